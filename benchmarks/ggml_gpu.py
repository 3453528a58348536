"""
runtime/ggml_gpu.py on the GPU, every figure against a bound measured in the same run:

- HBM copy bandwidth (a 2 GiB device-to-device copy, bytes read + written): the memory ceiling;
- bf16 matmul rate (torch.matmul, DeepSeek-V3 expert shapes on random data): the tensor-core ceiling;
- dequantize, each type: GB/s (GGML bytes read + float32 written) and its share of the copy bandwidth;
- decode: one token's 8 routed experts of DeepSeek-V3's shape (gate/up 2048 x 7168 Q4_K, down 7168 x 2048 Q6_K,
  28.5 MB each) through moe()'s GEMV path, captured in a CUDA graph that runs 8 such steps over different experts
  (1.8 GB, far past the L2): expert bytes / time as GB/s and its share of the copy bandwidth; over a few tile shapes
  (--quick: the module's default only); then T = 1..64 tokens through both paths (the DECODE_MAX_TOKENS crossover);
- prefill: 512, 2048, 8192, 32768 tokens, k = 8 of 256 experts all resident, through the grouped GEMM (over a few
  tile shapes; --quick: the module's default only) and the dense path (bf16 dequantization + torch's grouped GEMM):
  TFLOP/s (6 x hidden x inter per token-expert pair) against one bf16 torch.matmul of the same FLOPs; where they
  cross is DENSE_MIN_ROWS.

Before timing, a check: GEMV, GEMM and dense results against a float64 reference (one token, and 64 tokens).

    python -m benchmarks.ggml_gpu [--json] [--quick]        (from the repository root, on a GPU machine)

Imports runtime/ggml_gpu.py without the runtime package's __init__ (which imports ggml, which the GPU machine may lack).
Output: a table; with --json, one JSON object on the last line as well.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parent.parent
if "runtime" not in sys.modules:        # the package without its __init__, which imports ggml
    _pkg = types.ModuleType("runtime")
    _pkg.__path__ = [str(ROOT / "runtime")]
    sys.modules["runtime"] = _pkg
from runtime import ggml_gpu as GG  # noqa: E402

dev = torch.device("cuda")
HIDDEN, INTER, EXPERTS, K = 7168, 2048, 256, 8
F16_FIELDS = {GG.Q4_K: (0, 2), GG.Q5_K: (0, 2), GG.Q6_K: (208,), GG.Q8_0: (0,), GG.Q5_0: (0,)}
F16_SCALE = {GG.Q4_K: 2e-4, GG.Q5_K: 1e-4, GG.Q6_K: 5e-5, GG.Q8_0: 1e-3, GG.Q5_0: 6e-3}
# tile shapes swept: GEMV (rows, groups, warps), GEMM (BM, BN, groups, warps); none spills registers
# (benchmarks/ggml_gpu_sass.py --gemv / --gemm; a 256 x 64 GEMM tile does)
GEMV_CONFIGS = [(8, 8, 4), (4, 8, 4), (16, 8, 4), (8, 8, 8), (16, 8, 8), (8, 16, 4)]
GEMM_CONFIGS = [(64, 64, 2, 4), (128, 64, 2, 8), (64, 128, 2, 4), (128, 128, 2, 8), (128, 64, 4, 8)]


def random_stack(t, n, rows, cols, gen) -> GG.GpuStack:
    """Random GGML blocks on the GPU, fp16 scale fields set to sane finite values."""
    qk, nb = GG._layout(t)
    blocks = torch.randint(0, 256, (n * rows * cols // qk, nb), dtype=torch.uint8, device=dev, generator=gen)
    for at in F16_FIELDS[t]:
        d = (torch.rand(len(blocks), device=dev, generator=gen) + 0.5) * F16_SCALE[t]
        blocks[:, at:at + 2] = d.half().view(torch.uint8).view(-1, 2)
    return GG.GpuStack(blocks.view(n, rows, -1), t, rows, cols)


def bench_ms(fn, reps=20) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=max(100, reps * 10), return_mode="median")


def graph_ms(fn, reps=30) -> float:
    """Median ms of one replay of a CUDA graph of fn (captured after a warm-up call); do_bench if capture fails."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            fn()
    except RuntimeError as e:
        print(f"  (CUDA graph capture failed, timing eager launches: {str(e).splitlines()[0]})")
        torch.cuda.synchronize()
        return bench_ms(fn)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev).random_(0, 256)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6       # GB/s


