"""
runtime.fp8's block-scaled FP8 GEMM against bf16 torch.matmul (cuBLAS) and torch._scaled_mm with blockwise scales
(cuBLAS, where the installed torch has it), over every DeepSeek-V3 linear shape and M in {1, 4, 16, 64, 128, 512, 4096}.

    python benchmarks/fp8_gemm.py [--json out.json] [--tune runtime/fp8_configs.json] [--quick]

Timing: each measured call is captured R times into one CUDA graph, the R calls cycling through enough copies of the
weights to exceed 3x the L2 cache (decode streams weights from HBM, as in the model, where every layer has its own);
the graph is replayed 15 times (CUDA events) and the median replay / R is the time per call. Inputs are fresh random
data, never zeros.
Columns: ours = the whole linear from bf16 x as the runtime runs it (fp8.fp8_linear: on sm_90 one token in one
launch of fp8_hopper's decode kernel; else act_quant + GEMM, the GEMM being the Hopper prefill kernel where
fp8.use_hopper_kernel says so and the GPU is sm_90), with activations in two e4m3 terms (the runtime's default) and
in one (DeepSeek's scheme); gemm = our GEMM alone on pre-quantized x, one term, the like-for-like match for
_scaled_mm, which also takes one-term quantized x. Ratios are time(baseline) / time(ours). TFLOP/s (of one term) and
GB/s (weights + x + y bytes, of two) of ours against ceilings measured in the same run: an 8192^3 bf16 matmul, an
8192^3 per-tensor fp8 _scaled_mm, a 2 GiB device copy (bytes read + written). All shapes' decode sizes are timed
before any prefill size.
--tune: first sweep launch configs per shape and bucket of quantized-x rows (same harness; one row = one-term M=1,
two rows and up = two-term tokens, the default), write the winners to the given file (the table runtime.fp8 ships),
then benchmark with it. Buckets not measured take the nearest measured one's winner.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runtime import fp8  # noqa: E402

SHAPES = {"q_a+kv_a": (2112, 7168), "kv_a": (576, 7168), "q_a": (1536, 7168), "q_b": (24576, 1536),
          "kv_b": (32768, 512), "o": (7168, 16384), "shared gate+up": (4096, 7168), "shared down": (7168, 2048),
          "dense gate/up": (18432, 7168), "dense down": (7168, 18432)}
MS = [1, 4, 16, 64, 128, 512, 4096]
TUNE_ROWS = [1, 2, 16, 128, 512, 4096]
BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
dev = torch.device("cuda")
L2 = torch.cuda.get_device_properties(dev).L2_cache_size
SMS = torch.cuda.get_device_properties(dev).multi_processor_count


def graph_time(fn, calls: int, replays: int = 15) -> float:
    """Seconds per call: `fn(i)` for i < calls captured into one graph, median of replays. Each timed replay is queued
    behind another, so it starts as soon as the GPU is free and the host's launch of the graph is not in its time."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(min(calls, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    del g
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    return max(2, -(-3 * L2 // nbytes))


class Case:
    """One (N, K) shape: rotating copies of FP8 weights + scales and of bf16 weights, all fresh random."""

    def __init__(self, N: int, K: int):
        self.N, self.K = N, K
        r = copies_for(N * K)
        self.w = [(torch.randn(N, K, device=dev) * 64).clamp(-448, 448).to(torch.float8_e4m3fn) for _ in range(r)]
        self.ws = [torch.rand(-(-N // 128), -(-K // 128), device=dev) * 1e-3 + 1e-4 for _ in range(r)]
        self.rb = copies_for(2 * N * K)
        self.wb = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(self.rb)]

    def calls(self) -> int:
        return max(len(self.w), 20)


def x_for(M: int, K: int) -> torch.Tensor:
    return (torch.randn(M, K, device=dev) * torch.rand(M, 1, device=dev) * 4).to(torch.bfloat16)


def time_ours(case: Case, M: int, cfg: fp8.Config | None = None, prequant: bool = False, terms: int = 2) -> float:
    x = x_for(M, case.K)            # cfg None: the kernel and config the runtime picks (fp8.fp8_gemm's dispatch)
    out = torch.empty(M, case.N, dtype=torch.bfloat16, device=dev)
    r = len(case.w)
    if prequant:
        q, s = fp8.act_quant(x, terms)
        return graph_time(lambda i: fp8.fp8_gemm(q, s, case.w[i % r], case.ws[i % r], cfg, out=out, terms=terms),
                          case.calls())
    if cfg is None:                 # the runtime's own call (fp8_linear: on sm_90 a few tokens take one launch)
        return graph_time(lambda i: fp8.fp8_linear(x, case.w[i % r], case.ws[i % r], terms, out=out), case.calls())
    return graph_time(lambda i: fp8.fp8_gemm(*fp8.act_quant(x, terms), case.w[i % r], case.ws[i % r], cfg, out=out,
                                             terms=terms), case.calls())


def time_prefill(prefill_gemm, case: Case, M: int, terms: int, *args, **kw) -> float:
    """A fp8_hopper.prefill_gemm (or a copy's) alone on quantized x; args, kw: its tile and the rest."""
    q, s = fp8.act_quant(x_for(M, case.K), terms)
    out = torch.empty(M, case.N, dtype=torch.bfloat16, device=dev)
    r = len(case.w)
    return graph_time(lambda i: prefill_gemm(q, s, case.w[i % r], case.ws[i % r], out, terms, *args, **kw),
                      case.calls())


def ref64(q, s, w, ws, terms):
    """float64 product of the dequantized operands, terms summed."""
    MA, K = q.shape
    a = q.double() * s.double().repeat_interleave(128, 1)[:, :K]
    y = a @ fp8.dequantize_weight(w, ws).T
    return y.view(MA // terms, terms, -1).sum(1)


def time_bf16(case: Case, M: int) -> float:
    x = x_for(M, case.K)
    out = torch.empty(M, case.N, dtype=torch.bfloat16, device=dev)
    return graph_time(lambda i: torch.matmul(x, case.wb[i % case.rb].T, out=out), max(case.rb, 20))


def scaled_mm_blockwise(q, s, w, ws):
    """torch._scaled_mm with 1x128 activation and 128x128 weight scales; cuBLAS wants M a multiple of 4 and the
    activation scales outer-dim-major."""
    return torch._scaled_mm(q, w.T, scale_a=s.T.contiguous().T, scale_b=ws.T, out_dtype=torch.bfloat16)


def time_scaled_mm(case: Case, M: int) -> tuple[float | None, str]:
    Mp = -(-M // 4) * 4
    x = x_for(Mp, case.K)
    q, s = fp8.act_quant(x)
    r = len(case.w)
    try:
        y = scaled_mm_blockwise(q, s, case.w[0], case.ws[0])
        ref = fp8.fp8_gemm(q, s, case.w[0], case.ws[0])
        err = float((y.float() - ref.float()).norm() / ref.float().norm())
        if not err < 1e-2:
            return None, f"disagrees with ours by {err:.1e}"
    except (RuntimeError, TypeError) as e:
        return None, str(e).splitlines()[0][:80]
    return graph_time(lambda i: scaled_mm_blockwise(q, s, case.w[i % r], case.ws[i % r]), case.calls()), ""


def ceilings() -> dict:
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    t = graph_time(lambda i: torch.matmul(a, b), 5)
    af, bf = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)
    t8 = graph_time(lambda i: torch._scaled_mm(af, bf.T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), 5)
    src = torch.randn(1 << 29, device=dev)                       # 2 GiB
    dst = torch.empty_like(src)
    tc = graph_time(lambda i: dst.copy_(src), 5)
    return {"bf16_tflops": 2 * 8192 ** 3 / t / 1e12, "fp8_tflops": 2 * 8192 ** 3 / t8 / 1e12,
            "copy_gbs": 2 * (1 << 31) / tc / 1e9}


def candidates(M: int, N: int, K: int) -> list[fp8.Config]:
    out = []
    if M <= 64:
        for BN in (32, 64, 128):                  # one M tile for all rows, as runtime.fp8.config_for runs them
            for split in (1, 2, 4, 8, 16):
                for stages in (3, 5, 7):
                    out.append(fp8.Config(fp8.rows_tile(M), BN, split, 4, stages, 1))
    else:
        for BM, BN, warps, stages in ((128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 3), (128, 128, 4, 4),
                                      (64, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4)):
            for split in ((1, 2) if M <= 512 else (1,)):
                for step in (1, 2):
                    out.append(fp8.Config(BM, BN, split, warps, stages, 8, STEP=step))
    return [c for c in out if c.fits(M, N, K)]


def tune(path: Path, ms: list[int]) -> None:
    """ms: rows of quantized x; 1 is timed as one token in one term, more as ms/2 tokens in two terms."""
    table = {}
    for name, (N, K) in SHAPES.items():
        case = Case(N, K)
        timed = {}
        for M in ms:
            results = []
            for cfg in candidates(M, N, K):
                try:
                    results.append((time_ours(case, max(M // 2, 1), cfg, terms=1 if M == 1 else 2), cfg))
                except Exception as e:  # a config Triton cannot build for this chip: skip it, say so
                    print(f"  skip {cfg}: {type(e).__name__} {str(e).splitlines()[0][:80]}")
            timed[M] = sorted(results, key=lambda r: r[0])
            print(f"tune {name:15s} M={M:5d}: {timed[M][0][0] * 1e6:9.1f} us  {timed[M][0][1]}", flush=True)
        table[f"{N}x{K}"] = {}
        for b in BUCKETS:                   # the nearest measured M's fastest config that fits the whole bucket
            near = min(ms, key=lambda m: (abs(m.bit_length() - b.bit_length()), m))
            table[f"{N}x{K}"][str(b)] = vars(next(c for _, c in timed[near] if c.fits(b, N, K)))
        del case
        torch.cuda.empty_cache()
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d"), "configs": table}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    fp8._table = None                                                  # use the new table from here on
    fp8.CONFIG_FILE = path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", type=Path)
    p.add_argument("--tune", type=Path, help="sweep configs first and write the table here")
    p.add_argument("--quick", action="store_true", help="M in {1, 4096} only")
    args = p.parse_args()
    ms = [1, 4096] if args.quick else MS
    if args.tune:
        tune(args.tune, TUNE_ROWS)
    rows = []
    cases = {name: Case(N, K) for name, (N, K) in SHAPES.items()}
    # M outermost: every shape's decode sizes are timed before any prefill size heats the GPU (whose clocks then
    # drop for a while: the M=1 calls timed right after measured up to 12% slower)
    for M in ms:
        for name, case in cases.items():
            N, K = case.N, case.K
            ours, ours1 = time_ours(case, M), time_ours(case, M, terms=1)
            gemm, bf = time_ours(case, M, prequant=True, terms=1), time_bf16(case, M)
            smm, why = time_scaled_mm(case, M)
            nbytes = N * K + 2 * M * K + 2 * M * N + 4 * (N // 128 + 1) * (K // 128 + 1)
            rows.append(dict(shape=name, N=N, K=K, M=M, ours_us=ours * 1e6, ours1_us=ours1 * 1e6, gemm_us=gemm * 1e6,
                             bf16_us=bf * 1e6, scaled_mm_us=smm * 1e6 if smm else None, scaled_mm_note=why,
                             tflops=2 * M * N * K / ours1 / 1e12, gbs=nbytes / ours / 1e9,
                             cfg=vars(fp8.config_for(2 * M, N, K)), cfg1=vars(fp8.config_for(M, N, K))))
    rows.sort(key=lambda r: list(SHAPES).index(r["shape"]))          # printed by shape, then M
    del cases
    torch.cuda.empty_cache()
    ceil = ceilings()                                                  # last: 8192^3 matmuls heat the GPU too
    print(f"{torch.cuda.get_device_name()}, {SMS} SMs, L2 {L2 >> 20} MiB, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}")
    print(f"ceilings: bf16 {ceil['bf16_tflops']:.0f} TFLOP/s, fp8 per-tensor {ceil['fp8_tflops']:.0f} TFLOP/s, "
          f"device copy {ceil['copy_gbs']:.0f} GB/s")
    print("\nours = 2 activation terms (default), ours1 = 1 term; gemm = 1 term, x pre-quantized; TFLOP/s of ours1, "
          "GB/s of ours")
    print(f"{'shape':15s} {'N x K':>12s} {'M':>5s} {'ours us':>8s} {'ours1 us':>8s} {'gemm us':>8s} {'bf16 us':>8s}"
          f" {'smm us':>8s} {'x bf16':>6s} {'1 x bf16':>8s} {'gemm/smm':>8s} {'TFLOP/s':>8s} {'%fp8':>5s} {'GB/s':>6s}"
          f" {'%copy':>5s}")
    for r in rows:
        smm = f"{r['scaled_mm_us']:8.1f}" if r["scaled_mm_us"] else f"{'n/a':>8s}"
        vs = f"{r['scaled_mm_us'] / r['gemm_us']:8.2f}" if r["scaled_mm_us"] else f"{'':>8s}"
        print(f"{r['shape']:15s} {r['N']:>5d}x{r['K']:<6d} {r['M']:5d} {r['ours_us']:8.1f} {r['ours1_us']:8.1f} "
              f"{r['gemm_us']:8.1f} {r['bf16_us']:8.1f} {smm} {r['bf16_us'] / r['ours_us']:6.2f} "
              f"{r['bf16_us'] / r['ours1_us']:8.2f} {vs} {r['tflops']:8.1f} "
              f"{100 * r['tflops'] / ceil['fp8_tflops']:5.1f} {r['gbs']:6.0f} {100 * r['gbs'] / ceil['copy_gbs']:5.1f}")
    print("\nsummed over the shapes (time of baseline / time of ours):")
    summary = {}
    for M in ms:
        sel = [r for r in rows if r["M"] == M]
        ours, bf = sum(r["ours_us"] for r in sel), sum(r["bf16_us"] for r in sel)
        ours1 = sum(r["ours1_us"] for r in sel)
        worst = min(sel, key=lambda r: r["bf16_us"] / r["ours_us"])
        worst1 = min(sel, key=lambda r: r["bf16_us"] / r["ours1_us"])
        with_smm = [r for r in sel if r["scaled_mm_us"]]
        line = (f"M={M:5d}: bf16 {bf:8.1f} us; 2 terms {ours:8.1f} us = {bf / ours:.2f}x bf16 (slowest "
                f"{worst['shape']} {worst['bf16_us'] / worst['ours_us']:.2f}x); 1 term {ours1:8.1f} us = "
                f"{bf / ours1:.2f}x (slowest {worst1['shape']} {worst1['bf16_us'] / worst1['ours1_us']:.2f}x)")
        s = {"ours_us": ours, "ours1_us": ours1, "bf16_us": bf, "x_bf16": bf / ours, "x_bf16_1term": bf / ours1,
             "worst_shape": worst["shape"], "worst_x_bf16": worst["bf16_us"] / worst["ours_us"],
             "worst_shape_1term": worst1["shape"], "worst_x_bf16_1term": worst1["bf16_us"] / worst1["ours1_us"]}
        if with_smm:
            g, sm = sum(r["gemm_us"] for r in with_smm), sum(r["scaled_mm_us"] for r in with_smm)
            s["gemm_x_scaled_mm"] = sm / g
            s["scaled_mm_x_bf16"] = sum(r["bf16_us"] for r in with_smm) / sm
            line += (f"; gemm vs _scaled_mm over its {len(with_smm)} shapes {sm / g:.2f}x "
                     f"(_scaled_mm itself {s['scaled_mm_x_bf16']:.2f}x bf16)")
        summary[M] = s
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "triton": __import__("triton").__version__, "ceilings": ceil,
                                         "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
