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

KEY_BLOCK = 256                   # keys per online-softmax step: the same blocks whatever the rows, so a prompt
                                  # prefilled in chunks sums in the same order as in one pass


def mla_attend(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
               slots: torch.Tensor | int, pos: torch.Tensor, w_kb: torch.Tensor, w_vb: torch.Tensor, scale: float,
               bound: int | None = None) -> torch.Tensor:
    """q_nope (T, H, nope), q_pe (T, H, rope), kv (N, L, kv_lora), pe (N, L, rope), pos (T,) int64, slots: one
    slot for every row (an int: a prefill chunk) or one per row ((T,) int64: a decode step), w_kb (H, nope,
    kv_lora), w_vb (H, v, kv_lora) -> (T, H, v) float32. `bound`: an upper bound on pos + 1 that the caller knows
    (a CUDA graph's span), which saves reading pos back from the device."""
    return _blockwise(q_nope, q_pe, kv, pe, slots, pos, w_kb, w_vb, scale, bound)


def _blockwise(q_nope, q_pe, kv, pe, slots, pos, w_kb, w_vb, scale, bound):
    """Online softmax over key blocks of KEY_BLOCK. A decode step (rows of several slots, each gathering its own
    keys) runs the absorbed form: W_kb folded into the query, W_vb into the output, keys the cache itself. A prefill
    chunk (rows of one slot, sharing every key block) expands each block's keys and values per head instead
    (nope + rope + v = 320 multiply-adds per head and key, against kv_lora + rope + kv_lora = 1088 absorbed; the
    expansion costs kv_lora x heads x (nope + v) per key, once for all the chunk's rows)."""
    T, H, _ = q_nope.shape
    end = bound if bound is not None else (int(pos.max()) + 1 if T else 0)
    end = min(kv.shape[1], -(-end // KEY_BLOCK) * KEY_BLOCK)      # whole blocks: masked keys add exact zeros
    shared = isinstance(slots, int)
    dev = q_nope.device
    if shared:                                                     # (H, T, .) for batched matmuls over heads
        q, q_pe = q_nope.float().transpose(0, 1), q_pe.float().transpose(0, 1)
        w_kb, w_vb = w_kb.float(), w_vb.float()
        acc = torch.zeros(H, T, w_vb.shape[1], device=dev)
    else:
        q, q_pe = torch.einsum("thd,hdc->thc", q_nope.to(w_kb.dtype), w_kb).float(), q_pe.float()
        acc = torch.zeros_like(q)
    lead = (H, T, 1) if shared else (T, H, 1)
    m = torch.full(lead, float("-inf"), device=dev)
    den = torch.zeros(lead, device=dev)
    for a in range(0, end, KEY_BLOCK):
        b = min(end, a + KEY_BLOCK)
        later = torch.arange(a, b, device=dev)[None, :] > pos[:, None]               # (T, keys)
        if shared:
            c, k_pe = kv[slots, a:b].float(), pe[slots, a:b].float()
            k, v = torch.einsum("sc,hdc->hds", c, w_kb), torch.einsum("sc,hvc->hsv", c, w_vb)
            s = torch.bmm(q, k) + torch.matmul(q_pe, k_pe.T)                          # (H, T, keys)
            s = (s * scale).masked_fill(later, float("-inf"))
        else:
            c, k_pe = kv[slots, a:b].float(), pe[slots, a:b].float()                  # (T, keys, .) per row
            s = torch.einsum("thc,tsc->ths", q, c) + torch.einsum("thr,tsr->ths", q_pe, k_pe)
            s = (s * scale).masked_fill(later.unsqueeze(1), float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)     # rows with no key yet
        p = torch.exp(s - safe)
        fix = torch.exp(m - safe)
        den = den * fix + p.sum(-1, keepdim=True)
        acc = acc * fix + (torch.bmm(p, v) if shared else torch.einsum("ths,tsc->thc", p, c))
        m = m_new
    o = acc / den
    if shared:
        return o.transpose(0, 1)
    return torch.einsum("thc,hdc->thd", o.to(w_vb.dtype), w_vb).float()
