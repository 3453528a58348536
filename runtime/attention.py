"""MLA attention over the compressed cache, for prefill chunks and batched decode steps alike.

The cache holds, per slot (one sequence each) and position, c_kv (kv_lora values, normed) and k_rope (rope values,
rotated). A query row t of head h is q_nope (nope) and q_pe (rope); its key for cache entry j is
[W_kb[h] c_kv[j], k_rope[j]] and its value W_vb[h] c_kv[j] (W_kb, W_vb: the two halves of kv_b per head). Row t attends
to entries 0..pos[t] of slot slots[t] (causal by position), so a prefill chunk (rows of one slot at consecutive
positions, the cache already holding the ones before) and a decode step (one row per sequence, each at its own
position) are the same call.

`mla_attend` never materializes the (rows, heads, cache) scores: keys are taken in blocks with a running max and sum
(flash attention's online softmax), so memory is rows x heads x block, whatever the context. This module is the
reference path (torch ops, on any device); faster paths for the GPU plug in behind the same call.
"""
from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 24          # scores held at once (rows x heads x keys), float32: 64 MiB


def mla_attend(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
               slots: torch.Tensor | int, pos: torch.Tensor, w_kb: torch.Tensor, w_vb: torch.Tensor, scale: float,
               bound: int | None = None) -> torch.Tensor:
    """q_nope (T, H, nope), q_pe (T, H, rope), kv (N, L, kv_lora), pe (N, L, rope), pos (T,) int64, slots: one
    slot for every row (an int: a prefill chunk) or one per row ((T,) int64: a decode step), w_kb (H, nope,
    kv_lora), w_vb (H, v, kv_lora) -> (T, H, v) float32. `bound`: an upper bound on pos + 1 that the caller knows
    (a CUDA graph's span), which saves reading pos back from the device."""
    return _blockwise(q_nope, q_pe, kv, pe, slots, pos, w_kb, w_vb, scale, bound)


def _blockwise(q_nope, q_pe, kv, pe, slots, pos, w_kb, w_vb, scale, bound):
    """Absorbed form (W_kb folded into the query, W_vb into the output), online softmax over key blocks. Rows of
    one slot share each key block; rows of several slots gather their own (a decode step: few rows)."""
    dt = w_kb.dtype
    T, H, _ = q_nope.shape
    q_lat = torch.einsum("thd,hdc->thc", q_nope.to(dt), w_kb).float()
    q_pe = q_pe.float()
    end = bound if bound is not None else (int(pos.max()) + 1 if T else 0)
    shared = isinstance(slots, int)
    block = max(64, min(end, BLOCK_ELEMENTS // max(1, T * H)))
    m = torch.full((T, H, 1), float("-inf"), device=q_lat.device)
    den = torch.zeros(T, H, 1, device=q_lat.device)
    acc = torch.zeros_like(q_lat)
    for a in range(0, end, block):
        b = min(end, a + block)
        if shared:
            k, k_pe = kv[slots, a:b].float(), pe[slots, a:b].float()
            s = torch.einsum("thc,sc->ths", q_lat, k) + torch.einsum("thr,sr->ths", q_pe, k_pe)
        else:
            k, k_pe = kv[slots, a:b].float(), pe[slots, a:b].float()          # (T, keys, .) per row
            s = torch.einsum("thc,tsc->ths", q_lat, k) + torch.einsum("thr,tsr->ths", q_pe, k_pe)
        later = torch.arange(a, b, device=s.device)[None, :] > pos[:, None]
        s = (s * scale).masked_fill(later.unsqueeze(1), float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)     # rows with no key yet
        p = torch.exp(s - safe)
        fix = torch.exp(m - safe)
        den = den * fix + p.sum(-1, keepdim=True)
        acc = acc * fix + (torch.einsum("ths,sc->thc", p, k) if shared else torch.einsum("ths,tsc->thc", p, k))
        m = m_new
    o = acc / den
    return torch.einsum("thc,hdc->thd", o.to(dt), w_vb).float()
