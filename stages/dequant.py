"""
Dequantizers used to verify a merged DeepSeek-V3 model.

dequantize_ggml: GGUF tensor bytes -> float32. The types DeepSeek GGUFs are made of (K-quants, legacy
quants, F16/BF16/F32) have our own numpy kernels, bit-exact against gguf.quants.dequantize: each output
is the same float32 operations in the same order (so rounding and the sign of zeros agree too).
Everything else (IQ*, TQ*, MXFP4, ...) is delegated to gguf.quants.dequantize.

dequantize_fp8_block: DeepSeek's FP8 (e4m3fn) weights with 128x128 block scales -> float32.

Speed (the verify stage streams ~400 GB of Q4_K/Q6_K experts through here): numpy's cost is in passes
over memory and in per-row loop overhead, so
- per-block scales are worked out once per span of blocks, on (field, block) transposed arrays whose
  inner loops run over blocks rather than over 4..16 bytes;
- values are made in chunks small enough that the ~4 passes over a chunk stay in L2, on a thread pool
  when called from the main thread (numpy releases the GIL in its loops);
- bit fields are cut from uint64 words, as numpy has no SIMD shifts for uint8.
Pass `out=` to reuse an output array: faulting in fresh pages costs about a quarter of a Q4_K call.
Block layouts: ggml's ggml-common.h.
"""
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import gguf.quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

