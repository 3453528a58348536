"""
The own CPU kernel for the routed experts of a few tokens (runtime/cpu_kernels.c: Q4_K/Q6_K on AVX-512 VNNI, one
call per layer, results bit-identical to runtime.experts' ggml graph), compiled on first use and loaded with ctypes.

`kernel()` gives the loaded `Kernel`, or None where it cannot run: DSV3_CPU_KERNEL=0 (ggml only), a CPU without
AVX-512 F/BW/DQ/VNNI, no C compiler, a failed build; the last three are said once, on stderr, and ggml runs instead.

Build: `cc -O3 -march=native -fopenmp -shared -fPIC -ffp-contract=off` (CC overrides cc) into
$XDG_CACHE_HOME (or ~/.cache)/dsv3-hybrid/, named by a hash of the source, the command, the compiler's version and
the CPU (a home directory shared by machines of different CPUs holds one library per CPU), written under a temporary
name and then renamed, so that processes building at once never load half a file.

Threads: the library's OpenMP is libgomp, the one torch and ggml load (same soname), so the process keeps a single
OpenMP runtime and the OMP_WAIT_POLICY / GOMP_SPINCOUNT that runtime.ggml_ops sets before libgomp loads (it is
imported first, here).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from runtime import ggml_ops as G   # first: it sets OpenMP's defaults before libgomp loads

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512_vnni", "f16c", "fma")   # /proc/cpuinfo's names
SUPPORTED = frozenset({G.Q4_K, G.Q6_K})


class Kernel:
    """The loaded library: `moe(...)` runs one chunk of tokens."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        P, I, U = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        lib.moe_scratch_bytes.argtypes, lib.moe_scratch_bytes.restype = [I, I, I, I], U
        lib.moe_decode.argtypes = [I, I, I, I, P, P, P, P, P, P, I, I, I, P, I, P]
        lib.moe_decode.restype = I
        self._scratch: dict[tuple, tuple[threading.Lock, np.ndarray]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def supports(*types: int) -> bool:
        return all(t in SUPPORTED for t in types)

    def _scratch_for(self, key) -> tuple[threading.Lock, np.ndarray]:
        """One 64-byte aligned scratch buffer per (T padded to a power of two, k, hidden, inter), kept, like
        runtime.experts' graphs (a buffer for T serves any fewer tokens)."""
        key = (1 << (key[0] - 1).bit_length(),) + key[1:]
        with self._lock:
            if key not in self._scratch:
                n = self.lib.moe_scratch_bytes(*key)
                buf = np.empty(n + 64, np.uint8)
                off = -buf.ctypes.data % 64
                self._scratch[key] = (threading.Lock(), buf[off:off + n])
            return self._scratch[key]

    def moe(self, x: np.ndarray, ids: np.ndarray, w: np.ndarray, gate, up, down, out: np.ndarray,
            threads: int) -> None:
        """out (T, hidden) = the routed experts' sum for x (T, hidden) float32, ids (T, k) int32, w (T, k) float32
        (all C-contiguous; ids in range); gate/up/down: runtime.experts.StackedExperts of Q4_K/Q6_K."""
        T, k = ids.shape
        _, inter, hidden = gate.shape
        lock, scratch = self._scratch_for((T, k, hidden, inter))
        with lock:   # ctypes lets the GIL go for the call
            rc = self.lib.moe_decode(T, k, hidden, inter, x.ctypes.data, ids.ctypes.data, w.ctypes.data,
                                     gate.data.ctypes.data, up.data.ctypes.data, down.data.ctypes.data,
                                     gate.ggml_type, up.ggml_type, down.ggml_type, out.ctypes.data, threads,
                                     scratch.ctypes.data)
        if rc:
            raise ValueError(f"moe_decode refused its input (code {rc}): types "
                             f"{[G.type_name(s.ggml_type) for s in (gate, up, down)]}, hidden {hidden}, inter {inter}")


def kernel() -> Kernel | None:
    """The kernel, or None (ggml runs): DSV3_CPU_KERNEL=0, or it cannot be built or loaded here (said once)."""
    if os.environ.get("DSV3_CPU_KERNEL", "1") == "0":
        return None
    return _load()


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsv3-hybrid"


def _cpu() -> tuple[str, set[str]]:
    model, flags = "?", set()
    for line in open("/proc/cpuinfo"):
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "?":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def build() -> Path:
    """The library's path, compiled now unless the cache holds it. Raises RuntimeError with one line on failure."""
    model, flags = _cpu()
    missing = [f for f in CPU_FLAGS if f not in flags]
    if missing:
        raise RuntimeError(f"the CPU lacks {', '.join(missing)}")
    cc = shlex.split(os.environ.get("CC", "cc"))
    try:
        version = subprocess.run(cc + ["--version"], capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"no C compiler ({' '.join(cc)}: {e})") from None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(cc + FLAGS).encode(), version.encode(), model.encode(),
                                     " ".join(sorted(flags)).encode()])).hexdigest()[:16]
    path = _cache_dir() / f"cpu_kernels-{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            r = subprocess.run(cc + FLAGS + ["-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"build failed: {e}") from None
        if r.returncode:
            lines = [line for line in r.stderr.splitlines() if "error" in line] or r.stderr.splitlines() or ["?"]
            raise RuntimeError(f"build failed: {lines[0].strip()}")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


F16_SCALES = {G.Q4_K: ((0, 2), 2e-4), G.Q6_K: ((208,), 5e-5)}   # fp16 fields' offsets in a block, a sane size


def random_layer(rng: np.random.Generator, types, experts: int, hidden: int, inter: int) -> list[tuple]:
    """Random valid blocks for a layer of Q4_K/Q6_K experts: gate, up, down as (data, type, (experts, rows, cols)),
    random quants and scales, the fp16 block scales finite and small (weights ~0.05)."""
    parts = []
    for t, (rows, cols) in zip(types, ((inter, hidden), (inter, hidden), (hidden, inter))):
        size = G.row_size(t, 256)
        blocks = rng.integers(0, 256, (experts * rows * cols // 256, size), np.uint8)
        offsets, scale = F16_SCALES[t]
        for at in offsets:
            f16 = (rng.uniform(0.5, 1.5, len(blocks)) * scale).astype(np.float16)
            blocks[:, at:at + 2] = f16.view(np.uint8).reshape(-1, 2)
        parts.append((blocks.reshape(-1), int(t), (experts, rows, cols)))
    return parts


@functools.cache
def _load() -> Kernel | None:
    try:
        return Kernel(ctypes.CDLL(str(build())))
    except (RuntimeError, OSError) as e:
        print(f"note: own CPU expert kernel unavailable ({e}); ggml runs the routed experts", file=sys.stderr)
        return None
