"""MLA attention over the compressed cache, for prefill chunks and batched decode steps alike.

The cache holds, per slot (one sequence each) and position, c_kv (kv_lora values, normed) and k_rope (rope values,
rotated). A query row t of head h is q_nope (nope) and q_pe (rope); its key for cache entry j is
[W_kb[h] c_kv[j], k_rope[j]] and its value W_vb[h] c_kv[j] (W_kb, W_vb: the two halves of kv_b per head). Row t attends
to entries 0..pos[t] of slot slots[t] (causal by position), so a prefill chunk (rows of one slot at consecutive
positions, the cache already holding the ones before) and a decode step (one row per sequence, each at its own
position) are the same call.

`mla_attend` never materializes the (rows, heads, cache) scores: keys are taken in blocks with a running max and sum
(flash attention's online softmax), so memory is rows x heads x block, whatever the context. This module is the
reference path and the CPU's (torch ops, on any device).

On a GPU the same call takes Triton kernels on the absorbed form, or torch's flash attention on the expanded one:
- decode (`decode_triton`): FlashMLA's design in Triton. A program takes BLOCK_H heads of one row and a range of
  its keys; each key block (c_kv and k_rope, bf16) is loaded once for all of them and serves both products
  (scores against [q_lat, q_pe], then P @ c_kv), float32 accumulators. The keys are split across programs for
  parallelism and a second kernel merges the splits by their log-sum-exp (on sm_90 a programmatic dependent launch:
  it starts while the split kernel's last programs run); for a single row (`merge_vb`) that kernel also applies
  W_vb, so the merge's reads ride on the stream of W_vb. Each row reads its slot and position from device memory
  and splits its own true length, so a step is a fixed pair of launches (a CUDA graph captures it)
  whose cost follows the context, not the graph's span: a program past its row's length loads and writes nothing.
  On sm_90 at DeepSeek's shapes the split kernel is runtime.attention_hopper's (Gluon: TMA, no score computed
  twice), with this module's Triton kernel as the fallback and the reference.
- prefill, picked per chunk by `prefill_form`: fused attention (cuDNN's, else torch's flash kernel) on the expanded
  form (`prefill_sdpa`: the slot's cache expanded per head through W_kb / W_vb a piece of keys at a time, the pieces
  merged by their log-sum-exp),
  or for short chunks the absorbed kernel: the decode launch (one token a tile, split over the keys), or where
  heads are fewer than a tile, tiles of TOK consecutive tokens x BLOCK_H heads (`prefill_triton`).
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

try:                    # grid dependency control (sm_90): the merge launches while the split kernel finishes
    from triton.language.extra.cuda import gdc_wait
except ImportError:
    gdc_wait = None

try:                    # Gluon's Hopper API is experimental: without it, decode runs the Triton kernel everywhere
    from runtime import attention_hopper
    _hopper_error: Exception | None = None
except (ImportError, AttributeError) as e:
    attention_hopper, _hopper_error = None, e
HOPPER = os.environ.get("DSV3_ATTN_GLUON", "1") != "0"     # "0": the Triton decode kernel on sm_90 too

KEY_BLOCK = 256                   # keys per online-softmax step: the same blocks whatever the rows, so a prompt
                                  # prefilled in chunks sums in the same order as in one pass
EXPAND_KEYS = 8192                # keys expanded per head at once (prefill_sdpa): ~1.3 GiB at DeepSeek's shape
SDPA_MIN_ROWS = 192               # prefill chunks from this many rows take the expanded form (see prefill_form)
SDPA_BACKEND = os.environ.get("DSV3_SDPA", "cudnn")    # the expanded form's fused attention: "cudnn" (cuDNN's, v at
                                                       # its own head size) or "flash" (torch's; see _attend_lse)
LOG2E = 1.4426950408889634

# Launch shapes (benchmarks/attention.py --sweep times the alternatives; benchmarks/attention_sass.py shows what
# each builds to on sm_90). Decode: 64 heads a program (two warpgroups split the 64 x kv_lora accumulator, both
# products on Hopper's warpgroup MMA), at least MIN_KEYS keys a split (a short context still spreads over a few
# programs), about WAVES waves of programs. Key blocks of 64, both: they spill a few registers, yet a program's
# time goes mostly to the scores' chain of small dependent MMAs (Triton gives each warpgroup the whole 64 x BLOCK_N
# tile), and 64 keys take that chain at twice the width of 32.
DECODE = dict(BLOCK_H=64, BLOCK_N=64, MIN_KEYS=128, WAVES=1, KEYS_MAJOR=False, num_warps=8, num_stages=2,
              GLUON=True,        # GLUON: attention_hopper's kernel where it applies (sm_90, DeepSeek's shapes)
              MERGE_WARPS=1,     # the merge's programs: one warp each (many small programs in flight)
              MERGE_TILE=4096,   # partials a merge program takes (all splits x a piece of kv_lora)
              MERGE_VB_ROWS=1,   # up to this many rows the merge rides in the output's W_vb product (merge_vb),
              MERGE_VB_SPLITS=16,  # from this many splits (fewer: a small merge, and torch's product is faster)
              MERGE_VB_TILE=16384, MERGE_VB_WARPS=8)     # a program a (row, head), each reading all of W_vb[h]
PREFILL = dict(ROWS=64, BLOCK_N=64, KEYS_MAJOR=False, num_warps=8, num_stages=2)


def mla_attend(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
               slots: torch.Tensor | int, pos: torch.Tensor, w_kb: torch.Tensor, w_vb: torch.Tensor, scale: float,
               bound: int | None = None) -> torch.Tensor:
    """q_nope (T, H, nope), q_pe (T, H, rope), kv (N, L, kv_lora), pe (N, L, rope), pos (T,) int64, slots: one
    slot for every row (an int: a prefill chunk, rows at consecutive positions) or one per row ((T,) int64: a
    decode step), w_kb (H, nope, kv_lora), w_vb (H, v, kv_lora) -> (T, H, v) float32. `bound`: an upper bound on
    pos + 1 that the caller knows (a CUDA graph's span), which saves reading pos back from the device; for a prefill
    chunk on the GPU, the chunk's end (pos[-1] + 1) exactly."""
    if not (q_nope.is_cuda and q_nope.shape[0]):
        return _blockwise(q_nope, q_pe, kv, pe, slots, pos, w_kb, w_vb, scale, bound)
    if not isinstance(slots, int):
        return decode_triton(q_nope, q_pe, kv, pe, slots, pos, w_kb, w_vb, scale, bound)
    T = q_nope.shape[0]
    end = bound if bound is not None else int(pos[-1]) + 1
    if prefill_form(T) == "sdpa" and _flash_error is None:
        o = prefill_sdpa(q_nope, q_pe, kv, pe, slots, end, w_kb, w_vb, scale)
        if o is not None:
            return o
    if q_nope.shape[1] >= DECODE["BLOCK_H"]:      # one token a tile anyway: the decode launch, split over the keys
        rows = torch.full((T,), slots, dtype=torch.long, device=q_nope.device)
        return decode_triton(q_nope, q_pe, kv, pe, rows, pos, w_kb, w_vb, scale, end)
    return prefill_triton(q_nope, q_pe, kv, pe, slots, pos, w_kb, w_vb, scale)


def prefill_form(T: int) -> str:
    """Which prefill path a chunk of T rows takes: "sdpa" (expanded) once the chunk is long enough that the
    expansion pays, else "triton" (absorbed). Per key and head the absorbed form does 2 * kv_lora + rope
    multiply-adds per row, the expanded one nope + rope + v per row plus (nope + v) * kv_lora once: at DeepSeek's
    shapes the expanded form does fewer from ~170 rows; benchmarks/attention.py times both."""
    return "sdpa" if T >= SDPA_MIN_ROWS else "triton"


def _absorb(q_nope, q_pe, w_kb):
    """The queries the kernels take: [W_kb^T q_nope (kv_lora), q_pe (rope)] per row and head, bf16."""
    q_lat = torch.einsum("thd,hdc->thc", q_nope.to(w_kb.dtype), w_kb).to(torch.bfloat16)
    q_pe = q_pe.to(torch.bfloat16)
    # the kernels take any row and head strides (einsum's (h, t, c) product, seen as (t, h, c), needs no copy)
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (q_lat, q_pe))