GGML_BLOCK = {int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()}  # type id -> (values/block, bytes/block)
CHUNK_VALUES = 1 << 18  # values per values() call: 1 MiB of float32, stays in L2 with its temporaries
SPAN_VALUES = 1 << 22  # values whose per-block scales are worked out at once: bounds that memory to ~1 MiB
# half the cores, at most 8: the rest of the verify stage needs some, and numpy threads that wait on a busy core
# for the GIL are slower than one thread (measured on a shared 2-core box: 1 thread beat 2)
THREADS = max(1, min(8, len(os.sched_getaffinity(0)) // 2))


def ggml_nbytes(ggml_type, shape):
    block, nbytes = GGML_BLOCK[int(ggml_type)]
    assert shape[-1] % block == 0, f"row length {shape[-1]} is not a multiple of the block size {block}"
    return math.prod(shape) // block * nbytes


# -----------------------------------------------------------------------------
# kernels: k(b) takes an (n, bytes_per_block) uint8 array of blocks, works out their per-block scales once, and
# returns values(s, out), which writes the float32 values of blocks b[s] into out, a (len, values_per_block) array

def _f16(b, i):
    # the fp16 field at byte offset i of every block, as an (n,) float32 array
    return b[:, i:i + 2].view(np.float16)[:, 0].astype(np.float32)


def _fields(b, i, j):
    # bytes i..j-1 of every block as a (j-i, n) array, so per-block arithmetic loops over blocks
    return np.ascontiguousarray(b[:, i:j].T)


def _words(a):
    # bytes -> uint64 words: numpy has no SIMD shifts for uint8, so bit fields are cut 8 bytes at a time
    return np.ascontiguousarray(a).view(np.uint64)


def _bits(w, at, width, to=0):
    # bytes holding, at bit `to`, the `width` bits found at bit `at` of each byte of the words w
    x = (w >> np.uint64(at) if at else w) & np.uint64(((1 << width) - 1) * 0x0101010101010101)
    if to:
        x <<= np.uint64(to)
    return x.view(np.uint8)


def _nibbles(qs, run, out):
    # ggml packs 4-bit values in runs: `run` bytes hold `run` values in their low nibbles,
    # then the next `run` values in their high nibbles
    n, w = len(qs), _words(qs)
    out = out.reshape(n, -1, 2, run)
    out[:, :, 0] = _bits(w, 0, 4).reshape(n, -1, run)
    out[:, :, 1] = _bits(w, 4, 4).reshape(n, -1, run)
    return out.reshape(n, -1)


def _q8_0(b):
    d = _f16(b, 0)[:, None]

    def values(s, out):
        out[:] = b[s, 2:].view(np.int8)
        out *= d[s]
    return values


def _q4_0(b):
    d = _f16(b, 0)[:, None]

    def values(s, out):
        _nibbles(b[s, 2:], 16, out)
        out -= 8
        out *= d[s]
    return values


def _q4_1(b):
    d, m = _f16(b, 0)[:, None], _f16(b, 2)[:, None]

    def values(s, out):
        _nibbles(b[s, 4:], 16, out)
        out *= d[s]
        out += m[s]
    return values


def _q5(b, qh_at, out):
    # the 5th bit of value i is bit i of a little-endian uint32
    q = _nibbles(b[:, qh_at + 4:], 16, np.empty(out.shape, np.uint8))
    q |= np.unpackbits(b[:, qh_at:qh_at + 4], axis=1, bitorder="little") * np.uint8(16)
    out[:] = q


def _q5_0(b):
    d = _f16(b, 0)[:, None]

    def values(s, out):
        _q5(b[s], 2, out)
        out -= 16
        out *= d[s]
    return values


def _q5_1(b):
    d, m = _f16(b, 0)[:, None], _f16(b, 2)[:, None]

    def values(s, out):
        _q5(b[s], 4, out)
        out *= d[s]
        out += m[s]
    return values


def _q2_k(b):
    sc = _fields(b, 0, 16)
    dl, ml = (_f16(b, 80) * (sc & 15)).T, (_f16(b, 82) * (sc >> 4)).T  # (n, 16): per 16 values

    def values(s, out):
        n, qs = len(out), _words(b[s, 16:80])
        o = out.reshape(n, 2, 4, 32)
        for k in range(4):  # value 128h + 32k + j: bits 2k..2k+1 of byte 32h + j
            o[:, :, k] = _bits(qs, 2 * k, 2).reshape(n, 2, 32)
        o = out.reshape(n, 16, 16)
        o *= dl[s, :, None]
        o -= ml[s, :, None]
    return values


def _q3_k(b):
    # 16 6-bit scales: low 4 bits in the nibbles of bytes 0..7, high 2 bits in the 2-bit fields of bytes 8..11
    sc = _fields(b, 96, 108)
    lo = np.concatenate([sc[:8] & 15, sc[:8] >> 4])
    hi = np.concatenate([(sc[8:] >> 2 * k) & 3 for k in range(4)])
    dl = (_f16(b, 108) * ((lo | hi << 4).view(np.int8) - 32)).T

    def values(s, out):
        n, qs, hm = len(out), _words(b[s, 32:96]), _words(b[s, :32])
        q = np.empty((n, 8, 32), np.uint8)
        for k in range(4):  # low 2 bits of value 128h + 32k + j: bits 2k..2k+1 of byte 32h + j
            q.reshape(n, 2, 4, 32)[:, :, k] = _bits(qs, 2 * k, 2).reshape(n, 2, 32)
        for k in range(8):  # 3rd bit of value 32k + j: bit k of hmask byte j; clear means -4
            q[:, k] |= _bits(hm, k, 1, to=2)
        o = out.reshape(n, 16, 16)
        o[:] = (q.view(np.int8) - 4).reshape(n, 16, 16)
        o *= dl[s, :, None]
    return values


def _scale_min_k4(b):
    # per 32 values, d * 6-bit scale and dmin * 6-bit min, packed in bytes 4..15 (ggml's get_scale_min_k4)
    s = _fields(b, 4, 16)
    d, m, md = s[0:4], s[4:8], s[8:12]
    sc = np.concatenate([d & 63, (md & 15) | (d >> 6) << 4])
    mn = np.concatenate([m & 63, (md >> 4) | (m >> 6) << 4])
    return (_f16(b, 0) * sc).T, (_f16(b, 2) * mn).T  # (n, 8) each


def _q4_k(b):
    d, dm = _scale_min_k4(b)

    def values(s, out):
        n = len(out)
        _nibbles(b[s, 16:], 32, out)
        o = out.reshape(n, 8, 32)
        o *= d[s, :, None]
        o -= dm[s, :, None]
    return values


def _q5_k(b):
    d, dm = _scale_min_k4(b)

    def values(s, out):
        n, qh = len(out), _words(b[s, 16:48])
        q = _nibbles(b[s, 48:], 32, np.empty((n, 256), np.uint8)).reshape(n, 8, 32)
        for k in range(8):  # 5th bit of value 32k + j: bit k of qh byte j
            q[:, k] |= _bits(qh, k, 1, to=4)
        o = out.reshape(n, 8, 32)
        o[:] = q
        o *= d[s, :, None]
        o -= dm[s, :, None]
    return values


def _q6_k(b):
    d = (_f16(b, 208) * _fields(b, 192, 208).view(np.int8)).T  # (n, 16): per 16 values

    def values(s, out):
        n, qh = len(out), _words(b[s, 128:192])
        q = _nibbles(b[s, :128], 64, np.empty((n, 256), np.uint8)).reshape(n, 2, 4, 32)
        for k in range(4):  # bits 5..6 of value 128h + 32k + j: bits 2k..2k+1 of qh byte 32h + j
            q[:, :, k] |= _bits(qh, 2 * k, 2, to=4).reshape(n, 2, 32)
        o = out.reshape(n, 16, 16)
        o[:] = (q.view(np.int8) - 32).reshape(n, 16, 16)
        o *= d[s, :, None]
    return values


KERNELS = {
    T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}

_pool = (0, None)  # (threads, executor)
os.register_at_fork(after_in_child=lambda: globals().update(_pool=(0, None)))  # a forked child has no pool threads


def _run(fn, items):
    global _pool
    # callers that are already parallel (verify's dask tasks, one per core, run in worker threads) get no more threads
    if THREADS <= 1 or len(items) <= 1 or threading.current_thread() is not threading.main_thread():
        return [fn(i) for i in items]
    if _pool[0] != THREADS:
        if _pool[1]:
            _pool[1].shutdown(wait=False)
        _pool = (THREADS, ThreadPoolExecutor(THREADS, thread_name_prefix="dequant"))
    return list(_pool[1].map(fn, items))


# -----------------------------------------------------------------------------

def _ggml_to_float():
    """ggml's own C dequantizer (via ggml-python, which the runtime needs anyway): bit-exact with gguf's and ours,
    3.7-6x faster than gguf's; None where ggml-python is not installed (then the numpy kernels below serve)."""
    try:
        import ctypes
        import ggml
    except ImportError:
        return None

    def to_float(raw: np.ndarray, t: int, out: np.ndarray) -> bool:
        traits = ggml.ggml_get_type_traits(int(t)).contents
        if not traits.to_float:
            return False
        traits.to_float(raw.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                        out.size)
        return True
    return to_float


GGML_TO_FLOAT = _ggml_to_float()


def dequantize_ggml(raw, ggml_type, shape, out=None, backend="auto"):
    """
    GGUF tensor bytes -> float32 array of `shape` (numpy order: GGUF ne reversed, last dim = row).
    `out`: optional float32 array of `shape` to write into; reusing one saves faulting in fresh pages per tensor.
    `backend`: "auto" (ggml's C dequantizer when installed, else numpy), "ggml" or "numpy".
    """
    t = T(int(ggml_type))
    shape = tuple(int(s) for s in shape)
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)  # GGUFReader hands F32/F16 data as float arrays
    nbytes = ggml_nbytes(t, shape)
    assert raw.size == nbytes, f"{t.name} {shape}: expected {nbytes} bytes, got {raw.size}"
    if out is None:
        out = np.empty(shape, np.float32)
    assert out.shape == shape and out.dtype == np.float32 and out.flags.c_contiguous
    if t == T.F32:
        out[...] = raw.view(np.float32).reshape(shape)
    elif t == T.F16:
        out[...] = raw.view(np.float16).reshape(shape)
    elif t == T.BF16:
        out.view(np.uint32)[...] = raw.view(np.uint16).reshape(shape)
        out.view(np.uint32)[...] <<= 16
    elif backend != "numpy" and GGML_TO_FLOAT and GGML_TO_FLOAT(raw, t, out):
        pass
    elif backend == "ggml":
        raise ValueError(f"ggml dequantizer unavailable for {t.name}")
    elif t not in KERNELS:  # IQ*, TQ*, ...: rare in DeepSeek GGUFs, gguf's speed is fine
        out[...] = gguf.quants.dequantize(raw.reshape(-1, ggml_nbytes(t, shape[-1:])), t).reshape(shape)
    else:
        block, nbytes = GGML_QUANT_SIZES[t]
        blocks, rows = raw.reshape(-1, nbytes), out.reshape(-1, block)
        span, step = max(1, SPAN_VALUES // block), max(1, CHUNK_VALUES // block)
        for i in range(0, len(blocks), span):
            values, n = KERNELS[t](blocks[i:i + span]), min(span, len(blocks) - i)
            _run(lambda j: values(slice(j, j + step), rows[i + j:i + min(j + step, n)]), range(0, n, step))
    return out


# -----------------------------------------------------------------------------
# FP8

def _e4m3fn_table():
    # e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent 0 is subnormal; no inf; S.1111.111 is NaN
    code = np.arange(256)
    e, m = (code >> 3) & 15, (code & 7) / 8
    mag = np.where(e == 0, m * 2.0 ** -6, (1 + m) * 2.0 ** (e - 7))
    mag[(code & 0x7F) == 0x7F] = np.nan
    return np.where(code & 0x80, -mag, mag).astype(np.float32)


E4M3FN = _e4m3fn_table()


def dequantize_fp8_block(weight_e4m3, scale_inv, block=128):
    """
    DeepSeek FP8 weight (out, in) as e4m3fn codes (uint8 or float8 array, or a torch float8 tensor) and its
    float32 scale_inv [ceil(out/block), ceil(in/block)] -> float32 (out, in): each block x block tile times its scale.
    """
    if hasattr(weight_e4m3, "numpy"):  # torch tensor (float8_e4m3fn or uint8)
        import torch
        weight_e4m3 = weight_e4m3.view(torch.uint8).numpy()
        scale_inv = scale_inv.float().numpy() if hasattr(scale_inv, "numpy") else scale_inv
    codes = np.asarray(weight_e4m3).view(np.uint8)
    scale = np.asarray(scale_inv, dtype=np.float32)
    rows, cols = codes.shape
    assert scale.shape == (-(-rows // block), -(-cols // block)), f"scale {scale.shape} does not tile {codes.shape}"
    out = np.empty((rows, cols), np.float32)
    # one row of tiles at a time: its scales, widened to the columns, broadcast over <= block rows
    for i, r in enumerate(range(0, rows, block)):
        np.take(E4M3FN, codes[r:r + block], out=out[r:r + block])
        out[r:r + block] *= np.repeat(scale[i], block)[:cols]
    return out
