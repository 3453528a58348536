"""
Speed of stages.dequant.dequantize_ggml vs gguf.quants.dequantize on one DeepSeek-V3 expert matrix (2048 x 7168).
    python benchmarks/dequant.py [--types Q4_K,Q6_K] [--repeats 5] [--rows 2048] [--cols 7168]
"""
import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch
import gguf.quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from stages.dequant import dequantize_ggml, dequantize_fp8_block  # noqa: E402

F16_FIELDS = {  # byte offsets of the fp16 scales, made finite so no NaN/Inf work skews either side
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}

p = argparse.ArgumentParser()
p.add_argument("--types", default="Q4_K,Q6_K,Q5_K,Q3_K,Q2_K,Q8_0,Q5_0,Q4_0,Q4_1,Q5_1,BF16,F16")
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--rows", type=int, default=2048)
p.add_argument("--cols", type=int, default=7168)
args = p.parse_args()
warnings.simplefilter("ignore", RuntimeWarning)


def median_ms(f):
    f()  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


rng = np.random.default_rng(0)
shape = (args.rows, args.cols)
print(f"shape {shape}, torch threads {torch.get_num_threads()}, median of {args.repeats}")
print(f"{'type':8s} {'gguf ms':>9s} {'ours ms':>9s} {'speed-up':>9s}  exact")
for name in args.types.split(","):
    t = T[name]
    block, nbytes = GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, (args.rows, args.cols // block * nbytes), dtype=np.uint8)
    if name in ("F16", "BF16"):
        raw = rng.standard_normal(shape).astype(np.float32).astype(np.float16).view(np.uint8)
        if name == "BF16":
            raw = (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    blocks = raw.reshape(-1, nbytes)
    for at in F16_FIELDS.get(name, []):
        blocks[:, at:at + 2] = rng.uniform(-1, 1, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    ref = gguf.quants.dequantize(raw, t)
    exact = np.array_equal(ref.view(np.uint32), dequantize_ggml(raw, t, shape).view(np.uint32))
    g = median_ms(lambda: gguf.quants.dequantize(raw, t))
    o = median_ms(lambda: dequantize_ggml(raw, t, shape))
    print(f"{name:8s} {g:9.1f} {o:9.1f} {g / o:8.1f}x  {exact}")

# FP8 has no gguf counterpart: compare with the obvious torch version (cast, expand scales, multiply)
w = rng.integers(0, 256, shape, dtype=np.uint8)
w[(w & 0x7F) == 0x7F] = 0
s = rng.uniform(1e-4, 1e-2, (-(-shape[0] // 128), -(-shape[1] // 128))).astype(np.float32)


def torch_fp8():
    x = torch.from_numpy(w).view(torch.float8_e4m3fn).float()
    full = torch.from_numpy(s).repeat_interleave(128, 0).repeat_interleave(128, 1)[:shape[0], :shape[1]]
    return (x * full).numpy()


assert np.array_equal(torch_fp8(), dequantize_fp8_block(w, s))
t_ref, o = median_ms(torch_fp8), median_ms(lambda: dequantize_fp8_block(w, s))
print(f"{'FP8':8s} {t_ref:9.1f} {o:9.1f} {t_ref / o:8.1f}x  (baseline: torch cast + expanded scales)")
