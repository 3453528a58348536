"""Triton kernels that read GGML blocks where they lie on the GPU: dequantization (bit-exact with ggml's to_float),
fused dequant-GEMV for decode and a grouped (per-expert) GEMM for prefill, for the types a Q4_K_M file's routed
experts use: Q4_K, Q5_K, Q6_K, Q8_0, Q5_0.

One fact per place: `_weights` is the only code that knows the block layouts (ggml-common.h). It takes any
broadcastable tile of (row pointer, 32-value group index, lane 0..31) and returns the integer quant q, its scale and
its offset as float32, with value = scale * q - offset, the exact float operations and order of ggml's
dequantize_row_*: (d * sc) * q - dmin * m for Q4_K/Q5_K, (d * sc) * q for Q6_K, q * d for Q8_0/Q5_0. Every kernel
here is built on it:
- `dequantize`: the values, stored; launched with FMA contraction off, so that scale * q - offset rounds twice as
  in ggml's C (a fused multiply-add would round once and differ in the last bit).
- decode (`moe` with few tokens): one program per (block of weight rows, token-expert pair) streams the rows' bytes
  once, dots them with x in float32 and never writes dequantized weights; gate and up share the program (and x),
  silu(gate) * up goes to a small float32 buffer; down writes each pair's weighted rows, summed over the token's k
  experts by torch (no atomics: deterministic). Fixed shapes, no host syncs: capturable in a CUDA graph.
- prefill (`moe` with many tokens): token-expert pairs sorted by expert on the GPU (torch.sort, searchsorted: no
  host sync either), tiles of BM pairs of one expert; each program dequantizes its weight tile to bf16 in registers
  and feeds tl.dot (fp32 accumulation); down writes each pair's weighted row to its own place, and torch sums a
  token's k rows (atomic adds would sum them in whatever order the tiles finish: a prompt run twice would differ).
- long prefill (`moe` with many rows per expert): the experts dequantized to bf16 by the same `dequantize`, then
  torch's grouped GEMM; dequantizing once per expert beats dequantizing once per tile when tiles per expert are many.
  Its results are added per token one expert at a time (an expert's tokens are distinct, so no two atomic adds of
  one index_add_ meet): the same order every run, and no buffer of k rows per token (a whole prompt's rows come here).

Block layouts (little-endian; value index v in 0..QK-1):
  Q4_K 144 B / 256: d f16, dmin f16, scales[12] (6-bit scale and min per 32 values), qs[128] (nibbles, low nibbles
       of bytes 32c..32c+31 are values 64c.., high nibbles values 64c+32..)
  Q5_K 176 B / 256: as Q4_K, then qh[32] (bit s of qh[l] is the 5th bit of value 32s+l), then qs[128]
  Q6_K 210 B / 256: ql[128], qh[64], int8 scales[16] (one per 16 values), d f16 last; q in 0..63 minus 32
  Q8_0  34 B / 32:  d f16, int8 qs[32]
  Q5_0  22 B / 32:  d f16, qh u32 (bit l: 5th bit of value l), qs[16] (low nibbles values 0-15, high 16-31); q - 16
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

Q5_0, Q8_0, Q4_K, Q5_K, Q6_K = 6, 8, 12, 13, 14
_LAYOUT = {Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210), Q8_0: (32, 34), Q5_0: (32, 22)}  # values, bytes
SUPPORTED: frozenset[int] = frozenset(_LAYOUT)
NAMES = {Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K", Q8_0: "Q8_0", Q5_0: "Q5_0"}

DECODE_MAX_TOKENS = 8       # moe(): up to this many tokens take the GEMV path, more the grouped GEMM (the
                            # crossover benchmarks/ggml_gpu.py measured on the H200 lies between 8 and 16)
# Tile shapes, per device kind. GEMV: (weight rows per program, 32-value groups per K step, warps); GEMM: (pairs per
# tile, weight rows per tile, 32-value groups per K step, warps). Triton's CPU interpreter runs every program in
# Python, op by op: there, few large programs (same kernels, same results).
GEMV = {"cuda": (8, 8, 4), "cpu": (256, 8, 1)}
GEMM = {"cuda": (64, 64, 2, 4), "cpu": (64, 256, 8, 1)}
GEMM_LARGE = (128, 128, 2, 8), 4096     # from this many tokens on the GPU (measured: 1.23x the default at 8192)
DENSE_MIN_ROWS = 128        # moe(): from this many rows per expert (expected), bf16 experts + a grouped GEMM
                            # (benchmarks/ggml_gpu.py times both prefill paths per token count)
DENSE_BYTES = 1 << 30       # the dense path's bf16 weights at once (whole experts, at least one)
DEQ_ROWS, DEQ_GROUPS = 16, 8


def supported(ggml_type: int) -> bool:
    return int(ggml_type) in SUPPORTED


def _layout(ggml_type: int) -> tuple[int, int]:
    if int(ggml_type) not in _LAYOUT:
        raise ValueError(f"GGML type {ggml_type} has no GPU kernel (supported: "
                         f"{', '.join(NAMES[t] for t in sorted(SUPPORTED))})")
    return _LAYOUT[int(ggml_type)]


def row_bytes(ggml_type: int, cols: int) -> int:
    qk, nb = _layout(ggml_type)
    if cols % qk:
        raise ValueError(f"a {NAMES[int(ggml_type)]} row of {cols} values is not a whole number of {qk}-value blocks")
    return cols // qk * nb


# ---------------------------------------------------------------------------------------------- the block layouts

@triton.jit
def _u8(p, m):
    return tl.load(p, mask=m, other=0).to(tl.int32)


@triton.jit
def _f16(p, m):
    """The fp16 at byte pointer p (an even address) as float32."""
    return tl.load(p.to(tl.pointer_type(tl.float16)), mask=m, other=0.0).to(tl.float32)


@triton.jit
def _i2f(q):
    """Small int32 (|q| < 2^22) -> float32, exactly, on the full-rate ALUs: the float with bits 0x4B000000 + q + 128
    is 2^23 + q + 128 (one unit per step at 2^23), minus 2^23 + 128 (exact). The GPU's int-to-float conversion
    (I2F) runs at a quarter of the FMA rate or less, under what a decode GEMV needs per byte."""
    return (q + (0x4B000000 + 128)).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _kscale(sc_ptr, s, m):
    """ggml's get_scale_min_k4: the 6-bit scale and min of 32-value group s (0..7) of a Q4_K/Q5_K block."""
    lo = _u8(sc_ptr + s, m)                                  # scales[s]
    hi = _u8(sc_ptr + s + 4, m)                              # scales[s + 4]
    lo4 = _u8(sc_ptr + tl.where(s >= 4, s - 4, s), m)        # scales[s - 4]
    sc = tl.where(s < 4, lo & 63, (hi & 15) | ((lo4 >> 6) << 4))
    mn = tl.where(s < 4, hi & 63, (hi >> 4) | ((lo >> 6) << 4))
    return _i2f(sc), _i2f(mn)


