"""
Dequantizers used to verify a merged DeepSeek-V3 model.

- dequantize_ggml: GGUF tensor bytes -> float32. The types real DeepSeek GGUFs lean on (K-quants,
  legacy quants, F16/BF16/F32) have our own vectorized kernels, bit-exact against gguf.quants.dequantize
  (same float32 operations in the same order, so even -0.0 and rounding agree). Everything else
  (IQ*, TQ*, MXFP4, ...) is delegated to gguf.quants.dequantize.
- dequantize_fp8_block: DeepSeek's FP8 e4m3fn weights with 128x128 block scales -> float32.

Block layouts follow ggml-common.h. The kernels run on torch CPU tensors: its elementwise ops are
multi-threaded and handle the small broadcasts (one scale per 16 or 32 values) much faster than
numpy, and we work in chunks of blocks so the intermediates stay in cache.
"""
import math
import warnings

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
import gguf.quants

GGML_BLOCK = {int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()}  # type id -> (values/block, bytes/block)
CHUNK_VALUES = 1 << 18  # values per kernel call: ~1 MiB of float32 output, L2-sized


def ggml_nbytes(ggml_type, shape):
    block, nbytes = GGML_BLOCK[int(ggml_type)]
    assert shape[-1] % block == 0, f"row length {shape[-1]} is not a multiple of the block size {block}"
    return math.prod(shape) // block * nbytes


# -----------------------------------------------------------------------------
# kernels: b is a (n, bytes_per_block) uint8 tensor, out the (n, values_per_block) float32 result

U8 = torch.uint8
SHIFT_2 = torch.tensor([0, 2, 4, 6], dtype=U8).view(1, 1, 4, 1)  # 2-bit fields of a byte
SHIFT_1 = torch.arange(8, dtype=U8).view(1, 1, 8, 1)  # 1-bit fields of a byte


def _f16(b, i):
    # the fp16 field at byte offset i of every block, as an (n, 1) float32 column
    return b[:, i:i + 2].contiguous().view(torch.float16).float()


def _nibbles(qs, out):
    # ggml's 4-bit packing: a run of bytes holds its low nibbles, then (next run of values) its high nibbles
    out[:, :, 0] = qs & 15
    out[:, :, 1] = qs >> 4
    return out


def _q8_0(b, out):
    out.copy_(b[:, 2:].view(torch.int8)).mul_(_f16(b, 0))


def _q4_0(b, out):
    _nibbles(b[:, 2:].view(-1, 1, 16), out.view(-1, 1, 2, 16))
    out.sub_(8).mul_(_f16(b, 0))


def _q4_1(b, out):
    _nibbles(b[:, 4:].view(-1, 1, 16), out.view(-1, 1, 2, 16))
    out.mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5(b, qh_at, out):
    # 5th bit of value i is bit i of a little-endian uint32, i.e. bit i%8 of byte i//8
    n = len(b)
    q = _nibbles(b[:, qh_at + 4:].view(n, 1, 16), torch.empty(n, 1, 2, 16, dtype=U8)).view(n, 32)
    qh = (b[:, qh_at:qh_at + 4].reshape(n, 4, 1, 1) >> SHIFT_1.view(1, 1, 8, 1)) & 1
    out.copy_(q | (qh.view(n, 32) << 4))


def _q5_0(b, out):
    _q5(b, 2, out)
    out.sub_(16).mul_(_f16(b, 0))


def _q5_1(b, out):
    _q5(b, 4, out)
    out.mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q2_k(b, out):
    n = len(b)
    sc = b[:, :16]
    dl = (_f16(b, 80) * (sc & 15)).unsqueeze(-1)
    ml = (_f16(b, 82) * (sc >> 4)).unsqueeze(-1)
    q = (b[:, 16:80].view(n, 2, 1, 32) >> SHIFT_2) & 3  # (n, 2 halves, 4 shifts, 32)
    out.view(n, 16, 16).copy_(q.view(n, 16, 16)).mul_(dl).sub_(ml)


def _q3_k(b, out):
    n = len(b)
    # 16 6-bit scales: low nibbles in bytes 0..7 (low then high nibble), top 2 bits in bytes 8..11
    s = b[:, 96:108]
    lo = torch.cat([s[:, :8] & 15, s[:, :8] >> 4], 1)
    hi = ((s[:, 8:12].view(n, 1, 1, 4) >> SHIFT_2) & 3).view(n, 16)
    sc = (lo | (hi << 4)).view(torch.int8) - 32
    dl = (_f16(b, 108) * sc).unsqueeze(-1)
    ql = (b[:, 32:96].view(n, 2, 1, 32) >> SHIFT_2) & 3  # (n, 2, 4, 32)
    hm = (b[:, :32].view(n, 1, 1, 32) >> SHIFT_1) & 1  # (n, 1, 8, 32), same value order as ql
    # a clear hmask bit means "subtract 4"
    q = (ql.view(n, 256) | (hm.view(n, 256) << 2)).view(torch.int8) - 4
    out.view(n, 16, 16).copy_(q.view(n, 16, 16)).mul_(dl)


