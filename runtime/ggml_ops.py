"""
The few ggml C calls the CPU expert kernels need, through ggml-python's ctypes bindings (`pip install
ggml-python==0.0.45`, which vendors ggml 0.15.3; module `ggml`).

Usage: a context holds only tensor headers (no_alloc); the caller points every tensor at memory it owns
(`set_data`: a weight memmap, a numpy buffer) *before* making any view of it, since a view copies its source's
data pointer when it is made. `Graph` builds the forward graph of one output, plans it once for `n_threads`
and computes it again and again: inputs are read from, and outputs written to, whatever the tensors point at.

Checked at import (a binding whose ctypes structs disagree with the C library corrupts memory silently):
sizeof(ggml_tensor) + the object header must equal ggml_tensor_overhead(). The `ggml-py` package (a different
project, also module `ggml`) has a stale layout and fails here instead of segfaulting later.

Threads: this ggml build runs its workers on OpenMP (a ggml threadpool then starts no threads of its own, so
there is no point in one). OpenMP's default wait policy spins between parallel regions and at ggml's per-op
barriers, which collapses when the cores are oversubscribed (the GPU side's threads, other processes), so we
default OMP_WAIT_POLICY to PASSIVE, with a bounded spin (GOMP_SPINCOUNT), if no libgomp is loaded yet. libgomp
reads them once, when it is loaded: a program that imports torch first (torch loads its libgomp, which ggml then
shares: same soname) must set them itself, before that import.
"""
from __future__ import annotations

import ctypes
import os
import warnings

if "OMP_WAIT_POLICY" not in os.environ and not any("libgomp" in line for line in open("/proc/self/maps")):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    # ... but a bounded spin first (GOMP_SPINCOUNT overrides PASSIVE's 0): a decode step's experts start a few
    # hundred microseconds after the last layer's ended, and threads still spinning start them at once
    # (benchmarks/moe_step.py times ggml under each policy)
    os.environ.setdefault("GOMP_SPINCOUNT", "300000")

import numpy as np

try:
    import ggml as _g
except ImportError as e:  # pragma: no cover
    raise ImportError("runtime needs ggml-python==0.0.45 (module `ggml`): pip install ggml-python==0.0.45") from e

TESTED = ("0.0.45", "0.15.3")  # (ggml-python, ggml) this module was written and measured against


def _check_binding():
    where = getattr(_g, "__file__", "?")
    if not hasattr(_g, "ggml_tensor_overhead") or not hasattr(_g, "ggml_mul_mat_id"):
        raise ImportError(f"module `ggml` at {where} is not ggml-python (no ggml_mul_mat_id); "
                          f"install ggml-python=={TESTED[0]}")
    header = ctypes.sizeof(_g.ggml_object)
    py, c = ctypes.sizeof(_g.ggml_tensor), _g.ggml_tensor_overhead()
    if py + header != c:
        raise ImportError(
            f"ggml binding at {where} disagrees with its C library: ctypes sizeof(ggml_tensor) = {py} + "
            f"{header}-byte object header != ggml_tensor_overhead() = {c}. Using it would corrupt memory. "
            f"Install ggml-python=={TESTED[0]} (not `ggml-py`).")
    got = (getattr(_g, "__version__", "?"), _g.ggml_version().decode())
    if got != TESTED:
        warnings.warn(f"ggml-python {got[0]} / ggml {got[1]}: runtime.ggml_ops was tested with "
                      f"ggml-python {TESTED[0]} / ggml {TESTED[1]}", RuntimeWarning, stacklevel=3)


_check_binding()
_g.ggml_cpu_init()

# type ids (ggml's enum ggml_type; the same numbers GGUF files and our manifest use)
F32, I32 = _g.GGML_TYPE_F32, _g.GGML_TYPE_I32
Q4_K, Q5_K, Q6_K = _g.GGML_TYPE_Q4_K, _g.GGML_TYPE_Q5_K, _g.GGML_TYPE_Q6_K
Q5_0, Q8_0 = _g.GGML_TYPE_Q5_0, _g.GGML_TYPE_Q8_0

