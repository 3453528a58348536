"""Files: atomic writes, the output-folder lock, ownership of the output folder, streamed hashing.

Every final name is reached only by rename() after fsync(), so a run killed at any instant leaves either the old
file, the new file, or a temp file under `.pipeline/tmp/` -- never a half-written file under a final name.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

import xxhash

from .errors import PipelineError

STATE_DIR = ".pipeline"
HASH_NAME = "xxh3_128"
CHUNK = 16 << 20


def state_dir(out: Path) -> Path:
    return out / STATE_DIR


def tmp_dir(out: Path) -> Path:
    return out / STATE_DIR / "tmp"


def inside(root: Path, rel, what: str) -> Path:
    """`root / rel` for a relative path read from a file (a manifest, an index), refusing one that is not a plain
    relative path inside `root` (absolute, or with `..`): a file must never make us read or write elsewhere.
    Symlinks are followed as the user made them (a hub snapshot is a folder of links into its blob store)."""
    p = Path(rel) if isinstance(rel, str) and rel and "\0" not in rel else None
    if p is None:
        raise PipelineError(f"{what}: {rel!r} is not a file name")
    if p.is_absolute() or ".." in p.parts:
        raise PipelineError(f"{what}: path {rel} leads outside {root}; refused")
    return root / p


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_error(path: Path, e: OSError) -> PipelineError:
    if e.errno == errno.ENOSPC:
        return PipelineError(f"{path}: no space left on the output disk (free space, or pass --out on a larger disk)")
    return PipelineError(f"{path}: {e.strerror or e}")


@contextlib.contextmanager
def atomic_file(final: Path, out: Path):
    """Yield a binary file under .pipeline/tmp; on success fsync it and rename it to `final`."""
    tmp = tmp_dir(out) / (final.name + f".{os.getpid()}.partial")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_error(final, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(final: Path, obj, out: Path) -> None:
    with atomic_file(final, out) as f:
        f.write((json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def hash_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def hash_file(path: Path, progress=None) -> str:
    h = xxhash.xxh3_128()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if progress:
                progress(n)
    return h.hexdigest()


def claim_output(out: Path) -> None:
    """Make `out` ours, or refuse: we never write into (or clean up) a folder holding someone else's files."""
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{out}: output path exists and is not a folder")
    if out.is_dir() and not state_dir(out).is_dir() and any(out.iterdir()):
        raise PipelineError(f"{out}: output folder is not empty and was not made by this pipeline "
                            f"(no {STATE_DIR}/ inside); choose another --out, nothing was touched")
    try:
        state_dir(out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(out, e) from None
    if not os.access(state_dir(out), os.W_OK) or _read_only_fs(out):
        raise PipelineError(f"{out}: cannot write here (read-only); the pipeline needs a writable output folder "
                            "(`python pipeline.py verify --folder DIR` only reads)")


def _read_only_fs(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


class OutputLock:
    """An flock on <out>/.pipeline/lock: the kernel drops it when the holder dies, so a killed run never blocks."""

    def __init__(self, out: Path):
        self.path = state_dir(out) / "lock"
        self.fd = None

    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:                   # a read-only folder or disk
            raise PipelineError(f"{self.path.parent.parent}: cannot write here ({e.strerror}); the pipeline needs "
                                "a writable output folder (`python pipeline.py verify --folder DIR` only reads)") \
                from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise PipelineError(f"{self.path.parent.parent}: another run is using this output folder ({holder}); "
                                "wait for it to finish") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode(), 0)
        return self

    def __exit__(self, *exc):
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def clean_tmp(out: Path) -> None:
    """Remove temp files left by a killed run (only under our own .pipeline/tmp)."""
    t = tmp_dir(out)
    if t.is_dir():
        try:
            for p in t.iterdir():
                p.unlink(missing_ok=True)
        except OSError as e:
            raise disk_error(t, e) from None
