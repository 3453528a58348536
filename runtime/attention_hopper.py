"""The split-KV MLA decode kernel on sm_90 in Gluon (runtime.attention's `_mla_split_kernel`, rebuilt where Triton's
choices cost most), on FlashMLA's "seesaw" schedule. A program's two warpgroups take a round of two 64-key blocks:
- warpgroup 0 computes the even block's 64 heads x 64 keys scores (the queries' nine 64 x 64 pieces, [q_lat | q_pe],
  sit in shared memory) and its softmax, warpgroup 1 the odd block's, each in registers, so one warpgroup's softmax
  runs while the other's products keep the tensor cores busy;
- the output's 64 x 512 float32 accumulator is split by columns: warpgroup 0 holds O[:, :256], warpgroup 1
  O[:, 256:], and each multiplies both blocks' P into its half (its own P from registers, the other's from shared
  memory, where it replaces the block's k_rope once the scores are done);
- the running max is shared: warpgroup 0's max of its block goes to warpgroup 1, whose max over both is the round's;
  each rescales by the factors in turn (mathematically FlashAttention's online softmax).
Each key block sits in one of two stages as two halves on their own TMA barriers: the half of c_kv that its own
warpgroup multiplies by its P (early: reloaded as soon as that product is done) and the other half with k_rope (late:
reloaded once the other warpgroup's product is done); a score chain starts on the early half. At its start a
program also asks its next AHEAD blocks into L2 (`_prefetch`): their reads start at once, not two blocks at a time.
Same contract as the Triton kernel for one row a program (TOK = 1): program (head group of 64, split, row), the row's
length cut as runtime.attention's `_split_range` cuts it, the split's normalized output (with more than one split,
bfloat16 partials stored by TMA from the shared memory that held its own halves of c_kv) and its log2-sum-exp out; a
split past the row's end writes nothing. Keys past a row's end but inside the cache are read and masked (and with an
odd number of blocks, the last round's odd block past the split's end): the cache must hold finite values there
(runtime.model zero-fills it); past the cache's end TMA reads zeros.

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
DL = gl.constexpr(512)
DR = gl.constexpr(64)
HALF = gl.constexpr(DL.value // 2)     # the output's columns a warpgroup holds, c_kv's half a TMA barrier covers
EARLY = gl.constexpr(HALF.value // 64)  # 64-wide pieces of a half: MMAs of a score chain's early half
# key blocks of a split asked into L2 at its start, past the two in shared memory: a grid (a program an SM, two
# head groups reading the same keys) then has at most 66 splits x 8 blocks of 72 KiB (37 MiB) under way, within an
# H100's 50 MiB of L2 as well as an H200's 60 (8 measured no faster than 6 on the H200: BENCHMARKS.md)
AHEAD = gl.constexpr(6)
# each warpgroup's registers: a block's 64 x 64 scores (rows: heads), its half of the 64 x 512 output, P as an operand
S_L = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N.value, 16]))
O_L = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF.value, 16]))
P_L = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=O_L.value, k_width=2))
ROW_L = gl.constexpr(gl.SliceLayout(1, S_L.value))


def usable(q_lat: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor) -> bool:
    H = q_lat.shape[1]
    return (kv.is_cuda and torch.cuda.get_device_capability(kv.device) == (9, 0) and H % 64 == 0
            and kv.shape[-1] == DL.value and pe.shape[-1] == DR.value and kv.is_contiguous() and pe.is_contiguous()
            and kv.dtype == pe.dtype == q_lat.dtype == torch.bfloat16)


def split(q_lat, q_rope, kv, pe, slots, pos, qk_scale: float, part, lse, min_keys: int, splits: int) -> None:
    """The split kernel's launch: part and lse (T, H, splits) as runtime.attention's. With one split, part is the
    float32 output (T, H, 1, DL); with more, the contiguous bfloat16 partials (T, H, splits, DL)."""
    T, H, _ = q_lat.shape
    N, L, _ = kv.shape
    n, dl, dr = BLOCK_N.value, DL.value, DR.value
    layout = gl.NVMMASharedLayout.get_default_for([n, 64], gl.bfloat16)
    kv_desc = TensorDescriptor(kv.view(N * L, dl), [N * L, dl], [dl, 1], [n, 64], layout)
    pe_desc = TensorDescriptor(pe.view(N * L, dr), [N * L, dr], [dr, 1], [n, 64], layout)
    if splits > 1:      # a program's 64 heads x 64 values at a time, rows (row, head), columns (split, value)
        assert part.dtype == torch.bfloat16 and part.is_contiguous(), "contiguous bfloat16 partials"
        part_desc = TensorDescriptor(part.view(T * H, splits * dl), [T * H, splits * dl], [splits * dl, 1], [64, 64],
                                     layout)
    else:               # not used: one split stores the float32 output from registers
        part_desc = kv_desc
    args = (q_lat, q_rope, kv, pe, kv_desc, pe_desc, part_desc, slots, pos, part, lse, H, L, qk_scale,
            q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1),
            part.stride(0), part.stride(1), part.stride(2), min_keys)
    # warpgroup 0 is the kernel's 4 warps, warpgroup 1 a 4-warp partition (`R1` registers a thread, it holds half
    # the output's accumulator)
    _split_kernel[(H // 64, splits, T)](*args, SPLITS=splits, R1=232, num_warps=4)


@gluon.jit
def _split_kernel(q_ptr, qr_ptr, kv_ptr, pe_ptr, kv_desc, pe_desc, part_desc, slot_ptr, pos_ptr, o_ptr, lse_ptr, H,
                  L, qk_scale, s_qt, s_qh, s_rt, s_rh, s_ot, s_oh, s_os, MIN_KEYS, SPLITS: gl.constexpr,
                  R1: gl.constexpr):
    t = gl.program_id(2)
    sp = gl.program_id(1)
    # the merge (runtime.attention's, launched as a programmatic dependent) may start launching now: it waits for
    # this grid's end itself, and its launch then overlaps this grid's last programs
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)
    # the queries by cp.async first, all ten pieces in flight at once (they need no length): their latency overlaps
    # the length's load and the first key blocks'
    PIECES: gl.constexpr = DL // 64
    piece: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16)
    q_s = gl.allocate_shared_memory(gl.bfloat16, [PIECES + 1, 64, 64], piece)
    ql: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    rows = gl.program_id(0) * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, ql))
    cols = gl.arange(0, 64, layout=gl.SliceLayout(0, ql))
    for j in gl.static_range(PIECES):
        async_copy.async_copy_global_to_shared(q_s.index(j), q_ptr + t * s_qt + rows[:, None] * s_qh + j * 64
                                               + cols[None, :])
    async_copy.async_copy_global_to_shared(q_s.index(PIECES), qr_ptr + t * s_rt + rows[:, None] * s_rh + cols[None, :])
    async_copy.commit_group()
    length = gl.load(pos_ptr + t).to(gl.int32) + 1
    slot = gl.load(slot_ptr + t).to(gl.int32)          # beside the length's load, not after it
    n = gl.minimum(SPLITS, (length + MIN_KEYS - 1) // MIN_KEYS)
    per = ((length + n - 1) // n + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = sp * per
    if start < length:      # the splits that hold keys (the merge takes as many)
        _split_body(q_s, kv_ptr, pe_ptr, kv_desc, pe_desc, part_desc, o_ptr, lse_ptr, H, qk_scale, s_ot, s_oh, s_os,
                    t, sp, start, gl.minimum(length, start + per), slot * L, SPLITS, R1)
    else:
        async_copy.wait_group(0)


@gluon.jit
def _split_body(q_s, kv_ptr, pe_ptr, kv_desc, pe_desc, part_desc, o_ptr, lse_ptr, H, qk_scale, s_ot, s_oh, s_os, t,
                sp, start, end, row0, SPLITS: gl.constexpr, R1: gl.constexpr):
    wide: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, DL], gl.bfloat16)
    k_s = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, DL], wide)
    # a block's k_rope, then (once its scores are done) its P for the other warpgroup
    r_s = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, DR], kv_desc.layout)
    # row vectors handed over: m0, c0 (warpgroup 0), m1, c1 (warpgroup 1), then both row sums at the end
    x_s = gl.allocate_shared_memory(gl.float32, [8 * 64], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    # bars: per stage its early and late halves' TMA (E0, L0, E1, L1), then max0, max1, p0, p1, sum0, sum1
    bars = gl.allocate_shared_memory(gl.int64, [10, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(10):
        mbarrier.init(bars.index(i), count=1)
    steps = gl.cdiv(end - start, BLOCK_N)
    for st in gl.static_range(2):      # the first round's blocks (block 1 read and masked where steps == 1)
        _load_half(kv_desc, pe_desc, k_s, r_s, bars, st, 0, row0 + start + st * BLOCK_N)
        _load_half(kv_desc, pe_desc, k_s, r_s, bars, st, 1, row0 + start + st * BLOCK_N)
    _prefetch(kv_ptr, pe_ptr, row0, start + 2 * BLOCK_N, end, AHEAD)     # the next ones, into L2
    async_copy.wait_group(0)
    fence_async_shared()
    gl.thread_barrier()
    gl.warp_specialize([
        (_even_wg, (q_s, k_s, r_s, x_s, bars, kv_desc, pe_desc, part_desc, o_ptr, lse_ptr, H, qk_scale, s_ot, s_oh,
                    s_os, t, sp, start, end, steps, row0, SPLITS)),
        (_odd_wg, (q_s, k_s, r_s, x_s, bars, kv_desc, pe_desc, part_desc, o_ptr, H, qk_scale, s_ot, s_oh, s_os, t,
                   sp, start, end, steps, row0, SPLITS)),
    ], [4], [R1])


@gluon.jit
def _load_half(kv_desc, pe_desc, k_s, r_s, bars, st: gl.constexpr, late: gl.constexpr, row):
    """Half of a key block into stage `st` by TMA: c_kv's four 64-wide pieces of that half, and for the late half
    also k_rope. Stage 0's early half is c_kv[:, :256] (the half warpgroup 0 multiplies by its own P), stage 1's
    c_kv[:, 256:] (warpgroup 1's); each half arrives on its own barrier, so a reload waits only for its readers."""
    bar = bars.index(2 * st + late)
    lo: gl.constexpr = ((st + late) % 2) * HALF
    if late:
        mbarrier.expect(bar, BLOCK_N * (HALF + DR) * 2)
    else:
        mbarrier.expect(bar, BLOCK_N * HALF * 2)
    kb = k_s.index(st)
    for j in gl.static_range(EARLY):
        tma.async_copy_global_to_shared(kv_desc, [row, lo + j * 64], bar, kb.slice(lo + j * 64, 64, dim=1))
    if late:
        tma.async_copy_global_to_shared(pe_desc, [row, 0], bar, r_s.index(st))


@gluon.jit
def _prefetch(kv_ptr, pe_ptr, row0, k0, end, blocks: gl.constexpr):
    """Keys [k0, min(end, k0 + `blocks` key blocks)) of the slot at cache row row0 asked into L2 by one thread (c_kv's
    and k_rope's rows, each contiguous: two bulk prefetches, which nothing waits for), in the first head group's
    program only (the others read the same keys). Two stages in shared memory keep at most two blocks of a program's
    HBM reads under way; these start the next ones at once, so their TMA copies find them in L2. Predicated in the
    PTX, not by a branch: a branch here makes the warpgroups' partitions spill. A window asked again each round
    measured slower (BENCHMARKS.md)."""
    keys = gl.maximum(gl.minimum(end - k0, blocks * BLOCK_N), 0) * (gl.program_id(0) == 0).to(gl.int32)
    row = (row0 + k0).to(gl.int64)
    gl.inline_asm_elementwise(
        "{ .reg .pred p, q; .reg .b32 t; mov.u32 t, %tid.x; and.b32 t, t, 127; setp.ne.u32 q, $3, 0; "
        "setp.eq.and.u32 p, t, 0, q; @p cp.async.bulk.prefetch.L2.global [$1], $3; "
        "@p cp.async.bulk.prefetch.L2.global [$2], $4; mov.u32 $0, 0; }", "=r,l,l,r,r",
        [kv_ptr + row * DL, pe_ptr + row * DR, keys * (DL * 2), keys * (DR * 2)], dtype=gl.int32, is_pure=False,
        pack=1)


@gluon.jit
def _scores(q_s, k_s, r_s, bars, st: gl.constexpr, ph, s_zero, keys, base, end, qk_scale):
    """The queries x stage st's key block (keys from `base`), 64 x 64, scaled, keys from `end` on masked: a chain of
    MMAs on the early half's four pieces as soon as they are in, then on the late half's and k_rope."""
    kb = k_s.index(st)
    lo: gl.constexpr = st * HALF
    hi: gl.constexpr = (1 - st) * HALF
    mbarrier.wait(bars.index(2 * st), ph)
    s = warpgroup_mma(q_s.index(lo // 64), kb.slice(lo, 64, dim=1).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    for j in gl.static_range(1, EARLY):
        s = warpgroup_mma(q_s.index(lo // 64 + j), kb.slice(lo + j * 64, 64, dim=1).permute((1, 0)), s,
                          is_async=True)
    mbarrier.wait(bars.index(2 * st + 1), ph)
    for j in gl.static_range(EARLY):
        s = warpgroup_mma(q_s.index(hi // 64 + j), kb.slice(hi + j * 64, 64, dim=1).permute((1, 0)), s,
                          is_async=True)
    s = warpgroup_mma(q_s.index(DL // 64), r_s.index(st).permute((1, 0)), s, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, ))
    return gl.where(((base + keys) < end)[None, :], s * qk_scale, float("-inf"))


@gluon.jit
def _hand_over(x_s, at: gl.constexpr, m, c, bar):
    """A round's running max and rescale factor to the other warpgroup: x_s[at:at + 128], then `bar`."""
    x_s.slice(at, 64).store(m)
    x_s.slice(at + 64, 64).store(c)
    gl.thread_barrier()
    mbarrier.arrive(bar, count=1)


@gluon.jit
def _even_wg(q_s, k_s, r_s, x_s, bars, kv_desc, pe_desc, part_desc, o_ptr, lse_ptr, H, qk_scale, s_ot, s_oh, s_os,
             t, sp, start, end, steps, row0, SPLITS: gl.constexpr):
    """Warpgroup 0: the even key blocks' scores and softmax (stage 0), O[:, :256] from both blocks of a round."""
    keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_L))
    m_i = gl.full([64], float("-inf"), gl.float32, ROW_L)
    l_i = gl.zeros([64], gl.float32, ROW_L)
    acc = gl.zeros([64, HALF], gl.float32, O_L)
    s_zero = gl.zeros([64, BLOCK_N], gl.float32, S_L)
    for r in range(gl.cdiv(steps, 2)):
        ph = r & 1
        b = 2 * r
        more = b + 2 < steps
        s = _scores(q_s, k_s, r_s, bars, 0, ph, s_zero, keys, start + b * BLOCK_N, end, qk_scale)
        m0 = gl.maximum(m_i, gl.max(s, axis=1))
        c0 = gl.exp2(m_i - m0)
        _hand_over(x_s, 0, m0, c0, bars.index(4))
        e = gl.exp2(s - m0[:, None])
        l_i = l_i * c0 + gl.sum(e, axis=1)
        acc = acc * gl.convert_layout(c0, gl.SliceLayout(1, O_L))[:, None]
        acc = warpgroup_mma(gl.convert_layout(e.to(gl.bfloat16), P_L), k_s.index(0).slice(0, HALF, dim=1), acc,
                            is_async=True)
        mbarrier.wait(bars.index(5), ph)           # warpgroup 1's max over both blocks, and its factor c1
        m_i = x_s.slice(128, 64).load(ROW_L)
        c1 = x_s.slice(192, 64).load(ROW_L)
        r_s.index(0).store((e * c1[:, None]).to(gl.bfloat16))       # P0 in m1's frame, for warpgroup 1
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(bars.index(6), count=1)
        l_i = l_i * c1
        acc = warpgroup_mma_wait(0, deps=(acc, ))  # P0 @ c_kv[:, :256] done: stage 0's early half is free
        if more:
            _load_half(kv_desc, pe_desc, k_s, r_s, bars, 0, 0, row0 + start + (b + 2) * BLOCK_N)
        acc = acc * gl.convert_layout(c1, gl.SliceLayout(1, O_L))[:, None]
        mbarrier.wait(bars.index(7), ph)
        acc = warpgroup_mma(r_s.index(1), k_s.index(1).slice(0, HALF, dim=1), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))  # P1 @ c_kv[:, :256] done: stage 1's late half is free
        if more:
            _load_half(kv_desc, pe_desc, k_s, r_s, bars, 1, 1, row0 + start + (b + 3) * BLOCK_N)
    l_i = _row_sum(l_i, x_s, bars, 0)
    if SPLITS > 1:      # the log2-sum-exp first: its store is under way while the partial is staged
        lse = gl.where(l_i > 0, m_i + gl.log2(gl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        hs = gl.program_id(0) * 64 + gl.arange(0, 64, layout=ROW_L)
        gl.store(lse_ptr + t * (H * SPLITS) + hs * SPLITS + sp, lse, eviction_policy="evict_last")
    _store_half(acc, l_i, k_s, part_desc, o_ptr, H, t, sp, s_ot, s_oh, s_os, 0, SPLITS)


@gluon.jit
def _odd_wg(q_s, k_s, r_s, x_s, bars, kv_desc, pe_desc, part_desc, o_ptr, H, qk_scale, s_ot, s_oh, s_os, t, sp,
            start, end, steps, row0, SPLITS: gl.constexpr):
    """Warpgroup 1: the odd key blocks' scores and softmax (stage 1), O[:, 256:] from both blocks of a round. With
    an odd number of blocks the last round's odd block lies past the split's end: all masked, its P zeros."""
    keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_L))
    l_i = gl.zeros([64], gl.float32, ROW_L)
    acc = gl.zeros([64, HALF], gl.float32, O_L)
    s_zero = gl.zeros([64, BLOCK_N], gl.float32, S_L)
    for r in range(gl.cdiv(steps, 2)):
        ph = r & 1
        b = 2 * r + 1
        more = b + 1 < steps
        s = _scores(q_s, k_s, r_s, bars, 1, ph, s_zero, keys, start + b * BLOCK_N, end, qk_scale)
        mbarrier.wait(bars.index(4), ph)           # warpgroup 0's max and factor c0
        m0 = x_s.slice(0, 64).load(ROW_L)
        c0 = x_s.slice(64, 64).load(ROW_L)
        m1 = gl.maximum(m0, gl.max(s, axis=1))
        c1 = gl.exp2(m0 - m1)
        _hand_over(x_s, 128, m1, c1, bars.index(5))
        e = gl.exp2(s - m1[:, None])
        l_i = l_i * (c0 * c1) + gl.sum(e, axis=1)
        acc = acc * gl.convert_layout(c0 * c1, gl.SliceLayout(1, O_L))[:, None]
        p = e.to(gl.bfloat16)
        acc = warpgroup_mma(gl.convert_layout(p, P_L), k_s.index(1).slice(HALF, HALF, dim=1), acc, is_async=True)
        r_s.index(1).store(p)                      # P1 for warpgroup 0
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(bars.index(7), count=1)
        acc = warpgroup_mma_wait(0, deps=(acc, ))  # P1 @ c_kv[:, 256:] done: stage 1's early half is free
        if more:
            _load_half(kv_desc, pe_desc, k_s, r_s, bars, 1, 0, row0 + start + (b + 2) * BLOCK_N)
        mbarrier.wait(bars.index(6), ph)
        acc = warpgroup_mma(r_s.index(0), k_s.index(0).slice(HALF, HALF, dim=1), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))  # P0 @ c_kv[:, 256:] done: stage 0's late half is free
        if more:
            _load_half(kv_desc, pe_desc, k_s, r_s, bars, 0, 1, row0 + start + (b + 1) * BLOCK_N)
    l_i = _row_sum(l_i, x_s, bars, 1)
    _store_half(acc, l_i, k_s, part_desc, o_ptr, H, t, sp, s_ot, s_oh, s_os, 1, SPLITS)


@gluon.jit
def _row_sum(l_i, x_s, bars, wg: gl.constexpr):
    """The row sums over both warpgroups' blocks: each hands its own over and takes the other's."""
    x_s.slice(256 + 64 * wg, 64).store(l_i)
    gl.thread_barrier()
    mbarrier.arrive(bars.index(8 + wg), count=1)
    mbarrier.wait(bars.index(9 - wg), 0)
    return l_i + x_s.slice(320 - 64 * wg, 64).load(ROW_L)


@gluon.jit
def _store_half(acc, l_i, k_s, part_desc, o_ptr, H, t, sp, s_ot, s_oh, s_os, wg: gl.constexpr, SPLITS: gl.constexpr):
    """Warpgroup wg's half of the split's normalized output. With one split, the float32 output from registers;
    with more, the bfloat16 partial through shared memory and TMA, whole lines: staged where its own half of c_kv
    sat in its own stage, which no copy refills any more and the other warpgroup does not read."""
    o = acc * gl.convert_layout(gl.where(l_i > 0, 1.0 / l_i, 0.0), gl.SliceLayout(1, O_L))[:, None]
    h0 = gl.program_id(0) * 64
    if SPLITS > 1:
        stage = k_s.index(wg).slice(wg * HALF, HALF, dim=1)
        stage.store(o.to(gl.bfloat16))
        fence_async_shared()
        gl.thread_barrier()
        for j in gl.static_range(EARLY):
            tma.async_copy_shared_to_global(part_desc, [t * H + h0, sp * DL + wg * HALF + j * 64],
                                            stage.slice(j * 64, 64, dim=1))
        tma.store_wait(0)
    else:
        h = h0 + gl.arange(0, 64, layout=gl.SliceLayout(1, O_L))
        d = wg * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(0, O_L))
        gl.store(o_ptr + t * s_ot + h[:, None] * s_oh + sp * s_os + d[None, :], o)
