"""
Speed of stages.dequant vs gguf.quants.dequantize on one DeepSeek-V3 expert matrix (2048 x 7168), measured in one run.
    python benchmarks/dequant.py [--types Q4_K,Q6_K] [--repeats 7] [--threads N]
"ours" allocates its output like gguf does; "out=" reuses one output array, as the verify stage can
(no fresh pages to fault in).
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
import stages.dequant as dq  # noqa: E402

F16_FIELDS = {  # byte offsets of the fp16 scales, made finite so no NaN/Inf skews either side
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}

p = argparse.ArgumentParser()
p.add_argument("--types", default="Q4_K,Q6_K,Q5_K,Q3_K,Q2_K,Q8_0,Q5_0,Q4_0,Q4_1,Q5_1,BF16,F16")
p.add_argument("--repeats", type=int, default=7)
p.add_argument("--rows", type=int, default=2048)
p.add_argument("--cols", type=int, default=7168)
p.add_argument("--threads", type=int, default=dq.THREADS)
args = p.parse_args()
dq.THREADS = args.threads
warnings.simplefilter("ignore", RuntimeWarning)


def median_ms(*fns):
    # the calls take turns, so a busy spell on a shared machine slows all of them alike
    times = np.zeros((args.repeats + 1, len(fns)))
    for r in range(args.repeats + 1):  # the first round warms up
        for k, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[r, k] = time.perf_counter() - t0
    return 1e3 * np.median(times[1:], axis=0)


rng = np.random.default_rng(0)
shape = (args.rows, args.cols)
print(f"shape {shape}, {dq.THREADS} threads, {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}, "
      f"median of {args.repeats}")
print(f"{'type':6s} {'gguf ms':>8s} {'ours ms':>8s} {'speed-up':>8s} {'out= ms':>8s} {'speed-up':>8s}  bit-exact")
for name in args.types.split(","):
    t = T[name]
    block, nbytes = GGML_QUANT_SIZES[t]
    if name in ("F16", "BF16"):
        x = rng.standard_normal(shape).astype(np.float32)
        raw = (x.astype(np.float16) if name == "F16" else (x.view(np.uint32) >> 16).astype(np.uint16)).view(np.uint8)
    else:
        raw = rng.integers(0, 256, (args.rows, args.cols // block * nbytes), dtype=np.uint8)
        blocks = raw.reshape(-1, nbytes)
        for at in F16_FIELDS[name]:
            blocks[:, at:at + 2] = rng.uniform(-1, 1, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    ref = gguf.quants.dequantize(raw, t).reshape(shape)
    exact = np.array_equal(ref.view(np.uint32), dq.dequantize_ggml(raw, t, shape).view(np.uint32))
    out = np.empty(shape, np.float32)
    g, o, r = median_ms(lambda: gguf.quants.dequantize(raw, t), lambda: dq.dequantize_ggml(raw, t, shape),
                        lambda: dq.dequantize_ggml(raw, t, shape, out=out))
    print(f"{name:6s} {g:8.1f} {o:8.1f} {g / o:7.1f}x {r:8.1f} {g / r:7.1f}x  {exact}")

# FP8 has no gguf counterpart: compare with the obvious torch version (cast, expand the scales, multiply)
codes = rng.integers(0, 256, shape, dtype=np.uint8)
codes[(codes & 0x7F) == 0x7F] = 0
scale = rng.uniform(1e-4, 1e-2, (-(-shape[0] // 128), -(-shape[1] // 128))).astype(np.float32)


def torch_fp8():
    w = torch.from_numpy(codes).view(torch.float8_e4m3fn).float()
    s = torch.from_numpy(scale).repeat_interleave(128, 0).repeat_interleave(128, 1)[:shape[0], :shape[1]]
    return (w * s).numpy()


assert np.array_equal(torch_fp8(), dq.dequantize_fp8_block(codes, scale))
b, o = median_ms(torch_fp8, lambda: dq.dequantize_fp8_block(codes, scale))
print(f"{'FP8':6s} {b:8.1f} {o:8.1f} {b / o:7.1f}x   "
      f"(baseline: torch float8 cast * expanded scales, {torch.get_num_threads()} threads)")