def matmul_tflops(M, N, Kd, gen) -> float:
    a = torch.randn(M, Kd, device=dev, generator=gen).bfloat16()
    b = torch.randn(Kd, N, device=dev, generator=gen).bfloat16()
    return 2 * M * N * Kd / bench_ms(lambda: a @ b) / 1e9


def reference(x, ids, w, local, gate, up, down) -> torch.Tensor:
    wg, wu, wd = (GG.dequantize(s.data, s.ggml_type, s.cols).double() for s in (gate, up, down))
    e = local[ids.long()].long()
    out = torch.zeros(x.shape, dtype=torch.float64, device=dev)
    for t in range(len(x)):
        for j in range(ids.shape[1]):
            if e[t, j] >= 0:
                a, b = wg[e[t, j]] @ x[t].double(), wu[e[t, j]] @ x[t].double()
                out[t] += w[t, j].double() * (wd[e[t, j]] @ (a / (1 + torch.exp(-a)) * b))
    return out


def rel(a, b) -> float:
    return float(torch.linalg.norm(a.double() - b) / torch.linalg.norm(b))


def main():
    quick, as_json = "--quick" in sys.argv, "--json" in sys.argv
    gen = torch.Generator(device=dev).manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(f"{res['device']}, torch {res['torch']}, triton {res['triton']}")

    res["copy_GBps"] = bw = copy_bandwidth()
    print(f"HBM copy (read + write): {bw:.0f} GB/s")

    # --- check first: 8 resident experts of real shape, against float64
    n_check = 8
    stacks = (random_stack(GG.Q4_K, n_check, INTER, HIDDEN, gen), random_stack(GG.Q4_K, n_check, INTER, HIDDEN, gen),
              random_stack(GG.Q6_K, n_check, HIDDEN, INTER, gen))
    local = torch.arange(n_check, dtype=torch.int32, device=dev)
    check = {}
    for method, T in (("gemv", 1), ("gemm", 64), ("dense", 64)):
        x = torch.randn(T, HIDDEN, device=dev, generator=gen)
        ids = torch.stack([torch.randperm(n_check, device=dev, generator=gen) for _ in range(T)])
        w = torch.rand(T, n_check, device=dev, generator=gen)
        out = GG.moe(x, ids, w, local, *stacks, method=method)
        check[method] = rel(out, reference(x, ids, w, local, *stacks))
        print(f"check {method} T={T}: rel err vs float64 {check[method]:.2e}")
    res["check_rel_err"] = check
    assert check["gemv"] < 1e-4 and check["gemm"] < 1.5e-2 and check["dense"] < 1.5e-2, check
    del stacks

    # --- dequantize: 16 experts' worth of rows per type
    res["dequant"] = {}
    for t in (GG.Q4_K, GG.Q5_K, GG.Q6_K, GG.Q8_0, GG.Q5_0):
        s = random_stack(t, 16, INTER, HIDDEN, gen)
        ms = bench_ms(lambda: GG.dequantize(s.data, t, HIDDEN))
        gbps = (s.data.numel() + 16 * INTER * HIDDEN * 4) / ms / 1e6
        res["dequant"][GG.NAMES[t]] = {"GBps": gbps, "of_copy": gbps / bw}
        print(f"dequantize {GG.NAMES[t]}: {gbps:.0f} GB/s ({gbps / bw:.0%} of copy)")
        del s

    # --- decode: 64 resident experts, 8 steps of one token over 8 disjoint sets of 8
    n_local = 64
    gate, up = random_stack(GG.Q4_K, n_local, INTER, HIDDEN, gen), random_stack(GG.Q4_K, n_local, INTER, HIDDEN, gen)
    down = random_stack(GG.Q6_K, n_local, HIDDEN, INTER, gen)
    expert_bytes = sum(s.data[0].numel() for s in (gate, up, down))
    local = torch.full((EXPERTS,), -1, dtype=torch.int32, device=dev)
    here = torch.randperm(EXPERTS, device=dev, generator=gen)[:n_local]
    local[here] = torch.arange(n_local, dtype=torch.int32, device=dev)
    steps = 8

    def decode_case(T):
        xs = [torch.randn(T, HIDDEN, device=dev, generator=gen) for _ in range(steps)]
        ids = [here[torch.randperm(n_local, device=dev, generator=gen)[:T * K]].view(T, K) if T * K <= n_local else
               here[torch.randint(0, n_local, (T, K), device=dev, generator=gen)] for _ in range(steps)]
        ws = [torch.rand(T, K, device=dev, generator=gen) for _ in range(steps)]
        return xs, ids, ws

    xs, ids, ws = decode_case(1)
    ids = [here[s * 8:(s + 1) * 8].view(1, K) for s in range(steps)]     # one token: 8 disjoint sets of 8 experts
    res["decode_1tok"] = {}
    default = GG.GEMV["cuda"]
    for cfg in [default] + ([] if quick else [c for c in GEMV_CONFIGS if c != default]):
        GG.GEMV["cuda"] = cfg
        ms = graph_ms(lambda: [GG.moe(xs[s], ids[s], ws[s], local, gate, up, down, method="gemv")
                               for s in range(steps)]) / steps
        gbps = 8 * expert_bytes / ms / 1e6
        res["decode_1tok"][str(cfg)] = {"us": ms * 1e3, "GBps": gbps, "of_copy": gbps / bw}
        print(f"decode 1 token, 8 experts (GEMV rows/groups/warps {cfg}): {ms * 1e3:.1f} us, {gbps:.0f} GB/s "
              f"({gbps / bw:.0%} of copy)")
    best = min(res["decode_1tok"], key=lambda c: res["decode_1tok"][c]["us"])
    GG.GEMV["cuda"] = default

    res["decode_tokens"] = {}
    for T in (1, 2, 4, 8, 16, 32, 64):
        xs, ids, ws = decode_case(T)
        row = {}
        for method in ("gemv", "gemm"):
            row[method] = graph_ms(lambda: [GG.moe(xs[s], ids[s], ws[s], local, gate, up, down, method=method)
                                            for s in range(steps)]) / steps * 1e3
        res["decode_tokens"][T] = row
        print(f"decode T={T:3d}: gemv {row['gemv']:8.1f} us, gemm {row['gemm']:8.1f} us")
    del gate, up, down

    # --- prefill: all 256 experts resident, k = 8
    gate, up = random_stack(GG.Q4_K, EXPERTS, INTER, HIDDEN, gen), random_stack(GG.Q4_K, EXPERTS, INTER, HIDDEN, gen)
    down = random_stack(GG.Q6_K, EXPERTS, HIDDEN, INTER, gen)
    local = torch.arange(EXPERTS, dtype=torch.int32, device=dev)
    res["prefill"] = {}
    default = GG.GEMM["cuda"]
    for T in (512, 2048, 8192, 32768):
        x = torch.randn(T, HIDDEN, device=dev, generator=gen)
        ids = torch.rand(T, EXPERTS, device=dev, generator=gen).topk(K, dim=1).indices
        w = torch.rand(T, K, device=dev, generator=gen)
        flops = 6 * T * K * HIDDEN * INTER
        base = matmul_tflops(T * K, 3 * INTER, HIDDEN, gen)        # same FLOPs: (pairs, hidden) x (hidden, 3 inter)
        row = {"bf16_matmul_TFLOPs": base}
        for cfg in [default] + ([] if quick else [c for c in GEMM_CONFIGS if c != default]):
            GG.GEMM["cuda"] = cfg
            ms = bench_ms(lambda: GG.moe(x, ids, w, local, gate, up, down, method="gemm"))
            row[str(cfg)] = {"ms": ms, "TFLOPs": flops / ms / 1e9, "of_bf16": flops / ms / 1e9 / base}
            print(f"prefill T={T} (GEMM BM/BN/groups/warps {cfg}): {ms:.2f} ms, {flops / ms / 1e9:.0f} TFLOP/s "
                  f"({flops / ms / 1e9 / base:.0%} of bf16 matmul, {base:.0f} TFLOP/s)")
        GG.GEMM["cuda"] = default
        ms = bench_ms(lambda: GG.moe(x, ids, w, local, gate, up, down, method="dense"))
        row["dense"] = {"ms": ms, "TFLOPs": flops / ms / 1e9, "of_bf16": flops / ms / 1e9 / base}
        print(f"prefill T={T} (dense: bf16 dequantization + grouped GEMM): {ms:.2f} ms, "
              f"{flops / ms / 1e9:.0f} TFLOP/s ({flops / ms / 1e9 / base:.0%} of bf16 matmul)")
        res["prefill"][T] = row

    one = res["decode_1tok"][str(GG.GEMV["cuda"])]
    print(f"\nsummary ({res['device']}): copy {bw:.0f} GB/s; decode 1 token {one['GBps']:.0f} GB/s "
          f"({one['of_copy']:.0%}), best GEMV config {best}; prefill 8192 "
          f"{res['prefill'][8192][str(default)]['of_bf16']:.0%} of bf16 matmul")
    if as_json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
