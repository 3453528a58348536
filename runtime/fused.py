"""A decode step's small operations, each fused into one Triton kernel.

A decode step on the GPU is mostly launches, not bytes: in torch ops an RMS norm is five kernels, a rotary embedding
three, the router's group-limited top-k a dozen, and each costs its launch and a few microseconds however little it
reads. runtime.model calls these on CUDA tensors (inside its decode graphs and in prefill alike); its torch
expressions stay the reference and the CPU's path. The kernels also run in Triton's CPU interpreter (the tests).

- `rms_norm`: x (rows, n) any float dtype, w (n,) -> float32 (rows, n), one program a row.
- `add_rms_norm`: the residual add before a norm, in the same launch: (x + r as float32, its norm).
- `rope`: interleaved pairs of x (T, ..., rope) (any strides in the middle) rotated by freqs (T, rope / 2) complex
  -> (T, ..., rope) contiguous, float32 or rounded to `dtype`.
- `cache_write`: a MLA layer's new cache entries in one launch: c_kv normed and k_rope rotated, each rounded to the
  cache's dtype and stored at (slot, pos) of row t.
- `route`: DeepSeek-V3's router after its GEMM: sigmoid scores, the correction bias for the choice, the best
  `topk_groups` of `n_groups` groups by the sum of their two best, the top-k experts among those, weights from the
  uncorrected scores normalized and scaled. ids int64 and weights float32 (T, top_k), ids in descending choice order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


ROPE_HEADS = 8           # heads a rope program takes: one program for a token's 128 heads is latency-bound
NORM_WARPS = 8           # a norm program's warps: one program reads a whole row (7168 values in DeepSeek-V3)


def _block(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


# ---------------------------------------------------------------------------------------------- RMS norm

@triton.jit
def _rms_norm_kernel(x, add, sum_out, w, y, n, x_stride, eps, ADD: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    m = i < n
    v = tl.load(x + r * x_stride + i, mask=m, other=0.0).to(tl.float32)
    if ADD:
        v += tl.load(add + r * n + i, mask=m, other=0.0).to(tl.float32)
        tl.store(sum_out + r * n + i, v, mask=m)
    s = tl.sum(v * v, axis=0) / n
    wv = tl.load(w + i, mask=m, other=0.0).to(tl.float32)
    tl.store(y + r * n + i, v * (1.0 / tl.sqrt(s + eps)) * wv, mask=m)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=torch.float32, device=x.device)
    if len(x2):
        _rms_norm_kernel[(len(x2),)](x2, x2, y, w, y, n, x2.stride(0), eps, ADD=False, BLOCK=_block(n),
                                     num_warps=NORM_WARPS)
    return y.view(x.shape)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + r, rms_norm(x + r)), both float32 (rows, n); x and r (rows, n), any float dtypes."""
    n = x.shape[-1]
    x2, r2 = x.reshape(-1, n).contiguous(), r.reshape(-1, n).contiguous()
    s, y = (torch.empty(x2.shape, dtype=torch.float32, device=x.device) for _ in range(2))
    if len(x2):
        _rms_norm_kernel[(len(x2),)](x2, r2, s, w, y, n, n, eps, ADD=True, BLOCK=_block(n), num_warps=NORM_WARPS)
    return s.view(x.shape), y.view(x.shape)


# ---------------------------------------------------------------------------------------------- rotary embedding

@triton.jit
def _rope_kernel(x, f, y, H, HALF, xs_t, xs_h, xs_d, BH: tl.constexpr, BP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)[:, None]
    i = tl.arange(0, BP)[None, :]
    m = (h < H) & (i < HALF)
    src = x + t * xs_t + h * xs_h
    a = tl.load(src + 2 * i * xs_d, mask=m, other=0.0).to(tl.float32)
    b = tl.load(src + (2 * i + 1) * xs_d, mask=m, other=0.0).to(tl.float32)
    c = tl.load(f + t * 2 * HALF + 2 * i, mask=i < HALF, other=0.0)
    s = tl.load(f + t * 2 * HALF + 2 * i + 1, mask=i < HALF, other=0.0)
    dst = y + (t * H + h) * 2 * HALF + 2 * i
    tl.store(dst, (a * c - b * s).to(y.dtype.element_ty), mask=m)
    tl.store(dst + 1, (a * s + b * c).to(y.dtype.element_ty), mask=m)


