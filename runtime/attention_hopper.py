"""The split-KV MLA decode kernel on sm_90 in Gluon (runtime.attention's `_mla_split_kernel`, rebuilt where Triton's
choices cost most), with the two warpgroups in FlashMLA's roles:
- warpgroup 0 computes each 64-key block's whole 64 heads x 64 keys score tile (the queries' nine 64 x 64 pieces,
  [q_lat | q_pe], sit in shared memory), its softmax in registers (no reduction across warpgroups), and
  P @ c_kv[:, :256] with P from registers; it hands P and the rescale factors to warpgroup 1 through shared memory
  and computes the next block's scores while warpgroup 1 runs P @ c_kv[:, 256:];
- warpgroup 1 (a warp-specialized partition) does that second half and issues the key blocks' copies: c_kv in eight
  64-wide pieces and k_rope, by TMA into a ring of two stages, each refilled once both warpgroups are done with it.
Mbarriers order the hand-overs (block ready, stage free, P ready, P read). Triton's kernel gave each warpgroup the
whole score tile (computed twice, at 16 columns an MMA) and copied key blocks through registers.
Same contract as the Triton kernel for one row a program (TOK = 1): program (head group of 64, split, row), the row's
length cut by `split_range`, the split's normalized output and its log2-sum-exp out; a split past the row's end
writes zeros and -inf. Keys past a row's end but inside the cache are read and masked: the cache must hold finite
values there (runtime.model zero-fills it); past the cache's end TMA reads zeros.

Only for 64-head groups, kv_lora 512, rope 64 and a contiguous bf16 cache (DeepSeek-V3's shapes); runtime.attention
picks it (`usable`) and keeps the Triton kernel for everything else and as the reference.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK_N = gl.constexpr(64)     # keys a step
STAGES = gl.constexpr(2)       # key blocks in shared memory: 2 x 72 KiB beside the queries' 72 KiB and P's 8
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
    args = (q_lat, q_rope, kv_desc, pe_desc, slots, pos, part, lse, H, L, qk_scale,
            q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1),
            part.stride(0), part.stride(1), part.stride(2), min_keys)
    # warpgroup 0 is the kernel's 4 warps, warpgroup 1 a 4-warp partition (`R1` registers a thread, it holds half
    # the output's accumulator)
    _split_kernel[(H // 64, splits, T)](*args, SPLITS=splits, R1=232, num_warps=4)


@gluon.jit
def _split_kernel(q_ptr, qr_ptr, kv_desc, pe_desc, slot_ptr, pos_ptr, o_ptr, lse_ptr, H, L, qk_scale,
                  s_qt, s_qh, s_rt, s_rh, s_ot, s_oh, s_os, MIN_KEYS, SPLITS: gl.constexpr, R1: gl.constexpr):
    t = gl.program_id(2)
    sp = gl.program_id(1)
    # the merge (runtime.attention's, launched as a programmatic dependent) may start launching now: it waits for
    # this grid's end itself, and its launch then overlaps this grid's last programs
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)
    length = gl.load(pos_ptr + t).to(gl.int32) + 1
    slot = gl.load(slot_ptr + t).to(gl.int32)          # beside the length's load, not after it
    active = gl.minimum(SPLITS, (length + MIN_KEYS - 1) // MIN_KEYS)
    if sp < active:
        per = ((length + active - 1) // active + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        start = sp * per
        end = gl.minimum(length, start + per)
        if start < end:
            _split_body(q_ptr, qr_ptr, kv_desc, pe_desc, o_ptr, lse_ptr, H, qk_scale, s_qt, s_qh, s_rt, s_rh, s_ot,
                        s_oh, s_os, t, sp, start, end, slot * L, SPLITS, R1)
        else:       # a split past the row's end (the last blocks rounded up): weight 0 in the merge
            zl: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0])
            h = gl.program_id(0) * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, zl))
            d = gl.arange(0, DL, layout=gl.SliceLayout(0, zl))
            gl.store(o_ptr + t * s_ot + h[:, None] * s_oh + sp * s_os + d[None, :], gl.zeros([64, DL], gl.float32, zl))
            gl.store(lse_ptr + t * (H * SPLITS) + h * SPLITS + sp, gl.full([64], float("-inf"), gl.float32,
                                                                           gl.SliceLayout(1, zl)))


@gluon.jit
def _split_body(q_ptr, qr_ptr, kv_desc, pe_desc, o_ptr, lse_ptr, H, qk_scale, s_qt, s_qh, s_rt, s_rh, s_ot, s_oh,
                s_os, t, sp, start, end, row0, SPLITS: gl.constexpr, R1: gl.constexpr):
    PIECES: gl.constexpr = DL // 64
    h0 = gl.program_id(0) * 64
    piece: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16)
    kv_l: gl.constexpr = kv_desc.layout
    wide: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, DL], gl.bfloat16)
    q_s = gl.allocate_shared_memory(gl.bfloat16, [PIECES + 1, 64, 64], piece)
    k_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, DL], wide)
    r_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, DR], kv_l)
    p_s = gl.allocate_shared_memory(gl.bfloat16, [64, BLOCK_N], piece)
    a_s = gl.allocate_shared_memory(gl.float32, [64], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    # bars: ready[0..1] (TMA), free[0..1] (WG0 done with a stage), p_ready (P and alpha published), p_free (read)
    bars = gl.allocate_shared_memory(gl.int64, [2 * STAGES + 2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2 * STAGES + 2):
        mbarrier.init(bars.index(i), count=1)
    steps = gl.cdiv(end - start, BLOCK_N)
    for i in gl.static_range(STAGES):
        if i < steps:
            _load_block(kv_desc, pe_desc, k_s, r_s, bars, i, row0 + start + i * BLOCK_N)
    ql: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    rows = h0 + gl.arange(0, 64, layout=gl.SliceLayout(1, ql))
    cols = gl.arange(0, 64, layout=gl.SliceLayout(0, ql))
    # the queries by cp.async, all ten pieces in flight at once (through registers, loads and stores alternate)
    for j in gl.static_range(PIECES):
        async_copy.async_copy_global_to_shared(q_s.index(j), q_ptr + t * s_qt + rows[:, None] * s_qh + j * 64
                                               + cols[None, :])
    async_copy.async_copy_global_to_shared(q_s.index(PIECES), qr_ptr + t * s_rt + rows[:, None] * s_rh + cols[None, :])
    async_copy.commit_group()
    async_copy.wait_group(0)
    fence_async_shared()
    gl.thread_barrier()
    gl.warp_specialize([
        (_scores_wg, (q_s, k_s, r_s, p_s, a_s, bars, o_ptr, lse_ptr, H, qk_scale, s_ot, s_oh, s_os, t, sp, start,
                      end, steps, SPLITS)),
        (_values_wg, (k_s, r_s, p_s, a_s, bars, kv_desc, pe_desc, o_ptr, s_ot, s_oh, s_os, t, sp, start, steps,
                      row0)),
    ], [4], [R1])


@gluon.jit
def _scores(q_s, kb, rb, s_zero):
    """Queries x a key block, 64 x 64, as an asynchronous chain of MMAs (the caller waits)."""
    PIECES: gl.constexpr = DL // 64
    s = warpgroup_mma(q_s.index(0), kb.slice(0, 64, dim=1).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    for j in gl.static_range(1, PIECES):
        s = warpgroup_mma(q_s.index(j), kb.slice(j * 64, 64, dim=1).permute((1, 0)), s, is_async=True)
    return warpgroup_mma(q_s.index(PIECES), rb.permute((1, 0)), s, is_async=True)


@gluon.jit
def _softmax(s, m_i, l_i, keys, base, end, qk_scale):
    n = base + keys
    s = gl.where((n < end)[None, :], s * qk_scale, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    alpha = gl.exp2(m_i - m_new)
    e = gl.exp2(s - m_new[:, None])
    return e.to(gl.bfloat16), alpha, m_new, l_i * alpha + gl.sum(e, axis=1)


@gluon.jit
def _scores_wg(q_s, k_s, r_s, p_s, a_s, bars, o_ptr, lse_ptr, H, qk_scale, s_ot, s_oh, s_os, t, sp, start, end,
               steps, SPLITS: gl.constexpr):
    """Warpgroup 0: the scores and softmax of every block, P @ c_kv[:, :256] from registers."""
    HALF: gl.constexpr = DL // 2
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 16])
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    p_ready = bars.index(2 * STAGES)
    p_free = bars.index(2 * STAGES + 1)
    keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_l))
    m_i = gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, s_l))
    l_i = gl.zeros([64], gl.float32, gl.SliceLayout(1, s_l))
    acc = gl.zeros([64, HALF], gl.float32, o_l)
    s_zero = gl.zeros([64, BLOCK_N], gl.float32, s_l)
    mbarrier.wait(bars.index(0), 0)
    s = _scores(q_s, k_s.index(0), r_s.index(0), s_zero)
    s = warpgroup_mma_wait(0, deps=(s, ))
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, keys, start, end, qk_scale)
    for i in range(steps - 1):
        st = i % STAGES
        nx = (i + 1) % STAGES
        acc = _publish(p, alpha, acc, p_s, a_s, p_ready, p_free, i, o_l)
        acc = warpgroup_mma(gl.convert_layout(p, p_l), k_s.index(st).slice(0, HALF, dim=1), acc, is_async=True)
        mbarrier.wait(bars.index(nx), ((i + 1) // STAGES) & 1)
        s = _scores(q_s, k_s.index(nx), r_s.index(nx), s_zero)
        acc = warpgroup_mma_wait(1, deps=(acc, ))
        gl.thread_barrier()
        mbarrier.arrive(bars.index(STAGES + st), count=1)      # this warpgroup is done with stage st
        s = warpgroup_mma_wait(0, deps=(s, ))
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, keys, start + (i + 1) * BLOCK_N, end, qk_scale)
    last = steps - 1
    acc = _publish(p, alpha, acc, p_s, a_s, p_ready, p_free, last, o_l)
    acc = warpgroup_mma(gl.convert_layout(p, p_l), k_s.index(last % STAGES).slice(0, HALF, dim=1), acc)
    # the row sums for warpgroup 1's half, through the same hand-over
    mbarrier.wait(p_free, (steps & 1) ^ 1)
    a_s.store(gl.where(l_i > 0, 1.0 / l_i, 0.0))
    gl.thread_barrier()
    mbarrier.arrive(p_ready, count=1)
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_l))
    o = acc / gl.where(l_o > 0, l_o, 1.0)[:, None]
    h = gl.program_id(0) * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, o_l))
    d = gl.arange(0, HALF, layout=gl.SliceLayout(0, o_l))
    gl.store(o_ptr + t * s_ot + h[:, None] * s_oh + sp * s_os + d[None, :], o)
    if SPLITS > 1:
        lse = gl.where(l_i > 0, m_i + gl.log2(gl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        hs = gl.program_id(0) * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_l))
        gl.store(lse_ptr + t * (H * SPLITS) + hs * SPLITS + sp, lse)


@gluon.jit
def _publish(p, alpha, acc, p_s, a_s, p_ready, p_free, i, o_l: gl.constexpr):
    """P_i and alpha_i to shared memory for warpgroup 1 (once it has read P_{i-1}); this half rescaled."""
    mbarrier.wait(p_free, (i & 1) ^ 1)
    p_s.store(p)
    a_s.store(alpha)
    fence_async_shared()
    gl.thread_barrier()
    mbarrier.arrive(p_ready, count=1)
    return acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]


@gluon.jit
def _values_wg(k_s, r_s, p_s, a_s, bars, kv_desc, pe_desc, o_ptr, s_ot, s_oh, s_os, t, sp, start, steps, row0):
    """Warpgroup 1: P @ c_kv[:, 256:] from shared memory, and the key blocks' copies."""
    HALF: gl.constexpr = DL // 2
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 16])
    p_ready = bars.index(2 * STAGES)
    p_free = bars.index(2 * STAGES + 1)
    acc = gl.zeros([64, HALF], gl.float32, o_l)
    for i in range(steps):
        st = i % STAGES
        mbarrier.wait(p_ready, i & 1)
        alpha = a_s.load(gl.SliceLayout(1, o_l))
        acc = acc * alpha[:, None]
        acc = warpgroup_mma(p_s, k_s.index(st).slice(HALF, HALF, dim=1), acc)
        gl.thread_barrier()
        mbarrier.arrive(p_free, count=1)
        if i + STAGES < steps:
            mbarrier.wait(bars.index(STAGES + st), (i // STAGES) & 1)
            _load_block(kv_desc, pe_desc, k_s, r_s, bars, st, row0 + start + (i + STAGES) * BLOCK_N)
    mbarrier.wait(p_ready, steps & 1)
    inv = a_s.load(gl.SliceLayout(1, o_l))
    h = gl.program_id(0) * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, o_l))
    d = HALF + gl.arange(0, HALF, layout=gl.SliceLayout(0, o_l))
    gl.store(o_ptr + t * s_ot + h[:, None] * s_oh + sp * s_os + d[None, :], acc * inv[:, None])


@gluon.jit
def _load_block(kv_desc, pe_desc, k_s, r_s, ready, st, row):
    """A key block's c_kv (eight 64-wide pieces) and k_rope by TMA into stage `st`."""
    bar = ready.index(st)
    mbarrier.expect(bar, BLOCK_N * (DL + DR) * 2)
    kb = k_s.index(st)
    for j in gl.static_range(DL // 64):
        tma.async_copy_global_to_shared(kv_desc, [row, j * 64], bar, kb.slice(j * 64, 64, dim=1))
    tma.async_copy_global_to_shared(pe_desc, [row, 0], bar, r_s.index(st))
