"""DeepSeek's activation quantization, in one place for runtime/fp8.py and runtime/fp8_hopper.py (which import it;
fp8 imports fp8_hopper, never the reverse): per token, per 128 group of the last axis, scale = max(amax, 1e-4) / 448,
e4m3(clamp(x / scale)). The Triton helpers the kernels quantize with, and the torch reference they are held to.

Rounding to e4m3 is done by hand (`_round_e4m3`: ties to even, saturating), so the final cast is exact. The GPU's own
cast gives the same bits; Triton's CPU interpreter (TRITON_INTERPRET=1, used by the tests on machines without a GPU)
does not round casts correctly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _round_e4m3(v):
    """fp32 in [-448, 448] -> the nearest e4m3 value (ties to even), as fp32: exact to cast afterwards."""
    bits = v.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)  # 3 mantissa bits
    tiny = (tl.abs(v) + 24576.0) - 24576.0                           # below 2^-6 the step is 2^-9
    tiny = (tiny.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)   # keep the sign
    return tl.where(tl.abs(v) < 0.015625, tiny, normal)


@triton.jit
def _quantize(x):
    """x fp32 (R, 128) -> (e4m3 values as fp32 (R, 128), scales fp32 (R,)), one scale per row."""
    s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4), 448.0)
    return _round_e4m3(tl.clamp(tl.math.div_rn(x, s[:, None]), -448.0, 448.0)), s


def act_quant_reference(x: torch.Tensor, terms: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's activation quantization in torch ops: per token, per 128 group of the last axis, scale =
    max(amax, 1e-4) / 448, e4m3(clamp(x / scale)). With terms=2 the float32 remainder x - q*scale is quantized the
    same way again. Returns (e4m3 codes (..., terms * T, K) with token t's terms in rows terms*t.., float32 scales
    (..., terms * T, ceil(K/128))) for x (..., T, K)."""
    K = x.shape[-1]
    g = F.pad(x.float(), (0, -K % 128)).unflatten(-1, (-1, 128))
    codes, scales = [], []
    for _ in range(terms):
        s = g.abs().amax(-1).clamp_min(1e-4) / 448.0
        q = (g / s[..., None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        codes.append(q.flatten(-2)[..., :K])
        scales.append(s)
        g = g - q.float() * s[..., None]
    return torch.stack(codes, -2).flatten(-3, -2), torch.stack(scales, -2).flatten(-3, -2)


def fake_act_quant(x: torch.Tensor, terms: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x rounded as the FP8 kernels round it (the sum of its terms), in `dtype`: the GPU path's activation numerics
    on the CPU."""
    q, s = act_quant_reference(x, terms)
    terms_x = q.to(dtype) * s.to(dtype).repeat_interleave(128, -1)[..., :x.shape[-1]]
    return terms_x.unflatten(-2, (-1, terms)).sum(-2)
