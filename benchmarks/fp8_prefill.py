"""
The sm_90 prefill GEMM (runtime/fp8_hopper.py, Gluon, warp-specialized) against runtime.fp8's Triton GEMM, bf16
torch.matmul and torch._scaled_mm with blockwise scales, at 128, 512 and 4096 tokens over every DeepSeek-V3 shape.

    python benchmarks/fp8_prefill.py          (on an H100/H200)

First checks it: one and two terms, several shapes (N and K not multiples of 128 included) and M, outputs poisoned
with NaN, against a float64 product of the dequantized operands, both called directly and through fp8.fp8_gemm's
dispatch. Then times the GEMMs alone on quantized x with fp8_gemm.py's harness (CUDA graphs cycling through weights
over 3x the L2, medians): hopper1/hopper2 = one/two terms in 128-row tiles (two consumer warpgroups), "hopper1 c3" =
one term in 192-row tiles (three); triton1/triton2 = fp8's own kernel with the shipped table; runtime1/runtime2 =
what fp8.fp8_gemm picks per shape. Prints per-shape microseconds and the sums with their ratios.
Imports runtime/fp8*.py without the runtime package, so that the machine needs no ggml build.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp8_only import fp8, fp8_hopper  # noqa: E402  (first: before fp8_gemm imports runtime)
import fp8_gemm as B  # noqa: E402

dev = torch.device("cuda")
t0 = time.time()


print("== correctness (rel. error vs float64 of the dequantized operands; NaN-poisoned outputs)")
worst = 0.0
for (N, K) in [(576, 7168), (200, 384), (7168, 2048)]:
    w = (torch.randn(N, K, device=dev) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    ws = torch.rand(-(-N // 128), -(-K // 128), device=dev) * 1e-3 + 1e-4
    for M in [3, 130, 1000]:
        for terms in (1, 2):
            x = B.x_for(M, K)
            q, s = fp8.act_quant(x, terms)
            ref = B.ref64(q, s, w, ws, terms)
            out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=dev)
            fp8_hopper.prefill_gemm(q, s, w, ws, out, terms)
            if terms == 1:                                            # 192-row tiles
                wide = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=dev)
                fp8_hopper.prefill_gemm(q, s, w, ws, wide, terms, consumers=3)
                assert not wide.isnan().any() and float((wide.double() - ref).norm() / ref.norm()) < 6e-3
            disp = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=dev)
            fp8.fp8_gemm(q, s, w, ws, out=disp, terms=terms)          # the runtime's dispatch
            assert not disp.isnan().any() and float((disp.double() - ref).norm() / ref.norm()) < 6e-3
            tri = fp8.fp8_gemm(q, s, w, ws, fp8.config_for(terms * M, N, K), terms=terms)   # the Triton kernel
            e_ws = float((out.double() - ref).norm() / ref.norm())
            e_tr = float((tri.double() - ref).norm() / ref.norm())
            nan = bool(out.isnan().any())
            worst = max(worst, e_ws if not nan else 1.0)
            if M == 1000 or nan or e_ws > 6e-3:
                print(f"{N:>6}x{K:<6} M={M:<5} terms={terms} hopper {e_ws:.2e} triton {e_tr:.2e} nan={nan}")
print(f"worst hopper rel err {worst:.2e} ({time.time() - t0:.0f}s)")

print("== speed, GEMM alone on quantized x (us)")
cases = {name: B.Case(*nk) for name, nk in B.SHAPES.items()}


def time_ws(case, M, terms, **kw):
    x = B.x_for(M, case.K)
    q, s = fp8.act_quant(x, terms)
    out = torch.empty(M, case.N, dtype=torch.bfloat16, device=dev)
    r = len(case.w)
    return B.graph_time(lambda i: fp8_hopper.prefill_gemm(q, s, case.w[i % r], case.ws[i % r], out, terms, **kw),
                        case.calls())


def triton_config(case, M, terms):
    return fp8.config_for(terms * M, case.N, case.K)      # an explicit config: the Triton kernel, whatever the M


summary = []
for M in (4096, 512, 128):
    tot = {}
    for name, case in cases.items():
        t = {"bf16": B.time_bf16(case, M), "smm": B.time_scaled_mm(case, M)[0] or float("nan"),
             "triton1": B.time_ours(case, M, triton_config(case, M, 1), prequant=True, terms=1),
             "hopper1 s4": time_ws(case, M, 1, stages=4), "hopper1 c3": time_ws(case, M, 1, consumers=3, stages=4),
             "runtime1": B.time_ours(case, M, prequant=True, terms=1),
             "triton2": B.time_ours(case, M, triton_config(case, M, 2), prequant=True, terms=2),
             "hopper2 s4": time_ws(case, M, 2, stages=4), "runtime2": B.time_ours(case, M, prequant=True, terms=2)}
        for k, v in t.items():
            tot[k] = tot.get(k, 0) + v
        fl = 2 * M * case.N * case.K
        print(f"M={M} {name:14s} " + " ".join(f"{k} {v*1e6:.1f}" for k, v in t.items()) +
              f" | TF: hopper1 s4 {fl/t['hopper1 s4']/1e12:.0f} c3 {fl/t['hopper1 c3']/1e12:.0f}"
              f" smm {fl/t['smm']/1e12:.0f}", flush=True)
    summary.append((M, tot))
print(f"({time.time() - t0:.0f}s)")
for M, tot in summary:
    print(f"SUM M={M}: " + " ".join(f"{k} {v*1e6:.0f}" for k, v in tot.items()))
    print(f"   hopper1 s4/bf16 {tot['bf16']/tot['hopper1 s4']:.2f}x "
          f"c3/bf16 {tot['bf16']/tot['hopper1 c3']:.2f}x vs smm {tot['smm']/tot['hopper1 c3']:.2f}x "
          f"| RUNTIME 1 term {tot['bf16']/tot['runtime1']:.2f}x bf16 {tot['smm']/tot['runtime1']:.2f}x smm, "
          f"2 terms {tot['bf16']/tot['runtime2']:.2f}x bf16 | "
          f"hopper1 s4 vs smm {tot['smm']/tot['hopper1 s4']:.2f}x vs triton1 {tot['triton1']/tot['hopper1 s4']:.2f}x | "
          f"hopper2/bf16 {tot['bf16']/tot['hopper2 s4']:.2f}x vs triton2 {tot['triton2']/tot['hopper2 s4']:.2f}x | "
          f"triton1/bf16 {tot['bf16']/tot['triton1']:.2f}x smm/bf16 {tot['bf16']/tot['smm']:.2f}x")
