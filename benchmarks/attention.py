"""
runtime.attention on DeepSeek-V3's MLA shape (128 heads, kv_lora 512, rope 64, nope 128, v 128; bf16 cache).

    python benchmarks/attention.py [--json out.json] [--quick] [--sweep]

Decode: a step of B = 1, 4, 16 rows at position P = 1K, 8K, 32K, 128K (each row its own slot, all at P), timed as
`step` (mla_attend as the model calls it: absorb q through W_kb, the split-KV kernel, its merge, W_vb; for one row
the merge rides in the W_vb product, and the step is timed with the merge apart too), `kernel` (the split kernel and
its merge as two kernels) and `split` (the split kernel alone), each captured into a CUDA graph whose calls cycle
(whole cycles) through enough slots to exceed 3x the L2 (every layer reads its own cache), median of replays, each
queued behind another (the host's launch of the graph is not in the time). `attention` = kernel, less what the
merge in W_vb saves the step (step with the merge apart - step). GB/s = the cache bytes the rows must read
(B x P x 576 x 2) over the attention time, against a 2 GiB device copy (read + written) in the same run. `span`: the
step at 1K under a graph span (bound) of 128K, over the one at span 1K: the kernel follows each row's length, not
the span. Check first: real shapes against a float64 reference, outputs poisoned.
Prefill: chunks of 512, 2K, 8K tokens at offsets 0 and 24K through the forms (SDPA on the expanded form, the
absorbed Triton kernel), TFLOP/s of each form's own work (causal: the chunk's rows see offset + (t + 1) keys) against
a bf16 8192^3 matmul; `picked` is what prefill_form chooses.
`cudnn`: the expanded form through cuDNN's fused attention (SDPA_BACKEND "cudnn") instead of torch's flash kernel.
--quick: B = 1 and 16, P = 1K and 32K. --sweep: also time decode launch shapes at 32K (B = 1,
16) and prefill launch shapes at 2K tokens, offset 24K.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp8_only import fp8  # noqa: E402,F401  (first: the runtime package without ggml)
import fp8_gemm as G  # noqa: E402
from runtime import attention as A  # noqa: E402

dev = torch.device("cuda")
H, DL, DR, NOPE, VD = 128, 512, 64, 128, 128
SCALE = (NOPE + DR) ** -0.5
ROW = (DL + DR) * 2                         # cache bytes per position


def weights():
    g = torch.Generator(device=dev).manual_seed(1)
    w = lambda *s: (torch.randn(*s, device=dev, generator=g) * DL ** -0.5).to(torch.bfloat16)
    return w(H, NOPE, DL), w(H, VD, DL)


def caches(slots: int, length: int):
    kv = torch.randn(slots, length, DL, device=dev).to(torch.bfloat16)
    pe = torch.randn(slots, length, DR, device=dev).to(torch.bfloat16)
    return kv, pe


def check(w_kb, w_vb) -> float:
    """Decode (rows at their own lengths, crossing splits) and both prefill forms (the expanded one in pieces of
    1024 keys), vs float64; returns the worst."""
    kv, pe = caches(3, 5000)
    worst = 0.0
    d = lambda x: x.double()

    def ref(q_nope, q_pe, slot, p):
        k = torch.cat([torch.einsum("sc,hdc->hsd", d(kv[slot, :p + 1]), d(w_kb)),
                       d(pe[slot, :p + 1]).expand(H, -1, -1)], -1)
        v = torch.einsum("sc,hdc->hsd", d(kv[slot, :p + 1]), d(w_vb))
        att = torch.softmax(torch.einsum("hd,hsd->hs", torch.cat([d(q_nope), d(q_pe)], -1), k) * SCALE, -1)
        return torch.einsum("hs,hsd->hd", att, v)

    def err(out, rows):
        assert not out.isnan().any(), "unwritten output"
        r = torch.stack(rows)
        return float((out.double() - r).norm() / r.norm())

    pos, slots = torch.tensor([4999, 17, 1300], device=dev), torch.tensor([1, 2, 0], device=dev)
    qn, qp = torch.randn(3, H, NOPE, device=dev), torch.randn(3, H, DR, device=dev)
    rows = [ref(qn[i], qp[i], int(slots[i]), int(pos[i])) for i in range(3)]
    out = A.mla_attend(qn, qp, kv, pe, slots, pos, w_kb, w_vb, SCALE, 5000)
    worst = max(worst, err(out, rows))
    for i in range(3):                              # one row: the merge inside the W_vb product (merge_vb)
        out = A.mla_attend(qn[i:i + 1], qp[i:i + 1], kv, pe, slots[i:i + 1], pos[i:i + 1], w_kb, w_vb, SCALE, 5000)
        worst = max(worst, err(out, rows[i:i + 1]))
    A.EXPAND_KEYS, keys = 1024, A.EXPAND_KEYS
    for p0, T in [(0, 700), (4000, 1000), (4900, 100)]:
        qn, qp = torch.randn(T, H, NOPE, device=dev), torch.randn(T, H, DR, device=dev)
        pos = torch.arange(p0, p0 + T, device=dev)
        rows = [ref(qn[t], qp[t], 2, p0 + t) for t in range(0, T, 97)]
        for f in (A.prefill_sdpa(qn, qp, kv, pe, 2, p0 + T, w_kb, w_vb, SCALE),
                  cudnn_sdpa(qn, qp, kv, pe, 2, p0 + T, w_kb, w_vb, SCALE),
                  A.prefill_triton(qn, qp, kv, pe, 2, pos, w_kb, w_vb, SCALE)):
            worst = max(worst, err(f[::97], rows))
    A.EXPAND_KEYS = keys
    assert worst < 1e-2, worst
    return worst


def time_decode(w_kb, w_vb, B: int, P: int, bound: int, cfg: dict = A.DECODE) -> dict:
    """Step and kernel times of B rows at position P - 1 (P keys each), the launch's span `bound`. Where the merge
    rides in the W_vb product (merge_vb), the step is also timed with it as a kernel of its own (`step_sep_us`), and
    attention's time (`attn_us`) is its two kernels' less what the fused merge saves the step; elsewhere it is the
    two kernels' time."""
    copies = max(1, -(-3 * G.L2 // (B * P * ROW)))
    kv, pe = caches(B * copies, max(P, 1))
    pos = torch.full((B,), P - 1, dtype=torch.long, device=dev)
    slot_sets = [torch.arange(i * B, (i + 1) * B, device=dev) for i in range(copies)]
    qn, qp = torch.randn(B, H, NOPE, device=dev), torch.randn(B, H, DR, device=dev)
    calls = copies * -(-8 // copies)         # whole cycles: a replay after a replay rereads no recent slot

    def step(c):
        return G.graph_time(lambda i: A.decode_triton(qn, qp, kv, pe, slot_sets[i % copies], pos, w_kb, w_vb, SCALE,
                                                      bound, c), calls)
    splits = A.decode_splits(B, H, bound, dev, cfg)
    fused = A.merges_in_vb(B, splits, cfg)
    t_step = step(cfg)
    t_sep = step(dict(cfg, MERGE_VB_ROWS=0)) if fused else t_step
    q_lat, q_rope = A._absorb(qn, qp, w_kb)
    kernel = G.graph_time(lambda i: A._attend_latent(q_lat, q_rope, kv, pe, slot_sets[i % copies], pos, SCALE,
                                                     splits, 1, cfg["BLOCK_H"], cfg), calls)
    split = G.graph_time(lambda i: A._attend_latent(q_lat, q_rope, kv, pe, slot_sets[i % copies], pos, SCALE,
                                                    splits, 1, cfg["BLOCK_H"], cfg, combine=False), calls)
    del kv, pe
    attn = kernel - (t_sep - t_step)
    return {"B": B, "P": P, "bound": bound, "splits": splits, "merge_vb": fused, "step_us": t_step * 1e6,
            "step_sep_us": t_sep * 1e6, "attn_us": attn * 1e6, "kernel_us": kernel * 1e6, "split_us": split * 1e6,
            "gbs": B * P * ROW / attn / 1e9}


def event_time(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def cudnn_sdpa(*a):
    """prefill_sdpa with cuDNN's fused attention (A.SDPA_BACKEND = "cudnn") for this call."""
    keep, A.SDPA_BACKEND = A.SDPA_BACKEND, "cudnn"
    try:
        return A.prefill_sdpa(*a)
    finally:
        A.SDPA_BACKEND = keep


def time_prefill(w_kb, w_vb, T: int, offset: int, cfg: dict = A.PREFILL, forms=("sdpa", "cudnn", "triton")) -> dict:
    S = offset + T
    kv, pe = caches(1, S)
    qn, qp = torch.randn(T, H, NOPE, device=dev), torch.randn(T, H, DR, device=dev)
    pos = torch.arange(offset, S, device=dev)
    pairs = T * offset + T * (T + 1) / 2                          # (row, key) pairs a causal chunk computes
    flops = {"sdpa": 2 * pairs * H * (NOPE + DR + VD) + 2 * S * H * (NOPE + VD) * DL,
             "triton": 2 * pairs * H * (DL + DR + DL)}
    flops["cudnn"] = flops["sdpa"]
    run = {"sdpa": lambda: A.prefill_sdpa(qn, qp, kv, pe, 0, S, w_kb, w_vb, SCALE),
           "cudnn": lambda: cudnn_sdpa(qn, qp, kv, pe, 0, S, w_kb, w_vb, SCALE),
           "triton": lambda: A.prefill_triton(qn, qp, kv, pe, 0, pos, w_kb, w_vb, SCALE, cfg)}
    r = {"T": T, "offset": offset, "picked": A.prefill_form(T)}
    for f in forms:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = event_time(run[f])
        r[f + "_ms"], r[f + "_tflops"] = t * 1e3, flops[f] / t / 1e12
        r[f + "_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return r


# Launch shapes --sweep times (GLUON: runtime.attention_hopper's kernel; the Triton ones: benchmarks/attention_sass.py
# builds each for sm_90a, the BLOCK_N 64 ones spill 272-472 bytes, the BLOCK_H 32 one runs the older HMMA products
# without spills).
DECODE_SWEEP = [dict(A.DECODE, **v) for v in (
    {}, {"GLUON": False}, {"GLUON": False, "BLOCK_N": 32, "num_stages": 3}, {"GLUON": False, "KEYS_MAJOR": True},
    {"MIN_KEYS": 256}, {"MIN_KEYS": 64}, {"WAVES": 2}, {"GLUON": False, "BLOCK_H": 32, "num_warps": 4, "WAVES": 2})]
PREFILL_SWEEP = [dict(A.PREFILL, **v) for v in (
    {}, {"KEYS_MAJOR": True}, {"BLOCK_N": 64}, {"num_stages": 3}, {"ROWS": 32, "num_warps": 4})]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", type=Path)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    t0 = time.time()
    ceil = G.ceilings()
    w_kb, w_vb = weights()
    worst = check(w_kb, w_vb)
    props = torch.cuda.get_device_properties(dev)
    print(f"{props.name}, {props.multi_processor_count} SMs, L2 {G.L2 >> 20} MiB, torch {torch.__version__}; "
          f"device copy {ceil['copy_gbs']:.0f} GB/s, bf16 matmul {ceil['bf16_tflops']:.0f} TFLOP/s; "
          f"check vs float64: worst relative error {worst:.2e}; cuDNN attention: "
          f"{'runs' if A._cudnn_error is None else A._cudnn_error}", flush=True)
    Bs, Ps = ((1, 16), (1024, 32768)) if args.quick else ((1, 4, 16), (1024, 8192, 32768, 131072))
    decode = [time_decode(w_kb, w_vb, B, P, P) for B in Bs for P in Ps]
    span = {B: time_decode(w_kb, w_vb, B, 1024, 131072) for B in Bs}
    chunks = (512, 2048, 8192)
    prefill = [time_prefill(w_kb, w_vb, T, off) for off in (0, 24576) for T in chunks]
    sweep = {"decode": [], "prefill": []}
    if args.sweep:
        for cfg in DECODE_SWEEP:
            for B, P in ((1, 1024), (1, 32768), (16, 32768)):
                try:
                    sweep["decode"].append(dict(time_decode(w_kb, w_vb, B, P, P, cfg), cfg=cfg))
                except Exception as e:                        # a shape that does not compile: say which
                    sweep["decode"].append({"B": B, "cfg": cfg, "error": str(e).splitlines()[0][:200]})
        for cfg in PREFILL_SWEEP:
            try:
                sweep["prefill"].append(dict(time_prefill(w_kb, w_vb, 2048, 24576, cfg, ("triton",)), cfg=cfg))
            except Exception as e:
                sweep["prefill"].append({"cfg": cfg, "error": str(e).splitlines()[0][:200]})

    print("\ndecode (span = P):   B       P  splits  merge    step us  (merge apart)  kernel us  (split)  "
          "attention us    GB/s  %copy   step/step@1K")
    first = {}
    for r in decode:                                          # each B's step at the shortest context
        first.setdefault(r["B"], r["step_us"])
    for r in decode:
        print(f"{'':20s}{r['B']:3d} {r['P']:7d} {r['splits']:7d} {'in W_vb' if r['merge_vb'] else 'apart':>7s} "
              f"{r['step_us']:8.1f} {r['step_sep_us']:14.1f} {r['kernel_us']:10.1f} {r['split_us']:8.1f} "
              f"{r['attn_us']:13.1f} {r['gbs']:7.0f} {100 * r['gbs'] / ceil['copy_gbs']:6.1f} "
              f"{r['step_us'] / first[r['B']]:14.2f}")
    for B, r in span.items():
        print(f"span 128K at 1K, B={B:2d}: step {r['step_us']:.1f} us ({r['splits']} splits), "
              f"{r['step_us'] / first[B]:.2f}x the step at span 1K")
    print("\nprefill:   T  offset  picked   sdpa ms  TFLOP/s  +GiB  cudnn ms  TFLOP/s   triton ms  TFLOP/s  +GiB   "
          "triton/sdpa")
    for r in prefill:
        print(f"{r['T']:10d} {r['offset']:7d} {r['picked']:>7s} {r['sdpa_ms']:9.2f} {r['sdpa_tflops']:8.0f} "
              f"{r['sdpa_extra_gib']:5.1f} {r['cudnn_ms']:9.2f} {r['cudnn_tflops']:8.0f} "
              f"{r['triton_ms']:11.2f} {r['triton_tflops']:8.0f} "
              f"{r['triton_extra_gib']:5.1f} {r['triton_ms'] / r['sdpa_ms']:12.2f}")
    for r in sweep["decode"]:
        cfg = {k: v for k, v in r["cfg"].items() if A.DECODE.get(k) != v} or "default"
        print(f"sweep decode P={r.get('P', 32768):5d} B={r['B']:2d} {cfg}: " + (r["error"] if "error" in r else
              f"kernel {r['kernel_us']:.1f} us (split kernel {r['split_us']:.1f}), {r['gbs']:.0f} GB/s, "
              f"step {r['step_us']:.1f} us"))
    for r in sweep["prefill"]:
        cfg = {k: v for k, v in r["cfg"].items() if A.PREFILL.get(k) != v} or "default"
        print(f"sweep prefill 2K@24K {cfg}: " + (r["error"] if "error" in r else
              f"triton {r['triton_ms']:.2f} ms, {r['triton_tflops']:.0f} TFLOP/s"))
    print(f"({time.time() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"device": props.name, "ceilings": ceil, "check_worst": worst,
                                         "decode": decode, "span": list(span.values()), "prefill": prefill,
                                         "sweep": sweep}, indent=1))


if __name__ == "__main__":
    main()