def _unabsorb(o, w_vb):
    return torch.einsum("thc,hdc->thd", o.to(w_vb.dtype), w_vb).float()


@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def decode_splits(B: int, H: int, keys: int, device: torch.device, cfg: dict = DECODE) -> int:
    """Key splits per row of a decode launch over at most `keys` keys: about cfg WAVES waves of programs over the
    SMs, no split under MIN_KEYS keys. Fixed per launch (a graph's), each row splits its own length among them."""
    groups = -(-H // cfg["BLOCK_H"])
    want = max(1, cfg["WAVES"] * _sms(device) // (B * groups))
    return max(1, min(want, -(-keys // cfg["MIN_KEYS"])))


def decode_triton(q_nope, q_pe, kv, pe, slots, pos, w_kb, w_vb, scale, bound=None, cfg: dict = DECODE):
    """One decode step of T rows, row t at position pos[t] of slot slots[t] (device tensors, read by the kernels),
    on the split-KV kernel; `bound` (or the cache's length) fixes the split count only."""
    T, H, _ = q_nope.shape
    q_lat, q_rope = _absorb(q_nope, q_pe, w_kb)
    keys = bound if bound is not None else kv.shape[1]
    splits = decode_splits(T, H, keys, q_nope.device, cfg)
    if merges_in_vb(T, splits, cfg):
        part, lse = _attend_latent(q_lat, q_rope, kv, pe, slots, pos, scale, splits, 1, cfg["BLOCK_H"], cfg, False)
        return merge_vb(part, lse, pos, w_vb, cfg)
    o = _attend_latent(q_lat, q_rope, kv, pe, slots, pos, scale, splits, 1, cfg["BLOCK_H"], cfg)
    return _unabsorb(o, w_vb)


def merges_in_vb(T: int, splits: int, cfg: dict = DECODE) -> bool:
    """Whether a decode launch of T rows in `splits` splits merges them inside the W_vb product (merge_vb)."""
    return splits > 1 and splits >= cfg["MERGE_VB_SPLITS"] and T <= cfg["MERGE_VB_ROWS"]


def prefill_triton(q_nope, q_pe, kv, pe, slot: int, pos, w_kb, w_vb, scale, cfg: dict = PREFILL):
    """A prefill chunk (rows of `slot` at consecutive positions pos) on the absorbed kernel: tiles of TOK tokens x
    BLOCK_H heads (ROWS rows), no split."""
    T, H, _ = q_nope.shape
    q_lat, q_rope = _absorb(q_nope, q_pe, w_kb)
    block_h = min(cfg["ROWS"], triton.next_power_of_2(H))
    slots = torch.full((T,), slot, dtype=torch.long, device=q_nope.device)
    o = _attend_latent(q_lat, q_rope, kv, pe, slots, pos, scale, 1, cfg["ROWS"] // block_h, block_h, cfg)
    return _unabsorb(o, w_vb)


def _attend_latent(q_lat, q_rope, kv, pe, slots, pos, scale, splits, tok, block_h, cfg, combine: bool = True):
    """Softmax(q_lat c_kv^T + q_rope k_rope^T) c_kv per row and head, float32 (T, H, kv_lora). `combine=False`
    leaves the splits unmerged and returns them, (partials, log2-sum-exps) (see `merge_vb`)."""
    T, H, DL = q_lat.shape
    DR = q_rope.shape[-1]
    assert kv.stride(-1) == 1 and pe.stride(-1) == 1 and kv.dtype == pe.dtype == torch.bfloat16, "bf16 cache rows"
    # the output: written by the merge, or by the split kernel itself with one split (merge_vb's path writes none)
    out = torch.empty(T, H, DL, dtype=torch.float32, device=q_lat.device) if combine or splits == 1 else None
    if splits > 1:
        # bfloat16 partials: they cross L2 twice (written, merged), so their bytes cost most at one row
        part = torch.empty(T, H, splits, DL, dtype=torch.bfloat16, device=q_lat.device)
        lse = torch.empty(T, H, splits, dtype=torch.float32, device=q_lat.device)
    else:
        part, lse = out.unsqueeze(2), out            # lse unused with one split
    d_lat, d_pe = triton.next_power_of_2(DL), triton.next_power_of_2(DR)
    grid = (triton.cdiv(H, block_h), splits, triton.cdiv(T, tok))
    if not (tok == 1 and cfg.get("GLUON") and _hopper_split(q_lat, q_rope, kv, pe, slots, pos, scale * LOG2E,
                                                             part, lse, cfg["MIN_KEYS"], splits)):
        _mla_split_kernel[grid](
            q_lat, q_rope, kv, pe, slots, pos, part, lse, T, H, scale * LOG2E,
            q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1), kv.stride(0), kv.stride(1),
            pe.stride(0), pe.stride(1), part.stride(0), part.stride(1), part.stride(2),
            cfg.get("MIN_KEYS", 1), DL=DL, DR=DR, SPLITS=splits, TOK=tok, BLOCK_H=block_h, BLOCK_N=cfg["BLOCK_N"],
            D_LAT=d_lat, D_PE=d_pe, KEYS_MAJOR=cfg["KEYS_MAJOR"], DOT_F32=os.environ.get("TRITON_INTERPRET") == "1",
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if splits > 1 and combine:
        p2 = triton.next_power_of_2(splits)
        block_d = max(16, min(d_lat, cfg["MERGE_TILE"] // p2))      # a tile of MERGE_TILE partials a program
        pdl = _pdl(q_lat.device)
        _mla_combine_kernel[(T, H, triton.cdiv(DL, block_d))](
            part, lse, pos, out, part.stride(0), part.stride(1), part.stride(2), cfg["MIN_KEYS"], DL=DL,
            SPLITS=splits, SPLITS_P2=p2, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, PDL=pdl, num_warps=cfg["MERGE_WARPS"],
            **({"launch_pdl": True} if pdl else {}))
    return out if combine else (part, lse)


def merge_vb(part, lse, pos, w_vb, cfg: dict = DECODE):
    """The decode step's output (T, H, v) float32 from the split kernel's partials (T, H, splits, kv_lora) and
    log2-sum-exps: each row's splits merged and multiplied by W_vb in one kernel (`_merge_vb_kernel`)."""
    T, H, splits, DL = part.shape
    DV = w_vb.shape[1]
    assert w_vb.stride(-1) == 1 and part.is_contiguous(), "kv_lora contiguous in W_vb and the partials"
    out = torch.empty(T, H, DV, dtype=torch.float32, device=part.device)
    p2, v2 = triton.next_power_of_2(splits), triton.next_power_of_2(DV)
    block_c = max(16, min(triton.next_power_of_2(DL), cfg["MERGE_VB_TILE"] // max(p2, v2)))
    pdl = _pdl(part.device)
    _merge_vb_kernel[(T, H)](
        part, lse, pos, w_vb, out, part.stride(0), part.stride(1), part.stride(2), w_vb.stride(0), w_vb.stride(1),
        out.stride(0), out.stride(1), cfg["MIN_KEYS"], DL=DL, DV=DV, SPLITS=splits, SPLITS_P2=p2, DV_P2=v2,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_C=block_c, PDL=pdl, num_warps=cfg["MERGE_VB_WARPS"],
        **({"launch_pdl": True} if pdl else {}))
    return out


@functools.cache
def _pdl(device: torch.device) -> bool:
    """Whether the merge is launched as a programmatic dependent of the split kernel (sm_90 and later, compiled)."""
    return (device.type == "cuda" and gdc_wait is not None and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device) >= (9, 0))


_hopper_built = _hopper_noted = False


def _hopper_split(q_lat, q_rope, kv, pe, *args) -> bool:
    """attention_hopper's decode kernel where it applies (sm_90, DeepSeek's shapes); False where it does not, or
    where its first build fails (a Triton whose Gluon differs: said once, and the Triton kernel runs from then on)."""
    global attention_hopper, _hopper_built, _hopper_error, _hopper_noted
    if attention_hopper is None:
        if HOPPER and not _hopper_noted and kv.is_cuda and torch.cuda.get_device_capability(kv.device) == (9, 0):
            _hopper_noted = True
            warnings.warn(f"runtime.attention: the Hopper decode kernel is not available ({_hopper_error}); "
                          f"using the Triton kernel")
        return False
    if not (HOPPER and attention_hopper.usable(q_lat, kv, pe)):
        return False
    try:
        attention_hopper.split(q_lat, q_rope, kv, pe, *args)
    except Exception as e:
        if _hopper_built:
            raise
        _hopper_error, attention_hopper, _hopper_noted = e, None, True
        warnings.warn(f"runtime.attention: the Hopper decode kernel does not build with Triton {triton.__version__} "
                      f"({type(e).__name__}: {str(e).strip().splitlines()[0][:120]}); using the Triton kernel")
        return False
    _hopper_built = True
    return True


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    """a @ b, float32 out. F32: upcast first (Triton's interpreter multiplies bf16 operands' raw bits)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _split_range(length, split, MIN_KEYS, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [start, end) of split `split` of a row of `length` keys: the row's length cut into as many splits
    as have MIN_KEYS keys each (at most SPLITS), each a whole number of key blocks. Also the active count: the
    splits that hold keys (rounding up to whole blocks can leave the last ones empty; they run and write nothing)."""
    n = tl.minimum(SPLITS, (length + MIN_KEYS - 1) // MIN_KEYS)
    per = ((length + n - 1) // n + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * per
    return start, tl.minimum(length, start + per), (length + per - 1) // per


@triton.jit
def _mla_split_kernel(q_ptr, qr_ptr, kv_ptr, pe_ptr, slot_ptr, pos_ptr, o_ptr, lse_ptr, T, H, qk_scale,
                      s_qt, s_qh, s_rt, s_rh, s_kn, s_kl, s_pn, s_pl, s_ot, s_oh, s_os, MIN_KEYS,
                      DL: tl.constexpr, DR: tl.constexpr, SPLITS: tl.constexpr, TOK: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, D_LAT: tl.constexpr, D_PE: tl.constexpr,
                      KEYS_MAJOR: tl.constexpr, DOT_F32: tl.constexpr):
    """Program (head group, split, token group): rows are TOK tokens (one slot) x BLOCK_H heads; each key block
    of that slot is loaded once for all of them. With SPLITS > 1 (TOK = 1), writes the split's normalized output
    (in o_ptr's type: bfloat16 partials) and its log2-sum-exp; with one split, the output."""
    M: tl.constexpr = TOK * BLOCK_H
    r = tl.arange(0, M)
    t = (tl.program_id(2) * TOK + r // BLOCK_H).to(tl.int64)      # offsets past 2^31 in a long chunk
    h = tl.program_id(0) * BLOCK_H + r % BLOCK_H
    split = tl.program_id(1)
    p = tl.load(pos_ptr + t, mask=t < T, other=-1).to(tl.int32)    # a row sees keys 0..p
    length = tl.max(p, axis=0) + 1
    row_ok = (t < T) & (h < H)
    if SPLITS > 1:
        start, end, active = _split_range(length, split, MIN_KEYS, SPLITS, BLOCK_N)
        row_ok = row_ok & (split + 0 * r < active)     # past the row's length: no loads, no writes
    else:
        start, end = 0, length
    slot = tl.load(slot_ptr + tl.program_id(2) * TOK)
    dl = tl.arange(0, D_LAT)
    dr = tl.arange(0, D_PE)
    if KEYS_MAJOR:                                                  # (D, M): the scores' B operand
        q = tl.load(q_ptr + t[None, :] * s_qt + h[None, :] * s_qh + dl[:, None],
                    mask=row_ok[None, :] & (dl < DL)[:, None], other=0.0)
        qr = tl.load(qr_ptr + t[None, :] * s_rt + h[None, :] * s_rh + dr[:, None],
                     mask=row_ok[None, :] & (dr < DR)[:, None], other=0.0)
    else:                                                           # (M, D): their A operand
        q = tl.load(q_ptr + t[:, None] * s_qt + h[:, None] * s_qh + dl[None, :],
                    mask=row_ok[:, None] & (dl < DL)[None, :], other=0.0)
        qr = tl.load(qr_ptr + t[:, None] * s_rt + h[:, None] * s_rh + dr[None, :],
                     mask=row_ok[:, None] & (dr < DR)[None, :], other=0.0)
    kv_base = kv_ptr + slot * s_kn
    pe_base = pe_ptr + slot * s_pn
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D_LAT], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        key_ok = n < end
        k = tl.load(kv_base + n[:, None] * s_kl + dl[None, :], mask=key_ok[:, None] & (dl < DL)[None, :],
                    other=0.0)
        kr = tl.load(pe_base + n[:, None] * s_pl + dr[None, :], mask=key_ok[:, None] & (dr < DR)[None, :],
                     other=0.0)
        if KEYS_MAJOR:
            # Scores as (BLOCK_N, M): the key block is the product's A operand and the queries its B, which the
            # tensor cores read from shared memory, so the queries need no registers beside the M x kv_lora
            # accumulator (BLOCK_N 64 for Hopper's warpgroup products).
            s = tl.trans(_dot(k, q, DOT_F32) + _dot(kr, qr, DOT_F32))
        else:
            s = _dot(q, tl.trans(k), DOT_F32) + _dot(qr, tl.trans(kr), DOT_F32)
        s = tl.where(key_ok[None, :] & (n[None, :] <= p[:, None]), s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)       # rows with no key yet: keep zeros
        alpha = tl.math.exp2(m_i - m_use)
        e = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(e, axis=1)
        acc = acc * alpha[:, None] + _dot(e.to(k.dtype), k, DOT_F32)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + t[:, None] * s_ot + h[:, None] * s_oh + split * s_os + dl[None, :],
             o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (dl < DL)[None, :])
    if SPLITS > 1:
        lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + t * (H * SPLITS) + h * SPLITS + split, lse, mask=row_ok)


@triton.jit
def _lse_weights(lse):
    """The splits' weights in a row's merge from their log2-sum-exps (-inf where a split holds no keys: weight 0),
    relative to the largest, and their sum."""
    m = tl.max(lse, axis=0)
    w = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    return w, tl.sum(w, axis=0)


@triton.jit
def _mla_combine_kernel(part_ptr, lse_ptr, pos_ptr, out_ptr, s_ot, s_oh, s_os, MIN_KEYS,
                        DL: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """Program (row, head, piece of kv_lora): the row's active splits merged by their log2-sum-exp. All splits'
    partials are loaded at once (a SPLITS_P2 x BLOCK_D tile), not one after another: a serial loop over 64 splits
    would wait on 64 loads in turn. PDL: launched before the split kernel ends, it waits for it once it has read
    the row's position (which the split kernel does not write)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    H = tl.num_programs(1)
    length = tl.load(pos_ptr + t) + 1
    _, _, active = _split_range(length, 0, MIN_KEYS, SPLITS, BLOCK_N)
    if PDL:
        gdc_wait()
    s = tl.arange(0, SPLITS_P2)
    lse = tl.load(lse_ptr + (t * H + h) * SPLITS + s, mask=s < active, other=float("-inf"))
    w, total = _lse_weights(lse)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    part = tl.load(part_ptr + t.to(tl.int64) * s_ot + h * s_oh + s[:, None] * s_os + d[None, :],
                   mask=(s < active)[:, None] & (d < DL)[None, :], other=0.0).to(tl.float32)
    acc = tl.sum(part * w[:, None], axis=0)
    tl.store(out_ptr + (t.to(tl.int64) * H + h) * DL + d, acc / tl.where(total > 0, total, 1.0), mask=d < DL)


@triton.jit
def _merge_vb_kernel(part_ptr, lse_ptr, pos_ptr, w_ptr, out_ptr, s_pt, s_ph, s_ps, s_wh, s_wv, s_ot, s_oh, MIN_KEYS,
                     DL: tl.constexpr, DV: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                     DV_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """Program (row, head): the row's active splits merged by their log2-sum-exp (as `_mla_combine_kernel`), a
    piece of BLOCK_C latent values at a time, each piece multiplied into W_vb[h] (DV x DL) at once: the merged
    latent output never goes to memory, and the partials' reads (from L2, just written) ride on the stream of W_vb
    that the output product reads anyway. The next piece's loads are issued before this one's sums; W_vb's first
    piece before the wait for the split kernel (PDL), which does not write it."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    H = tl.num_programs(1)
    length = tl.load(pos_ptr + t) + 1
    _, _, active = _split_range(length, 0, MIN_KEYS, SPLITS, BLOCK_N)
    s = tl.arange(0, SPLITS_P2)
    c = tl.arange(0, BLOCK_C)
    v = tl.arange(0, DV_P2)
    w_rows = w_ptr + h * s_wh + v[:, None] * s_wv
    p_rows = part_ptr + t.to(tl.int64) * s_pt + h * s_ph + s[:, None] * s_ps
    w_ok, p_ok = (v < DV)[:, None], (s < active)[:, None]
    w = tl.load(w_rows + c[None, :], mask=w_ok & (c < DL)[None, :], other=0.0)
    if PDL:
        gdc_wait()
    p = tl.load(p_rows + c[None, :], mask=p_ok & (c < DL)[None, :], other=0.0)
    lse = tl.load(lse_ptr + (t * H + h) * SPLITS + s, mask=s < active, other=float("-inf"))
    wgt, total = _lse_weights(lse)
    wgt = wgt / tl.where(total > 0, total, 1.0)
    acc = tl.zeros([DV_P2], tl.float32)
    for c0 in range(0, DL, BLOCK_C):
        nxt = c0 + BLOCK_C + c
        w_next = tl.load(w_rows + nxt[None, :], mask=w_ok & (nxt < DL)[None, :], other=0.0)
        p_next = tl.load(p_rows + nxt[None, :], mask=p_ok & (nxt < DL)[None, :], other=0.0)
        o = tl.sum(p.to(tl.float32) * wgt[:, None], axis=0)
        acc += tl.sum(w.to(tl.float32) * o[None, :], axis=1)
        w, p = w_next, p_next
    tl.store(out_ptr + t * s_ot + h * s_oh + v, acc, mask=v < DV)


def prefill_sdpa(q_nope, q_pe, kv, pe, slot: int, end: int, w_kb, w_vb, scale):
    """A prefill chunk of T rows (the last T of positions 0..end-1 of `slot`) on the expanded form: per head
    k = [W_kb c_kv, k_rope], v = W_vb c_kv. The keys are expanded EXPAND_KEYS at a time, so memory stays bounded
    whatever the context: the cache before the chunk in unmasked pieces, then the chunk's own keys (square causal),
    each piece through fused attention with its log-sum-exp (_attend_lse), the pieces merged by it. Where no fused
    op runs, says so once and the chunk takes the absorbed kernel."""
    T, H, nope = q_nope.shape
    vd = w_vb.shape[1]
    offset = end - T
    w = torch.cat([w_kb, w_vb], 1).flatten(0, 1).to(kv.dtype)                      # (H * (nope + v), kv_lora)
    q = torch.cat([q_nope.to(kv.dtype), q_pe.to(kv.dtype)], -1).transpose(0, 1)[None]    # (1, H, T, nope + rope)
    pieces = [(a, min(a + EXPAND_KEYS, offset), False) for a in range(0, offset, EXPAND_KEYS)]
    pieces.append((offset, end, True))
    o = lse = None
    for a, b, causal in pieces:
        kvb = (kv[slot, a:b] @ w.T).view(b - a, H, nope + vd).transpose(0, 1)           # (H, keys, nope + v)
        k = torch.cat([kvb[..., :nope], pe[slot, a:b].to(kv.dtype).expand(H, b - a, pe.shape[-1])], -1)
        part = _attend_lse(q, k[None], kvb[None, ..., nope:], causal, scale)
        del kvb
        if part is None:
            return None
        o_i, lse_i = part[0][0, :, :, :vd].float(), part[1][0].reshape(H, T).float()   # (H, T, v), (H, T)
        if o is None:
            o, lse = o_i, lse_i
            continue
        new = torch.logaddexp(lse, lse_i)
        o = o * torch.exp(lse - new)[..., None] + o_i * torch.exp(lse_i - new)[..., None]
        lse = new
    return o.transpose(0, 1)


def _attend_lse(q, k, v, causal: bool, scale: float):
    """(softmax(q k^T * scale) v, its natural-log log-sum-exp (B, H, T[, 1])) for v's head size at most k's: by
    cuDNN's fused attention where SDPA_BACKEND says so and it runs (it takes v at its own head size), else torch's
    flash kernel (v padded to k's head size); on the CPU (the tests' check of the piecewise merge) in float32 torch
    ops. None where the flash op fails (said once); a cuDNN failure is said once and the flash kernel takes over."""
    if not q.is_cuda:
        s = torch.einsum("bhtd,bhsd->bhts", q.float(), k.float()) * scale
        if causal:
            s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, -1) @ v.float(), torch.logsumexp(s, -1)
    global _flash_error, _cudnn_error
    if SDPA_BACKEND == "cudnn" and _cudnn_error is None:
        try:
            out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v.contiguous(), None, True, 0.0, causal,
                                                                      False, scale=scale)
            return out[0], out[1]
        except Exception as e:         # a cuDNN without fused attention for these shapes
            _cudnn_error = e
            warnings.warn(f"runtime.attention: cuDNN's attention failed ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:120]}); prefill chunks take torch's flash kernel")
    if _flash_error is None:
        try:
            v = F.pad(v, (0, k.shape[-1] - v.shape[-1]))
            out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
            return out[0], out[1]
        except Exception as e:         # a torch without the op, or one whose flash build refuses these shapes
            _flash_error = e
            warnings.warn(f"runtime.attention: torch's flash attention op failed ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:120]}); prefill chunks take the absorbed Triton kernel")
    return None


_flash_error: Exception | None = None
_cudnn_error: Exception | None = None


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
