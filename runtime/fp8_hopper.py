"""The FP8 linear on Hopper (sm_90), in Gluon: the prefill GEMM (the same block-scaled product as fp8._gemm_kernel,
for many rows) and the decode linear (one token, x quantized inside: _decode_kernel's docstring).

Why a second kernel: each 128-K group's product must be scaled (s_x per row, s_w per weight tile) before it joins
the fp32 sum. Written as `acc += tl.dot(a, b) * s`, every warp of a Triton program waits for its wgmma, then scales,
in lockstep, so the tensor cores idle during the adds (~700 TFLOP/s at best on an H200, under half the fp8 rate).
Issuing the next group's wgmma before scaling the last one does not help: ptxas serializes wgmmas whose accumulator
registers other instructions read while a later one is in flight (warning C7514).

So the work is split by warps (warp specialization), as in DeepGEMM: a producer warp TMA-loads each group's x and
weight tiles into a ring of STAGES shared-memory stages, and two or three consumer warpgroups each own 64 rows of the
output tile: 128 x 128 or 192 x 128, or 128 x 256 where each consumer runs one m64n256 wgmma a group over two weight
blocks. A consumer keeps its sum in units of the current group's scale (_consumer's docstring), so wgmma
accumulates into the sum itself and the sum is its only register tile, which is what lets a 64 x 256 sum fit. It
issues its wgmmas, waits for them, frees the stage, then rescales; the consumers run out of step, so one's wgmmas
fill the tensor cores while another rescales. The grid is persistent (one program per SM walking the tiles, grouped
along M for L2 reuse), so the producer loads the next tile while the consumers store, and the output leaves through
shared memory by TMA, which runs on under the next tile's wgmmas (stored from registers, short K ran at half the
speed: there the output is most of the bytes). At large M the loads take about as long as the math (the kernel
without its wgmmas takes 60-96% of its time: BENCHMARKS.md), so bigger tiles, which pull fewer bytes per FLOP, run
faster; 128 x 256 also reads shared memory less per FLOP in its wgmmas than 256 x 128 (four consumers: measured
1.12x slower, and dropped). Which tile runs, per shape: fp8.hopper_tile.

With two activation terms each group feeds the weight tile in shared memory to two products (the terms' x tiles,
rows t::2 of the quantized x, by two TMA descriptors), each with its own scale, so the weights are read once and the
M tile is 128 tokens either way. Out-of-range rows, columns and K are zero-filled by TMA; K must be a multiple of 16
(TMA strides), x and W contiguous. Where it beats the Triton kernel, and by how much: fp8.use_hopper_kernel and
BENCHMARKS.md. The kernel builds with Triton 3.6's Gluon (`triton.experimental.gluon`, whose API still moves).
"""
from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from runtime.fp8_quant import _quantize     # x quantized as act_quant does (runtime.fp8 imports this module)


@gluon.jit
def _tile(t, tiles_m, tiles_n, group_m, BM: gl.constexpr):
    """Output tile t -> (its first row, its column tile); grouped along M, so that neighbours share weight tiles."""
    per_group = group_m * tiles_n
    first_m = (t // per_group) * group_m
    rows_here = gl.minimum(tiles_m - first_m, group_m)
    return (first_m + (t % per_group) % rows_here) * BM, (t % per_group) // rows_here


@gluon.jit
def _producer(a0_desc, a1_desc, w_desc, a0_bufs, a1_bufs, w_bufs, ready, empty, tiles_m, tiles_n, group_m, n_groups):
    """One warp: TMA loads of each 128-K group's tiles into the next free stage, running on into the next output
    tile while the consumers finish this one."""
    STAGES: gl.constexpr = w_bufs.shape[0]          # (worker partitions take no constexpr arguments: shapes carry them)
    TERMS: gl.constexpr = 2 if a1_bufs.shape[0] > 1 else 1
    CONSUMERS: gl.constexpr = a0_bufs.shape[0] // STAGES
    BN: gl.constexpr = w_bufs.shape[1]
    nbytes: gl.constexpr = TERMS * CONSUMERS * a0_desc.block_type.nbytes + w_desc.block_type.nbytes
    step = 0
    for t in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
        off_m, pid_n = _tile(t, tiles_m, tiles_n, group_m, 64 * CONSUMERS)
        for g in range(n_groups):
            s = step % STAGES
            mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)     # every consumer is done with it
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes)
            tma.async_copy_global_to_shared(w_desc, [pid_n * BN, g * 128], bar, w_bufs.index(s))
            for c in gl.static_range(CONSUMERS):
                tma.async_copy_global_to_shared(a0_desc, [off_m + 64 * c, g * 128], bar,
                                                a0_bufs.index(s * CONSUMERS + c))
                if TERMS == 2:
                    tma.async_copy_global_to_shared(a1_desc, [off_m + 64 * c, g * 128], bar,
                                                    a1_bufs.index(s * CONSUMERS + c))
            step += 1