@triton.jit
def _weights(TYPE: tl.constexpr, row, g, l, m):
    """Values of 32-value group g (index along the row), lane l (0..31) of the rows at byte pointers `row`, for any
    broadcastable shapes of row/g (lane-independent) and l: (q, scale, offset) float32, value = scale * q - offset.
    m masks rows/groups (lane-independent)."""
    if TYPE == 12 or TYPE == 13:                 # Q4_K, Q5_K
        BYTES: tl.constexpr = 144 if TYPE == 12 else 176
        QS: tl.constexpr = 16 if TYPE == 12 else 48
        blk = row + (g // 8) * BYTES
        s = g % 8
        sc, mn = _kscale(blk + 4, s, m)
        scale = _f16(blk, m) * sc
        offset = _f16(blk + 2, m) * mn
        q = (_u8(blk + QS + (s // 2) * 32 + l, m) >> ((s % 2) * 4)) & 15
        if TYPE == 13:
            q += ((_u8(blk + 16 + l, m) >> s) & 1) << 4
    elif TYPE == 14:                             # Q6_K
        blk = row + (g // 8) * 210
        s = g % 8
        n, j = s // 4, s % 4                     # 128-value half, quarter in it
        ql = _u8(blk + n * 64 + (j % 2) * 32 + l, m)
        qh = _u8(blk + 128 + n * 32 + l, m)
        q = (((ql >> ((j // 2) * 4)) & 15) | (((qh >> (j * 2)) & 3) << 4)) - 32
        sc_ptr = blk + 192 + n * 8 + j * 2       # int8 scales[8n + 2j + l // 16]
        sc0, sc1 = _u8(sc_ptr, m), _u8(sc_ptr + 1, m)
        sc = tl.where(l < 16, sc0 - ((sc0 & 128) << 1), sc1 - ((sc1 & 128) << 1))
        scale = _f16(blk + 208, m) * _i2f(sc)
        offset = tl.zeros_like(scale)
    elif TYPE == 8:                              # Q8_0
        blk = row + g * 34
        b = _u8(blk + 2 + l, m)
        q = b - ((b & 128) << 1)
        scale = _f16(blk, m)
        offset = tl.zeros_like(scale)
    else:                                        # Q5_0
        tl.static_assert(TYPE == 6)
        blk = row + g * 22
        hb = (_u8(blk + 2 + l // 8, m) >> (l % 8)) & 1
        q = (((_u8(blk + 6 + l % 16, m) >> ((l // 16) * 4)) & 15) | (hb << 4)) - 16
        scale = _f16(blk, m)
        offset = tl.zeros_like(scale)
    return _i2f(q), scale, offset


# ---------------------------------------------------------------------------------------------- dequantize

@triton.jit
def _dequant_kernel(src, dst, n_rows, rbytes, cols, TYPE: tl.constexpr, R: tl.constexpr, G: tl.constexpr,
                    BF16: tl.constexpr, F32: tl.constexpr):
    r = tl.program_id(0) * R + tl.arange(0, R)[:, None, None]
    g = tl.program_id(1) * G + tl.arange(0, G)[None, :, None]
    l = tl.arange(0, 32)[None, None, :]
    m = (r < n_rows) & (g < cols // 32)
    r = r.to(tl.int64)
    q, scale, offset = _weights(TYPE, src + r * rbytes, g, l, m)
    v = scale * q - offset
    if BF16:
        v = _bf16(v, F32)
    tl.store(dst + r * cols + g * 32 + l, v, mask=m & (l < 32))


def dequantize(blocks: torch.Tensor, ggml_type: int, cols: int, dtype=torch.float32) -> torch.Tensor:
    """uint8 blocks (..., row_bytes) -> (..., cols) values, float32 bit-exact with ggml's to_float; bf16 straight
    from the kernel (those values rounded to nearest even, as the grouped GEMM rounds them); any other dtype cast
    from float32."""
    rb = row_bytes(ggml_type, cols)
    if blocks.dtype != torch.uint8 or blocks.shape[-1] != rb:
        raise ValueError(f"{NAMES[int(ggml_type)]} rows of {cols} values: want uint8 (..., {rb}), "
                         f"got {blocks.dtype} {tuple(blocks.shape)}")
    blocks = blocks.contiguous()
    direct = dtype in (torch.float32, torch.bfloat16)
    res = torch.empty((*blocks.shape[:-1], cols), dtype=dtype if direct else torch.float32, device=blocks.device)
    n_rows = blocks.numel() // rb
    if n_rows:
        grid = (triton.cdiv(n_rows, DEQ_ROWS), triton.cdiv(cols // 32, DEQ_GROUPS))
        _dequant_kernel[grid](blocks, res, n_rows, rb, cols, TYPE=int(ggml_type), R=DEQ_ROWS, G=DEQ_GROUPS,
                              BF16=res.dtype == torch.bfloat16, F32=not blocks.is_cuda, enable_fp_fusion=False)
    return res if direct else res.to(dtype)


# ---------------------------------------------------------------------------------------------- expert stacks

@dataclass
class GpuStack:
    """One routed-expert matrix stack as GGML bytes on the GPU (or a staging buffer): uint8 (n_local, rows,
    row_bytes), contiguous; logical (n_local, rows, cols)."""
    data: torch.Tensor
    ggml_type: int
    rows: int
    cols: int

    def __post_init__(self):
        rb = row_bytes(self.ggml_type, self.cols)
        d = self.data
        if d.dtype != torch.uint8 or d.dim() != 3 or tuple(d.shape[1:]) != (self.rows, rb) or not d.is_contiguous():
            raise ValueError(f"{NAMES[int(self.ggml_type)]} stack of ({self.rows}, {self.cols}): want contiguous uint8 "
                             f"(n, {self.rows}, {rb}), got {d.dtype} {tuple(d.shape)}")

    @property
    def row_bytes(self) -> int:
        return self.data.shape[2]


# ---------------------------------------------------------------------------------------------- decode: GEMV

@triton.jit
def _rows_dot(TYPE: tl.constexpr, row, rm, v_ptr, K, R: tl.constexpr, G: tl.constexpr):
    """(R,) float32 dots of the rows at byte pointers `row` (R, 1, 1) with the float vector at v_ptr (K values)."""
    acc = tl.zeros((R, G, 32), dtype=tl.float32)
    l = tl.arange(0, 32)[None, None, :]
    n_groups = K // 32
    for k0 in range(0, n_groups, G):
        g = k0 + tl.arange(0, G)[None, :, None]
        gm = g < n_groups
        v = tl.load(v_ptr + g * 32 + l, mask=gm & (l < 32), other=0.0).to(tl.float32)
        q, scale, offset = _weights(TYPE, row, g, l, rm & gm)
        acc += (scale * q - offset) * v
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def _gemv_gate_up_kernel(x, ids, local, gw, uw, h, K, N, k_top, g_rb, u_rb,
                         GT: tl.constexpr, UT: tl.constexpr, R: tl.constexpr, G: tl.constexpr):
    """h[p, rows] = silu(gate_e x_t) * up_e x_t for pair p = t * k_top + j, e = local[ids[p]] (skipped if < 0)."""
    pid_n, p = tl.program_id(0), tl.program_id(1)
    e = tl.load(local + tl.load(ids + p))
    if e >= 0:
        r = pid_n * R + tl.arange(0, R)
        rm = (r < N)[:, None, None]
        er = (e.to(tl.int64) * N + r)[:, None, None]
        xt = x + (p // k_top).to(tl.int64) * K
        a = _rows_dot(GT, gw + er * g_rb, rm, xt, K, R, G)
        b = _rows_dot(UT, uw + er * u_rb, rm, xt, K, R, G)
        tl.store(h + p.to(tl.int64) * N + r, a / (1.0 + tl.exp(-a)) * b, mask=r < N)


@triton.jit
def _gemv_down_kernel(h, ids, wts, local, dw, y, K, N, d_rb, DT: tl.constexpr, R: tl.constexpr, G: tl.constexpr):
    """y[p, rows] = wts[p] * down_e h[p] for pair p (zeros where e = local[ids[p]] < 0)."""
    pid_n, p = tl.program_id(0), tl.program_id(1)
    e = tl.load(local + tl.load(ids + p))
    r = pid_n * R + tl.arange(0, R)
    acc = tl.zeros((R,), dtype=tl.float32)
    if e >= 0:
        er = (e.to(tl.int64) * N + r)[:, None, None]
        acc = tl.load(wts + p).to(tl.float32) * _rows_dot(DT, dw + er * d_rb, (r < N)[:, None, None],
                                                          h + p.to(tl.int64) * K, K, R, G)
    tl.store(y + p.to(tl.int64) * N + r, acc, mask=r < N)


def _moe_gemv(x, ids, weights, local, gate, up, down):
    T, k = ids.shape
    inter, hidden = gate.rows, gate.cols
    h = torch.empty((T * k, inter), dtype=torch.float32, device=x.device)
    y = torch.empty((T, k, hidden), dtype=torch.float32, device=x.device)
    R, G, warps = GEMV[x.device.type]
    _gemv_gate_up_kernel[(triton.cdiv(inter, R), T * k)](
        x, ids, local, gate.data, up.data, h, hidden, inter, k, gate.row_bytes, up.row_bytes,
        GT=gate.ggml_type, UT=up.ggml_type, R=R, G=G, num_warps=warps)
    _gemv_down_kernel[(triton.cdiv(hidden, R), T * k)](
        h, ids, weights, local, down.data, y, inter, hidden, down.row_bytes, DT=down.ggml_type, R=R, G=G,
        num_warps=warps)
    return y.sum(1)


# ---------------------------------------------------------------------------------------------- prefill: grouped GEMM

@triton.jit
def _dot(a, b, acc, F32: tl.constexpr):
    """acc + a @ b for bf16 a, b. F32 (Triton's CPU interpreter): its bf16 dot multiplies the raw 16-bit patterns
    (triton 3.9), so the same bf16 values go in as float32, which their products are exactly in either case."""
    if F32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _bf16(v, F32: tl.constexpr):
    """float32 -> bf16, to nearest even. F32 (the interpreter, whose casts truncate): rounded by hand first."""
    if F32:
        bits = v.to(tl.uint32, bitcast=True)
        v = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return v.to(tl.bfloat16)


@triton.jit
def _weight_tile(TYPE: tl.constexpr, row, nm, k0, n_groups, BN: tl.constexpr, G: tl.constexpr, F32: tl.constexpr):
    """The (G * 32, BN) bf16 tile of weight rows `row` (BN, 1, 1) at 32-value groups k0 .. k0 + G - 1, for tl.dot."""
    g = k0 + tl.arange(0, G)[None, :, None]
    l = tl.arange(0, 32)[None, None, :]
    q, scale, offset = _weights(TYPE, row, g, l, nm & (g < n_groups))
    w = tl.reshape(_bf16(scale * q - offset, F32), (BN, G * 32))
    return tl.trans(w)


@triton.jit
def _gemm_gate_up_kernel(x, order, tile_e, tile_start, tile_stop, gw, uw, h, K, N, k_top, n_local, g_rb, u_rb,
                         GT: tl.constexpr, UT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, G: tl.constexpr,
                         F32: tl.constexpr):
    """h[i, cols] = silu(x_t gate_e^T) * x_t up_e^T, bf16, for the sorted pairs i of this tile (all of expert e)."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    e = tl.load(tile_e + pid_m)
    if e < n_local:
        i = tl.load(tile_start + pid_m) + tl.arange(0, BM)
        im = i < tl.load(tile_stop + pid_m)
        tok = (tl.load(order + i, mask=im, other=0) // k_top).to(tl.int64)
        n = pid_n * BN + tl.arange(0, BN)
        nm = (n < N)[:, None, None]
        er = (e.to(tl.int64) * N + n)[:, None, None]
        kk = tl.arange(0, G * 32)
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K // 32, G):
            km = (k0 * 32 + kk < K)[None, :]
            a = tl.load(x + tok[:, None] * K + k0 * 32 + kk[None, :], mask=im[:, None] & km, other=0.0)
            a = _bf16(a.to(tl.float32), F32)
            acc_g = _dot(a, _weight_tile(GT, gw + er * g_rb, nm, k0, K // 32, BN, G, F32), acc_g, F32)
            acc_u = _dot(a, _weight_tile(UT, uw + er * u_rb, nm, k0, K // 32, BN, G, F32), acc_u, F32)
        hv = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(h + i.to(tl.int64)[:, None] * N + n[None, :], _bf16(hv, F32), mask=im[:, None] & (n < N)[None, :])


@triton.jit
def _gemm_down_kernel(h, order, wts, tile_e, tile_start, tile_stop, dw, out, K, N, n_local, d_rb,
                      DT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, G: tl.constexpr, F32: tl.constexpr):
    """out[p, cols] = w_p * h_i down_e^T for the sorted pairs i (pair p = order[i]) of this tile."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    e = tl.load(tile_e + pid_m)
    if e < n_local:
        i = tl.load(tile_start + pid_m) + tl.arange(0, BM)
        im = i < tl.load(tile_stop + pid_m)
        p = tl.load(order + i, mask=im, other=0)
        n = pid_n * BN + tl.arange(0, BN)
        nm = (n < N)[:, None, None]
        er = (e.to(tl.int64) * N + n)[:, None, None]
        kk = tl.arange(0, G * 32)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K // 32, G):
            km = (k0 * 32 + kk < K)[None, :]
            a = tl.load(h + i.to(tl.int64)[:, None] * K + k0 * 32 + kk[None, :], mask=im[:, None] & km, other=0.0)
            acc = _dot(a, _weight_tile(DT, dw + er * d_rb, nm, k0, K // 32, BN, G, F32), acc, F32)
        w = tl.load(wts + p, mask=im, other=0.0).to(tl.float32)
        tl.store(out + p.to(tl.int64)[:, None] * N + n[None, :], acc * w[:, None], mask=im[:, None] & (n < N)[None, :])


def _pairs_by_expert(ids, local, n_local):
    """(order, bounds): the token-expert pairs (flat indices into ids) sorted by local expert, stable, and where
    each local expert's pairs start in that order ((n_local + 1,), int64); on the device, no host sync. Pairs of
    experts not here sort last (key n_local), past bounds[n_local]."""
    e = local[ids.reshape(-1).long()].long()
    key, order = torch.sort(torch.where(e < 0, n_local, e), stable=True)
    return order, torch.searchsorted(key, torch.arange(n_local + 1, device=key.device))


def _schedule(ids, local, n_local, BM):
    """Pairs sorted by local expert, and the tiles over them: (order, tile_e, tile_start, tile_stop), all on the
    device, no host sync. Pairs of experts not here fall in no tile. The grid has an upper bound of tiles,
    cdiv(pairs, BM) + min(n_local, pairs); a tile past the last has tile_e == n_local."""
    P = ids.numel()
    order, bounds = _pairs_by_expert(ids, local, n_local)
    counts = bounds[1:] - bounds[:-1]
    tiles = (counts + BM - 1) // BM
    ends = torch.cumsum(tiles, 0)
    n_tiles = triton.cdiv(P, BM) + min(n_local, P)
    t = torch.arange(n_tiles, device=ids.device)
    tile_e = torch.searchsorted(ends, t, right=True)
    ec = tile_e.clamp(max=n_local - 1)
    tile_start = bounds[ec] + (t - (ends - tiles)[ec]) * BM
    i32 = lambda v: v.to(torch.int32).contiguous()  # noqa: E731
    return i32(order), i32(tile_e), i32(tile_start), i32(bounds[ec + 1]), n_tiles


def _moe_gemm(x, ids, weights, local, gate, up, down):
    T, k = ids.shape
    inter, hidden = gate.rows, gate.cols
    n_local = gate.data.shape[0]
    BM, BN, G, warps = GEMM_LARGE[0] if x.is_cuda and T >= GEMM_LARGE[1] else GEMM[x.device.type]
    interpreted = x.device.type != "cuda"          # Triton's CPU interpreter: see _dot and _bf16
    order, tile_e, tile_start, tile_stop, n_tiles = _schedule(ids, local, n_local, BM)
    h = torch.empty((T * k, inter), dtype=torch.bfloat16, device=x.device)   # rows in sorted-pair order
    out = torch.zeros((T * k, hidden), dtype=torch.float32, device=x.device)  # rows by pair: zero where not here
    _gemm_gate_up_kernel[(triton.cdiv(inter, BN), n_tiles)](
        x, order, tile_e, tile_start, tile_stop, gate.data, up.data, h, hidden, inter, k, n_local,
        gate.row_bytes, up.row_bytes, GT=gate.ggml_type, UT=up.ggml_type, BM=BM, BN=BN, G=G, F32=interpreted,
        num_warps=warps)
    _gemm_down_kernel[(triton.cdiv(hidden, BN), n_tiles)](
        h, order, weights, tile_e, tile_start, tile_stop, down.data, out, inter, hidden, n_local,
        down.row_bytes, DT=down.ggml_type, BM=BM, BN=BN, G=G, F32=interpreted, num_warps=warps)
    return out.view(T, k, hidden).sum(1)


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b^T for bf16 a, b with float32 accumulation and result (cuBLAS on a GPU)."""
    if a.is_cuda:
        return torch.mm(a, b.t(), out_dtype=torch.float32)
    return a.float() @ b.float().t()


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor | None:
    """torch's grouped GEMM (bf16, rows of group g = a[offs[g-1]:offs[g]] times b[g]), or None where this torch or
    device has none that runs (said once; the dense path then loops over the experts)."""
    global _grouped_error
    if _grouped_error is None:
        try:
            return torch._grouped_mm(a, b, offs=offs)
        except Exception as e:                 # no such op, or no kernel for this device (before sm_90)
            _grouped_error = e
            print(f"note: torch._grouped_mm unavailable ({type(e).__name__}: {str(e).strip()[:100]}); long prefill "
                  f"chunks multiply their experts one at a time", file=sys.stderr)
    return None


_grouped_error: Exception | None = None


def _moe_dense(x, ids, weights, local, gate, up, down, counts=None):
    """Prefill with many rows per expert: the local experts, DENSE_BYTES of them at a time, dequantized to bf16 (the
    values the grouped kernel feeds its tensor cores) and multiplied by torch's grouped GEMM (cuBLAS-class tensor
    core rates; bf16 results), the pairs sorted by expert, their weighted results added back per token.
    counts: each local expert's pair count on the host, if the caller knows it; else one host sync reads it."""
    T, k = ids.shape
    inter, hidden = gate.rows, gate.cols
    n_local = gate.data.shape[0]
    order, bounds = _pairs_by_expert(ids, local, n_local)
    if counts is None:
        counts = (bounds[1:] - bounds[:-1]).tolist()
    elif len(counts) != n_local:
        raise ValueError(f"counts: want one per local expert ({n_local}), got {len(counts)}")
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + int(c))
    xb = x.to(torch.bfloat16)
    wf = weights.reshape(-1).float()
    out = torch.zeros((T, hidden), dtype=torch.float32, device=x.device)
    per = max(1, DENSE_BYTES // (3 * inter * hidden * 2))
    for g0 in range(0, n_local, per):
        g1 = min(n_local, g0 + per)
        a, b = starts[g0], starts[g1]
        if a == b:
            continue
        wg = dequantize(gate.data[g0:g1], gate.ggml_type, hidden, torch.bfloat16)      # (g, inter, hidden)
        wu = dequantize(up.data[g0:g1], up.ggml_type, hidden, torch.bfloat16)
        wd = dequantize(down.data[g0:g1], down.ggml_type, inter, torch.bfloat16)       # (g, hidden, inter)
        p = order[a:b]
        tok = p // k
        xs = xb[tok]
        offs = (bounds[g0 + 1:g1 + 1] - bounds[g0]).to(torch.int32)
        spans = [(j - g0, starts[j] - a, starts[j + 1] - a) for j in range(g0, g1) if starts[j + 1] > starts[j]]
        ag = _grouped_mm(xs, wg.transpose(1, 2), offs)
        if ag is not None:
            au = _grouped_mm(xs, wu.transpose(1, 2), offs)
            h = (F.silu(ag.float()) * au.float()).to(torch.bfloat16)
            y = _grouped_mm(h, wd.transpose(1, 2), offs).float()
        else:
            y = torch.empty((b - a, hidden), dtype=torch.float32, device=x.device)
            for e, r0, r1 in spans:
                ag, au = _mm32(xs[r0:r1], wg[e]), _mm32(xs[r0:r1], wu[e])
                y[r0:r1] = _mm32((F.silu(ag) * au).to(torch.bfloat16), wd[e])
        y *= wf[p, None]
        for _, r0, r1 in spans:
            out.index_add_(0, tok[r0:r1], y[r0:r1])
    return out


# ---------------------------------------------------------------------------------------------- the MoE layer

def moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, local: torch.Tensor,
        gate: GpuStack, up: GpuStack, down: GpuStack, *, method: str | None = None,
        counts=None) -> torch.Tensor:
    """sum over pairs (t, j) with local[ids[t, j]] >= 0 of weights[t, j] * down_e(silu(gate_e x_t) * up_e x_t),
    e = local[ids[t, j]]; float32 (T, hidden). x (T, hidden) float32 or bf16; ids (T, k) integer global expert ids;
    weights (T, k); local (n_experts,) int32, -1 for experts not in these stacks.
    method: "gemv" (decode), "gemm" or "dense" (prefill: _moe_dense), or None: gemv up to DECODE_MAX_TOKENS tokens;
    on a GPU, dense from DENSE_MIN_ROWS expected rows per expert (T x k over all n_experts); else gemm. The gemv
    path makes no host sync and no data-dependent allocation: CUDA-graph capturable (tested). The gemm path makes no
    host sync either (its grid is an upper bound of tiles; capture untested: torch.sort's). The dense path reads the
    local experts' pair counts back once, unless `counts` (host ints, one per local expert) gives them."""
    T, k = ids.shape
    n_local, inter, hidden = gate.data.shape[0], gate.rows, gate.cols
    if (up.data.shape[0], up.rows, up.cols) != (n_local, inter, hidden) or \
            (down.data.shape[0], down.rows, down.cols) != (n_local, hidden, inter):
        raise ValueError(f"inconsistent expert stacks: gate {(n_local, inter, hidden)} "
                         f"up {(up.data.shape[0], up.rows, up.cols)} down {(down.data.shape[0], down.rows, down.cols)}")
    if x.shape != (T, hidden) or weights.shape != (T, k):
        raise ValueError(f"x {tuple(x.shape)}, ids {tuple(ids.shape)}, weights {tuple(weights.shape)}: "
                         f"want (T, {hidden}), (T, k), (T, k)")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"x must be float32 or bfloat16, got {x.dtype}")
    x, ids, weights, local = x.contiguous(), ids.contiguous(), weights.contiguous(), local.contiguous()
    if T == 0:
        return torch.zeros((0, hidden), dtype=torch.float32, device=x.device)
    if method is None:
        dense = x.is_cuda and T * k >= DENSE_MIN_ROWS * local.numel()
        method = "gemv" if T <= DECODE_MAX_TOKENS else "dense" if dense else "gemm"
    if method == "dense":
        return _moe_dense(x, ids, weights, local, gate, up, down, counts)
    if method not in ("gemv", "gemm"):
        raise ValueError(f"method {method!r}: want gemv, gemm or dense")
    return (_moe_gemv if method == "gemv" else _moe_gemm)(x, ids, weights, local, gate, up, down)
