"""quantize: make the routed experts' GGML blocks from the FP8 checkpoint, as llama.cpp would, instead of a GGUF.

Only under `gguf: {quantize: MIX}` in the manifest (otherwise the stage has nothing to do). For each routed-expert
tensor of the plan (type chosen by reconcile from llama.cpp's rules for MIX, stages/mixes.py), each expert is:
read from the checkpoint, dequantized (FP8 code x its 128x128 tile scale, in float32: what llama.cpp's converter
and DeepSeek's fp8_cast_bf16 do), rounded to BF16 (round to nearest even, the converter's output type), and
quantized as ggml's own `ggml_quantize_chunk` with no importance matrix does, which is what llama-quantize calls on
those BF16 values widened to float32 (Q4_K and Q6_K by stages/fastquant.c, which makes the same bytes several
times faster and is used only once it has matched ggml in this process). The bytes are written at the expert's
offset in `<name>.ggml`.

Streaming and resumable: a pool of threads (ggml and numpy release the GIL) works one expert each, in bands of
rows, so memory is a few expert-bands per thread. A tensor in progress lives in `.pipeline/quantize/` (its file
and a log of finished experts, appended only after their bytes are on disk); once whole it is fsynced and renamed
into `.pipeline/quantized/`. A run killed at any moment redoes only the experts not logged, and since the
quantizer is deterministic the result is byte-identical. Write then copies these files as it copies a GGUF.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import xxhash

from . import fastquant, ggml_types
from .dag import Context, Option, Result, Stage, digest
from .dequant import dequantize_fp8_block
from .errors import PipelineError
from .fsio import disk_error, fsync_dir, read_json, state_dir, write_json
from .ui import byte_progress, console

VERSION = 1
RESULT = ".pipeline/quantized.json"
DONE_DIR = ".pipeline/quantized"          # finished tensors: <name>.ggml, the GGML bytes of all its experts
WORK_DIR = ".pipeline/quantize"           # tensors in progress: <name>.partial and <name>.log
BAND = 128                                # rows per step: one row of FP8 tiles
SYNC_SECONDS = 1.0                        # log finished experts (after fdatasync) at most this often


def ggml_module():
    try:
        import ggml
    except ImportError:
        raise PipelineError("sources.gguf.quantize needs ggml-python (pip install ggml-python==0.0.45)") from None
    return ggml


def ggml_versions() -> dict:
    g = ggml_module()
    return {"ggml": g.ggml_version().decode(), "ggml_python": getattr(g, "__version__", "?")}


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), in place, kept as float32. No NaN or Inf comes from FP8."""
    u = x.view(np.uint32)
    u += np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    u &= np.uint32(0xFFFF0000)
    return x


def _pread(path: str, offset: int, length: int) -> np.ndarray:
    with open(path, "rb", buffering=0) as f:
        data = os.pread(f.fileno(), length, offset)
    if len(data) != length:
        raise PipelineError(f"{path}: file ended early at byte {offset + len(data)} (changed since reconcile?)")
    return np.frombuffer(data, np.uint8)