def rope(x: torch.Tensor, freqs: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    T, d = x.shape[0], x.shape[-1]
    x3 = x.reshape(T, -1, d)                     # a view for the q / kv slices runtime.model passes
    H = x3.shape[1]
    y = torch.empty((T, H, d), dtype=dtype, device=x.device)
    f = torch.view_as_real(freqs.contiguous())
    if T and H:
        bh = min(_block(H), ROPE_HEADS)
        _rope_kernel[(T, triton.cdiv(H, bh))](x3, f, y, H, d // 2, x3.stride(0), x3.stride(1), x3.stride(2),
                                             BH=bh, BP=_block(d // 2))
    return y.view(x.shape)


# ---------------------------------------------------------------------------------------------- MLA cache entries

@triton.jit
def _cache_write_kernel(kv, w, f, slots, pos, kv_cache, pe_cache, kv_stride, LORA, HALF, eps,
                        slot_stride, pos_stride, pe_slot_stride, pe_pos_stride,
                        ONE_SLOT: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    sl = tl.load(slots).to(tl.int64) if ONE_SLOT else tl.load(slots + t).to(tl.int64)
    p = tl.load(pos + t).to(tl.int64)
    row = kv + t * kv_stride
    j = tl.arange(0, BL)
    c = tl.load(row + j, mask=j < LORA, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(c * c, axis=0) / LORA + eps)
    c = c * r * tl.load(w + j, mask=j < LORA, other=0.0).to(tl.float32)
    tl.store(kv_cache + sl * slot_stride + p * pos_stride + j, c.to(kv_cache.dtype.element_ty), mask=j < LORA)
    i = tl.arange(0, BP)
    a = tl.load(row + LORA + 2 * i, mask=i < HALF, other=0.0).to(tl.float32)
    b = tl.load(row + LORA + 2 * i + 1, mask=i < HALF, other=0.0).to(tl.float32)
    co = tl.load(f + t * 2 * HALF + 2 * i, mask=i < HALF, other=0.0)
    si = tl.load(f + t * 2 * HALF + 2 * i + 1, mask=i < HALF, other=0.0)
    dst = pe_cache + sl * pe_slot_stride + p * pe_pos_stride + 2 * i
    tl.store(dst, (a * co - b * si).to(pe_cache.dtype.element_ty), mask=i < HALF)
    tl.store(dst + 1, (a * si + b * co).to(pe_cache.dtype.element_ty), mask=i < HALF)


def cache_write(kv: torch.Tensor, norm: torch.Tensor, eps: float, freqs: torch.Tensor, slots, pos: torch.Tensor,
                kv_cache: torch.Tensor, pe_cache: torch.Tensor) -> None:
    """kv (T, kv_lora + rope) -> kv_cache[slot, pos] = rms_norm(c_kv) and pe_cache[slot, pos] = rope(k_rope), row
    by row; slots an int (every row) or (T,) int64, pos (T,) int64 (device tensors: a graph replays it)."""
    T, lora, d = kv.shape[0], kv_cache.shape[-1], pe_cache.shape[-1]
    if kv.stride(-1) != 1:
        kv = kv.contiguous()
    one = not isinstance(slots, torch.Tensor)
    if one:
        slots = torch.full((1,), slots, dtype=torch.long, device=kv.device)
    f = torch.view_as_real(freqs.contiguous())
    if T:
        _cache_write_kernel[(T,)](kv, norm, f, slots, pos, kv_cache, pe_cache, kv.stride(0), lora, d // 2, eps,
                                  kv_cache.stride(0), kv_cache.stride(1), pe_cache.stride(0), pe_cache.stride(1),
                                  ONE_SLOT=one, BL=_block(lora), BP=_block(d // 2))


# ---------------------------------------------------------------------------------------------- router

@triton.jit
def _route_kernel(logits, bias, ids, wts, E, GROUP, route_scale, N_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
                  TOP_K: tl.constexpr, BK: tl.constexpr, BG: tl.constexpr, BE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BG)[:, None]
    j = tl.arange(0, BE)[None, :]
    m = (g < N_GROUPS) & (j < GROUP)
    e = g * GROUP + j                                            # expert index, (BG, BE)
    NEG: tl.constexpr = float("-inf")
    x = tl.load(logits + t * E + e, mask=m, other=0.0).to(tl.float32)
    score = 1.0 / (1.0 + tl.exp(-x))
    choice = tl.where(m, score + tl.load(bias + e, mask=m, other=0.0).to(tl.float32), NEG)
    # each group's sum of its two best choices (the best taken once, at its lowest index)
    best = tl.max(choice, axis=1)
    first = tl.min(tl.where(choice == best[:, None], j, BE), axis=1)
    second = tl.max(tl.where(j == first[:, None], NEG, choice), axis=1)
    gsum = tl.where(tl.arange(0, BG) < N_GROUPS, best + second, NEG)
    gi = tl.arange(0, BG)
    keep = tl.zeros((BG,), dtype=tl.int32)
    for _ in tl.static_range(TOPK_GROUPS):
        top = tl.max(gsum, axis=0)
        k = tl.min(tl.where(gsum == top, gi, BG), axis=0)
        keep = tl.where(gi == k, 1, keep)
        gsum = tl.where(gi == k, NEG, gsum)
    choice = tl.where(keep[:, None] != 0, choice, NEG)
    kk = tl.arange(0, BK)
    out_ids = tl.zeros((BK,), dtype=tl.int64)
    out_w = tl.zeros((BK,), dtype=tl.float32)
    for s in tl.static_range(TOP_K):
        top = tl.max(tl.max(choice, axis=1), axis=0)
        k = tl.min(tl.min(tl.where(choice == top, e, E + BG * BE), axis=1), axis=0)
        out_ids = tl.where(kk == s, k, out_ids)
        out_w = tl.where(kk == s, tl.sum(tl.sum(tl.where(e == k, score, 0.0), axis=1), axis=0), out_w)
        choice = tl.where(e == k, NEG, choice)
    out_w = out_w / tl.sum(out_w, axis=0) * route_scale
    tl.store(ids + t * TOP_K + kk, out_ids, mask=kk < TOP_K)
    tl.store(wts + t * TOP_K + kk, out_w, mask=kk < TOP_K)


def route(logits: torch.Tensor, bias: torch.Tensor, n_groups: int, topk_groups: int, top_k: int,
          route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (T, E) float32, the router's GEMM -> (ids int64, weights float32), each (T, top_k)."""
    T, E = logits.shape
    if E % n_groups or top_k > topk_groups * (E // n_groups):
        raise ValueError(f"router: top {top_k} of {E} experts in {n_groups} groups (best {topk_groups}): "
                         "not a routing")
    logits = logits.contiguous()
    ids = torch.empty((T, top_k), dtype=torch.long, device=logits.device)
    wts = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    if T:
        _route_kernel[(T,)](logits, bias, ids, wts, E, E // n_groups, route_scale, N_GROUPS=n_groups,
                            TOPK_GROUPS=topk_groups, TOP_K=top_k, BK=_block(top_k), BG=_block(n_groups),
                            BE=_block(E // n_groups))
    return ids, wts
