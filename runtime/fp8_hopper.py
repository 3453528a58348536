"""The prefill GEMM on Hopper (sm_90), in Gluon: the same block-scaled product as fp8._gemm_kernel, for many rows.

Why a second kernel: each 128-K group's product must be scaled (s_x per row, s_w per weight tile) before it joins
the fp32 sum. Written as `acc += tl.dot(a, b) * s`, every warp of a Triton program waits for its wgmma, then scales,
in lockstep, so the tensor cores idle during the adds (~700 TFLOP/s at best on an H200, under half the fp8 rate).
Issuing the next group's wgmma before scaling the last one does not help: ptxas serializes wgmmas whose accumulator
registers other instructions read while a later one is in flight (warning C7514).

So the work is split by warps (warp specialization), as in DeepGEMM: a producer warp TMA-loads each group's x and
weight tiles into a ring of STAGES shared-memory stages, and two or three consumer warpgroups each own 64 rows of a
128x128 or 192x128 output tile. A consumer issues its wgmmas, waits for them, frees the stage, then scales and adds;
the consumers run out of step, so one's wgmmas fill the tensor cores while another adds. The grid is persistent (one
program per SM walking the tiles, grouped along M for L2 reuse), so the producer loads the next tile while the
consumers store. Three consumers (one term only: 160 registers a thread, where two terms need ~200) share each weight
tile among 192 rows: 17% fewer bytes pulled from L2 per FLOP, which looks like the limit at large M (every variant
measured moves 6.3-7.3 TB/s from L2 to the SMs; BENCHMARKS.md). Which count runs: fp8.hopper_consumers.

With two activation terms each group feeds the weight tile in shared memory to two products (the terms' x tiles,
rows t::2 of the quantized x, by two TMA descriptors), each with its own scale, so the weights are read once and the
M tile is 128 tokens either way. Out-of-range rows, columns and K are zero-filled by TMA; K must be a multiple of 16
(TMA strides), x and W contiguous. Where it beats the Triton kernel, and by how much: fp8.use_hopper_kernel and
BENCHMARKS.md. The kernel builds with Triton 3.6's Gluon (`triton.experimental.gluon`, whose API still moves).
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


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
def _consumer(a0_bufs, a1_bufs, w_bufs, ready, empty, as_ptr, ws_ptr, c_ptr, M, N, tiles_m, tiles_n, group_m,
              n_groups, stride_cm, stride_wsn, WG: gl.constexpr):
    """One warpgroup: rows [64 WG, 64 WG + 64) of each tile. Per group: a wgmma per term, wait, free the stage,
    then the scaled adds, during which the other warpgroups' wgmmas keep the tensor cores busy."""
    STAGES: gl.constexpr = w_bufs.shape[0]
    TERMS: gl.constexpr = 2 if a1_bufs.shape[0] > 1 else 1
    CONSUMERS: gl.constexpr = a0_bufs.shape[0] // STAGES
    BN: gl.constexpr = w_bufs.shape[1]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 32])
    zeros = gl.zeros((64, BN), gl.float32, layout)
    x0 = zeros
    x1 = zeros
    step = 0
    for t in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
        off_m, pid_n = _tile(t, tiles_m, tiles_n, group_m, 64 * CONSUMERS)
        rows = off_m + 64 * WG + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
        cols = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
        row_ok = rows < M
        sa_rows = as_ptr + rows * TERMS * n_groups
        ws_row = ws_ptr + (pid_n * BN // 128) * stride_wsn      # BN divides 128: one weight scale per group
        # scales are loaded a group ahead: their latency hides behind a group's wgmmas
        sw = gl.load(ws_row)
        s0 = gl.load(sa_rows, mask=row_ok, other=0.0) * sw
        s1 = gl.load(sa_rows + (TERMS - 1) * n_groups, mask=row_ok, other=0.0) * sw
        acc = zeros
        for g in range(n_groups):
            more = g + 1 < n_groups
            sw_next = gl.load(ws_row + g + 1, mask=more, other=0.0)
            s0_next = gl.load(sa_rows + g + 1, mask=row_ok & more, other=0.0)
            s = step % STAGES
            mbarrier.wait(ready.index(s), (step // STAGES) & 1)
            w = w_bufs.index(s).permute((1, 0))
            x0 = warpgroup_mma(a0_bufs.index(s * CONSUMERS + WG), w, x0, use_acc=False, is_async=True)
            if TERMS == 2:
                s1_next = gl.load(sa_rows + n_groups + g + 1, mask=row_ok & more, other=0.0)
                x1 = warpgroup_mma(a1_bufs.index(s * CONSUMERS + WG), w, x1, use_acc=False, is_async=True)
                x0, x1 = warpgroup_mma_wait(0, deps=(x0, x1))
            else:
                s1_next = s0_next
                x0 = warpgroup_mma_wait(0, deps=(x0, ))
            mbarrier.arrive(empty.index(s), count=1)
            acc += x0 * s0[:, None]
            if TERMS == 2:
                acc += x1 * s1[:, None]
            s0 = s0_next * sw_next
            s1 = s1_next * sw_next
            step += 1
        c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :]
        gl.store(c_ptrs, acc.to(gl.bfloat16), mask=row_ok[:, None] & (cols < N)[None, :])


# One wrapper per consumer warpgroup: a partition's function takes no constexpr arguments, and the warpgroup's index
# must be one (it picks the slab and the rows at compile time).
@gluon.jit
def _consumer0(a0_bufs, a1_bufs, w_bufs, ready, empty, as_ptr, ws_ptr, c_ptr, M, N, tiles_m, tiles_n, group_m,
               n_groups, stride_cm, stride_wsn):
    _consumer(a0_bufs, a1_bufs, w_bufs, ready, empty, as_ptr, ws_ptr, c_ptr, M, N, tiles_m, tiles_n, group_m, n_groups,
              stride_cm, stride_wsn, 0)


@gluon.jit
def _consumer1(a0_bufs, a1_bufs, w_bufs, ready, empty, as_ptr, ws_ptr, c_ptr, M, N, tiles_m, tiles_n, group_m,
               n_groups, stride_cm, stride_wsn):
    _consumer(a0_bufs, a1_bufs, w_bufs, ready, empty, as_ptr, ws_ptr, c_ptr, M, N, tiles_m, tiles_n, group_m, n_groups,
              stride_cm, stride_wsn, 1)


@gluon.jit
def _consumer2(a0_bufs, a1_bufs, w_bufs, ready, empty, as_ptr, ws_ptr, c_ptr, M, N, tiles_m, tiles_n, group_m,
               n_groups, stride_cm, stride_wsn):
    _consumer(a0_bufs, a1_bufs, w_bufs, ready, empty, as_ptr, ws_ptr, c_ptr, M, N, tiles_m, tiles_n, group_m, n_groups,
              stride_cm, stride_wsn, 2)


@gluon.jit
def _prefill_kernel(a0_desc, a1_desc, w_desc, as_ptr, ws_ptr, c_ptr, M, N, n_groups, stride_cm, stride_wsn,
                    TERMS: gl.constexpr, CONSUMERS: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    """Persistent: program p takes output tiles p, p + programs, ... of 64 * CONSUMERS rows x BN columns."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    gl.static_assert(a0_desc.block_type.shape[0] == 64 and a0_desc.block_type.shape[1] == 128)
    gl.static_assert(CONSUMERS == 2 or (CONSUMERS == 3 and TERMS == 1))
    a0_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES * CONSUMERS, 64, 128], a0_desc.layout)
    a1_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES * CONSUMERS if TERMS == 2 else 1, 64, 128],
                                        a0_desc.layout)       # with one term, one unused slab (TERMS for partitions)
    w_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BN, 128], w_desc.layout)
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
    consumer = (a0_bufs, a1_bufs, w_bufs, ready, empty, as_ptr, ws_ptr, c_ptr, gl.to_tensor(M), gl.to_tensor(N),
                tiles_m, tiles_n, group_m, n_groups, gl.to_tensor(stride_cm), gl.to_tensor(stride_wsn))
    producer = (a0_desc, a1_desc, w_desc, a0_bufs, a1_bufs, w_bufs, ready, empty, tiles_m, tiles_n, group_m, n_groups)
    if CONSUMERS == 3:
        gl.warp_specialize([(_consumer0, consumer), (_consumer1, consumer), (_consumer2, consumer),
                            (_producer, producer)], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([(_consumer0, consumer), (_consumer1, consumer), (_producer, producer)], [4, 1],
                           [CONSUMER_REGS, PRODUCER_REGS])


_sms: dict = {}


def supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def prefill_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out: torch.Tensor,
                 terms: int, consumers: int = 2, BN: int = 128, stages: int = 4, group_m: int = 8,
                 consumer_regs: int | None = None):
    """a (terms * M, K) e4m3, token m's terms in rows terms*m + t; a_scale (terms * M, ceil(K/128)); w (N, K) e4m3,
    w_scale (ceil(N/128), ceil(K/128)) -> out (M, N) bf16. Tiles of 64 * consumers rows (3 with one term only)."""
    MA, K = a.shape
    N, M = w.shape[0], MA // terms
    n_groups = triton.cdiv(K, 128)
    if consumer_regs is None:        # what the register file allows: 232 a thread for two consumers, 160 for three
        consumer_regs = 232 if consumers == 2 else 160
    a_layout = gl.NVMMASharedLayout.get_default_for([64, 128], gl.float8e4nv)
    w_layout = gl.NVMMASharedLayout.get_default_for([BN, 128], gl.float8e4nv)
    view = a.view(M, terms, K)
    a_descs = [TensorDescriptor(view[:, t], [M, K], [terms * K, 1], [64, 128], a_layout) for t in range(terms)]
    w_desc = TensorDescriptor(w, [N, K], [K, 1], [BN, 128], w_layout)
    if a.device not in _sms:
        _sms[a.device] = torch.cuda.get_device_properties(a.device).multi_processor_count
    grid = (min(triton.cdiv(M, 64 * consumers) * triton.cdiv(N, BN), _sms[a.device]), )
    _prefill_kernel[grid](a_descs[0], a_descs[-1], w_desc, a_scale, w_scale, out, M, N, n_groups, out.stride(0),
                          w_scale.stride(0), TERMS=terms, CONSUMERS=consumers, STAGES=stages, GROUP_M=group_m,
                          CONSUMER_REGS=consumer_regs, PRODUCER_REGS=40, num_warps=4)
    return out
