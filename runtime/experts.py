"""
Routed experts: where they live and how a layer's step runs them.

- `MoEExperts`: one layer's experts on the CPU through ggml, or for Q4_K/Q6_K runtime.cpu_kernels (below).
- `LayerExperts`: one layer on both devices: the experts placed on the GPU (runtime.ggml_gpu, GGML bytes) and the
  rest through MoEExperts, at once, beside the shared expert (decode: pinned buffers, events, no allocation).
- placement (`plan_placement`, `setup_gpu`): which experts fill the GPU's spare memory: the most-hit of a routing
  profile (`RoutingProfile`, runtime.profile) or whole layers; `hit_rate` is the share of expert bytes they serve.
- `Streamer`: prefill's streaming of a long chunk's other experts host -> GPU, when that beats the CPU; and a decode
  step's share of its experts, streamed and run on the GPU while the CPU runs the rest.

Routed experts of one DeepSeek-V3 MoE layer on the CPU, with ggml's quantized kernels, straight from the
merged folder's bytes (docs/FORMAT.md: `blk.N.ffn_{gate,up,down}_exps.weight`, flat U8 GGML blocks, expert e
= the e-th equal slice; logical shape (experts, out, in)). Nothing is copied or dequantized: ggml reads the
memmap in place, and `ggml_mul_mat_id` touches only the rows of the experts a token selected (tokens that
share an expert are batched against it).

    out[t] = sum_k weights[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = expert_ids[t, k]

Activations are rounded to ggml's matching dot-product format before each matmul (int8 blocks: Q8_K of 256 for
K-quants, Q8_0 of 32 for Q5_0/Q8_0): a relative error of ~2.3e-3 x (block max / rms) per rounded vector, 1.5-2%
through the layer against float64 on the real fixture (tests/test_experts.py). That is the accuracy ggml gives.

Graphs are built once per (padded token count, weight types, shapes, threads) and shared by all layers of
that kind: a call points the graph's three weight tensors at its own layer's bytes, copies its inputs in and
runs the prebuilt plan. Token counts are padded up to a power of two (<= max_tokens; longer inputs are cut
into chunks of max_tokens), the padding rows repeating the chunk's first token's experts with weight 0, so
they touch no extra expert bytes. A graph's buffers take (2 hidden + 4 k inter + k hidden) * 4 bytes per padded
token: 140 MB for 256 DeepSeek-V3 tokens, ~280 MB for all buckets up to 256 together.
ggml's compute releases the GIL; one call at a time per graph (a lock), so layers run one after another.

Fast path: a chunk of at most KERNEL_MAX_TOKENS tokens whose three matrices are all Q4_K/Q6_K (a Q4_K_M model's
experts) runs instead through runtime.cpu_kernels' own AVX-512 VNNI kernel, one call per layer: ggml's Q4_K/Q6_K
dot products are AVX2 and compute-bound on a core below its memory bandwidth, which a decode step's experts are
bound by (a longer chunk's, by compute). Its results are bit-identical to the graph's (same Q8_K rounding, same
float order; checked once per process on a small random layer before it is used: own_kernel), so which path ran
never shows. Where it cannot run (another weight type, no AVX-512 VNNI, no compiler, a failed check,
DSV3_CPU_KERNEL=0) the graph does. Its scratch buffers are kept per padded token count like the graphs: 0.4 MB for
one DeepSeek-V3 token, 102 MB for 256, 204 MB for all buckets up to 256 (such layers then build no graphs).
"""
from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runtime import cpu_kernels, ggml_ops as G


@dataclass(frozen=True)
class StackedExperts:
    """One routed-expert matrix stack as stored: flat uint8 GGML blocks, type id, logical (experts, out, in)."""
    data: np.ndarray
    ggml_type: int
    shape: tuple[int, int, int]

    def __post_init__(self):
        e, rows, cols = self.shape
        want = e * rows * G.row_size(self.ggml_type, cols)
        if self.data.dtype != np.uint8 or self.data.ndim != 1 or not self.data.flags.c_contiguous:
            raise ValueError(f"expert bytes must be a flat contiguous uint8 array, "
                             f"got {self.data.dtype} {self.data.shape}")
        if self.data.size != want:
            raise ValueError(f"{G.type_name(self.ggml_type)} {self.shape}: expected {want} bytes, got {self.data.size}")


class _Graph:
    """The MoE graph for T (padded) tokens: input/output buffers + the planned ggml graph."""

    def __init__(self, T, k, g: StackedExperts, u: StackedExperts, d: StackedExperts, threads):
        (E, I, H) = g.shape
        self.ctx = c = G.context(16 + 2 * k)
        self.bufs = []

        def new(t):  # memory for a non-view result, given before any view of it is made (views copy the pointer)
            self.bufs.append(G.alloc(t))
            return t

        self.w_gate, self.w_up, self.w_down = (G.tensor(c, s.ggml_type, s.shape[2], s.shape[1], E) for s in (g, u, d))
        self.x = new(G.tensor(c, G.F32, H, 1, T))
        self.ids = new(G.tensor(c, G.I32, k, T))
        self.w = new(G.tensor(c, G.F32, 1, k, T))
        gate = new(G.mul_mat_id(c, self.w_gate, self.x, self.ids))   # (I, k, T)
        up = new(G.mul_mat_id(c, self.w_up, self.x, self.ids))       # (I, k, T)
        h = new(G.swiglu(c, gate, up))                               # silu(gate) * up
        h = new(G.mul(c, h, self.w))                                 # * routing weight, before down: I < H values
        y = new(G.mul_mat_id(c, self.w_down, h, self.ids))           # (H, k, T)
        rows = lambda i: G.view_2d(c, y, H, T, G.row_stride(y, 2), i * G.row_stride(y, 1))  # noqa: E731  (H, T)
        out = rows(0)                                                # k == 1: y itself is the output
        for i in range(1, k):                                        # sum over k, like llama.cpp's build_moe_ffn
            out = new(G.add(c, out, rows(1))) if i == 1 else G.add_inplace(c, out, rows(i))
        self.graph = G.Graph(c, out, threads)
        self.x_np, self.ids_np = G.array(self.x, np.float32, (T, H)), G.array(self.ids, np.int32, (T, k))
        self.w_np, self.out_np = G.array(self.w, np.float32, (T, k)), G.array(out, np.float32, (T, H))
        self.lock = threading.Lock()

    def __del__(self):
        if G is not None and G.free is not None:  # not at interpreter exit
            G.free(self.ctx)