Tensor = ctypes.POINTER(_g.ggml_tensor)


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once)."""
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        try:
            topo = f"/sys/devices/system/cpu/cpu{cpu}/topology"
            cores.add((open(f"{topo}/physical_package_id").read().strip(), open(f"{topo}/core_id").read().strip()))
        except OSError:
            cores.add(("cpu", cpu))
    return max(1, len(cores))


def type_name(t: int) -> str:
    return _g.ggml_type_name(t).decode()


def row_size(t: int, n: int) -> int:
    """Bytes of one row of n values of type t (n must be a whole number of blocks)."""
    if n % _g.ggml_blck_size(t):
        raise ValueError(f"a {type_name(t)} row of {n} values is not a whole number of "
                         f"{_g.ggml_blck_size(t)}-value blocks")
    return _g.ggml_row_size(t, n)


# ---------------------------------------------------------------------------------------------- context, tensors

def context(n_tensors: int, graph: bool = True):
    """A no_alloc context with room for n_tensors headers (and one graph). Free it with free()."""
    size = n_tensors * _g.ggml_tensor_overhead() + (_g.ggml_graph_overhead() if graph else 0)
    ctx = _g.ggml_init(_g.ggml_init_params(mem_size=size, mem_buffer=None, no_alloc=True))
    if not ctx:
        raise MemoryError("ggml_init failed")
    return ctx


free = _g.ggml_free


def tensor(ctx, ggml_type: int, *ne: int) -> Tensor:
    """A new 1-3d tensor header; ne in ggml order (ne[0] = the contiguous row length)."""
    new = {1: _g.ggml_new_tensor_1d, 2: _g.ggml_new_tensor_2d, 3: _g.ggml_new_tensor_3d}[len(ne)]
    return new(ctx, ggml_type, *ne)


def nbytes(t: Tensor) -> int:
    return _g.ggml_nbytes(t)


def set_data(t: Tensor, address: int) -> None:
    """Point t at memory the caller keeps alive (ggml neither copies nor frees it)."""
    t.contents.data = address


def set_array(t: Tensor, a: np.ndarray) -> None:
    """Point t at a C-contiguous numpy array of exactly its size."""
    if not a.flags.c_contiguous or a.nbytes != nbytes(t):
        raise ValueError(f"array of {a.nbytes} bytes (contiguous: {a.flags.c_contiguous}) "
                         f"for a {nbytes(t)}-byte tensor")
    t.contents.data = a.ctypes.data


def alloc(t: Tensor) -> np.ndarray:
    """A fresh 64-byte aligned buffer for t; t points at it. Keep the returned array alive as long as t is used."""
    buf = np.empty(nbytes(t) + 64, np.uint8)
    off = -buf.ctypes.data % 64
    buf = buf[off:off + nbytes(t)]
    t.contents.data = buf.ctypes.data
    return buf


def array(t: Tensor, dtype, shape) -> np.ndarray:
    """The memory t points at (contiguous), as a numpy array without copying."""
    a = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes(t)).from_address(t.contents.data))
    return a.view(dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------- ops
# ggml semantics: mul_mat(a, b) = b @ a.T per 2d slice (a: ne (K, M), b: ne (K, N) -> ne (M, N));
# mul_mat_id(as, b, ids): as ne (K, M, n_as) stacked matrices, b ne (K, n_b, T), ids I32 ne (n_used, T)
# -> ne (M, n_used, T), row (i, t) = as[ids[i, t]] @ b[:, i % n_b, t]. Rows that pick the same matrix are batched.

mul_mat = _g.ggml_mul_mat
mul_mat_id = _g.ggml_mul_mat_id
get_rows = _g.ggml_get_rows
silu = _g.ggml_silu
swiglu = _g.ggml_swiglu_split        # silu(a) * b in one op
mul = _g.ggml_mul                    # elementwise, b broadcast over a
mul_inplace = _g.ggml_mul_inplace
add = _g.ggml_add
add_inplace = _g.ggml_add_inplace
view_2d = _g.ggml_view_2d           # (ctx, a, ne0, ne1, nb1 bytes, offset bytes)


def row_stride(t: Tensor, dim: int) -> int:
    return t.contents.nb[dim]


# ---------------------------------------------------------------------------------------------- graphs

class Graph:
    """The forward graph of `out`, planned once for n_threads; compute() reruns it on whatever data the tensors
    point at now. Not re-entrant: one compute at a time per Graph."""

    def __init__(self, ctx, out: Tensor, n_threads: int):
        self.graph = _g.ggml_new_graph(ctx)
        _g.ggml_build_forward_expand(self.graph, out)
        self.plan = _g.ggml_graph_plan(self.graph, n_threads, None)
        self.work = np.empty(max(1, self.plan.work_size), np.uint8)  # kept alive with the plan
        self.plan.work_data = self.work.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        self._plan_ref = ctypes.byref(self.plan)
        self.n_threads = n_threads

    def compute(self) -> None:
        status = _g.ggml_graph_compute(self.graph, self._plan_ref)
        if status != _g.GGML_STATUS_SUCCESS:
            raise RuntimeError(f"ggml_graph_compute failed with status {status}")
