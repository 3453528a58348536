"""
The sm_90 prefill GEMM (runtime/fp8_hopper.py, Gluon, warp-specialized) against runtime.fp8's Triton GEMM, bf16
torch.matmul and torch._scaled_mm with blockwise scales, at 128 to 4096 tokens over every DeepSeek-V3 shape.

    python benchmarks/fp8_prefill.py          (on an H100/H200; about 2 minutes)

First checks it: every tile, one and two terms, several shapes (N and K not multiples of 128, N whose
rows TMA cannot store) and M, x whose rows and groups span orders of magnitude (a zero row, a group of tiny values),
a weight block scaled 1e4 above its neighbours, outputs poisoned with NaN, against a float64 product of the
dequantized operands, both called directly and through fp8.fp8_gemm's dispatch. Then times the GEMMs alone on
quantized x with fp8_gemm.py's harness (CUDA graphs cycling through weights over 3x the L2, medians): c2/c3 = one
term in tiles of 128/192 rows x 128 columns (2/3 consumer warpgroups), n256 = one term in 128 x 256 tiles, c2 t2 =
two terms; triton1/triton2 = fp8's own kernel with the shipped table; runtime1/runtime2 = what
fp8.fp8_gemm picks per shape (use_hopper_kernel, then hopper_tile). Prints per-shape microseconds (and TFLOP/s)
and the sums with their ratios.
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
# name: (terms, consumers, columns)
VARIANTS = {"c2": (1, 2, 128), "c3": (1, 3, 128), "n256": (1, 2, 256), "c2 t2": (2, 2, 128)}

print("== correctness (rel. error vs float64 of the dequantized operands; NaN-poisoned outputs)")
gen = torch.Generator(device=dev).manual_seed(1)
worst = {}
for (N, K) in [(576, 7168), (200, 384), (7168, 2048), (2112, 7168), (130, 304)]:
    w = (torch.randn(N, K, device=dev, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    ws = torch.rand(-(-N // 128), -(-K // 128), device=dev, generator=gen) * 1e-3 + 1e-4
    ws[0, -1] *= 1e4
    for M in [3, 130, 1000, 1500]:
        x = torch.randn(M, K, device=dev, generator=gen) * torch.rand(M, 1, device=dev, generator=gen) * 4
        x[0] = 0
        x[1] *= 1e3
        x[:, 128:256] *= 1e-3
        x = x.to(torch.bfloat16)
        for terms in (1, 2):
            q, s = fp8.act_quant(x, terms)
            ref = B.ref64(q, s, w, ws, terms)
            runs = {name: lambda out, c=c, bn=bn: fp8_hopper.prefill_gemm(q, s, w, ws, out, terms, c, bn)
                    for name, (t, c, bn) in VARIANTS.items() if t == terms}
            runs[f"dispatch{terms}"] = lambda out: fp8.fp8_gemm(q, s, w, ws, out=out, terms=terms)
            for name, run in runs.items():
                out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=dev)
                run(out)
                err = float((out.double() - ref).norm() / ref.norm()) if not out.isnan().any() else float("inf")
                worst[name] = max(worst.get(name, 0.0), err)
checked = " ".join(f"{k} {v:.2e}" for k, v in worst.items())
print(f"worst: {checked} ({time.time() - t0:.0f}s)")
assert max(worst.values()) < 6e-3, worst

print("== speed, GEMM alone on quantized x (us)")
cases = {name: B.Case(*nk) for name, nk in B.SHAPES.items()}


summary = []
for M in (4096, 1024, 512, 128):
    tot = {}
    for name, case in cases.items():
        t = {"bf16": B.time_bf16(case, M), "smm": B.time_scaled_mm(case, M)[0] or float("nan")}
        for v, (terms, c, bn) in VARIANTS.items():
            t[v] = B.time_prefill(fp8_hopper.prefill_gemm, case, M, terms, c, bn)
        for terms in (1, 2):            # an explicit config: the Triton kernel, whatever the M
            t[f"triton{terms}"] = B.time_ours(case, M, fp8.config_for(terms * M, case.N, case.K), True, terms)
            t[f"runtime{terms}"] = B.time_ours(case, M, prequant=True, terms=terms)
        for k, v in t.items():
            tot[k] = tot.get(k, 0) + v
        fl = 2 * M * case.N * case.K
        print(f"M={M} {name:14s} " + " ".join(f"{k} {v * 1e6:.1f}" for k, v in t.items()) + " | TFLOP/s " +
              " ".join(f"{k} {fl / t[k] / 1e12:.0f}" for k in ("smm", "c2", "c3", "n256", "runtime1")),
              flush=True)
    summary.append((M, tot))
print(f"({time.time() - t0:.0f}s)")
for M, tot in summary:
    print(f"SUM M={M}: " + " ".join(f"{k} {v * 1e6:.0f}" for k, v in tot.items()))
    print("   bf16 / x: " + " ".join(f"{k} {tot['bf16'] / v:.2f}" for k, v in tot.items()))
    print("   smm / x:  " + " ".join(f"{k} {tot['smm'] / v:.2f}" for k, v in tot.items()))
print(f"correctness: {checked}")