# Chunks of up to this many tokens run through runtime.cpu_kernels where it can (the module docstring's fast path).
# It beat the graph at every chunk size measured, 1 to 256 tokens (benchmarks/experts_cpu.py --decode-tokens;
# BENCHMARKS.md), so it takes every chunk of the default max_tokens.
KERNEL_MAX_TOKENS = 256

_own = None                 # runtime.cpu_kernels' kernel once checked: False where it cannot run or failed the check
_own_lock = threading.RLock()


def own_kernel() -> cpu_kernels.Kernel | None:
    """runtime.cpu_kernels' kernel, or None (the graph runs): DSV3_CPU_KERNEL=0, it cannot build here, or it did not
    give the graph's exact output on a small random layer with Q4_K and Q6_K in every position (checked once per
    process, like stages.fastquant's quantizers; a mismatch is said once)."""
    global _own
    if os.environ.get("DSV3_CPU_KERNEL", "1") == "0":
        return None
    with _own_lock:
        if _own is None:
            _own = False            # meanwhile: the check's own reference layer gets the graph
            kernel = cpu_kernels.kernel()
            if kernel is not None and _same_as_graph(kernel):
                _own = kernel
    return _own or None


def _same_as_graph(kernel: cpu_kernels.Kernel) -> bool:
    rng = np.random.default_rng(0)
    for types in ((G.Q4_K, G.Q6_K, G.Q4_K), (G.Q6_K, G.Q4_K, G.Q6_K)):
        parts = [StackedExperts(*p) for p in cpu_kernels.random_layer(rng, types, 4, 512, 256)]
        x = rng.standard_normal((3, 512)).astype(np.float32)
        ids = np.array([[0, 1], [2, 1], [3, 3]], np.int32)
        w = rng.uniform(0.05, 1, (3, 2)).astype(np.float32)
        want = MoEExperts(*parts, threads=2).forward(x, ids, w)
        got = np.empty_like(want)
        kernel.moe(x, ids, w, *parts, got, 2)
        if not np.array_equal(got, want):
            print(f"note: the own CPU expert kernel ({cpu_kernels.SOURCE.name}) does not give ggml's exact results "
                  f"here (relative difference {np.linalg.norm(got - want) / np.linalg.norm(want):.1e}); ggml runs "
                  "the routed experts", file=sys.stderr)
            return False
    return True


_graphs: dict[tuple, _Graph] = {}
_graphs_lock = threading.Lock()


def clear_graph_cache() -> None:
    """Free every cached graph and its buffers."""
    with _graphs_lock:
        _graphs.clear()


class MoEExperts:
    """The routed experts of one layer. `gate`, `up`, `down`: StackedExperts or (data, ggml_type, shape) tuples;
    gate/up (experts, inter, hidden), down (experts, hidden, inter); their types may differ."""

    def __init__(self, gate, up, down, threads: int | None = None, max_tokens: int = 256):
        self.gate, self.up, self.down = (s if isinstance(s, StackedExperts) else StackedExperts(*s)
                                         for s in (gate, up, down))
        self.experts, self.inter, self.hidden = self.gate.shape
        if self.up.shape != self.gate.shape or self.down.shape != (self.experts, self.hidden, self.inter):
            raise ValueError(f"inconsistent expert shapes: gate {self.gate.shape} up {self.up.shape} "
                             f"down {self.down.shape}")
        self.threads = threads or G.physical_cores()
        self.max_tokens = max_tokens
        self._addresses = [s.data.ctypes.data for s in (self.gate, self.up, self.down)]
        types = [s.ggml_type for s in (self.gate, self.up, self.down)]
        self._kernel = own_kernel() if cpu_kernels.Kernel.supports(*types) else None

    @classmethod
    def from_folder(cls, folder, layer: int, **kw) -> MoEExperts:
        """Layer `layer`'s routed experts of an opened folder (runtime.load.Folder), memmapped in place."""
        parts = []
        for name in ("gate", "up", "down"):
            key = f"blk.{layer}.ffn_{name}_exps.weight"
            t = folder.tensors[key]
            parts.append(StackedExperts(folder.raw(key), t.ggml_type, tuple(t.logical_shape)))
        return cls(*parts, **kw)

    def _graph(self, T: int, k: int) -> _Graph:
        key = (T, k, self.threads) + tuple((s.ggml_type, s.shape) for s in (self.gate, self.up, self.down))
        with _graphs_lock:
            if key not in _graphs:
                _graphs[key] = _Graph(T, k, self.gate, self.up, self.down, self.threads)
            return _graphs[key]

    @property
    def expert_bytes(self) -> int:
        """GGML bytes of one expert's three matrices."""
        return sum(s.data.size // self.experts for s in (self.gate, self.up, self.down))

    def forward(self, x: np.ndarray, expert_ids: np.ndarray, weights: np.ndarray,
                out: np.ndarray | None = None) -> np.ndarray:
        """x float32 (T, hidden), expert_ids int (T, k), weights float32 (T, k) -> float32 (T, hidden), written
        into `out` if given (a float32 (T, hidden) C-contiguous array, e.g. a pinned host buffer)."""
        x, ids, w = np.asarray(x, np.float32), np.asarray(expert_ids), np.asarray(weights, np.float32)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"expert_ids must be a 2-d integer array, got {ids.dtype} {ids.shape}")
        T, k = ids.shape
        if x.shape != (T, self.hidden) or w.shape != (T, k):
            raise ValueError(f"x {x.shape}, expert_ids {ids.shape}, weights {w.shape}: "
                             f"want (T, {self.hidden}), (T, k), (T, k)")
        if ids.size and (ids.min() < 0 or ids.max() >= self.experts):  # ggml would abort the process
            raise ValueError(f"expert ids must be in [0, {self.experts}), got [{ids.min()}, {ids.max()}]")
        if out is None:
            out = np.empty((T, self.hidden), np.float32)
        elif out.shape != (T, self.hidden) or out.dtype != np.float32:
            raise ValueError(f"out {out.dtype} {out.shape}: want float32 ({T}, {self.hidden})")
        for a in range(0, T, self.max_tokens):
            n = min(self.max_tokens, T - a)
            self._run(x[a:a + n], ids[a:a + n], w[a:a + n], out[a:a + n])
        return out

    __call__ = forward

    def _run(self, x, ids, w, out):
        n, k = ids.shape
        if self._kernel is not None and n <= KERNEL_MAX_TOKENS:
            dest = out if out.flags.c_contiguous else np.empty_like(out, order="C")
            self._kernel.moe(np.ascontiguousarray(x), np.ascontiguousarray(ids, np.int32), np.ascontiguousarray(w),
                             self.gate, self.up, self.down, dest, self.threads)
            if dest is not out:
                out[:] = dest
            return
        g = self._graph(min(1 << (n - 1).bit_length(), self.max_tokens), k)
        with g.lock:
            for t, address in zip((g.w_gate, g.w_up, g.w_down), self._addresses):  # this layer's bytes
                G.set_data(t, address)
            g.x_np[:n], g.ids_np[:n], g.w_np[:n] = x, ids, w
            g.x_np[n:], g.ids_np[n:], g.w_np[n:] = 0, ids[0], 0  # padding rows: no new experts, weight 0
            g.graph.compute()
            out[:] = g.out_np[:n]