def _scale_min_k4(s):
    # 8 6-bit scales and 8 6-bit mins packed in 12 bytes (ggml's get_scale_min_k4)
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], 1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], 1)
    return sc, mn


def _q4_k(b, out):
    n = len(b)
    h = b[:, :16].contiguous()
    sc, mn = _scale_min_k4(h[:, 4:16])
    d = (_f16(h, 0) * sc).unsqueeze(-1)
    dm = (_f16(h, 2) * mn).unsqueeze(-1)
    _nibbles(b[:, 16:].view(n, 4, 32), out.view(n, 4, 2, 32))
    out.view(n, 8, 32).mul_(d).sub_(dm)


def _q5_k(b, out):
    n = len(b)
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc).unsqueeze(-1)
    dm = (_f16(b, 2) * mn).unsqueeze(-1)
    q = _nibbles(b[:, 48:].view(n, 4, 32), torch.empty(n, 4, 2, 32, dtype=U8))
    qh = (b[:, 16:48].view(n, 1, 1, 32) >> SHIFT_1) & 1  # (n, 1, 8, 32): bit k of byte j -> value 32k+j
    out.view(n, 8, 32).copy_(q.view(n, 8, 32) | (qh.view(n, 8, 32) << 4)).mul_(d).sub_(dm)


def _q6_k(b, out):
    n = len(b)
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8)).unsqueeze(-1)
    q = _nibbles(b[:, :128].view(n, 2, 64), torch.empty(n, 2, 2, 64, dtype=U8))
    qh = (b[:, 128:192].view(n, 2, 1, 32) >> SHIFT_2) & 3  # (n, 2, 4, 32), same value order as q
    q = (q.view(n, 256) | (qh.view(n, 256) << 4)).view(torch.int8) - 32
    out.view(n, 16, 16).copy_(q.view(n, 16, 16)).mul_(d)


KERNELS = {
    T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}


def _torch_u8(a):
    # torch refuses to share read-only memory (GGUFReader memmaps) without a warning; we never write to it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


# -----------------------------------------------------------------------------

def dequantize_ggml(raw, ggml_type, shape):
    """GGUF tensor bytes -> float32 array of `shape` (numpy order: GGUF ne reversed, last dim = row)."""
    t = T(int(ggml_type))
    shape = tuple(int(s) for s in shape)
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)  # GGUFReader hands F32/F16 data as float arrays
    assert raw.size == ggml_nbytes(t, shape), f"{t.name} {shape}: expected {ggml_nbytes(t, shape)} bytes, got {raw.size}"
    if t == T.F32:
        return raw.view(np.float32).reshape(shape).copy()
    if t == T.F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if t == T.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if t not in KERNELS:  # IQ*, TQ*, ...: rare in the verify path, so gguf's speed is fine
        return gguf.quants.dequantize(raw.reshape(-1, ggml_nbytes(t, shape[-1:])), t).reshape(shape)
    block, nbytes = GGML_QUANT_SIZES[t]
    blocks = raw.reshape(-1, nbytes)
    out = np.empty((len(blocks), block), np.float32)
    out_t, step = torch.from_numpy(out), max(1, CHUNK_VALUES // block)
    for i in range(0, len(blocks), step):
        KERNELS[t](_torch_u8(blocks[i:i + step]), out_t[i:i + step])
    return out.reshape(shape)


# -----------------------------------------------------------------------------
# FP8

def _e4m3fn_table():
    # e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent 0 is subnormal; no inf, S.1111.111 is NaN
    code = np.arange(256)
    e, m = (code >> 3) & 15, (code & 7).astype(np.float64)
    mag = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
    mag[(code & 0x7F) == 0x7F] = np.nan
    return np.where(code & 0x80, -mag, mag).astype(np.float32)


E4M3FN = _e4m3fn_table()


def dequantize_fp8_block(weight_e4m3, scale_inv, block=128):
    """DeepSeek FP8 weight (out, in) e4m3fn codes + float32 scale_inv [ceil(out/block), ceil(in/block)] -> float32."""
    if isinstance(weight_e4m3, torch.Tensor):
        weight_e4m3 = weight_e4m3.view(torch.uint8).numpy()
    if isinstance(scale_inv, torch.Tensor):
        scale_inv = scale_inv.float().numpy()
    codes = np.asarray(weight_e4m3).view(np.uint8)
    scale = np.asarray(scale_inv, dtype=np.float32)
    rows, cols = codes.shape
    assert scale.shape == (-(-rows // block), -(-cols // block)), f"scale {scale.shape} does not tile {codes.shape}"
    out = E4M3FN[codes]
    # one row of tiles at a time: the scale row, widened to the columns, broadcasts over <= block rows
    for i, r in enumerate(range(0, rows, block)):
        out[r:r + block] *= np.repeat(scale[i], block)[:cols]
    return out
