"""Faster Q4_K and Q6_K quantizers (stages/fastquant.c) that make ggml's reference bytes, compiled on first use.

The C file is built with this machine's C compiler (`cc`, or $CC) into the user's cache folder, once per source,
flags and compiler, and loaded with ctypes. `quantizer(type, reference)` hands one out only after it has made the
same bytes as `reference` (ggml's own quantizer) on a sample of hard and random blocks in this process; otherwise,
or without a compiler, the caller keeps ggml's quantizer, with one note saying why. DSV3_NO_FASTQUANT=1 keeps ggml's.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

import numpy as np

SOURCE = Path(__file__).with_name("fastquant.c")
# -ffp-contract=off: no fused multiply-add, whose single rounding would change bytes
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"]
KERNELS = {"Q4_K": ("dsv3_quantize_q4_K", 144), "Q6_K": ("dsv3_quantize_q6_K", 210)}   # symbol, bytes per 256 values


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsv3-hybrid"


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, os.uname().machine]).encode())
    lib = _cache_dir() / f"fastquant-{key.hexdigest()[:16]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                           timeout=120, check=True)
            os.replace(tmp, lib)                     # whole or absent, for concurrent first runs too
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    so = ctypes.CDLL(str(lib))
    for symbol, _ in KERNELS.values():
        getattr(so, symbol).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        getattr(so, symbol).restype = None
    return so


def sample(seed: int = 0) -> np.ndarray:
    """Blocks that take every branch of the reference: random scales and signs, all-positive, all-negative, constant,
    zero, one outlier, tiny (subnormal fp16 scales) and huge values, sub-blocks of zeros beside large ones."""
    rng = np.random.default_rng(seed)
    blocks = [rng.standard_normal(256) * s for s in (1e-3, 0.02, 1.0, 300.0)]
    blocks += [np.abs(rng.standard_normal(256)), -np.abs(rng.standard_normal(256)), np.full(256, 0.37),
               np.full(256, -2.5), np.zeros(256), np.r_[np.zeros(255), 7.0], rng.standard_normal(256) * 1e-7,
               np.r_[np.zeros(128), rng.standard_normal(128) * 50], rng.integers(-3, 4, 256).astype(float)]
    x = np.concatenate(blocks + [rng.standard_normal(256 * 64) * rng.uniform(1e-4, 1, (64, 1)).repeat(256, 1).ravel()])
    return x.astype(np.float32)


def _run(fn, x: np.ndarray, out: np.ndarray) -> None:
    """out (uint8, the blocks' bytes) <- blocks of x (contiguous float32, a multiple of 256 values)."""
    fn(x.ctypes.data, out.ctypes.data, x.size)


_lock = threading.Lock()
_checked: dict[str, Callable | None] = {}


def quantizer(type_name: str,
              reference: Callable[[np.ndarray], bytes]) -> Callable[[np.ndarray, np.ndarray], None] | None:
    """The fast quantizer `(x, out) -> None` of a type in KERNELS once it has matched `reference` (x -> that type's
    bytes by ggml), else None. Built and checked once per process and type, whichever thread asks first."""
    with _lock:
        if type_name not in _checked:
            _checked[type_name] = _check(type_name, reference)
        return _checked[type_name]


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        return _build()
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", "") or str(e)).strip()
        print(f"note: the fast quantizers ({SOURCE.name}) did not build ({detail.splitlines()[-1] if detail else e}); "
              "quantizing with ggml's own", file=sys.stderr)
        return None


def _check(type_name: str, reference):
    if os.environ.get("DSV3_NO_FASTQUANT") or type_name not in KERNELS:
        return None
    so = _library()
    if so is None:
        return None
    symbol, block = KERNELS[type_name]
    fn = functools.partial(_run, getattr(so, symbol))
    x = sample()
    ours = np.empty(x.size // 256 * block, np.uint8)
    fn(x, ours)
    if ours.tobytes() != reference(x):
        print(f"note: the fast {type_name} quantizer built with this compiler differs from ggml's bytes "
              f"({SOURCE.name}); quantizing {type_name} with ggml's own", file=sys.stderr)
        return None
    return fn
