"""Block-scaled FP8 linear layers for DeepSeek-V3, in Triton: y = x @ W^T, bf16 out.

W is e4m3 (N, K) with `weight_scale_inv` (ceil(N/128), ceil(K/128)) multiplying each 128x128 tile (docs/FORMAT.md).
x is quantized per token per 128-wide group of K: s = max(amax, 1e-4) / 448, q = e4m3(clamp(x / s, +-448)), as
DeepSeek's own act_quant does. The GEMM accumulates each 128-K step's product in fp32 and adds it times s_x * s_w.

Activations in one or two terms (`terms`): 1 is DeepSeek's scheme above; 2 also quantizes what the first term
missed, r = x - q*s, the same way (its own per-group scale), and the GEMM adds both products: x carried to ~7 bits
instead of 3 at the cost of one more product per weight tile. A weight tile is loaded once for both, so for decode,
where the time is the weight stream, the second term is nearly free; prefill does twice the tensor-core work.
In the kernels the two terms of token m are rows 2m and 2m+1 of the quantized x; the GEMM sums each pair of output
rows before it writes (so a one-token decode still fills one 16-row tile).

Two launch shapes, picked per call from a shipped table (fp8_configs.json, made by `benchmarks/fp8_gemm.py --tune`),
keyed by the rows of quantized x (terms x tokens):
- small M (decode): K is split across programs so that enough of them stream the weight; the last program of each
  output tile to finish sums the partials in a fixed order (deterministic) and writes bf16.
- large M (prefill): `act_quant` once, then a plain tiled GEMM, grouped along M for L2 reuse; STEP 2 issues two
  128-K products per iteration before their scaled adds.
On Hopper (sm_90), prefill-sized calls (`use_hopper_kernel`) go to fp8_hopper instead: a warp-specialized Gluon
kernel that keeps the tensor cores busy while it scales (H100: 1.6-1.8x this file's GEMM at 512-4096 tokens);
and a decode step's single token (`use_decode_kernel`) takes fp8_hopper's one-launch linear, which quantizes x
while its weight tiles stream in (no act_quant launch).
Measurements and the goals they meet or miss: BENCHMARKS.md.

x is quantized by runtime/fp8_quant.py's helpers (shared with fp8_hopper, which this module imports, never the
reverse).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import triton
import triton.language as tl

from runtime.fp8_quant import _quantize, act_quant_reference, fake_act_quant

try:                             # Gluon's Hopper API is experimental: without it, every M runs the Triton kernel
    from runtime import fp8_hopper
    _hopper_import_error = None
except (ImportError, AttributeError) as e:
    fp8_hopper, _hopper_import_error = None, e

GROUP = 128                      # quantization group of x along K, and W's tile edge
WORKSPACE_FLOATS = 8 << 20       # split-K partials, per device: 32 MiB
LOCKS = 1 << 16                  # one counter per output tile of a split-K launch


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, n_groups,
                      ROWS: tl.constexpr, GROUPS: tl.constexpr, TERMS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    for j in tl.static_range(GROUPS):
        g = tl.program_id(1) * GROUPS + j
        cols = g * 128 + tl.arange(0, 128)
        mask = (rows < M)[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        for t in tl.static_range(TERMS):
            q, s = _quantize(x)
            out = rows * TERMS + t
            tl.store(q_ptr + out[:, None] * K + cols[None, :], q.to(tl.float8e4nv), mask=mask)
            tl.store(s_ptr + out * n_groups + g, s, mask=(rows < M) & (rows * 0 + g < n_groups))
            x = x - q * s[:, None]           # what this term missed (launched without FMA contraction: as torch)


@triton.jit
def _gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, part_ptr, lock_ptr,
                 MA, N, K, stride_am, stride_wn, stride_cm, stride_wsn, groups_per_split,
                 BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr, GROUP_M: tl.constexpr,
                 STEP: tl.constexpr, TERMS: tl.constexpr, EVEN_K: tl.constexpr):
    # program -> tile of (MA rows of quantized x) x N, grouped along M so that neighbours share W tiles in L2
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    tiles_m, tiles_n = tl.cdiv(MA, BM), tl.cdiv(N, BN)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, 128)
    mask_m, mask_n = offs_m < MA, offs_n < N
    a_rows = a_ptr + offs_m[:, None] * stride_am
    w_cols = w_ptr + offs_n[None, :] * stride_wn
    ws_row = ws_ptr + (pid_n * BN // 128) * stride_wsn        # BN divides 128: one weight scale per step
    n_groups = tl.cdiv(K, 128)
    g0 = pid_k * groups_per_split

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for i in range(0, groups_per_split, STEP):
        for j in tl.static_range(STEP):         # STEP 2: two products in flight before the scaled adds
            g = g0 + i + j
            k = g * 128 + offs_k
            if EVEN_K:
                b = tl.load(w_cols + k[:, None], mask=mask_n[None, :], other=0.0)
                a = tl.load(a_rows + k[None, :], mask=mask_m[:, None], other=0.0)
            else:
                b = tl.load(w_cols + k[:, None], mask=mask_n[None, :] & (k < K)[:, None], other=0.0)
                a = tl.load(a_rows + k[None, :], mask=mask_m[:, None] & (k < K)[None, :], other=0.0)
            sa = tl.load(as_ptr + offs_m * n_groups + g, mask=mask_m, other=0.0)
            sb = tl.load(ws_row + g)
            acc += tl.dot(a, b) * (sa * sb)[:, None]

    # rows -> tokens: a token's terms are adjacent rows
    BO: tl.constexpr = BM // TERMS
    if TERMS > 1:
        acc = tl.sum(tl.reshape(acc, (BO, TERMS, BN)), axis=1)
    M = MA // TERMS
    offs_o = pid_m * BO + tl.arange(0, BO)
    c_ptrs = c_ptr + offs_o[:, None] * stride_cm + offs_n[None, :]
    mask_c = (offs_o < M)[:, None] & mask_n[None, :]
    if SPLIT == 1:
        tl.store(c_ptrs, acc.to(tl.bfloat16), mask=mask_c)
    else:
        # partials in (SPLIT, M, N); the last program of this tile to arrive sums them in split order
        part = part_ptr + offs_o[:, None] * N + offs_n[None, :]
        tl.store(part + pid_k * M * N, acc, mask=mask_c)
        tl.debug_barrier()                       # every thread's partial is stored before the release below
        tile = pid_m * tiles_n + pid_n
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            total = tl.zeros((BO, BN), dtype=tl.float32)
            for s in range(SPLIT):
                total += tl.load(part + s * M * N, mask=mask_c, other=0.0, cache_modifier=".cg")
            tl.store(c_ptrs, total.to(tl.bfloat16), mask=mask_c)
            tl.store(lock_ptr + tile, 0)         # ready for the next launch (and CUDA graph replays)


@dataclass(frozen=True)
class Config:
    BM: int
    BN: int
    SPLIT: int
    warps: int
    stages: int
    GROUP_M: int = 8
    STEP: int = 1                    # 128-K groups per loop iteration: 1 or 2 (K's groups per split must divide)

    def fits(self, M: int, N: int, K: int) -> bool:
        """M: rows of quantized x (terms x tokens)."""
        tiles = triton.cdiv(M, self.BM) * triton.cdiv(N, self.BN)
        return (128 % self.BN == 0 and self.SPLIT <= triton.cdiv(K, GROUP) and triton.cdiv(K, GROUP) % self.STEP == 0
                and (self.SPLIT == 1 or (triton.cdiv(K, GROUP) // self.SPLIT) % self.STEP == 0)
                and (self.SPLIT == 1 or (self.SPLIT * M * N <= WORKSPACE_FLOATS and tiles <= LOCKS)))


CONFIG_FILE = Path(__file__).with_name("fp8_configs.json")
_table: dict | None = None
_workspaces: dict = {}


def m_bucket(M: int) -> int:
    """Configs are kept per power-of-two bucket of M (1, 2, 4, ... 4096, then 4096 for larger)."""
    return min(1 << max(M - 1, 0).bit_length(), 4096)


def rows_tile(M: int) -> int:
    """The M tile for few rows (<= 64): one tile covers them all, or the weights stream once per tile; 16 at least
    (the smallest tensor-core tile)."""
    return max(16, 1 << (M - 1).bit_length())


def default_config(M: int, N: int, K: int, sms: int = 132) -> Config:
    """For shapes the table lacks: split K until about two programs per SM stream the weight."""
    if M <= 64:
        BM = rows_tile(M)
        BN = 64
        tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
        split = max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(K, GROUP) // 2, 16))
        cfg = Config(BM, BN, split, 4, 4, 1)
        while not cfg.fits(M, N, K):
            cfg = Config(BM, BN, cfg.SPLIT // 2, 4, 4, 1)
        return cfg
    return Config(128, 128, 1, 8, 4) if M >= 256 else Config(64, 128, 1, 4, 4)


def _load_table() -> dict:
    global _table
    if _table is None:
        _table = json.loads(CONFIG_FILE.read_text())["configs"] if CONFIG_FILE.exists() else {}
    return _table


def config_for(M: int, N: int, K: int) -> Config:
    c = _load_table().get(f"{N}x{K}", {}).get(str(m_bucket(M)))
    if c is not None:
        cfg = Config(**{k: v for k, v in c.items() if k in Config.__dataclass_fields__})
        if M <= 64 and cfg.BM < M:     # a bucket's config may come from fewer rows
            cfg = replace(cfg, BM=rows_tile(M))
        if cfg.fits(M, N, K):
            return cfg
    return default_config(M, N, K)


def use_hopper_kernel(M: int, N: int, K: int, terms: int) -> bool:
    """Whether fp8_hopper's prefill kernel beats the Triton one (measured on an H100, BENCHMARKS.md): it takes 128 to
    256 tokens x 128 or 256 outputs per program, so it needs a full M tile and enough tiles to fill the GPU (under
    ~64 of 128 x 128 a few programs stream all of K alone, where split-K is faster)."""
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    return M >= 128 and tiles >= 64 and K % 16 == 0


# fp8_hopper's tiles, (consumer warpgroups of 64 rows, columns), and the FLOPs each computes per unit of time where
# its waves are full, relative to 128 x 256 (one term, 4096 tokens, H100: BENCHMARKS.md). Bigger tiles pull fewer
# bytes from L2 per FLOP, and 256 columns run one m64n256 wgmma a group, which reads shared memory less per FLOP.
HOPPER_TILES = {(2, 128): 0.78, (3, 128): 0.84, (2, 256): 1.0}


def hopper_tile(M: int, N: int, terms: int, sms: int) -> tuple[int, int]:
    """(consumers, columns) of fp8_hopper's tiles for this shape: with one term, the tile whose waves over the SMs
    take least time, a wave costing its tile's size over the tile's rate; two terms: 128 x 128 (they hold two sums:
    only two consumers of 128 columns have the registers). Wave quantization decides it where tiles are few: 2112 x
    7168 at 4096 tokens is 288 tiles of 128 x 256 (a third wave 18% full) against 374 of 192 x 128 (three full
    waves), measured 144 against 134 us."""
    if terms == 2:
        return 2, 128

    def cost(tile):
        consumers, columns = tile
        waves = triton.cdiv(triton.cdiv(M, 64 * consumers) * triton.cdiv(N, columns), sms)
        return waves * 64 * consumers * columns / HOPPER_TILES[tile]
    return min(HOPPER_TILES, key=cost)


_hopper_built: set = set()


def hopper_ready(device: torch.device) -> bool:
    """Whether fp8_hopper's kernels serve `device` (sm_90). On an sm_90 whose fp8_hopper failed to import (or to
    build), says so once: the Triton kernels run instead, slower."""
    global _hopper_import_error
    if fp8_hopper is not None:
        return fp8_hopper.supported(device)
    sm90 = device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
    if _hopper_import_error is not None and sm90:
        e, _hopper_import_error = _hopper_import_error, None
        warnings.warn(f"runtime.fp8: runtime.fp8_hopper does not import with Triton {triton.__version__} "
                      f"({type(e).__name__}: {str(e).strip().splitlines()[0][:120]}); using the Triton kernels")
    return False


def _hopper_call(variant: tuple, call) -> bool:
    """Run a kernel of fp8_hopper; False if its first build fails. Gluon's API still changes between Triton releases
    (it was written for 3.6), and a Triton that no longer builds it should cost speed, not the run. `variant`: what
    makes a new build (a failure after that one built is a real error)."""
    global fp8_hopper
    try:
        call()
    except Exception as e:           # whatever the first build raises: this Triton's Gluon is not the one it knows
        if variant in _hopper_built:
            raise
        warnings.warn(f"runtime.fp8: the Hopper kernels do not build with Triton {triton.__version__} "
                      f"({type(e).__name__}: {str(e).strip().splitlines()[0][:120]}); using the Triton kernels")
        fp8_hopper = None
        return False
    _hopper_built.add(variant)
    return True


def _hopper_gemm(a, a_scale, w, w_scale, out, terms) -> bool:
    consumers, columns = hopper_tile(len(a) // terms, len(w), terms, fp8_hopper.sm_count(a.device))
    variant = ("prefill", terms, consumers, columns, fp8_hopper.tma_writable(out))      # each a build of its own
    return _hopper_call(variant, lambda: fp8_hopper.prefill_gemm(a, a_scale, w, w_scale, out, terms, consumers,
                                                                 columns))


def _workspace(device: torch.device):
    """Split-K partials and tile counters, one set per device (counters return to 0 after every launch). Shared by
    every launch on the device: split-K GEMMs must not run on two streams of one device at once. Made on the first
    split-K call, so warm up before capturing CUDA graphs."""
    if device not in _workspaces:
        _workspaces[device] = (torch.empty(WORKSPACE_FLOATS, dtype=torch.float32, device=device),
                               torch.zeros(LOCKS, dtype=torch.int32, device=device))
    return _workspaces[device]


def act_quant(x: torch.Tensor, terms: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (e4m3 (terms * M, K), fp32 scales (terms * M, ceil(K/128))); token m's terms are rows
    terms*m .. terms*m + terms-1."""
    M, K = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    n_groups = triton.cdiv(K, GROUP)
    q = torch.empty(terms * M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(terms * M, n_groups, dtype=torch.float32, device=x.device)
    rows, groups, warps = (1, 1, 1) if M <= 16 else (8, 4, 4)     # decode: many tiny programs, one warp each
    _act_quant_kernel[(triton.cdiv(M, rows), triton.cdiv(n_groups, groups))](
        x, q, s, M, K, x.stride(0), n_groups, ROWS=rows, GROUPS=groups, TERMS=terms, num_warps=warps,
        enable_fp_fusion=False)
    return q, s


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
             cfg: Config | None = None, out: torch.Tensor | None = None, terms: int = 1) -> torch.Tensor:
    """a (terms * M, K) e4m3 with a_scale (terms * M, ceil(K/128)) from act_quant; w e4m3 (N, K), w_scale
    (ceil(N/128), ceil(K/128)) -> bf16 (M, N), into `out` if given."""
    MA, K = a.shape
    N, M = w.shape[0], MA // terms
    assert w.shape[1] == K and w.stride(1) == 1 and a.stride(1) == 1 and MA % terms == 0, (a.shape, w.shape)
    if out is None:
        out = torch.empty(M, N, dtype=torch.bfloat16, device=a.device)
    assert out.shape == (M, N) and out.dtype == torch.bfloat16 and out.stride(1) == 1
    if M == 0:
        return out
    if (cfg is None and use_hopper_kernel(M, N, K, terms) and a.is_contiguous() and w.is_contiguous()
            and hopper_ready(a.device) and _hopper_gemm(a, a_scale, w, w_scale, out, terms)):
        return out
    cfg = cfg or config_for(MA, N, K)
    part, locks = _workspace(a.device) if cfg.SPLIT > 1 else (out, out)
    n_groups = triton.cdiv(K, GROUP)
    split = max(d for d in range(1, cfg.SPLIT + 1) if n_groups % d == 0 and (n_groups // d) % cfg.STEP == 0)
    per_split = n_groups // split
    grid = (triton.cdiv(MA, cfg.BM) * triton.cdiv(N, cfg.BN), split)
    _gemm_kernel[grid](a, a_scale, w, w_scale, out, part, locks,
                       MA, N, K, a.stride(0), w.stride(0), out.stride(0), w_scale.stride(0), per_split,
                       BM=cfg.BM, BN=cfg.BN, SPLIT=split, GROUP_M=cfg.GROUP_M, STEP=cfg.STEP, TERMS=terms,
                       EVEN_K=K % GROUP == 0, num_warps=cfg.warps, num_stages=cfg.stages)
    return out


DECODE_ROWS = 2                  # rows of quantized x (tokens x terms) up to which sm_90 runs fp8_hopper.decode_linear


def use_decode_kernel(x: torch.Tensor, w: torch.Tensor, terms: int) -> bool:
    """Whether fp8_hopper's one-launch decode kernel takes this call: sm_90 and one token (or two in one term), where
    it beats act_quant + the split-K GEMM (H100, summed at M=1: 1.84x bf16 against 1.67x with one term, 1.80x
    against 1.64x with two; it loses from 4 rows: BENCHMARKS.md); W as TMA reads it (contiguous, 16-byte aligned, K
    a multiple of 16), and a split-K that fits the shared workspace."""
    M, (N, K) = x.shape[0], w.shape
    if not (0 < M * terms <= DECODE_ROWS and K % 16 == 0 and w.is_contiguous() and w.data_ptr() % 16 == 0
            and hopper_ready(x.device)):
        return False
    *_, split = fp8_hopper.decode_variant(M, N, K, x.device)
    return split * M * N <= WORKSPACE_FLOATS and triton.cdiv(N, 64) <= LOCKS


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, terms: int = 1,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) any float dtype -> bf16 (..., N): quantize x per 128 group (in `terms` terms), block-scaled GEMM.
    On sm_90 a decode step's token takes one launch that quantizes x itself (fp8_hopper.decode_linear); else
    act_quant, then fp8_gemm."""
    lead, K = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, K)
    if x.stride(1) != 1:
        x = x.contiguous()
    if use_decode_kernel(x, w, terms):
        if out is None:
            out = torch.empty(x.shape[0], w.shape[0], dtype=torch.bfloat16, device=x.device)
        variant = ("decode", terms, *fp8_hopper.decode_variant(x.shape[0], w.shape[0], K, x.device))
        if _hopper_call(variant, lambda: fp8_hopper.decode_linear(x, w, w_scale, out, terms, *_workspace(x.device))):
            return out.view(*lead, w.shape[0])
    return fp8_gemm(*act_quant(x, terms), w, w_scale, terms=terms, out=out).view(*lead, w.shape[0])


def dequantize_weight(w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """e4m3 W (N, K) times its 128x128 tile scales, in float64 (for references)."""
    ws = w_scale.double().repeat_interleave(GROUP, 0)[:w.shape[0]].repeat_interleave(GROUP, 1)[:, :w.shape[1]]
    return w.double() * ws


def reference_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, terms: int = 1) -> torch.Tensor:
    """float64 reference on the dequantized operands: x quantized as the kernels do (torch ops), W tile-scaled."""
    return fake_act_quant(x, terms, torch.float64) @ dequantize_weight(w, w_scale).T


def reference_act_quant(x: torch.Tensor, terms: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return act_quant_reference(x, terms)