@gluon.jit
def _store_tile(tile, c_desc, buf, row, col):
    """A warpgroup's tile to global memory by TMA, through its shared-memory buffer (free once the last store left)."""
    tma.store_wait(0)                       # (only the thread that issued the last store waits here)
    gl.thread_barrier()
    buf.store(tile)
    fence_async_shared()
    gl.thread_barrier()
    tma.async_copy_shared_to_global(c_desc, [row, col], buf)


@gluon.jit
def _rescaled(acc, f, f_hi, upper):
    """acc times its rows' factors f, or f_hi in the columns `upper` (a 256-wide tile's second weight block). LLVM
    folds the select: each register's column is known up to its lane's offset, which is under 8."""
    if acc.shape[1] == 128:
        out = acc * f[:, None]
    else:
        out = acc * gl.where(upper[None, :], f_hi[:, None], f[:, None])
    return out


@gluon.jit
def _consumer(a0_bufs, a1_bufs, w_bufs, ready, empty, as_ptr, ws_ptr, c_ptr, c_desc, c_bufs, M, N, tiles_m, tiles_n,
              group_m, n_groups, stride_cm, stride_wsn, WG: gl.constexpr):
    """One warpgroup: rows [64 WG, 64 WG + 64) of each tile. Per group: a wgmma per term into the term's running sum,
    wait, free the stage, then rescale the sum, during which the other warpgroups' wgmmas keep the tensor cores busy.

    The sum is kept in units of the current group's scale s_g (s_x of the row times s_w of the column's weight
    block): after group g it holds sum_j<=g P_j s_j / s_g, so the next group's wgmma accumulates straight into it
    once it is multiplied by s_g / s_g+1 (online, as flash attention rescales its softmax sum). No separate product
    tile: half the registers of `acc += P * s`, which is what lets 256 columns (two weight blocks, one m64n256
    wgmma) fit. After the last group the factor is s_g itself (the next scales read as 1), so the sum leaves in true
    units. Rounding: one fp32 multiply per group, as the scaled add had."""
    STAGES: gl.constexpr = w_bufs.shape[0]
    TERMS: gl.constexpr = 2 if a1_bufs.shape[0] > 1 else 1
    CONSUMERS: gl.constexpr = a0_bufs.shape[0] // STAGES
    BN: gl.constexpr = w_bufs.shape[1]
    TMA_STORE: gl.constexpr = c_bufs.shape[0] == CONSUMERS
    # every scale is at least 2^-50: a zero weight scale (an all-zero block) must not make the units 0. Its group
    # then adds its product times ~2^-50 s_x, and the sum, in units of at least 2^-100, stays finite below ~2e8.
    FLOOR: gl.constexpr = 2.0 ** -50
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 32])
    zeros = gl.zeros((64, BN), gl.float32, layout)
    upper = gl.arange(0, BN, layout=gl.SliceLayout(0, layout)) >= 128    # columns of a 256-wide tile's second block
    step = 0
    for t in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
        off_m, pid_n = _tile(t, tiles_m, tiles_n, group_m, 64 * CONSUMERS)
        rows = off_m + 64 * WG + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
        cols = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
        row_ok = rows < M
        sa_rows = as_ptr + rows * TERMS * n_groups
        ws_lo = ws_ptr + (pid_n * BN // 128) * stride_wsn       # the weight block of the tile's first 128 columns
        ws_hi = ws_lo + (BN // 128 - 1) * stride_wsn            # of its last (the same one where BN is 128)
        hi_ok = pid_n * BN + BN - 128 < N
        # scales are loaded a group ahead: their latency hides behind a group's wgmmas. Rows past M read 1.
        sw_lo = gl.maximum(gl.load(ws_lo), FLOOR)
        sw_hi = gl.maximum(gl.load(ws_hi, mask=hi_ok, other=1.0), FLOOR)
        s0 = gl.maximum(gl.load(sa_rows, mask=row_ok, other=1.0), FLOOR)
        s1 = gl.maximum(gl.load(sa_rows + (TERMS - 1) * n_groups, mask=row_ok, other=1.0), FLOOR)
        acc0 = zeros
        acc1 = zeros
        f0 = gl.full_like(s0, 1.0)          # the factors that bring the sums to this group's units, per row
        f0_hi = f0                          # (and per weight block: the second 128 columns where BN is 256)
        f1 = f0
        for g in range(n_groups):
            more = g + 1 < n_groups
            sw_lo_next = gl.maximum(gl.load(ws_lo + g + 1, mask=more, other=1.0), FLOOR)
            sw_hi_next = gl.maximum(gl.load(ws_hi + g + 1, mask=more & hi_ok, other=1.0), FLOOR)
            s0_next = gl.maximum(gl.load(sa_rows + g + 1, mask=row_ok & more, other=1.0), FLOOR)
            s = step % STAGES
            mbarrier.wait(ready.index(s), (step // STAGES) & 1)
            w = w_bufs.index(s).permute((1, 0))
            # rescaled just before the wgmma that reads it (after the wait, the copies Triton makes of a sum that is
            # rescaled in place read registers of the wgmma in flight, and ptxas serializes them all: C7514)
            acc0 = _rescaled(acc0, f0, f0_hi, upper)
            if TERMS == 2:      # both rescaled before either wgmma: ptxas waits out a wgmma before any rescale
                acc1 = acc1 * f1[:, None]
            acc0 = warpgroup_mma(a0_bufs.index(s * CONSUMERS + WG), w, acc0, is_async=True)
            if TERMS == 2:
                s1_next = gl.maximum(gl.load(sa_rows + n_groups + g + 1, mask=row_ok & more, other=1.0), FLOOR)
                acc1 = warpgroup_mma(a1_bufs.index(s * CONSUMERS + WG), w, acc1, is_async=True)
                acc0, acc1 = warpgroup_mma_wait(0, deps=(acc0, acc1))
                f1 = s1 / s1_next * (sw_lo / sw_lo_next)
                s1 = s1_next
            else:
                acc0 = warpgroup_mma_wait(0, deps=(acc0, ))
            mbarrier.arrive(empty.index(s), count=1)
            f0 = s0 / s0_next
            f0_hi = f0 * (sw_hi / sw_hi_next)
            f0 = f0 * (sw_lo / sw_lo_next)
            s0 = s0_next
            sw_lo = sw_lo_next
            sw_hi = sw_hi_next
            step += 1
        acc0 = _rescaled(acc0, f0, f0_hi, upper)
        if TERMS == 2:
            acc0 += acc1 * f1[:, None]
        if TMA_STORE:       # through shared memory: the store runs on while the next tile's wgmmas do
            out = acc0.to(gl.bfloat16)
            if c_bufs.shape[2] == BN:
                _store_tile(out, c_desc, c_bufs.index(WG), off_m + 64 * WG, pid_n * BN)
            else:           # in two column halves through a buffer half the size (room for another stage)
                lo, hi = gl.split(gl.permute(gl.reshape(out, [64, 2, BN // 2]), (0, 2, 1)))
                _store_tile(lo, c_desc, c_bufs.index(WG), off_m + 64 * WG, pid_n * BN)
                _store_tile(hi, c_desc, c_bufs.index(WG), off_m + 64 * WG, pid_n * BN + BN // 2)
        else:
            c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :]
            gl.store(c_ptrs, acc0.to(gl.bfloat16), mask=row_ok[:, None] & (cols < N)[None, :])
    if TMA_STORE:
        tma.store_wait(0)


# One wrapper per consumer warpgroup: a partition's function takes no constexpr arguments, and the warpgroup's index
# must be one (it picks the slab and the rows at compile time).
@gluon.jit
def _consumer0(a0_bufs, a1_bufs, w_bufs, ready, empty, as_ptr, ws_ptr, c_ptr, c_desc, c_bufs, M, N, tiles_m,
               tiles_n, group_m, n_groups, stride_cm, stride_wsn):
    _consumer(a0_bufs, a1_bufs, w_bufs, ready, empty, as_ptr, ws_ptr, c_ptr, c_desc, c_bufs, M, N, tiles_m, tiles_n,
              group_m, n_groups, stride_cm, stride_wsn, 0)


@gluon.jit
def _consumer1(a0_bufs, a1_bufs, w_bufs, ready, empty, as_ptr, ws_ptr, c_ptr, c_desc, c_bufs, M, N, tiles_m,
               tiles_n, group_m, n_groups, stride_cm, stride_wsn):
    _consumer(a0_bufs, a1_bufs, w_bufs, ready, empty, as_ptr, ws_ptr, c_ptr, c_desc, c_bufs, M, N, tiles_m, tiles_n,
              group_m, n_groups, stride_cm, stride_wsn, 1)


@gluon.jit
def _consumer2(a0_bufs, a1_bufs, w_bufs, ready, empty, as_ptr, ws_ptr, c_ptr, c_desc, c_bufs, M, N, tiles_m,
               tiles_n, group_m, n_groups, stride_cm, stride_wsn):
    _consumer(a0_bufs, a1_bufs, w_bufs, ready, empty, as_ptr, ws_ptr, c_ptr, c_desc, c_bufs, M, N, tiles_m, tiles_n,
              group_m, n_groups, stride_cm, stride_wsn, 2)


@gluon.jit
def _prefill_kernel(a0_desc, a1_desc, w_desc, as_ptr, ws_ptr, c_ptr, c_desc, M, N, n_groups, stride_cm, stride_wsn,
                    TERMS: gl.constexpr, CONSUMERS: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, TMA_STORE: gl.constexpr):
    """Persistent: program p takes output tiles p, p + programs, ... of 64 * CONSUMERS rows x BN columns: 128 x 128,
    and with one term 192 x 128 or 128 x 256. Two terms hold two sums and 256 columns a sum twice as wide, 128
    registers a thread, which only two consumers have."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    gl.static_assert(a0_desc.block_type.shape[0] == 64 and a0_desc.block_type.shape[1] == 128)
    gl.static_assert((CONSUMERS == 2 and BN == 128) or (TERMS == 1 and (CONSUMERS == 3) != (BN == 256)))
    a0_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES * CONSUMERS, 64, 128], a0_desc.layout)
    a1_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES * CONSUMERS if TERMS == 2 else 1, 64, 128],
                                        a0_desc.layout)       # with one term, one unused slab (TERMS for partitions)
    w_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BN, 128], w_desc.layout)
    # a warpgroup's output tile (or half of it), bf16, on its way out by TMA (one unused slab without: TMA_STORE for
    # the partitions)
    c_bufs = gl.allocate_shared_memory(gl.bfloat16, [CONSUMERS if TMA_STORE else 1, 64, c_desc.block_type.shape[1]],
                                       c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=CONSUMERS)          # one arrival per consumer warpgroup

    # scalars as tensors: Triton makes integer arguments equal to 1 constexprs, which partitions cannot take
    tiles_m = gl.to_tensor(gl.cdiv(M, 64 * CONSUMERS))
    tiles_n = gl.to_tensor(gl.cdiv(N, BN))
    group_m = gl.to_tensor(GROUP_M)
    n_groups = gl.to_tensor(n_groups)
    consumer = (a0_bufs, a1_bufs, w_bufs, ready, empty, as_ptr, ws_ptr, c_ptr, c_desc, c_bufs, gl.to_tensor(M),
                gl.to_tensor(N), tiles_m, tiles_n, group_m, n_groups, gl.to_tensor(stride_cm), gl.to_tensor(stride_wsn))
    producer = (a0_desc, a1_desc, w_desc, a0_bufs, a1_bufs, w_bufs, ready, empty, tiles_m, tiles_n, group_m, n_groups)
    if CONSUMERS == 3:
        gl.warp_specialize([(_consumer0, consumer), (_consumer1, consumer), (_consumer2, consumer),
                            (_producer, producer)], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([(_consumer0, consumer), (_consumer1, consumer), (_producer, producer)], [4, 1],
                           [CONSUMER_REGS, PRODUCER_REGS])


@gluon.jit
def _decode_kernel(x_ptr, w_desc, ws_ptr, c_ptr, part_ptr, lock_ptr, M, N, K, n_groups, stride_xm, stride_cm,
                   stride_wsn, TERMS: gl.constexpr, MQ: gl.constexpr, RT: gl.constexpr, GROUPS: gl.constexpr,
                   STAGES: gl.constexpr, SPLIT: gl.constexpr, XQ_LAYOUT: gl.constexpr):
    """The whole linear for a few tokens (M <= MQ): program (n, k) takes 64 weight rows x GROUPS 128-K groups.

    Its weight tiles stream through a ring of STAGES TMA loads (all of them at once where STAGES = GROUPS), and x is
    quantized (fp8_quant._quantize, as act_quant) while the first are in flight. The quantized x of all its groups and
    terms is one wgmma B operand: per term a block of RT >= GROUPS * MQ rows (a power of two, 8 at least), row
    j*MQ + m holding token m's group j (rows past that are zeros). wgmma's N is at least 8, so for one token a row
    per group costs no more tensor-core work than one group padded to 8 rows, the 128 threads quantize GROUPS groups
    at once, and both terms take one wgmma. Group j's wgmma (W tile j as the 64-row A operand) fills every column;
    only group j's columns are kept, by scales that are zero elsewhere, each product added while the next group's
    wgmma runs. The end sums each token's columns over groups and terms. Split K: the last program of a weight-row
    tile to finish sums the partials in split order, as fp8._gemm_kernel does."""
    RB: gl.constexpr = TERMS * RT
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    g0 = pid_k * GROUPS
    xl: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0])
    r = gl.arange(0, RT, layout=gl.SliceLayout(1, xl))
    j, m = r // MQ, r % MQ
    k = (g0 + j)[:, None] * 128 + gl.arange(0, 128, layout=gl.SliceLayout(0, xl))[None, :]
    here = (j < GROUPS) & (g0 + j < n_groups)
    x = gl.load(x_ptr + m[:, None] * stride_xm + k, mask=(here & (m < M))[:, None] & (k < K), other=0.0)
    sw = gl.load(ws_ptr + (pid_n // 2) * stride_wsn + g0 + j, mask=here, other=0.0)
    # x's loads are issued first: the barrier set-up below (a CTA barrier per step) runs under their latency
    w_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, 64, 128], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(STAGES):
        mbarrier.init(ready.index(j), count=1)
    for j in gl.static_range(STAGES):       # past K too (an uneven last split): TMA fills those tiles with zeros
        mbarrier.expect(ready.index(j), w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [pid_n * 64, (g0 + j) * 128], ready.index(j), w_bufs.index(j))

    xq = gl.allocate_shared_memory(gl.float8e4nv, [RB, 128], XQ_LAYOUT)
    sx = gl.allocate_shared_memory(gl.float32, [RB], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    x = x.to(gl.float32)
    for t in gl.static_range(TERMS):
        q, s = _quantize(x)
        xq.slice(t * RT, RT).store(q.to(gl.float8e4nv))
        sx.slice(t * RT, RT).store(s * sw)
        x = x - q * s[:, None]              # what this term missed (launched without FMA contraction: as act_quant)
    fence_async_shared()
    gl.thread_barrier()

    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, RB, 32])
    cols: gl.constexpr = gl.SliceLayout(0, layout)
    scale = sx.load(cols)
    group_of = (gl.arange(0, RB, layout=cols) % RT) // MQ
    zeros = gl.zeros((64, RB), gl.float32, layout)
    acc = zeros
    done = zeros                            # the product in flight (set before its first use below)
    for j in gl.static_range(GROUPS):
        mbarrier.wait(ready.index(j % STAGES), (j // STAGES) & 1)
        product = warpgroup_mma(w_bufs.index(j % STAGES), xq.permute((1, 0)), zeros, use_acc=False, is_async=True)
        if j > 0:                           # the last group's product, added while this one's runs
            done = warpgroup_mma_wait(1, deps=(done, ))
            acc += done * gl.where(group_of == j - 1, scale, 0.0)[None, :]
            if j - 1 + STAGES < GROUPS:     # its weight tile is read: the stage takes the tile STAGES groups on
                slot = (j - 1) % STAGES
                mbarrier.expect(ready.index(slot), w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(w_desc, [pid_n * 64, (g0 + j - 1 + STAGES) * 128], ready.index(slot),
                                                w_bufs.index(slot))
        done = product
    done = warpgroup_mma_wait(0, deps=(done, ))
    acc += done * gl.where(group_of == GROUPS - 1, scale, 0.0)[None, :]

    # out[m, n] = the sum over terms t and groups j of acc[n, t * RT + j * MQ + m], through shared memory
    sums = gl.allocate_shared_memory(gl.float32, [64, RB], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
    sums.store(acc)
    gl.thread_barrier()
    ol: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [4, 1], [0, 1])
    out = sums.slice(0, MQ, dim=1).load(ol)
    for c in gl.static_range(1, TERMS * GROUPS):
        out += sums.slice((c // GROUPS) * RT + (c % GROUPS) * MQ, MQ, dim=1).load(ol)
    n = pid_n * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, ol))
    t = gl.arange(0, MQ, layout=gl.SliceLayout(0, ol))
    mask = (n < N)[:, None] & (t < M)[None, :]
    c_ptrs = c_ptr + t[None, :] * stride_cm + n[:, None]
    if SPLIT == 1:
        gl.store(c_ptrs, out.to(gl.bfloat16), mask=mask)
    else:
        part = part_ptr + t[None, :] * N + n[:, None]           # partials (SPLIT, M, N)
        gl.store(part + pid_k * M * N, out, mask=mask)
        gl.thread_barrier()                                     # every thread's partial is stored before the release
        arrived = gl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            total = gl.load(part, mask=mask, other=0.0, cache_modifier=".cg")
            for i in range(1, SPLIT):
                total += gl.load(part + i * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            gl.store(c_ptrs, total.to(gl.bfloat16), mask=mask)
            gl.store(lock_ptr + pid_n, 0)                       # ready for the next launch (and graph replays)


_sms: dict = {}


def sm_count(device: torch.device) -> int:
    if device not in _sms:
        _sms[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sms[device]


def supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def tma_writable(out: torch.Tensor) -> bool:
    """Whether TMA can store into out: rows contiguous, 16-byte aligned start and row stride."""
    return out.stride(1) == 1 and out.stride(0) * out.element_size() % 16 == 0 and out.data_ptr() % 16 == 0


# registers a consumer thread may hold: what the file has beside the producer's 40 (which counts as 128 threads)
CONSUMER_REGS = {2: 232, 3: 160}


def store_columns(BN: int, half_store: bool | None = None) -> int:
    """Columns of the output slab a consumer stages in shared memory for TMA: BN, or by default half of 256 (two
    halves in turn, which leaves room for a fourth stage)."""
    return BN // 2 if (BN == 256 if half_store is None else half_store) else BN


def prefill_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out: torch.Tensor,
                 terms: int, consumers: int = 2, BN: int = 128, stages: int = 4, group_m: int = 8,
                 consumer_regs: int | None = None, tma_store: bool | None = None, half_store: bool | None = None):
    """a (terms * M, K) e4m3, token m's terms in rows terms*m + t; a_scale (terms * M, ceil(K/128)); w (N, K) e4m3,
    w_scale (ceil(N/128), ceil(K/128)) -> out (M, N) bf16. Tiles of 64 * consumers rows x BN columns (_prefill_kernel:
    3 consumers or BN 256 for one term only). The output leaves by TMA where it can (tma_writable), else by plain
    stores; with 256 columns in two column halves (half_store), which leaves shared memory for a fourth stage."""
    MA, K = a.shape
    N, M = w.shape[0], MA // terms
    n_groups = triton.cdiv(K, 128)
    tma_store = tma_writable(out) if tma_store is None else tma_store
    consumer_regs = consumer_regs or CONSUMER_REGS[consumers]
    a_layout = gl.NVMMASharedLayout.get_default_for([64, 128], gl.float8e4nv)
    w_layout = gl.NVMMASharedLayout.get_default_for([BN, 128], gl.float8e4nv)
    store_cols = store_columns(BN, half_store)
    c_layout = gl.NVMMASharedLayout.get_default_for([64, store_cols], gl.bfloat16)
    view = a.view(M, terms, K)
    a_descs = [TensorDescriptor(view[:, t], [M, K], [terms * K, 1], [64, 128], a_layout) for t in range(terms)]
    w_desc = TensorDescriptor(w, [N, K], [K, 1], [BN, 128], w_layout)
    c = out if tma_store else torch.empty(64, BN, dtype=torch.bfloat16, device=out.device)   # (unused without)
    c_desc = TensorDescriptor(c, list(c.shape), [c.stride(0), 1], [64, store_cols], c_layout)
    grid = (min(triton.cdiv(M, 64 * consumers) * triton.cdiv(N, BN), sm_count(a.device)), )
    _prefill_kernel[grid](a_descs[0], a_descs[-1], w_desc, a_scale, w_scale, out, c_desc, M, N, n_groups,
                          out.stride(0), w_scale.stride(0), TERMS=terms, CONSUMERS=consumers, STAGES=stages,
                          GROUP_M=group_m, CONSUMER_REGS=consumer_regs, PRODUCER_REGS=40, TMA_STORE=tma_store,
                          num_warps=4)
    return out


@functools.lru_cache(maxsize=None)        # fp8.fp8_linear asks for it per call, to check and to key the build
def decode_variant(tokens: int, N: int, K: int, device: torch.device, groups: int | None = None,
                   stages: int | None = None) -> tuple[int, int, int, int]:
    """(MQ, GROUPS, STAGES, SPLIT) of decode_linear, by a rule fitted to a sweep on an H100 (BENCHMARKS.md):
    - MQ: tokens padded to a power of two;
    - GROUPS, the 128-K groups per program: 8 (a 64 KB weight stream), at most 16 / MQ (x's and the products'
      registers) and K's groups rounded up to a power of two; halved, down to 4, while it does not divide K's
      groups (the last split would load and quantize zeros) or leaves under two programs per SM;
    - STAGES, the weight tiles in flight: all of the program's, or 4 where that lets every program be resident at
      once (6 a SM at 4 stages, 3 at 8: a second, partial wave of programs costs more than the shallower ring);
    - SPLIT: programs along K."""
    mq = 1 << (tokens - 1).bit_length()
    n_groups = triton.cdiv(K, 128)
    sms = sm_count(device) if groups is None or stages is None else None     # (overrides need no GPU: the sass tool)
    if groups is None:
        groups = max(1, min(8, 16 // mq, 1 << (n_groups - 1).bit_length()))
        while groups > 4 and (n_groups % groups or triton.cdiv(N, 64) * (n_groups // groups) < 2 * sms):
            groups //= 2
    split = triton.cdiv(n_groups, groups)
    if stages is None:
        stages = 4 if groups > 4 and triton.cdiv(N, 64) * split <= 6 * sms else groups
    return mq, groups, min(stages, groups), split


def decode_constants(terms: int, tokens: int, N: int, K: int, device: torch.device | None, groups: int | None = None,
                     stages: int | None = None) -> dict:
    """_decode_kernel's compile-time arguments: decode_variant's, the rows RT of a term's block of x (a power of two,
    8 at least: wgmma's N) and its shared-memory layout."""
    mq, groups, stages, split = decode_variant(tokens, N, K, device, groups, stages)
    rt = max(8, 1 << (groups * mq - 1).bit_length())
    return dict(TERMS=terms, MQ=mq, RT=rt, GROUPS=groups, STAGES=stages, SPLIT=split,
                XQ_LAYOUT=gl.NVMMASharedLayout.get_default_for([terms * rt, 128], gl.float8e4nv))


def decode_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out: torch.Tensor, terms: int,
                  part: torch.Tensor, locks: torch.Tensor, groups: int | None = None,
                  stages: int | None = None) -> torch.Tensor:
    """x (M, K) float, a few tokens (fp8 sends it one; tested to 16), unquantized -> out (M, N) bf16: the FP8 linear
    (act_quant + block-scaled GEMM, x in `terms` e4m3 terms) in one launch. part/locks: fp8's split-K workspace (the
    caller checks it fits). `groups`, `stages` override decode_variant's rule."""
    M, K = x.shape
    N = w.shape[0]
    consts = decode_constants(terms, M, N, K, x.device, groups, stages)
    w_desc = TensorDescriptor(w, [N, K], [K, 1], [64, 128],
                              gl.NVMMASharedLayout.get_default_for([64, 128], gl.float8e4nv))
    _decode_kernel[(triton.cdiv(N, 64), consts["SPLIT"])](
        x, w_desc, w_scale, out, part, locks, M, N, K, triton.cdiv(K, 128), x.stride(0), out.stride(0),
        w_scale.stride(0), **consts, num_warps=4, enable_fp_fusion=False)
    return out