# ============================================================================================ placement, profiles
# Which routed experts live on the GPU. A decode token reads the GGML bytes of each expert it routes to, so an
# expert kept on the GPU serves (its hits) x (its bytes) of what would otherwise stream from host memory; the
# figure of merit of a placement is the share of expert bytes it serves (hit_rate).

PROFILE_NAME = "routing-profile.json"   # beside manifest.json in the model folder; not listed in it (see README)
PROFILE_FORMAT = "dsv3-hybrid-routing-profile"


class ProfileError(ValueError):
    """A routing profile that cannot be used with this model (one line, names the file)."""


@dataclass
class RoutingProfile:
    """Expert hit counts per MoE layer (how many token-routings chose each expert) over a calibration text."""
    counts: dict[int, np.ndarray]        # layer -> int64 (n_experts,)
    tokens: int                          # tokens routed (each counts top_k hits per layer)
    source: str = ""                     # the calibration text's file name
    routers: dict[int, str] | None = None   # layer -> the router weight's checksum in manifest.json, if any

    def save(self, path) -> None:
        """Written atomically (a temporary file beside it, then renamed)."""
        path = Path(path)
        body = {"format": PROFILE_FORMAT, "tokens": self.tokens, "source": self.source,
                "layers": {str(i): c.tolist() for i, c in sorted(self.counts.items())},
                "routers": {str(i): v for i, v in sorted((self.routers or {}).items())}}
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(body, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path, n_experts: int | None = None, routers: dict[int, str] | None = None) -> RoutingProfile:
        """Read and check a profile; with n_experts/routers given (the model's), a profile of another model is
        refused (ProfileError naming the file)."""
        path = Path(path)
        try:
            body = json.loads(path.read_text())
            if body.get("format") != PROFILE_FORMAT:
                raise ProfileError(f"{path}: not a routing profile (format {body.get('format')!r})")
            counts = {int(i): np.asarray(c, np.int64) for i, c in body["layers"].items()}
            prof = cls(counts, int(body["tokens"]), body.get("source", ""),
                       {int(i): v for i, v in body.get("routers", {}).items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            if isinstance(e, ProfileError):
                raise
            raise ProfileError(f"{path}: unreadable routing profile ({e})") from None
        for i, c in counts.items():
            if c.ndim != 1 or (n_experts is not None and c.size != n_experts) or (c < 0).any():
                raise ProfileError(f"{path}: layer {i} has {c.size} counts, the model has {n_experts} experts")
        for i, v in (routers or {}).items():
            if prof.routers and prof.routers.get(i) not in (None, v):
                raise ProfileError(f"{path}: recorded on another model (layer {i}'s router differs)")
        return prof


def router_checksums(folder) -> dict[int, str]:
    """Layer -> the checksum manifest.json lists for its router weight (a profile's model fingerprint)."""
    out = {}
    for name, t in folder.tensors.items():
        if name.endswith(".ffn_gate_inp.weight") and t.checksum:
            out[int(name.split(".")[1])] = t.checksum
    return out


def plan_placement(per_expert: dict[int, int], n_experts: int, budget: int,
                   counts: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """Experts to keep on the GPU, layer -> sorted global ids, within `budget` bytes (per_expert: layer -> bytes of
    one expert). With `counts` (a profile): the most-hit experts over all layers first (an expert's hits are the
    bytes it serves per byte it takes), ties by layer then id, each taken if it still fits. Without: whole layers
    in layer order, then as many of the next layer's experts (lowest ids) as fit."""
    chosen: dict[int, list[int]] = {i: [] for i in per_expert}
    left = budget
    if counts is not None:
        order = sorted(((-int(counts.get(i, np.zeros(n_experts))[e]), i, e)
                        for i in per_expert for e in range(n_experts)))
        for _, i, e in order:
            if per_expert[i] <= left:
                chosen[i].append(e)
                left -= per_expert[i]
    else:
        for i in sorted(per_expert):
            n = min(n_experts, left // per_expert[i])
            chosen[i] = list(range(n))
            left -= n * per_expert[i]
            if n < n_experts:
                break
    return {i: np.array(sorted(v), np.int64) for i, v in chosen.items() if v}


def local_map(n_experts: int, resident) -> np.ndarray:
    """int32 (n_experts,): global expert id -> its index among `resident` (in the given order), -1 if absent."""
    m = np.full(n_experts, -1, np.int32)
    m[np.asarray(resident, np.int64)] = np.arange(len(resident), dtype=np.int32)
    return m


def hit_rate(placement: dict[int, np.ndarray], counts: dict[int, np.ndarray], per_expert: dict[int, int]) -> float:
    """Share of the expert bytes that `counts`' routings read which `placement`'s GPU experts serve."""
    total = sum(int(c.sum()) * per_expert[i] for i, c in counts.items() if i in per_expert)
    served = sum(int(counts[i][ids].sum()) * per_expert[i] for i, ids in placement.items() if i in counts)
    return served / total if total else 0.0


def cpu_routes(ids: np.ndarray, weights: np.ndarray, resident: np.ndarray, ids_out: np.ndarray,
               w_out: np.ndarray) -> bool:
    """The CPU's share of a routing: into ids_out/w_out (int32/float32 (T, k)), every pair whose expert is
    `resident` (bool (n_experts,)) becomes a CPU-routed expert of the same step with weight 0, so that ggml
    reads no byte more than the CPU pairs need. False if every pair is resident (nothing for the CPU to do)."""
    on_gpu = resident[ids]
    if not on_gpu.any():
        ids_out[:], w_out[:] = ids, weights
        return True
    if on_gpu.all():
        return False
    filler = ids[~on_gpu].flat[0]
    np.copyto(ids_out, np.where(on_gpu, filler, ids))
    np.copyto(w_out, np.where(on_gpu, np.float32(0), weights))
    return True


# ============================================================================================ both devices at once

_gpu_kernels = None


def gpu_kernels():
    """runtime.ggml_gpu, or None (said once) where it cannot load: then every expert stays on the CPU."""
    global _gpu_kernels
    if _gpu_kernels is None:
        try:
            from runtime import ggml_gpu
            _gpu_kernels = ggml_gpu
        except Exception as e:   # noqa: BLE001  (Triton missing or broken: the CPU path still serves)
            print(f"note: GPU expert kernels unavailable ({type(e).__name__}: {e}); routed experts stay on the CPU",
                  file=sys.stderr)
            _gpu_kernels = False
    return _gpu_kernels or None


class _HostBuffers:
    """The pinned host side of a step's copies, shared by all layers of a process and grown (never shrunk) to the
    most rows seen: x, ids, weights down; the CPU experts' sum up. One step at a time: each layer waits for its own
    downward copies (which the stream queues after the previous layer's upward copy) before it writes here."""

    def __init__(self):
        self.rows = self.hidden = self.k = 0
        self.pinned = None

    def get(self, T: int, hidden: int, k: int, pinned: bool):
        if T > self.rows or (hidden, k, pinned) != (self.hidden, self.k, self.pinned):
            rows = max(T, self.rows if (hidden, k, pinned) == (self.hidden, self.k, self.pinned) else 0)
            new = lambda *s, dt=torch.float32: torch.empty(s, dtype=dt, pin_memory=pinned)  # noqa: E731
            self.x, self.ids, self.w, self.out = new(rows, hidden), new(rows, k, dt=torch.int64), new(rows, k), \
                new(rows, hidden)
            self.ids32, self.w_cpu = np.empty((rows, k), np.int32), np.empty((rows, k), np.float32)
            self.event = torch.cuda.Event() if pinned else None
            self.rows, self.hidden, self.k, self.pinned = rows, hidden, k, pinned
        return self


_host = _HostBuffers()


class LayerExperts:
    """One MoE layer's routed experts on both devices: the CPU's (ggml over the folder's memory map: every expert)
    and, after make_resident, some on the GPU as their GGML bytes (runtime.ggml_gpu). A call splits each token's
    k experts between the two, runs both at once and returns their sum.

    Order of a step on a GPU model: the hidden rows, ids and weights go to pinned host buffers (asynchronous copies
    + an event); the shared expert and the GPU-resident experts are queued; the host waits for the copies only (not
    for the GPU's work), runs ggml on the CPU's pairs, and queues the sum's copy back. Nothing is allocated per
    step once the buffers have grown to the step's rows (the decode graph passes its own `out`)."""

    def __init__(self, cpu: MoEExperts, layer: int):
        self.cpu, self.layer = cpu, layer
        self.n_experts, self.per_expert = cpu.experts, cpu.expert_bytes
        self.resident = np.zeros(self.n_experts, bool)     # on the GPU
        self.local: torch.Tensor | None = None              # int32 (n_experts,) on the device: global -> local
        self.stacks: tuple | None = None                    # (gate, up, down) ggml_gpu.GpuStack
        self.streamer: Streamer | None = None               # prefill's expert streaming, if the model has one
        self.record: np.ndarray | None = None               # int64 (n_experts,): hit counts, while profiling

    @classmethod
    def from_folder(cls, folder, layer: int, threads: int | None = None) -> LayerExperts:
        return cls(MoEExperts.from_folder(folder, layer, threads=threads), layer)

    @property
    def gpu_ready(self) -> bool:
        """Every matrix's GGML type has a GPU kernel."""
        gg = gpu_kernels()
        return gg is not None and all(gg.supported(s.ggml_type) for s in self._mats)

    @property
    def _mats(self):
        return self.cpu.gate, self.cpu.up, self.cpu.down

    def make_resident(self, experts, device, bounce: torch.Tensor | None = None) -> int:
        """Copy `experts` (global ids) to `device` as GGML bytes; later calls run them there. Returns the bytes."""
        gg = gpu_kernels()
        experts = np.unique(np.asarray(experts, np.int64))
        self.resident[:] = False
        self.local, self.stacks = None, None
        if not len(experts):
            return 0
        stacks = []
        for s in self._mats:
            E, rows, cols = s.shape
            size = s.data.size // E
            dev = torch.empty((len(experts), rows, size // rows), dtype=torch.uint8, device=device)
            flat = dev.view(-1)
            for j, e in enumerate(experts):
                _copy_bytes(flat[j * size:(j + 1) * size], s.data[e * size:(e + 1) * size], bounce)
            stacks.append(gg.GpuStack(dev, s.ggml_type, rows, cols))
        self.stacks = tuple(stacks)
        self.local = torch.from_numpy(local_map(self.n_experts, experts)).to(device)
        self.resident[experts] = True
        return len(experts) * self.per_expert

    # ------------------------------------------------------------------------------------ the two parts

    def gpu_part(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 hist: np.ndarray | None = None) -> torch.Tensor | None:
        """The resident experts' share (float32 (T, hidden) on the device), or None if none is resident. A decode
        batch's is queued without a host sync (CUDA-graph capturable); a long prefill's reads its per-expert pair
        counts back once, unless `hist` (pairs per global expert, on the host) gives them."""
        if self.stacks is None:
            return None
        counts = None if hist is None else hist[np.flatnonzero(self.resident)]
        return gpu_kernels().moe(x, ids, weights, self.local, *self.stacks, counts=counts)

    def cpu_part(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, launch=None,
                 out: torch.Tensor | None = None):
        """The non-resident experts' share through ggml, with `launch()` (the GPU's side of the step) queued once
        the inputs' copies are, so that both run at once. Returns (float32 (T, hidden) on x's device, written into
        `out` if given; what launch returned)."""
        T, k = ids.shape
        if x.device.type != "cuda":       # a CPU model: no copies
            launched = launch() if launch else None
            b = _host.get(T, self.cpu.hidden, k, pinned=False)
            ids_np = ids.numpy()
            res = out if out is not None else torch.empty((T, self.cpu.hidden), dtype=torch.float32)
            if cpu_routes(ids_np, weights.float().numpy(), self.resident, b.ids32[:T], b.w_cpu[:T]):
                self.cpu.forward(x.float().numpy(), b.ids32[:T], b.w_cpu[:T], out=res.numpy())
            else:
                res.zero_()
            return res, launched
        b = _host.get(T, self.cpu.hidden, k, pinned=True)
        xh, ih, wh, oh = b.x[:T], b.ids[:T], b.w[:T], b.out[:T]
        xh.copy_(x, non_blocking=True)
        ih.copy_(ids, non_blocking=True)
        wh.copy_(weights, non_blocking=True)
        b.event.record()
        launched = launch() if launch else None
        b.event.synchronize()                              # the copies only, not the launched work
        ids_np = ih.numpy()
        res = out if out is not None else torch.empty((T, self.cpu.hidden), dtype=torch.float32, device=x.device)
        on_gpu, streamed = self.resident, None
        pick = self.streamer.decode_experts(self, ids_np) if self.streamer is not None else ()
        if len(pick):                                      # a decode step's share of experts over PCIe, queued
            streamed = self.streamer.run_picked(self, x, ids, weights, pick)
            on_gpu = self.resident.copy()
            on_gpu[pick] = True
        if cpu_routes(ids_np, wh.numpy(), on_gpu, b.ids32[:T], b.w_cpu[:T]):
            t0 = time.perf_counter()
            self.cpu.forward(xh.numpy(), b.ids32[:T], b.w_cpu[:T], out=oh.numpy())
            if self.streamer is not None:
                used = np.unique(ids_np)
                self.streamer.cpu_timed(T * k - int(on_gpu[ids_np].sum()), time.perf_counter() - t0,
                                        T, int((~on_gpu[used]).sum()))
            res.copy_(oh, non_blocking=True)
        else:
            res.zero_()
        if streamed is not None:
            res += streamed
        return res, launched

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, launch_shared=None):
        """(routed experts' sum, float32 (T, hidden) on x's device; what launch_shared() returned). A long prefill
        chunk may stream its experts to the GPU instead (Streamer)."""
        if self.record is not None:                          # profiling (runtime.profile)
            self.record += np.bincount(ids.cpu().numpy().reshape(-1), minlength=self.n_experts)
        if self.streamer is not None:
            ids_np = self.streamer.worth(self, ids)
            if ids_np is not None:
                shared = launch_shared() if launch_shared else None
                return self.streamer.run(self, x, ids, weights, ids_np), shared
        gpu = []

        def launch():                                        # the GPU's side, queued behind the inputs' copies
            shared = launch_shared() if launch_shared else None
            gpu.append(self.gpu_part(x, ids, weights))
            return shared

        routed, shared = self.cpu_part(x, ids, weights, launch)
        if gpu[0] is not None:
            routed += gpu[0]
        return routed, shared


def _copy_bytes(dst: torch.Tensor, src: np.ndarray, bounce: torch.Tensor | None) -> None:
    """dst (uint8, any device) <- src (uint8, e.g. a read-only memmap slice), through `bounce` (pinned uint8) in
    pieces when given: a memmap cannot be pinned in place, and torch will not wrap a read-only array."""
    if bounce is None or dst.device.type != "cuda":
        dst.copy_(torch.from_numpy(np.array(src)))
        return
    n, step = src.size, bounce.numel()
    view = bounce.numpy()
    for a in range(0, n, step):
        m = min(step, n - a)
        np.copyto(view[:m], src[a:a + m])
        dst[a:a + m].copy_(bounce[:m])                  # synchronous: the bounce buffer is reused next


# ============================================================================================ prefill streaming

def decode_pick(ids: np.ndarray, resident: np.ndarray, cpu_expert_s: float, copy_expert_s: float,
                cap: int) -> np.ndarray:
    """Of a decode step's non-resident experts (routing `ids` (T, k)), those to stream to the GPU instead of running
    them on the CPU, sorted: as many as make the CPU's time for the rest and the copies' time for these end
    together, n x cpu / (cpu + copy) rounded down (the CPU keeps the remainder: its time is the better known), at
    most `cap` (a slot's worth); the experts with the most pairs first (the CPU's time grows with them, a copy's
    does not). PCIe reads host memory beside the CPU's cores: where the cores cannot use all of the host's memory
    bandwidth, the two add up."""
    used, counts = np.unique(ids, return_counts=True)
    keep = ~resident[used]
    used, counts = used[keep], counts[keep]
    if len(used) < 2 or cpu_expert_s <= 0:
        return np.empty(0, np.int64)
    n = max(0, min(cap, int(len(used) * cpu_expert_s / (cpu_expert_s + copy_expert_s))))
    return np.sort(used[np.argsort(-counts, kind="stable")[:n]]).astype(np.int64)


def stream_pays(copy_s: float, cpu_s: float | None) -> bool:
    """Stream a chunk's experts if crossing PCIe takes less than the CPU would (unknown CPU time: not yet; the CPU
    runs that chunk and is timed). The GPU's math on the streamed bytes is left out: it overlaps the next batch's
    copy and is ~10x shorter for Q4_K_M experts (tensor cores on ~4.5 bits per weight)."""
    return cpu_s is not None and cpu_s == cpu_s and copy_s < cpu_s


class Streamer:
    """Prefill's expert streaming (shared by a model's layers): for a long chunk, the experts a MoE layer routes to
    that are not resident cross host -> GPU and run there (ggml_gpu.moe with a `local` map per batch), instead of
    ggml on the CPU. The folder's memory map stays the one copy in RAM: bytes go memmap -> pinned staging (host
    threads, in parallel) -> GPU staging, in batches of whole experts, double-buffered: batch j + 1's copies run
    while batch j computes. The first batch of each layer waits for the layer's routing (no prefetch across
    layers).

    Decided per layer and chunk (`worth`): stream if bytes to cross / pcie_bps < the CPU's time for the chunk's
    CPU pairs (pairs x cpu_pair_s). pcie_bps is measured on the first decision (pinned staging -> GPU);
    cpu_pair_s is measured on the CPU's own calls of at least MEASURE_ROWS rows (the first such layer runs on the
    CPU to measure it) and kept as a running mean."""

    MEASURE_ROWS = 64       # rows from which a CPU call is compute-bound enough to predict longer chunks
    MIN_ROWS = 32           # never stream below this (decode, short chunks): the routing's host copy costs a sync
    DECODE_ROWS = 16        # decode batches up to this many rows may stream a share of their experts (decode_pick)
    COPY_LATENCY_S = 20e-6  # per streamed expert beside its bytes: copies and their launch

    def __init__(self, device, slot_bytes: int, threads: int = 8):
        self.device = torch.device(device)
        self.slot_bytes = slot_bytes
        self.copy_stream = torch.cuda.Stream(self.device)
        self.slots = [dict(dev=torch.empty(slot_bytes, dtype=torch.uint8, device=self.device),
                           host=torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True),
                           map=torch.empty(1024, dtype=torch.int32, device=self.device),
                           map_host=torch.empty(1024, dtype=torch.int32, pin_memory=True),
                           copied=torch.cuda.Event(), used=torch.cuda.Event()) for _ in range(2)]
        self._next = 0
        self.decode_rows = DECODE_STREAM                # batch sizes (rows) that may stream
        self.cpu_expert_s: dict[int, float] = {}       # decode batch rows -> CPU seconds per distinct expert
        self.decode_streamed = 0                        # experts decode steps have streamed
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="stage")
        self.pcie_bps: float | None = None
        self.cpu_pair_s: float | None = None
        self.decisions = deque(maxlen=1024)   # recent (layer, rows, bytes, predicted copy s, CPU s, streamed)

    @property
    def device_bytes(self) -> int:
        return 2 * self.slot_bytes

    def measure_pcie(self) -> float:
        s = self.slots[0]
        s["dev"].copy_(s["host"])                          # warm
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(3):
            s["dev"].copy_(s["host"], non_blocking=True)
        torch.cuda.synchronize(self.device)
        self.pcie_bps = 3 * self.slot_bytes / (time.perf_counter() - t0)
        return self.pcie_bps

    def cpu_timed(self, pairs: int, seconds: float, rows: int = 0, experts: int = 0) -> None:
        """A CPU call's time: per pair for long chunks (prefill's decision), per distinct expert for each decode
        batch size (decode_experts')."""
        if pairs >= self.MEASURE_ROWS:
            rate = seconds / pairs
            self.cpu_pair_s = rate if self.cpu_pair_s is None else 0.5 * (self.cpu_pair_s + rate)
        if experts and rows <= self.DECODE_ROWS:
            rate, old = seconds / experts, self.cpu_expert_s.get(rows)
            self.cpu_expert_s[rows] = rate if old is None else 0.75 * old + 0.25 * rate

    def decode_experts(self, layer: LayerExperts, ids_np: np.ndarray) -> np.ndarray:
        """The non-resident experts of a decode step that cross PCIe and run on the GPU while the CPU runs the
        others (the module's decode_pick); none until the CPU's time per expert at this batch size has been
        measured, or where the memory map cannot be page-locked; only for batches of `decode_rows` rows."""
        T = ids_np.shape[0]
        if T not in self.decode_rows or T not in self.cpu_expert_s or not layer.gpu_ready \
                or layer.n_experts > self.slots[0]["map"].numel() \
                or not all(host_registered(m.data) for m in layer._mats):
            return np.empty(0, np.int64)
        if self.pcie_bps is None:
            self.measure_pcie()
        pick = decode_pick(ids_np, layer.resident, self.cpu_expert_s[T],
                           layer.per_expert / self.pcie_bps + self.COPY_LATENCY_S, self.slot_bytes // layer.per_expert)
        self.decode_streamed += len(pick)
        return pick

    def run_picked(self, layer: LayerExperts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                   pick: np.ndarray) -> torch.Tensor:
        """Queue the picked experts' upload (page-locked memory map -> a GPU slot, on the copy stream) and their
        math behind it (on the current stream); returns their share, float32 (T, hidden), when the stream gets
        there."""
        s = self.slots[self._next]
        self._next ^= 1
        s["used"].synchronize()                            # this slot's last math (and its map's copy) is done
        s["map_host"].numpy()[:layer.n_experts] = local_map(layer.n_experts, pick)
        compute = torch.cuda.current_stream(x.device)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(s["used"])
            views = self._upload(layer, pick, s)
            s["copied"].record(self.copy_stream)
        local = s["map"][:layer.n_experts]
        local.copy_(s["map_host"][:layer.n_experts], non_blocking=True)
        compute.wait_event(s["copied"])
        gg = gpu_kernels()
        stacks = [gg.GpuStack(v, m.ggml_type, m.shape[1], m.shape[2]) for v, m in zip(views, layer._mats)]
        out = gg.moe(x, ids, weights, local, *stacks)
        s["used"].record(compute)
        return out

    def needed(self, layer: LayerExperts, ids_np: np.ndarray) -> np.ndarray:
        used = np.unique(ids_np)
        return used[~layer.resident[used]]

    def predict(self, layer: LayerExperts, ids_np: np.ndarray) -> tuple[float, float, int]:
        """(seconds to cross, seconds on the CPU, bytes) for this chunk's non-resident experts."""
        cross = len(self.needed(layer, ids_np)) * layer.per_expert
        cpu_pairs = int((~layer.resident[ids_np]).sum())
        if self.pcie_bps is None:
            self.measure_pcie()
        cpu_s = cpu_pairs * self.cpu_pair_s if self.cpu_pair_s is not None else float("nan")
        return cross / self.pcie_bps, cpu_s, cross

    def worth(self, layer: LayerExperts, ids: torch.Tensor) -> np.ndarray | None:
        """The chunk's routing on the host if streaming it pays, else None."""
        if not ids.is_cuda or ids.shape[0] < self.MIN_ROWS or layer.per_expert > self.slot_bytes \
                or not layer.gpu_ready:
            return None
        ids_np = ids.cpu().numpy()
        copy_s, cpu_s, nbytes = self.predict(layer, ids_np)
        go = stream_pays(copy_s, cpu_s)
        self.decisions.append((layer.layer, ids.shape[0], nbytes, copy_s, cpu_s, go))
        return ids_np if go else None

    def run(self, layer: LayerExperts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
            ids_np: np.ndarray) -> torch.Tensor:
        """Every routed expert of the chunk on the GPU: resident ones from their stacks, the rest streamed."""
        gg = gpu_kernels()
        hist = np.bincount(ids_np.ravel(), minlength=layer.n_experts)   # pairs per expert: no sync in moe()
        out = layer.gpu_part(x, ids, weights, hist)
        out = torch.zeros((x.shape[0], layer.cpu.hidden), dtype=torch.float32, device=x.device) if out is None else out
        need = self.needed(layer, ids_np)
        per = self.slot_bytes // layer.per_expert
        batches = [need[a:a + per] for a in range(0, len(need), per)]
        if not batches:
            return out
        maps = torch.from_numpy(np.stack([local_map(layer.n_experts, b) for b in batches])).to(x.device)
        compute = torch.cuda.current_stream(x.device)
        direct = all(host_registered(m.data) for m in layer._mats)
        for j, batch in enumerate(batches):
            s = self.slots[j % 2]
            if not direct:
                s["copied"].synchronize()                  # the pinned slot's previous upload is done
                views = self._fill(layer, batch, s)
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(s["used"])     # the GPU slot's previous batch has been computed
                if direct:                                 # page-locked memory map -> GPU, no staging copy
                    views = self._upload(layer, batch, s)
                else:
                    n = sum(v.numel() for v in views)
                    s["dev"][:n].copy_(s["host"][:n], non_blocking=True)
                s["copied"].record(self.copy_stream)
            compute.wait_event(s["copied"])
            stacks = [gg.GpuStack(v, m.ggml_type, m.shape[1], m.shape[2]) for v, m in zip(views, layer._mats)]
            out += gg.moe(x, ids, weights, maps[j], *stacks, counts=hist[batch])
            s["used"].record(compute)
        return out

    @staticmethod
    def _layout(layer: LayerExperts, batch: np.ndarray, slot: dict):
        """(matrix, its bytes per expert, where its stack starts in the slot, the GPU slot's view of it) per
        matrix: the batch's experts' blocks, stack after stack."""
        dev, at, out = slot["dev"], 0, []
        for m in layer._mats:
            E, rows, _ = m.shape
            size = m.data.size // E
            out.append((m, size, at, dev[at:at + len(batch) * size].view(len(batch), rows, size // rows)))
            at += len(batch) * size
        return out

    def _upload(self, layer: LayerExperts, batch: np.ndarray, slot: dict) -> list[torch.Tensor]:
        """Queue the batch's experts straight from the page-locked memory map into the GPU slot (on the current
        stream), one copy per run of consecutive expert ids; return the slot's views."""
        views = []
        for m, size, at, view in self._layout(layer, batch, slot):
            src = _host_tensor(m.data)
            j = 0
            while j < len(batch):
                k = j
                while k + 1 < len(batch) and batch[k + 1] == batch[k] + 1:
                    k += 1
                e0 = int(batch[j])
                slot["dev"][at + j * size:at + (k + 1) * size].copy_(
                    src[e0 * size:(int(batch[k]) + 1) * size], non_blocking=True)
                j = k + 1
            views.append(view)
        return views

    def _fill(self, layer: LayerExperts, batch: np.ndarray, slot: dict) -> list[torch.Tensor]:
        """Copy the batch's experts' bytes from the memmap into the slot's pinned buffer (threads; numpy's copy
        releases the GIL); return the GPU slot's views, one (n, rows, row_bytes) stack per matrix."""
        host = slot["host"].numpy()
        jobs, views = [], []
        for m, size, at, view in self._layout(layer, batch, slot):
            for j, e in enumerate(batch):
                e = int(e)                                 # numpy int32 * size would overflow past 2 GiB
                jobs.append((host[at + j * size:at + (j + 1) * size], m.data[e * size:(e + 1) * size]))
            views.append(view)
        list(self.pool.map(lambda job: np.copyto(*job), jobs))
        return views


# The folder's memory map, page-locked for the GPU's DMA engines (cudaHostRegister, read-only): streamed experts
# then cross at the PCIe rate straight from the page cache, instead of through a pinned staging copy that the
# CPU's memory bandwidth caps below it. Each mapping (a shard file) is registered once, whole, on first use, and
# unregistered when its array is freed (before the munmap): a later mapping at the same address must not inherit
# a registration that pins the old pages. Where the driver refuses (no read-only registration, a memlock limit)
# the staging path runs, with one note. DSV3_NO_HOST_REGISTER=1 keeps the staging path.
_HOST_REGISTER_READ_ONLY = 8
_registered: dict[tuple[int, int], bool] = {}
_refused_noted = False


def _mapping(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


@functools.cache
def _cudart():
    import ctypes
    for line in open("/proc/self/maps"):
        if "libcudart.so" in line:
            return ctypes.CDLL(line.split()[-1])
    return None


def _forget(key: tuple[int, int], ok: bool) -> None:
    if ok:
        import ctypes
        _cudart().cudaHostUnregister(ctypes.c_void_p(key[0]))
    _registered.pop(key, None)


def host_registered(a: np.ndarray) -> bool:
    """Whether the memory map under `a` is page-locked for the GPU (registering it on first use)."""
    global _refused_noted
    root = _mapping(a)
    key = (root.ctypes.data, root.nbytes)
    if key not in _registered:
        ok, why = False, "DSV3_NO_HOST_REGISTER is set"
        if not os.environ.get("DSV3_NO_HOST_REGISTER"):
            import ctypes
            rt = _cudart()
            why = "libcudart is not loaded"
            if rt is not None:
                err = rt.cudaHostRegister(ctypes.c_void_p(key[0]), ctypes.c_size_t(key[1]),
                                          ctypes.c_uint(_HOST_REGISTER_READ_ONLY))
                ok = err == 0
                if not ok:
                    rt.cudaGetLastError()              # not sticky: clear it, or torch's next check reports it
                    why = f"cudaHostRegister failed (error {err})"
        if not ok and not _refused_noted:
            _refused_noted = True
            print(f"note: the model's memory map cannot be page-locked for the GPU ({why}); streamed experts go "
                  "through a pinned staging copy", file=sys.stderr)
        _registered[key] = ok
        weakref.finalize(root, _forget, key, ok).atexit = False   # at exit the CUDA context may be gone first
    return _registered[key]


def _host_tensor(a: np.ndarray) -> torch.Tensor:
    """A flat uint8 CPU tensor over a read-only memory-mapped array, without a copy (torch warns about writability;
    nothing writes to it)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.from_numpy(a.reshape(-1))


# ============================================================================================ a model's placement

STAGE_BYTES = 1 << 30          # each of the two streaming slots (GPU and pinned host), at most
# Decode batches of these many rows stream a share of their experts (Streamer.decode_experts). DSV3_DECODE_STREAM:
# "0" none, "1" every batch up to Streamer.DECODE_ROWS rows; by default 2-8 rows, where it measured a gain (one row:
# even, or worse with half the experts resident; 16: even; see BENCHMARKS.md).
DECODE_STREAM = {"0": range(0), "1": range(1, Streamer.DECODE_ROWS + 1)}.get(
    os.environ.get("DSV3_DECODE_STREAM", ""), range(2, 9))
MARGIN_BYTES = 1 << 30         # left free on the GPU beside the plan (decode graphs' pools, allocator slack)


def expert_budget(device, reserve: int, gpu_memory: float | None) -> int:
    """Bytes the resident experts may take now: what is free on the device less `reserve` (prefill buffers,
    streaming slots) and a margin; with `gpu_memory` (GiB), at most that in all for this process (what torch holds
    already counted)."""
    free = torch.cuda.mem_get_info(device)[0]
    budget = free - reserve - MARGIN_BYTES
    if gpu_memory is not None:
        budget = min(budget, int(gpu_memory * 2**30) - torch.cuda.memory_reserved(device) - reserve)
    return max(0, budget)


@dataclass
class Placement:
    experts: dict[int, np.ndarray]      # layer -> resident global ids
    bytes: int
    budget: int
    profile: str | None                 # the profile file used, or None (whole layers)
    expected_hit_rate: float | None     # on the profile's own text, if one was used


def place_experts(layers: dict[int, LayerExperts], device, budget: int, profile: RoutingProfile | None = None,
                  profile_name: str | None = None) -> Placement:
    """Fill `budget` bytes of `device` with routed experts (plan_placement) and make them resident."""
    ready = {i: le for i, le in layers.items() if le.gpu_ready}
    if not ready:
        return Placement({}, 0, budget, profile_name, None)
    per_expert = {i: le.per_expert for i, le in ready.items()}
    n_experts = next(iter(ready.values())).n_experts
    plan = plan_placement(per_expert, n_experts, budget, profile.counts if profile else None)
    total = 0
    bounce = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True) if torch.device(device).type == "cuda" else None
    for i, ids in plan.items():
        total += ready[i].make_resident(ids, device, bounce)
    rate = hit_rate(plan, profile.counts, per_expert) if profile else None
    return Placement(plan, total, budget, profile_name, rate)


def record_profile(layers: dict[int, LayerExperts], run, source: str = "",
                   routers: dict[int, str] | None = None) -> RoutingProfile:
    """Count every layer's routings while `run()` pushes tokens through the model; `run` returns the token count."""
    for le in layers.values():
        le.record = np.zeros(le.n_experts, np.int64)
    try:
        tokens = run()
        return RoutingProfile({i: le.record.copy() for i, le in layers.items()}, tokens, source, routers)
    finally:
        for le in layers.values():
            le.record = None


def setup_gpu(layers: dict[int, LayerExperts], folder, device, reserve: int,
              gpu_memory: float | None = None) -> Placement | None:
    """A GPU model's experts: the streaming slots for prefill, then resident experts filling the rest of the
    budget (expert_budget less the slots): by the folder's routing profile (PROFILE_NAME) if it has a usable
    one (else a note, once), or whole layers. None where the GPU kernels cannot load."""
    if gpu_kernels() is None or not any(le.gpu_ready for le in layers.values()):
        return None
    device = torch.device(device)
    biggest = max(le.per_expert for le in layers.values())
    slot = max(biggest, min(STAGE_BYTES, 32 * biggest))
    budget = expert_budget(device, reserve + 2 * slot + gpu_kernels().DENSE_BYTES, gpu_memory)
    streamer = Streamer(device, slot) if expert_budget(device, reserve, gpu_memory) >= 2 * slot else None
    for le in layers.values():
        le.streamer = streamer
    profile, name = None, None
    path = Path(folder.path) / PROFILE_NAME
    if path.exists():
        try:
            profile = RoutingProfile.load(path, next(iter(layers.values())).n_experts, router_checksums(folder))
            name = str(path)
        except ProfileError as e:
            print(f"note: {e}; GPU experts placed by whole layers", file=sys.stderr)
    return place_experts(layers, device, budget, profile, name)


def compare_placements(per_expert: dict[int, int], n_experts: int, counts: dict[int, np.ndarray],
                       profile: dict[int, np.ndarray], shares=(0.1, 0.25, 0.5, 0.75)) -> list[dict]:
    """Hit rates on `counts` (a text's routings) of a placement planned from `profile` (another text's) and of
    whole layers, at budgets of each share of all the expert bytes."""
    total = sum(per_expert.values()) * n_experts
    rows = []
    for share in shares:
        budget = int(share * total)
        rows.append({"share": share, "budget_bytes": budget,
                     "profile": hit_rate(plan_placement(per_expert, n_experts, budget, profile), counts, per_expert),
                     "whole_layers": hit_rate(plan_placement(per_expert, n_experts, budget), counts, per_expert)})
    return rows
