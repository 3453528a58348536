"""The split-KV MLA decode kernel on sm_90 in Gluon (runtime.attention's `_mla_split_kernel`, rebuilt where Triton's
choices cost most).

Triton gives each of the two warpgroups the whole 64 heads x keys score tile, a chain of small 64x16 (or 64x32)
MMAs per key block that both run, and the key block reaches shared memory through per-thread copies whose addresses
fill the registers. Here:
- the 8 warps split the scores by keys (each warpgroup 64 heads x 32 keys of a 64-key block: nothing computed
  twice) and P @ c_kv by kv_lora columns (each warpgroup 256 of the 512);
- a key block (c_kv in eight 64-wide pieces, and k_rope) arrives by TMA into a ring of two stages, the next block's
  copies in flight while this one is computed;
- the queries sit in shared memory once, as nine 64 x 64 pieces ([q_lat | q_pe]), the scores' A operand.
Same contract as the Triton kernel for one row a program (TOK = 1): program (head group of 64, split, row), the row's
length cut by `split_range`, the split's normalized output and its log2-sum-exp out, and nothing written by a split
past the row's length. Keys past a row's end but inside the cache are read and masked: the cache must hold finite
values there (runtime.model zero-fills it); past the cache's end TMA reads zeros.

Only for 64-head groups, kv_lora 512, rope 64 and a contiguous bf16 cache (DeepSeek-V3's shapes); runtime.attention
picks it (`usable`) and keeps the Triton kernel for everything else and as the reference.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK_N = gl.constexpr(64)     # keys a step
STAGES = gl.constexpr(2)       # key blocks in shared memory: 2 x 72 KiB beside the queries' 72 KiB
DL = gl.constexpr(512)
DR = gl.constexpr(64)


def usable(q_lat: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor) -> bool:
    H = q_lat.shape[1]
    return (kv.is_cuda and torch.cuda.get_device_capability(kv.device) == (9, 0) and H % 64 == 0
            and kv.shape[-1] == DL.value and pe.shape[-1] == DR.value and kv.is_contiguous() and pe.is_contiguous()
            and kv.dtype == pe.dtype == q_lat.dtype == torch.bfloat16)


def split(q_lat, q_rope, kv, pe, slots, pos, qk_scale: float, part, lse, min_keys: int, splits: int) -> None:
    """The split kernel's launch: part (T, H, splits, DL) float32 and lse (T, H, splits) as runtime.attention's."""
    T, H, _ = q_lat.shape
    N, L, _ = kv.shape
    n, dl, dr = BLOCK_N.value, DL.value, DR.value
    layout = gl.NVMMASharedLayout.get_default_for([n, 64], gl.bfloat16)
    kv_desc = TensorDescriptor(kv.view(N * L, dl), [N * L, dl], [dl, 1], [n, 64], layout)
    pe_desc = TensorDescriptor(pe.view(N * L, dr), [N * L, dr], [dr, 1], [n, 64], layout)
    _split_kernel[(H // 64, splits, T)](
        q_lat, q_rope, kv_desc, pe_desc, slots, pos, part, lse, H, L, qk_scale,
        q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1),
        part.stride(0), part.stride(1), part.stride(2), min_keys, SPLITS=splits, num_warps=8)


@gluon.jit
def _split_kernel(q_ptr, qr_ptr, kv_desc, pe_desc, slot_ptr, pos_ptr, o_ptr, lse_ptr, H, L, qk_scale,
                  s_qt, s_qh, s_rt, s_rh, s_ot, s_oh, s_os, MIN_KEYS, SPLITS: gl.constexpr):
    t = gl.program_id(2)
    sp = gl.program_id(1)
    length = gl.load(pos_ptr + t).to(gl.int32) + 1
    active = gl.minimum(SPLITS, (length + MIN_KEYS - 1) // MIN_KEYS)
    if sp < active:
        per = ((length + active - 1) // active + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        start = sp * per
        end = gl.minimum(length, start + per)
        slot = gl.load(slot_ptr + t).to(gl.int32)
        _split_body(q_ptr, qr_ptr, kv_desc, pe_desc, o_ptr, lse_ptr, H, qk_scale, s_qt, s_qh, s_rt, s_rh, s_ot,
                    s_oh, s_os, t, sp, start, end, slot * L, SPLITS)


@gluon.jit
def _split_body(q_ptr, qr_ptr, kv_desc, pe_desc, o_ptr, lse_ptr, H, qk_scale, s_qt, s_qh, s_rt, s_rh, s_ot, s_oh,
                s_os, t, sp, start, end, row0, SPLITS: gl.constexpr):
    PIECES: gl.constexpr = DL // 64
    h0 = gl.program_id(0) * 64
    piece: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16)
    kv_l: gl.constexpr = kv_desc.layout
    wide: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, DL], gl.bfloat16)
    q_s = gl.allocate_shared_memory(gl.bfloat16, [PIECES + 1, 64, 64], piece)
    k_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, DL], wide)
    r_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, DR], kv_l)
    p_s = gl.allocate_shared_memory(gl.bfloat16, [64, BLOCK_N], piece)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    nbytes: gl.constexpr = BLOCK_N * (DL + DR) * 2
    steps = gl.cdiv(end - start, BLOCK_N)
    for i in gl.static_range(STAGES):                   # the first blocks' copies, under the queries' loads
        if i < steps:
            _load_block(kv_desc, pe_desc, k_s, r_s, ready, i, row0 + start + i * BLOCK_N, nbytes)

    # queries -> shared memory, nine 64 x 64 pieces
    ql: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])
    rows = h0 + gl.arange(0, 64, layout=gl.SliceLayout(1, ql))
    cols = gl.arange(0, 64, layout=gl.SliceLayout(0, ql))
    for j in gl.static_range(PIECES):
        q_s.index(j).store(gl.load(q_ptr + t * s_qt + rows[:, None] * s_qh + j * 64 + cols[None, :]))
    q_s.index(PIECES).store(gl.load(qr_ptr + t * s_rt + rows[:, None] * s_rh + cols[None, :]))
    fence_async_shared()
    gl.thread_barrier()

    # scores: warpgroup w takes keys [32 w, 32 w + 32) of a block; the output: kv_lora columns [256 w, 256 w + 256)
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                  instr_shape=[16, BLOCK_N // 2, 16])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, DL // 2, 16])
    keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_l))
    m_i = gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, s_l))
    l_i = gl.zeros([64], gl.float32, gl.SliceLayout(1, s_l))
    acc = gl.zeros([64, DL], gl.float32, o_l)
    s_zero = gl.zeros([64, BLOCK_N], gl.float32, s_l)
    for i in range(steps):
        st = i % STAGES
        mbarrier.wait(ready.index(st), (i // STAGES) & 1)
        kb = k_s.index(st)
        s = warpgroup_mma(q_s.index(0), kb.slice(0, 64, dim=1).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        for j in gl.static_range(1, PIECES):
            s = warpgroup_mma(q_s.index(j), kb.slice(j * 64, 64, dim=1).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma(q_s.index(PIECES), r_s.index(st).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        n = start + i * BLOCK_N + keys
        s = gl.where((n < end)[None, :], s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        alpha = gl.exp2(m_i - m_new)
        e = gl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + gl.sum(e, axis=1)
        m_i = m_new
        p_s.store(e.to(gl.bfloat16))
        fence_async_shared()
        gl.thread_barrier()                             # P whole (both warpgroups' keys) before either reads it
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
        acc = warpgroup_mma(p_s, kb, acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        gl.thread_barrier()                             # stage `st` and P are read: they may be overwritten
        if i + STAGES < steps:
            _load_block(kv_desc, pe_desc, k_s, r_s, ready, st, row0 + start + (i + STAGES) * BLOCK_N, nbytes)

    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_l))
    o = acc / gl.where(l_o > 0, l_o, 1.0)[:, None]
    h = h0 + gl.arange(0, 64, layout=gl.SliceLayout(1, o_l))
    d = gl.arange(0, DL, layout=gl.SliceLayout(0, o_l))
    gl.store(o_ptr + t * s_ot + h[:, None] * s_oh + sp * s_os + d[None, :], o)
    if SPLITS > 1:
        lse = gl.where(l_i > 0, m_i + gl.log2(gl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        hs = h0 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_l))
        gl.store(lse_ptr + t * (H * SPLITS) + hs * SPLITS + sp, lse)


@gluon.jit
def _load_block(kv_desc, pe_desc, k_s, r_s, ready, st, row, nbytes: gl.constexpr):
    """A key block's c_kv (eight 64-wide pieces) and k_rope by TMA into stage `st`."""
    bar = ready.index(st)
    mbarrier.expect(bar, nbytes)
    kb = k_s.index(st)
    for j in gl.static_range(DL // 64):
        tma.async_copy_global_to_shared(kv_desc, [row, j * 64], bar, kb.slice(j * 64, 64, dim=1))
    tma.async_copy_global_to_shared(pe_desc, [row, 0], bar, r_s.index(st))
