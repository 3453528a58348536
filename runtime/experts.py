"""
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
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from runtime import ggml_ops as G


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

    def forward(self, x: np.ndarray, expert_ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """x float32 (T, hidden), expert_ids int (T, k), weights float32 (T, k) -> float32 (T, hidden)."""
        x, ids, w = np.asarray(x, np.float32), np.asarray(expert_ids), np.asarray(weights, np.float32)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"expert_ids must be a 2-d integer array, got {ids.dtype} {ids.shape}")
        T, k = ids.shape
        if x.shape != (T, self.hidden) or w.shape != (T, k):
            raise ValueError(f"x {x.shape}, expert_ids {ids.shape}, weights {w.shape}: "
                             f"want (T, {self.hidden}), (T, k), (T, k)")
        if ids.size and (ids.min() < 0 or ids.max() >= self.experts):  # ggml would abort the process
            raise ValueError(f"expert ids must be in [0, {self.experts}), got [{ids.min()}, {ids.max()}]")
        out = np.empty((T, self.hidden), np.float32)
        for a in range(0, T, self.max_tokens):
            n = min(self.max_tokens, T - a)
            self._run(x[a:a + n], ids[a:a + n], w[a:a + n], out[a:a + n])
        return out

    __call__ = forward

    def _run(self, x, ids, w, out):
        n, k = ids.shape
        g = self._graph(min(1 << (n - 1).bit_length(), self.max_tokens), k)
        with g.lock:
            for t, address in zip((g.w_gate, g.w_up, g.w_down), self._addresses):  # this layer's bytes
                G.set_data(t, address)
            g.x_np[:n], g.ids_np[:n], g.w_np[:n] = x, ids, w
            g.x_np[n:], g.ids_np[n:], g.w_np[n:] = 0, ids[0], 0  # padding rows: no new experts, weight 0
            g.graph.compute()
            out[:] = g.out_np[:n]