def ggml_bytes(type_name: str, x: np.ndarray) -> bytes:
    """ggml's own bytes of x (float32, whole 256-value blocks) as `type_name`: what a fast quantizer must match."""
    x = np.ascontiguousarray(x, np.float32)
    t = ggml_types.get(type_name)
    out = np.empty(t.nbytes((x.size,)), np.uint8)
    ggml_module().ggml_quantize_chunk(t.id, x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                      out.ctypes.data_as(ctypes.c_void_p), 0, x.size // 256, 256, None)
    return out.tobytes()


def fast_quantizer(type_id: int):
    """stages/fastquant.c's quantizer for this type where it built and matched ggml in this process, else None."""
    name = ggml_types.name_of(type_id)
    return fastquant.quantizer(name, functools.partial(ggml_bytes, name)) if name in fastquant.KERNELS else None


def quantize_expert(expert: dict, root: str, type_id: int, rows: int, cols: int) -> np.ndarray:
    """One expert's GGML bytes from its checkpoint tensor (F8_E4M3 with a scale, or BF16). Q4_K and Q6_K go
    through stages/fastquant.c where it built and matched ggml's bytes in this process, the rest through ggml."""
    g = ggml_module()
    row_bytes = g.ggml_row_size(type_id, cols)
    fast = fast_quantizer(type_id)             # its types' rows are whole 256-value blocks, as ggml's
    out = np.empty(rows * row_bytes, np.uint8)
    rel, offset, length = expert["weight"]
    codes = _pread(os.path.join(root, rel), offset, length)
    if expert["dtype"] == "F8_E4M3":
        codes = codes.reshape(rows, cols)
        srel, soff, slen = expert["scale"]
        scale = _pread(os.path.join(root, srel), soff, slen).view(np.float32).reshape(-(-rows // 128), -1)
    else:                                                          # BF16: widening to float32 is exact
        codes = codes.view(np.uint16).reshape(rows, cols)
    for r0 in range(0, rows, BAND):
        r1 = min(rows, r0 + BAND)
        if expert["dtype"] == "F8_E4M3":
            x = round_bf16(dequantize_fp8_block(codes[r0:r1], scale[r0 // 128:-(-r1 // 128)]))
        else:
            x = (codes[r0:r1].astype(np.uint32) << 16).view(np.float32)
        x = np.ascontiguousarray(x)
        if fast:
            fast(x, out[r0 * row_bytes:r1 * row_bytes])
        else:
            g.ggml_quantize_chunk(type_id, x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                  out[r0 * row_bytes:].ctypes.data_as(ctypes.c_void_p), 0, r1 - r0, cols, None)
    return out


# -- one tensor's files ----------------------------------------------------------------------------------------------

class Work:
    """A tensor being quantized: its partial file, open for pwrite, and its log of finished experts."""

    def __init__(self, out: Path, t: dict, spec: str):
        self.name, self.t, self.spec = t["name"], t, spec
        self.final = out / DONE_DIR / f"{self.name}.ggml"
        self.partial = out / WORK_DIR / f"{self.name}.partial"
        self.log_path = out / WORK_DIR / f"{self.name}.log"
        self.per = t["shape"][0] // len(t["experts"])            # bytes per expert
        self.hashes: dict[int, str] = {}
        if self.log_path.exists() and self.partial.exists():
            lines = self.log_path.read_text().split("\n")
            if lines[0] == spec:
                for line in lines[1:]:
                    try:
                        e, h = json.loads(line)
                    except (json.JSONDecodeError, ValueError, TypeError):   # a killed run may cut its last line
                        continue
                    self.hashes[int(e)] = h
        if not self.hashes:
            with open(self.log_path, "w") as f:
                f.write(spec + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self.fd, t["shape"][0])
        self.log = open(self.log_path, "a")
        self.pending: list[tuple[int, str]] = []

    def todo(self) -> list[int]:
        return [e for e in range(len(self.t["experts"])) if e not in self.hashes]

    def put(self, e: int, data: np.ndarray) -> None:        # from worker threads: distinct ranges of one file
        if os.pwrite(self.fd, data, e * self.per) != data.nbytes:
            raise OSError(28, "short write", str(self.partial))

    def sync(self) -> None:
        """Make the finished experts' bytes durable, then log them (never the other way round)."""
        if self.pending:
            os.fdatasync(self.fd)
            self.log.write("".join(json.dumps([e, h]) + "\n" for e, h in self.pending))
            self.log.flush()
            os.fsync(self.log.fileno())
            self.hashes.update(self.pending)
            self.pending = []

    def finish(self) -> dict:
        self.sync()
        os.fsync(self.fd)
        os.close(self.fd)
        self.log.close()
        os.replace(self.partial, self.final)
        fsync_dir(self.final.parent)
        self.log_path.unlink()
        return record(self.t, self.spec, self.final, self.hashes)

    def close(self) -> None:
        os.close(self.fd)
        self.log.close()


def experts_hash(hashes: list[str]) -> str:
    """A tensor file's content hash: over its experts' own xxh3-128 hashes, in expert order."""
    return "experts:" + xxhash.xxh3_128("".join(hashes).encode()).hexdigest()


def record(t: dict, spec: str, final: Path, hashes: dict[int, str]) -> dict:
    st = final.stat()
    return {"spec": spec, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "hash": experts_hash([hashes[e] for e in sorted(hashes)]), "type": t["ggml_type"]}


def file_hash(path: Path, n_experts: int, advance) -> str:
    """experts_hash of a finished file, read back expert by expert (bounded memory)."""
    per = path.stat().st_size // n_experts
    hashes = []
    with open(path, "rb") as f:
        for _ in range(n_experts):
            data = f.read(per)
            hashes.append(xxhash.xxh3_128(data).hexdigest())
            advance(len(data))
    return experts_hash(hashes)


def tensor_spec(t: dict, plan: dict, versions: dict) -> str:
    """Everything that determines a tensor's bytes: type, shape, the checkpoint bytes it reads, the quantizer."""
    files = plan["source_files"]["fp8"]
    used = sorted({x[k][0] for x in t["experts"] for k in ("weight", "scale") if x.get(k)})
    return digest({"version": VERSION, "name": t["name"], "type": t["ggml_type"], "shape": t["logical_shape"],
                   "experts": t["experts"], "source_hashes": [[rel, files[rel]["hash"]] for rel in used],
                   "quantizer": versions})


# -- the stage -------------------------------------------------------------------------------------------------------

def workers_option(ctx: Context) -> int:
    """stages.quantize.workers (load_manifest checked it is a whole number >= 1), else one thread per core."""
    return ctx.manifest.stage_options.get("quantize", {}).get("workers") or len(os.sched_getaffinity(0))


def run(ctx: Context) -> Result:
    plan = ctx.result("reconcile")
    tensors = [t for t in plan["tensors"].values() if t["side"] == "quantized"]
    if not tensors:
        remove_others(ctx.out, set())
        write_json(ctx.out / RESULT, {"mix": None, "files": {}}, ctx.out)
        return Result(result=RESULT, outputs=[RESULT], summary="nothing to quantize: the routed experts come from "
                                                                "the GGUF")
    versions = ggml_versions()
    old = read_json(ctx.out / RESULT) if (ctx.out / RESULT).exists() else {}
    for d in (DONE_DIR, WORK_DIR):
        (ctx.out / d).mkdir(parents=True, exist_ok=True)
    files, todo, recheck = {}, [], []
    for t in tensors:
        spec = tensor_spec(t, plan, versions)
        rec = old.get("files", {}).get(f"{t['name']}.ggml")
        final = ctx.out / DONE_DIR / f"{t['name']}.ggml"
        st = final.stat() if final.exists() else None
        if not ctx.forced and rec and rec["spec"] == spec and st and st.st_size == rec["size"]:
            if st.st_mtime_ns == rec["mtime_ns"]:
                files[final.name] = rec                  # finished by an earlier run: keep it
            else:                                        # touched or copied (cp -r): kept if its bytes are the same
                recheck.append((t, spec, final, rec))
        else:
            if ctx.forced:
                (ctx.out / WORK_DIR / f"{t['name']}.log").unlink(missing_ok=True)
            todo.append((t, spec))
    if recheck:                                      # reading back is minutes where quantizing again is hours
        with byte_progress("check", sum(r["size"] for *_, r in recheck), len(recheck), "tensors") as advance:
            for t, spec, final, rec in recheck:
                if file_hash(final, len(t["experts"]), advance) == rec["hash"]:
                    files[final.name] = dict(rec, mtime_ns=final.stat().st_mtime_ns)
                else:
                    todo.append((t, spec))
                advance(0, 1)
    need = sum(t["shape"][0] for t, _ in todo)
    shards = max(0, plan["total_bytes"] - sum(p.stat().st_size for p in ctx.out.glob("model-*.safetensors")))
    free = shutil.disk_usage(ctx.out).free
    if need + shards > free:                         # say so now, not after hours of quantizing
        raise PipelineError(f"{ctx.out}: not enough disk space: the quantized experts need {need / 1e9:.1f} GB and "
                            f"then the merged shards {shards / 1e9:.1f} GB, {free / 1e9:.1f} GB free; nothing was "
                            "written")
    n_workers = workers_option(ctx)
    root = plan["sources"]["fp8"]
    fast = sorted({t["ggml_type"] for t, _ in todo if fast_quantizer(t["ggml_type_id"])})   # built here, not in a bar
    if fast:
        console.print(f"quantize: {' and '.join(fast)} by stages/fastquant.c (checked against ggml's bytes in this "
                      "run)")
    works = []
    try:
        for t, spec in todo:
            works.append(Work(ctx.out, t, spec))
        jobs = [(w, e) for w in works for e in w.todo()]
        resumed = sum(len(w.hashes) for w in works)
        if resumed:
            console.print(f"quantize: {resumed} experts already done by an earlier run")
        fp8_bytes = lambda w, e: w.t["experts"][e]["weight"][2]
        with byte_progress("quantize", sum(fp8_bytes(w, e) for w, e in jobs), len(jobs), "experts") as advance:
            _quantize_all(works, jobs, root, n_workers, advance, fp8_bytes)
        for w in works:
            files[w.final.name] = w.finish()
        works = []
    except OSError as e:
        raise disk_error(ctx.out / WORK_DIR, e) from None
    finally:
        for w in works:
            w.close()
    remove_others(ctx.out, {n.removesuffix(".ggml") for n in files})
    mix = plan["quantize"]
    write_json(ctx.out / RESULT, {"mix": mix, **versions, "files": files}, ctx.out)
    n_experts = sum(len(t["experts"]) for t in tensors)
    total = sum(t["shape"][0] for t in tensors)
    made = [f"{DONE_DIR}/{n}" for n in sorted(files)]
    return Result(result=RESULT, outputs=[RESULT] + made, big=made,     # checked by the content check above
                  summary=f"{len(tensors)} tensors ({n_experts} experts) to {mix} with ggml {versions['ggml']}, "
                          f"{total / 1e9:.2f} GB ({len(todo)} quantized, {len(tensors) - len(todo)} kept)")


def remove_others(out: Path, names: set[str]) -> None:
    """Files of tensors an older plan had (ours, so removed): finished ones and ones left in progress."""
    for d in (DONE_DIR, WORK_DIR):
        if (out / d).is_dir():
            for p in (out / d).iterdir():
                if p.name.rsplit(".", 1)[0] not in names:
                    p.unlink()


def _quantize_all(works: list[Work], jobs: list, root: str, n_workers: int, advance, fp8_bytes) -> None:
    """Run the (Work, expert) jobs on n_workers threads, at most 2 per thread in flight (bounded memory)."""
    def one(w, e):
        t = w.t
        _, rows, cols = t["logical_shape"]
        data = quantize_expert(t["experts"][e], root, t["ggml_type_id"], rows, cols)
        w.put(e, data)
        return w, e, xxhash.xxh3_128(data).hexdigest()

    it, running, last = iter(jobs), set(), time.monotonic()
    with ThreadPoolExecutor(n_workers, thread_name_prefix="quantize") as pool:
        try:
            while True:
                while len(running) < 2 * n_workers:
                    job = next(it, None)
                    if job is None:
                        break
                    running.add(pool.submit(one, *job))
                if not running:
                    break
                done, running = wait(running, timeout=SYNC_SECONDS, return_when=FIRST_COMPLETED)
                for f in done:
                    w, e, h = f.result()
                    w.pending.append((e, h))
                    advance(fp8_bytes(w, e), 1)
                if time.monotonic() - last >= SYNC_SECONDS or not running:
                    for w in works:
                        w.sync()
                    last = time.monotonic()
        except BaseException:
            for f in running:
                f.cancel()
            raise
        finally:
            for w in works:                     # what finished before a failure or Ctrl-C is kept
                try:
                    w.sync()
                except OSError:
                    pass


def fingerprint(ctx: Context) -> dict:
    """The quantizer's version (a new ggml may round differently); the mix and types come in through the plan."""
    return {"quantizer": ggml_versions()} if ctx.manifest.gguf.quantize else {}


STAGE = Stage("quantize", needs=("reconcile",),
              inputs="plan.json (routed experts and their types under gguf: {quantize: MIX}); the checkpoint's experts",
              outputs=".pipeline/quantized/*.ggml (GGML bytes of every routed expert), .pipeline/quantized.json",
              version=VERSION, fingerprint=fingerprint, run=run, options={"workers": Option(int, minimum=1)})
