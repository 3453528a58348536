"""
The sm_90 decode linear (runtime/fp8_hopper.py's decode kernel: x quantized inside, one launch) against the
two-launch path it replaces (fp8.act_quant + fp8's split-K Triton GEMM with the shipped table) and bf16
torch.matmul, at 1, 2, 4 and 16 tokens over every DeepSeek-V3 shape, one and two activation terms.

    python benchmarks/fp8_decode.py [--sweep]          (on an H100/H200)

First checks it against a float64 product of the dequantized operands (x quantized by act_quant, which
tests/test_fp8.py holds to torch's rounding), outputs poisoned with NaN. Timing: fp8_gemm.py's harness (CUDA
graphs cycling through weights over 3x the L2, medians).
--sweep also times other (groups per program, weight stages) pairs at 1 and 2 tokens, to check
fp8_hopper.decode_variant's rule.
Imports runtime/fp8*.py without the runtime package, so that the machine needs no ggml build.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp8_only import fp8, fp8_hopper  # noqa: E402  (first: before fp8_gemm imports runtime)
import fp8_gemm as B  # noqa: E402

dev = torch.device("cuda")
SWEEP = "--sweep" in sys.argv
SWEEP_GS = [(2, 2), (4, 4), (8, 4), (8, 8), (16, 4), (16, 8)]          # (groups per program, stages)
MS = (1, 2, 4, 16)


def check():
    gen = torch.Generator(device=dev).manual_seed(0)
    worst = 0.0
    for N, K in [(576, 7168), (24576, 1536), (7168, 16384), (32768, 512), (130, 304)]:
        w = (torch.randn(N, K, device=dev, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        ws = torch.rand(-(-N // 128), -(-K // 128), device=dev, generator=gen) * 1e-3 + 1e-4
        for M in (1, 3, 16):
            x = (torch.randn(M, K, device=dev, generator=gen) * 3).to(torch.bfloat16)
            for terms in (1, 2):
                ref = B.ref64(*fp8.act_quant(x, terms), w, ws, terms).cpu()    # act_quant: torch's rounding
                out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=dev)
                fp8_hopper.decode_linear(x, w, ws, out, terms, *fp8._workspace(dev))
                err = float((out.cpu().double() - ref).norm() / ref.norm())
                assert not out.isnan().any() and err < 6e-3, (N, K, M, terms, err)
                worst = max(worst, err)
    print(f"check: decode kernel vs float64 (x quantized as act_quant), 5 shapes x M 1/3/16 x 1-2 terms: worst "
          f"relative error {worst:.2e} (bound 6e-3)")


def time_decode(case, M, terms, groups=None, stages=None):
    x = B.x_for(M, case.K)
    out = torch.empty(M, case.N, dtype=torch.bfloat16, device=dev)
    part, locks = fp8._workspace(dev)
    r = len(case.w)
    return B.graph_time(lambda i: fp8_hopper.decode_linear(x, case.w[i % r], case.ws[i % r], out, terms, part, locks,
                                                            groups, stages), case.calls())


def time_two_launch(case, M, terms):
    """act_quant + fp8_gemm with its table config (a given config keeps fp8_gemm off the decode kernel's path)."""
    return B.time_ours(case, M, fp8.config_for(terms * M, case.N, case.K), terms=terms)


def main():
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}")
    check()
    sums = {}
    print(f"\n{'shape':15s} {'M':>3s} {'bf16':>7s} {'2L 1t':>7s} {'dec 1t':>7s} {'2L 2t':>7s} {'dec 2t':>7s} "
          f"{'(MQ,G,St,S)':>14s}  us; 2L = act_quant + Triton GEMM, dec = decode kernel; t = terms"
          + (f"; sweep (G, stages) {SWEEP_GS}, 1 term | 2 terms" if SWEEP else ""))
    for name, (N, K) in B.SHAPES.items():
        case = B.Case(N, K)
        for M in MS:
            t = dict(bf16=B.time_bf16(case, M), two1=time_two_launch(case, M, 1), dec1=time_decode(case, M, 1),
                     two2=time_two_launch(case, M, 2), dec2=time_decode(case, M, 2))
            for k, v in t.items():
                sums[(M, k)] = sums.get((M, k), 0.0) + v
            line = (f"{name:15s} {M:3d} " + " ".join(f"{v * 1e6:7.1f}" for v in t.values())
                    + f" {str(fp8_hopper.decode_variant(M, N, K, dev)):>14s}")
            if SWEEP and M <= 2:
                line += "  " + " | ".join(" ".join(f"{time_decode(case, M, terms, g, st) * 1e6:5.1f}"
                                                   for g, st in SWEEP_GS) for terms in (1, 2))
            print(line, flush=True)
        del case
        torch.cuda.empty_cache()
    print("\nsummed over the 10 shapes (us; x = time of bf16 / time):")
    for M in MS:
        s = {k: sums[(M, k)] * 1e6 for k in ("bf16", "two1", "dec1", "two2", "dec2")}
        print(f"M={M:2d}: bf16 {s['bf16']:6.1f}; one term: two launches {s['two1']:6.1f} ({s['bf16'] / s['two1']:.2f}x)"
              f", decode kernel {s['dec1']:6.1f} ({s['bf16'] / s['dec1']:.2f}x); two terms: two launches "
              f"{s['two2']:6.1f} ({s['bf16'] / s['two2']:.2f}x), decode kernel {s['dec2']:6.1f} "
              f"({s['bf16'] / s['dec2']:.2f}x)")


if __name__ == "__main__":
    main()
