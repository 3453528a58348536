"""verify: prove, tensor by tensor, that the merged folder holds the right weights in the right places.

Two checks per merged tensor, both against the sources read afresh (no trust in reconcile's plan or the writer):
1. integrity: the shard bytes equal the source bytes, and their xxh3-128 equals the one in manifest.json;
2. parity: the merged tensor, dequantized, against the same logical weight from the *other* source (routed experts
   from the GGUF against the FP8 checkpoint's experts; FP8 tensors against their GGUF twins, attn_kv_b against
   attn_k_b/attn_v_b rebuilt per head). A right tensor differs by its quantization error; a mis-mapped one
   (wrong layer, swapped experts, transposed, k/v mixed up) by ~1.4 (two unrelated weights of equal scale).
Before those, the folder itself: every shard present, of manifest.json's size, with a header that lists exactly
manifest.json's tensors; no extra shard; config, tokenizer, template and index against manifest.json's `files`.
Work is one dask task per tensor and per bounded chunk of rows (whole experts), so it spreads over local cores or a
distributed cluster with bounded memory per task; per-task results are logged so a killed verify resumes. A result
is reused only under a key that holds everything its task read (the shard's size and mtime, both sources' content
hashes), and `pipeline.py verify` reuses only what an interrupted verify of its own finished: it always reads.
check_folder is `verify --folder`: the same folder checks and every tensor's bytes against manifest.json alone
(no sources, no parity), or a seed-format folder's completeness (stages/seedcheck.py).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from .dag import Context, Option, Result, Stage, digest
from . import ggml_types
from .dequant import dequantize_fp8_block, dequantize_ggml
from .errors import PipelineError
from .formats import read_gguf, read_hf_checkpoint, read_safetensors_header
from .fsio import CHUNK, HASH_NAME, hash_file, inside, read_json, state_dir, write_json
from .mixes import expert_type
from .names import LAYOUT_KV_B, expected_weights
from .quantize import DONE_DIR as QUANTIZED_DIR, RESULT as QUANTIZED_RESULT
from .reconcile import gguf_layout
from .ui import byte_progress, console

VERSION = 2                              # 2: task ids keyed by every file read; files in the report
RESULT = "verify.json"
LOG = "verify/results.jsonl"             # under .pipeline/
BUDGET = 1 << 24                         # values per side per parity task: 64 MB of float32, whatever the model

OWN_ERROR = {name: t.own_error for name, t in ggml_types.TYPES.items()}     # for the report


def threshold(ggml_type: str, fp8_side: bool) -> float:
    return ggml_types.threshold(ggml_type, fp8_side)


# -- reading rows of a logical (rows, cols) matrix from any of the formats involved ---------------------------------

def _pread(path: str, offset: int, length: int) -> np.ndarray:
    with open(path, "rb", buffering=0) as f:
        data = os.pread(f.fileno(), length, offset)
    if len(data) != length:
        raise PipelineError(f"{path}: file ended early at byte {offset + len(data)}")
    return np.frombuffer(data, np.uint8)


def read_rows(spec: dict, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of the weight described by `spec`, as float32 (r1 - r0, cols)."""
    fmt, cols = spec["fmt"], spec["cols"]
    if fmt == "ggml":
        row = ggml_types.get(spec["type"]).row_bytes(cols)
        return dequantize_ggml(_pread(spec["path"], spec["offset"] + r0 * row, (r1 - r0) * row), spec["type"],
                               (r1 - r0, cols))
    if fmt == "fp8":                      # r0 is a multiple of 128: the tile rows line up
        codes = _pread(spec["path"], spec["offset"] + r0 * cols, (r1 - r0) * cols).reshape(r1 - r0, cols)
        sc_cols = -(-cols // 128)
        s0, s1 = r0 // 128, -(-r1 // 128)
        scale = _pread(spec["scale_path"], spec["scale_offset"] + s0 * sc_cols * 4, (s1 - s0) * sc_cols * 4)
        return dequantize_fp8_block(codes, scale.view(np.float32).reshape(s1 - s0, sc_cols))
    if fmt == "stack":                    # one part per expert, `part_rows` rows each; chunks hold whole parts
        n = spec["part_rows"]
        return np.concatenate([read_rows(spec["parts"][e], 0, n) for e in range(r0 // n, r1 // n)])
    if fmt == "kv_b":                     # attn_kv_b rows rebuilt per head from attn_k_b^T and attn_v_b
        nope, v, kvr = spec["nope"], spec["v"], spec["kv_lora"]
        heads = []
        for h in range(r0 // (nope + v), r1 // (nope + v)):
            heads.append(read_rows(spec["k_b"], h * kvr, (h + 1) * kvr).T)
            heads.append(read_rows(spec["v_b"], h * v, (h + 1) * v))
        return np.concatenate(heads)
    raise ValueError(fmt)


# -- tasks (run on workers: plain dicts in, small dicts out) ---------------------------------------------------------

def integrity_task(t: dict) -> dict:
    import xxhash
    h = xxhash.xxh3_128()
    path, begin, end = t["merged"]
    problem = ""
    if "segments" not in t and "value" not in t:        # verify --folder: the bytes against manifest.json alone
        with open(path, "rb", buffering=0) as merged:
            merged.seek(begin)
            length = end - begin
            while length:
                a = merged.read(min(CHUNK, length))
                if not a:
                    problem = f"file ended early at byte {begin + end - begin - length}"
                    break
                h.update(a)
                length -= len(a)
    elif "value" in t:
        data = _pread(path, begin, end - begin).tobytes()
        h.update(data)
        if int.from_bytes(data, "little", signed=True) != t["value"]:
            problem = f"holds {int.from_bytes(data, 'little', signed=True)}, the GGUF says {t['value']}"
    else:
        with open(path, "rb", buffering=0) as merged:
            merged.seek(begin)
            pos = begin
            for src, offset, length in t["segments"]:
                with open(src, "rb", buffering=0) as s:
                    s.seek(offset)
                    while length and not problem:
                        a, b = merged.read(min(CHUNK, length)), s.read(min(CHUNK, length))
                        h.update(a)
                        if a != b:
                            first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
                            problem = f"byte {pos + first - begin} differs from the source {Path(src).name}"
                        pos, length = pos + len(a), length - len(a)
    digest = h.hexdigest()
    if not problem and digest != t["expect"]:
        problem = f"xxh3_128 {digest} differs from manifest.json's {t['expect']}"
    return {"id": t["id"], "name": t["name"], "kind": "integrity", "hash": digest, "problem": problem,
            "bytes": end - begin}


def _row_sums(x: np.ndarray, y: np.ndarray) -> float:
    """sum(x * y): float32 products summed per row (SIMD), rows summed in float64. Relative error ~1e-6."""
    return float(np.einsum("ij,ij->i", x, y).sum(dtype=np.float64))


def parity_task(t: dict) -> dict:
    import torch
    torch.set_num_threads(1)              # one task per core; dask does the parallelism
    r0, r1, group = t["rows"][0], t["rows"][1], t["group_rows"]
    a, b = read_rows(t["merged"], r0, r1), read_rows(t["twin"], r0, r1)
    sums = []
    for g0 in range(r0, r1, group):
        x, y = a[g0 - r0:g0 - r0 + group], b[g0 - r0:g0 - r0 + group]
        finite = bool(np.isfinite(x).all())
        if not finite:
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        d = x - y
        sums.append([g0 // group, _row_sums(d, d), _row_sums(y, y), _row_sums(x, y), _row_sums(x, x), finite])
    return {"id": t["id"], "name": t["name"], "kind": "parity", "groups": sums, "bytes": t["bytes"]}


def run_task(t: dict) -> dict:
    start = time.perf_counter()
    out = integrity_task(t) if t["kind"] == "integrity" else parity_task(t)
    out["seconds"] = time.perf_counter() - start
    return out


# -- building the task list ------------------------------------------------------------------------------------------

def ggml_spec(ref, rows: int, cols: int) -> dict:
    return {"fmt": "ggml", "type": ref.ggml_type, "path": str(ref.file), "offset": ref.offset, "rows": rows,
            "cols": cols}


def fp8_spec(weight, scale, rows: int, cols: int) -> dict:
    """An FP8 weight + scale (TensorRefs or manifest entries), or a plain BF16/F16/F32 weight as an exact GGML type."""
    path, offset, dtype = weight
    if dtype == "F8_E4M3":
        return {"fmt": "fp8", "path": path, "offset": offset, "scale_path": scale[0], "scale_offset": scale[1],
                "rows": rows, "cols": cols}
    return {"fmt": "ggml", "type": ggml_types.get(dtype).id, "path": path, "offset": offset,
            "rows": rows, "cols": cols}


def as_2d(shape) -> tuple[int, int]:
    return (1, shape[0]) if len(shape) == 1 else (math.prod(shape[:-1]), shape[-1])


def file_identities(out: Path, manifest: dict, sources: dict) -> dict[str, str]:
    """What each file a task may read is, now: a source file by its content hash (fetch's), an expert file the
    quantize stage made by its content hash while it is the file that stage recorded (same size and mtime), a merged
    shard by its name, size and mtime (a shard written again since is checked again, not taken from an earlier
    run's log)."""
    ids = {str(Path(side["root"]) / rel): "source:" + f["hash"] for side in sources.values()
           for rel, f in side["files"].items()}
    made = read_json(out / QUANTIZED_RESULT).get("files", {}) if sources["gguf"].get("quantize") and \
        (out / QUANTIZED_RESULT).is_file() else {}
    for rel, f in made.items():
        path = out / QUANTIZED_DIR / rel
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_size, st.st_mtime_ns) == (f["size"], f["mtime_ns"]):
            ids[str(path)] = "quantized:" + f["hash"]
    for s in manifest["shards"]:
        try:
            st = os.stat(out / s["file"])
            ids[str(out / s["file"])] = f"shard:{s['file']}:{st.st_size}.{st.st_mtime_ns}"
        except OSError:
            pass
    return ids


def task_id(t: dict, files: dict[str, str]) -> str:
    """A task's log key: the task with every file it reads replaced by that file's identity, so a result is reused
    only if nothing it read has changed (the merged shard and both sources), wherever the folder now lives."""
    def canon(x):
        if isinstance(x, dict):
            return {k: canon(v) for k, v in x.items() if k != "id"}
        if isinstance(x, list):
            return [canon(v) for v in x]
        if isinstance(x, str) and (x in files or os.path.isabs(x)):
            return files.get(x) or _stat_id(x)
        return x
    where = f":{t['rows'][0]}" if "rows" in t else ""
    return f"{t['kind']}:{t['name']}{where}:" + digest([VERSION, canon(t)])


def _stat_id(path: str) -> str:
    """A file no stage recorded a content hash for: known by its path, size and mtime (changed, checked again)."""
    try:
        st = os.stat(path)
    except OSError:
        return f"missing:{path}"
    return f"file:{path}:{st.st_size}.{st.st_mtime_ns}"


def build_tasks(out: Path, manifest: dict, sources: dict, broken: set[str] = frozenset()) -> tuple[list[dict], dict]:
    """Integrity and parity tasks for every tensor whose shard is whole (`broken`: shards that failed their check).
    Under gguf: {quantize: MIX} the experts were made here and there is no GGUF: FP8 tensors get integrity only and
    the experts' parity is against the checkpoint they were made from."""
    fp8_root = Path(sources["fp8"]["root"])
    cfg, hf = read_hf_checkpoint(fp8_root)
    mix = sources["gguf"].get("quantize")
    gg = None if mix else read_gguf([Path(sources["gguf"]["root"]) / n for n in sources["gguf"]["order"]])
    weights = {w.out: w for w in expected_weights(cfg, gguf_layout(gg.meta) if gg else LAYOUT_KV_B)}
    files = file_identities(out, manifest, sources)
    tensors = manifest["tensors"]
    tasks, info = [], {}
    for name, e in tensors.items():
        if e["shard"] in broken:
            info[name] = {"twin": None}
            continue
        shard = str(out / e["shard"])
        src = e["source"]
        integrity = {"kind": "integrity", "name": name, "merged": [shard, *e["offsets"]],
                     "expect": e[HASH_NAME], "bytes": e["offsets"][1] - e["offsets"][0]}
        if src["side"] == "value" and mix:           # the type llama.cpp's mix gives these experts
            w = weights[name.removesuffix(".ggml_type") + ".weight"]
            proj = name.split(".")[2].removeprefix("ffn_").removesuffix("_exps")
            integrity["value"] = ggml_types.get(expert_type(mix, proj, w.layer, cfg["num_hidden_layers"],
                                                            w.shape[-1])).id
        elif src["side"] == "value":
            sibling = tensors[name.removesuffix(".ggml_type") + ".weight"]["source"]["name"]
            integrity["value"] = gg.tensors[sibling].ggml_type
        elif src["side"] == "quantized":             # the quantize stage's file when kept, else a hash check only
            made = out / QUANTIZED_DIR / f"{name}.ggml"
            integrity["segments"] = [[str(made), 0, integrity["bytes"]]] if made.exists() else \
                [[shard, *e["offsets"][:1], integrity["bytes"]]]
        else:
            table = hf if src["side"] == "fp8" else gg.tensors
            names = src["name"] if isinstance(src["name"], list) else [src["name"]]
            missing = [n for n in names if n not in table]
            if missing:
                raise PipelineError(f"manifest.json: tensor {name}: its source {missing[0]} is not in the "
                                    f"{src['side']} source")
            integrity["segments"] = [[str(table[n].file), table[n].offset, table[n].length] for n in names]
        integrity["id"] = task_id(integrity, files)
        tasks.append(integrity)

        w = weights.get(name)
        if w is None or (gg is None and w.source != "gguf"):   # scales, .ggml_type, MTP, FP8 without a GGUF:
            info[name] = {"twin": None}                         # integrity only (a scale's parity is its weight's)
            continue
        rows, cols = as_2d(w.shape)
        if w.source == "gguf":           # routed experts: merged GGML bytes vs the checkpoint's FP8 experts
            per = rows // len(w.hf)
            merged = {"fmt": "ggml", "type": e["ggml_type_id"], "path": shard, "offset": e["offsets"][0],
                      "rows": rows, "cols": cols}
            parts = [fp8_spec((str(hf[n].file), hf[n].offset, hf[n].dtype),
                              (str(hf[n + "_scale_inv"].file), hf[n + "_scale_inv"].offset) if
                              n + "_scale_inv" in hf else None, per, cols) for n in w.hf]
            twin = {"fmt": "stack", "parts": parts, "part_rows": per, "rows": rows, "cols": cols}
            group, unit, kind, fp8_side = per, per, e["ggml_type"], src["side"] != "quantized"   # quantized from it
            info[name] = {"twin": f"checkpoint {w.hf[0].replace('.0.', '.E.', 1)} (E = 0..{len(w.hf) - 1})",
                          "experts": len(w.hf)}
        else:                            # checkpoint tensor vs its GGUF twin(s)
            scale = tensors.get(name + "_scale_inv")
            merged = fp8_spec((shard, e["offsets"][0], e["dtype"]), (shard, scale["offsets"][0]) if scale else None,
                              rows, cols)
            fp8_side = e["dtype"] == "F8_E4M3"
            group = rows
            if len(w.gguf) == 2:         # attn_kv_b vs attn_k_b + attn_v_b, per head
                k_ref, v_ref = (gg.tensors[n] for n in w.gguf)
                nh, kvr, nope = k_ref.shape
                v = v_ref.shape[1]
                twin = {"fmt": "kv_b", "k_b": ggml_spec(k_ref, nh * kvr, nope), "v_b": ggml_spec(v_ref, nh * v, kvr),
                        "nope": nope, "v": v, "kv_lora": kvr, "rows": rows, "cols": cols}
                unit = math.lcm(nope + v, 128)
                kind = max((k_ref.dtype, v_ref.dtype), key=lambda k: ggml_types.get(k).own_error)
            else:
                ref = gg.tensors[next(iter(w.gguf))]
                twin, unit, kind = ggml_spec(ref, rows, cols), 128 if fp8_side else 1, ref.dtype
            info[name] = {"twin": "GGUF " + " + ".join(w.gguf)}
        info[name].update(threshold=threshold(kind, fp8_side), type=kind)
        step = max(unit, BUDGET // cols // unit * unit)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            t = {"kind": "parity", "name": name, "rows": [r0, r1], "group_rows": group,
                 "merged": merged, "twin": twin, "bytes": (r1 - r0) * cols}
            t["id"] = task_id(t, files)
            tasks.append(t)
    return tasks, info


# -- running the tasks: dask locally or on a cluster ----------------------------------------------------------------



@contextlib.contextmanager
def cluster(scheduler: str | None, workers: int | None):
    """A dask.distributed client on `scheduler`, or on a LocalCluster of `workers` processes; None for dask's local
    threaded scheduler. Entered before anything is changed, so a scheduler that cannot be reached changes nothing."""
    if not (scheduler or workers):
        yield None
        return
    from distributed import Client, LocalCluster
    local = None
    try:
        if scheduler:
            client = Client(scheduler)     # waits distributed.comm.timeouts.connect (dask config)
        else:
            local = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                 dashboard_address=":0", silence_logs="CRITICAL")   # a level name: the
            # worker process passes it to Logger.setLevel, which refuses "critical". Not ERROR: a worker whose
            # heartbeat races the scheduler's shutdown logs a traceback at ERROR; task failures still reach us
            # through their futures.
            client = Client(local)
    except (OSError, TimeoutError, ValueError, TypeError) as e:
        if local:
            local.close()
        what = f"--scheduler {scheduler}" if scheduler else f"a local cluster of {workers} workers"
        raise PipelineError(f"{what}: cannot connect ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no answer'}); nothing was changed") from None
    try:
        console.print(f"dask cluster: {len(client.scheduler_info()['workers'])} workers, "
                      f"dashboard {client.dashboard_link}")
        yield client
    finally:
        client.close()
        if local:
            local.close()


def execute(tasks: list[dict], on_result, scheduler: str | None = None, workers: int | None = None,
            client=None) -> None:
    """Run every task once; `on_result(result)` is called in this process as each one finishes."""
    if client is None and (scheduler or workers):
        with cluster(scheduler, workers) as c:
            return execute(tasks, on_result, client=c)
    if client is not None:
        from distributed import as_completed
        futures = client.map(run_task, tasks, pure=False)
        for fut in as_completed(futures):
            try:
                result = fut.result()
            except (PipelineError, OSError):
                raise
            except Exception as e:   # typically a worker that cannot import this project or see the files
                raise PipelineError(f"dask cluster {client.scheduler.address}: a verify task failed on a worker "
                                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); workers "
                                    "need this project installed and the same paths to the model files") from None
            on_result(result)
            fut.release()
        return
    import dask
    from dask.callbacks import Callback

    keys = {}

    def posttask(key, result, dsk, state, worker_id):
        if key in keys:
            on_result(result)

    graph = [dask.delayed(run_task, pure=False)(t, dask_key_name=f"task-{i}") for i, t in enumerate(tasks)]
    keys.update({f"task-{i}": i for i in range(len(tasks))})
    with Callback(posttask=posttask):
        dask.compute(*graph, scheduler="threads", num_workers=os.cpu_count())


# -- the folder itself: shards, headers, small files -----------------------------------------------------------------

def check_manifest_shape(m, where: str) -> None:
    """manifest.json is read from a folder that may come from anywhere: refuse a malformed one in one line."""
    def bad(why):
        return VerifyFailed(f"{where}: {why}")
    if not isinstance(m, dict) or not isinstance(m.get("tensors"), dict) or not isinstance(m.get("shards"), list):
        raise bad("not a dsv3-hybrid manifest (no tensors / shards)")
    if m.get("format") != "dsv3-hybrid":
        raise bad(f"format {m.get('format')!r}, expected 'dsv3-hybrid'")
    for s in m["shards"]:
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and _is_int(s.get("size"))):
            raise bad(f"malformed shard entry {json.dumps(s)[:80]}")
    for name, e in m["tensors"].items():
        ok = isinstance(e, dict) and isinstance(e.get("shard"), str) and isinstance(e.get(HASH_NAME), str) and \
            isinstance(e.get("offsets"), list) and len(e["offsets"]) == 2 and all(map(_is_int, e["offsets"])) and \
            0 <= e["offsets"][0] <= e["offsets"][1]
        if not ok:
            raise bad(f"tensor {name}: malformed entry (shard, offsets [begin, end], {HASH_NAME})")
    if not isinstance(m.get("files", {}), dict):
        raise bad("'files' is not a mapping")


def _inside(folder: Path, rel, what: str) -> Path:
    try:
        return inside(folder, rel, what)
    except PipelineError as e:
        raise VerifyFailed(str(e)) from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def folder_problems(folder: Path, manifest: dict) -> dict[str, list[str]]:
    """Per file of the folder (shards, index, config, tokenizer, template), what is wrong with it; {} if nothing.
    Shards: present, the size manifest.json says, a header that lists exactly manifest.json's tensors at manifest.json's
    offsets, no shard beside them that manifest.json does not name. Small files: present, size and xxh3_128."""
    from .write import AUX_FILES, INDEX, MANIFEST
    problems: dict[str, list[str]] = {}
    where = folder / MANIFEST
    by_shard: dict[str, dict] = {}
    for name, e in manifest["tensors"].items():
        by_shard.setdefault(e["shard"], {})[name] = e
    listed = {s["file"]: s["size"] for s in manifest["shards"]}
    for rel in sorted(set(by_shard) | set(listed)):
        _inside(folder, rel, f"{where}: shard")         # a path out of the folder: refused outright (one line)
        path = folder / rel
        if rel not in listed:
            problems.setdefault(rel, []).append(f"holds tensor {next(iter(by_shard[rel]))}, but manifest.json's "
                                                "shards list does not name it")
            continue
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.setdefault(rel, []).append("shard missing")
            continue
        if size != listed[rel]:
            problems.setdefault(rel, []).append(f"{size} bytes, manifest.json says {listed[rel]} "
                                                f"({'truncated' if size < listed[rel] else 'grown or replaced'})")
            continue
        try:
            header = read_safetensors_header(path)
        except PipelineError as e:
            problems.setdefault(rel, []).append(f"bad header: {str(e).removeprefix(str(path) + ': ')}")
            continue
        want = by_shard.get(rel, {})
        for name in sorted(set(header) - set(want))[:3]:
            problems.setdefault(rel, []).append(f"header has tensor {name}, which manifest.json does not list here")
        for name, e in want.items():
            ref = header.get(name)
            if ref is None:
                problems.setdefault(rel, []).append(f"header lacks tensor {name}")
            elif [ref.offset, ref.offset + ref.length] != e["offsets"] or ref.dtype != e.get("dtype") or \
                    list(ref.shape) != e.get("shape"):
                problems.setdefault(rel, []).append(
                    f"header says tensor {name} is {ref.dtype}{list(ref.shape)} at "
                    f"[{ref.offset}, {ref.offset + ref.length}), manifest.json {e.get('dtype')}{e.get('shape')} "
                    f"at {e['offsets']}")
    for path in sorted(folder.rglob("*.safetensors")):
        rel = str(path.relative_to(folder))
        if rel not in listed and not rel.startswith(".pipeline"):
            problems.setdefault(rel, []).append("extra shard: not named in manifest.json (a loader that scans the "
                                                "folder would read it)")
    files = manifest.get("files", {})
    for rel, f in files.items():
        path = _inside(folder, rel, f"{where}: file")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.setdefault(rel, []).append("missing")
            continue
        if not isinstance(f, dict) or size != f.get("size") or hash_file(path) != f.get(HASH_NAME):
            problems.setdefault(rel, []).append(f"does not match its {HASH_NAME} in manifest.json (changed since "
                                                "the folder was written)")
    if files:                                  # a tokenizer file or template added later would be read unchecked
        for rel in AUX_FILES + [INDEX]:
            if rel not in files and (folder / rel).exists():
                problems.setdefault(rel, []).append("has no checksum in manifest.json (added after the folder was "
                                                    "written)")
    return problems


def file_report(problems: dict[str, list[str]], manifest: dict) -> dict:
    shards = [s["file"] for s in manifest["shards"]]
    names = shards + sorted(manifest.get("files", {})) + sorted(set(problems) - set(shards))
    return {rel: {"status": "fail" if problems.get(rel) else "pass", "problems": problems.get(rel, [])}
            for rel in dict.fromkeys(names)}


# -- results ---------------------------------------------------------------------------------------------------------

def load_log(path: Path) -> dict[str, dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:          # the last line of a killed run may be cut
                continue
            done[r["id"]] = r
    return done


def summarize(manifest: dict, info: dict, results: dict[str, dict], files: dict | None = None,
              mode: str = "full") -> dict:
    """The report (verify.json): per tensor and per file. mode: full (integrity + parity), integrity (verify
    --folder: the bytes against manifest.json only), completeness (a seed-format folder: names, shapes, types)."""
    files = files or {}
    per = {n: {"status": "pass", "problems": []} for n in manifest["tensors"]}
    broken = {rel for rel, f in files.items() if f["status"] == "fail"}
    for n, e in manifest["tensors"].items():
        if e.get("shard") in broken:
            per[n]["problems"].append(f"not checked: its shard {e['shard']} failed (see files)")
    sums: dict[str, dict[int, list]] = {}
    for r in results.values():
        t = per[r["name"]]
        t["seconds"] = t.get("seconds", 0.0) + r["seconds"]
        if r["kind"] == "integrity":
            t[HASH_NAME] = r["hash"]
            if r["problem"]:
                t["problems"].append(f"integrity: {r['problem']}")
            continue
        acc = sums.setdefault(r["name"], {})
        for g, d2, b2, ab, a2, finite in r["groups"]:
            s = acc.setdefault(g, [0.0, 0.0, 0.0, 0.0, True])
            s[0] += d2; s[1] += b2; s[2] += ab; s[3] += a2; s[4] &= finite
    for name, acc in sums.items():
        t, i = per[name], info[name]
        rel = {g: math.sqrt(d2 / b2) if b2 > 0 else (0.0 if d2 == 0 else math.inf) for g, (d2, b2, *_) in acc.items()}
        cos = {g: ab / math.sqrt(a2 * b2) if a2 > 0 and b2 > 0 else (1.0 if a2 == b2 else 0.0)
               for g, (_, b2, ab, a2, _) in acc.items()}
        worst = max(rel, key=lambda g: rel[g])
        t.update(twin=i["twin"], type=i["type"], threshold=round(i["threshold"], 5), rel_error=rel[worst],
                 cosine=cos[worst])
        if "experts" in i:
            t["worst_expert"] = worst
            t["experts"] = {"rel_error": [round(rel[g], 6) for g in sorted(rel)],
                            "cosine": [round(cos[g], 6) for g in sorted(cos)]}
            bad = [g for g in sorted(rel) if not rel[g] <= i["threshold"]]
            for g in bad[:8]:
                t["problems"].append(f"expert {g}: rel. error {rel[g]:.3f} > {i['threshold']:.3f} "
                                     f"(cosine {cos[g]:.3f}) against the checkpoint's expert {g}")
            if len(bad) > 8:
                t["problems"].append(f"... and {len(bad) - 8} more experts over the threshold")
        elif not rel[worst] <= i["threshold"]:
            t["problems"].append(f"rel. error {rel[worst]:.3f} > {i['threshold']:.3f} (cosine {cos[worst]:.3f}) "
                                 f"against {i['twin']}")
        if not all(s[4] for s in acc.values()):
            t["problems"].append("holds NaN or Inf")
    for t in per.values():
        if t["problems"]:
            t["status"] = "fail"
        if "rel_error" in t:
            t["rel_error"], t["cosine"] = round(t["rel_error"], 6), round(t["cosine"], 6)
    failed = sorted(n for n, t in per.items() if t["status"] == "fail")
    return {"verdict": "fail" if failed or broken else "pass", "mode": mode,
            "summary": {"tensors": len(per), "passed": len(per) - len(failed), "failed": len(failed),
                        "parity_checked": len(sums), "bytes": sum(r["bytes"] for r in results.values()
                                                                    if r["kind"] == "integrity"),
                        "files": len(files), "files_failed": len(broken)},
            "failed": failed,
            "files": files,
            "thresholds": {"own_error": OWN_ERROR, "fp8_error": ggml_types.FP8_ERROR, "margin": ggml_types.MARGIN,
                           "cap": ggml_types.CAP},
            "tensors": per}


def print_report(report: dict, top: int = 12) -> None:
    from rich.table import Table
    rows = sorted(((n, t) for n, t in report["tensors"].items() if "rel_error" in t),
                  key=lambda nt: (nt[1]["status"] == "pass", -nt[1]["rel_error"] / max(nt[1]["threshold"], 1e-9)))
    failed_only = [(n, t) for n, t in report["tensors"].items() if t["status"] == "fail" and "rel_error" not in t]
    table = Table(title="verify: worst tensors (rel. RMS error against the other source)")
    table.add_column("tensor", overflow="fold")
    for col in ("type", "rel. error", "threshold", "cosine", "worst expert", "status"):
        table.add_column(col)
    for n, t in failed_only + rows[:top]:
        table.add_row(n, t.get("type", ""), f"{t['rel_error']:.4f}" if "rel_error" in t else "",
                      f"{t['threshold']:.4f}" if "threshold" in t else "", f"{t['cosine']:.4f}" if "cosine" in t else "",
                      str(t.get("worst_expert", "")), "[green]pass[/]" if t["status"] == "pass" else "[red]FAIL[/]")
    if rows or failed_only:
        console.print(table)
    for rel, f in report.get("files", {}).items():
        for p in f["problems"]:
            console.print(f"[red]FAIL[/] {rel}: {p}", soft_wrap=True)
    for n in report["failed"]:
        for p in report["tensors"][n]["problems"]:
            if not p.startswith("not checked: its shard"):      # said once, on the shard's own line
                console.print(f"[red]FAIL[/] {n}: {p}", soft_wrap=True)
    console.print(verdict_line(report), soft_wrap=True)


def verdict_line(report: dict) -> str:
    s, mode = report["summary"], report.get("mode", "full")
    verdict = "[bold green]PASS[/]" if report["verdict"] == "pass" else "[bold red]FAIL[/]"
    files = f", {s['files'] - s['files_failed']}/{s['files']} files whole" if s.get("files") else ""
    if mode == "integrity":
        return (f"{verdict}: {s['passed']}/{s['tensors']} tensors match manifest.json's xxh3_128{files}, "
                f"{s['bytes'] / 1e9:.2f} GB checked. Integrity only: parity with the sources was NOT checked "
                "(`python pipeline.py verify --manifest M` with the sources does that)")
    if mode == "completeness":
        return (f"{verdict}: {s['passed']}/{s['tensors']} tensors present with the shape and GGML type config.json "
                f"implies{files}. Completeness only: a seed-format folder has no checksums, so the content was NOT "
                "checked")
    return (f"{verdict}: {s['passed']}/{s['tensors']} tensors verified ({s['parity_checked']} against the other "
            f"source){files}, {s['bytes'] / 1e9:.2f} GB checked")


def junit_xml(report: dict) -> str:
    """One testcase per merged tensor, grouped by layer, and one per file (classname `files`): what CI shows."""
    import xml.etree.ElementTree as ET
    s = report["summary"]
    suite = ET.Element("testsuite", name="verify", tests=str(s["tensors"] + s.get("files", 0)),
                       failures=str(s["failed"] + s.get("files_failed", 0)), errors="0")
    for n, t in sorted(report["tensors"].items()):
        case = ET.SubElement(suite, "testcase", classname=n.rsplit(".", 2)[0] if n.startswith("blk.") else "model",
                             name=n, time=f"{t.get('seconds', 0.0):.3f}")
        if t["status"] == "fail":
            ET.SubElement(case, "failure", message=t["problems"][0]).text = "\n".join(t["problems"])
    for rel, f in sorted(report.get("files", {}).items()):
        case = ET.SubElement(suite, "testcase", classname="files", name=rel, time="0.000")
        if f["status"] == "fail":
            ET.SubElement(case, "failure", message=f["problems"][0]).text = "\n".join(f["problems"])
    return ET.tostring(ET.Element("testsuites"), encoding="unicode").replace(
        "<testsuites />", "<testsuites>" + ET.tostring(suite, encoding="unicode") + "</testsuites>")


class VerifyFailed(PipelineError):
    """The merged folder does not hold what it should: exit 1, not 2 (the run itself worked)."""
    exit_code = 1


def set_verified(out: Path, verified: bool) -> None:
    path = out / "manifest.json"
    manifest = read_json(path)
    if manifest.get("verified") != verified:
        manifest["verified"] = verified
        write_json(path, manifest, out)


def run_logged(tasks: list[dict], log_path: Path, client, fresh: bool) -> dict[str, dict]:
    """Run the tasks not already in the log (all of them if `fresh`), appending each result as it comes: a killed
    verify resumes with what it had not finished."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if fresh:
        log_path.unlink(missing_ok=True)
    wanted = {t["id"] for t in tasks}
    results = {k: v for k, v in load_log(log_path).items() if k in wanted}
    todo = sorted((t for t in tasks if t["id"] not in results), key=lambda t: -t["bytes"])   # big first: balance
    if results:
        console.print(f"verify: {len(results)} of {len(tasks)} tasks already done by an earlier run")
    with open(log_path, "a") as log, byte_progress("verify", sum(t["bytes"] for t in todo), len(todo),
                                                   "tasks") as advance:
        if log.tell() and _pread(str(log_path), log.tell() - 1, 1)[0] != ord("\n"):
            log.write("\n")              # a killed run cut its last line: don't glue the next result onto it
        last_sync = [time.monotonic()]

        def on_result(r: dict) -> None:
            results[r["id"]] = r
            log.write(json.dumps(r) + "\n")
            log.flush()
            if time.monotonic() - last_sync[0] > 5:
                os.fsync(log.fileno())
                last_sync[0] = time.monotonic()
            advance(r["bytes"], 1)

        if todo:
            execute(todo, on_result, client=client)
    return results


def shards_read_right(manifest: dict, report: dict) -> tuple[set[str], set[str]]:
    """(shards whose every byte checked out, shards with a byte or header that did not)."""
    bad = {rel for rel, f in report["files"].items() if f["status"] == "fail"}
    for n, t in report["tensors"].items():
        if any(p.startswith("integrity") for p in t["problems"]):
            bad.add(manifest["tensors"][n]["shard"])
    return {s["file"] for s in manifest["shards"]} - bad, bad & {s["file"] for s in manifest["shards"]}


def run(ctx: Context) -> Result:
    from .write import invalidate_shards, restamp_shards
    sources = ctx.result("fetch")
    manifest = read_json(ctx.out / "manifest.json")
    check_manifest_shape(manifest, str(ctx.out / "manifest.json"))
    with cluster(ctx.verify.get("scheduler"), ctx.verify.get("workers")) as client:   # before anything changes
        start = time.time()
        set_verified(ctx.out, False)
        (ctx.out / RESULT).unlink(missing_ok=True)       # no earlier report may stand for this run's
        problems = folder_problems(ctx.out, manifest)
        files = file_report(problems, manifest)
        tasks, info = build_tasks(ctx.out, manifest, sources, broken=set(problems))
        # `run` reuses results whose inputs (shard and sources) are unchanged; `pipeline.py verify` reads afresh,
        # taking only what an interrupted verify of its own had finished
        fresh = ctx.forced or (ctx.explicit and not ctx.resume)
        results = run_logged(tasks, state_dir(ctx.out) / LOG, client, fresh)
    report = summarize(manifest, info, results, files)
    report["summary"]["seconds"] = round(time.time() - start, 3)
    write_json(ctx.out / RESULT, report, ctx.out)
    good, bad = shards_read_right(manifest, report)
    restamp_shards(ctx.out, good)            # read and right: a copied folder need not be written again
    invalidate_shards(ctx.out, bad)          # wrong bytes: `run` writes these shards again, and only these
    print_report(report)
    s = report["summary"]
    if report["verdict"] != "pass":
        files_failed = f", {s['files_failed']} files failed" if s["files_failed"] else ""
        raise VerifyFailed(f"verify: {s['failed']} of {s['tensors']} tensors failed{files_failed} "
                           f"(details in {ctx.out / RESULT}); manifest.json stays verified: false")
    set_verified(ctx.out, True)
    return Result(result=RESULT, outputs=[RESULT], json_checks={"manifest.json": {"field": "verified", "equals": True}},
                  summary=f"PASS: {s['passed']}/{s['tensors']} tensors, {s['parity_checked']} against the other "
                          f"source, {s['bytes'] / 1e9:.2f} GB")


# -- verify --folder: a folder alone, without its sources ------------------------------------------------------------

def check_folder(folder: Path, scheduler: str | None = None, workers: int | None = None) -> dict:
    """Integrity of a merged folder against its own manifest.json (every tensor's xxh3_128, in parallel with dask),
    or, for a seed-format folder (no manifest), its completeness. Reads only; returns the report, raises
    VerifyFailed (exit 1) if the folder fails."""
    folder = Path(folder)
    try:
        folder.resolve(strict=True)
    except RuntimeError:                      # Python < 3.13: a symlink loop
        raise PipelineError(f"{folder}: symlink loop") from None
    except OSError as e:
        raise PipelineError(f"{folder}: {'symlink loop' if e.errno == 40 else 'no such folder'}") from None
    if not folder.is_dir():
        raise PipelineError(f"{folder}: not a folder")
    mpath = folder / "manifest.json"
    if mpath.exists():
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VerifyFailed(f"{mpath}: not valid JSON ({getattr(e, 'msg', e)})") from None
        check_manifest_shape(manifest, str(mpath))
        with cluster(scheduler, workers) as client:
            start = time.time()
            problems = folder_problems(folder, manifest)
            tasks = []
            for name, e in manifest["tensors"].items():
                if e["shard"] not in problems:
                    tasks.append({"kind": "integrity", "id": name, "name": name,
                                  "merged": [str(folder / e["shard"]), *e["offsets"]], "expect": e[HASH_NAME],
                                  "bytes": e["offsets"][1] - e["offsets"][0]})
            results: dict[str, dict] = {}
            total = sum(t["bytes"] for t in tasks)
            with byte_progress("verify --folder", total, len(tasks), "tensors") as advance:
                def on_result(r):
                    results[r["id"]] = r
                    advance(r["bytes"], 1)
                tasks.sort(key=lambda t: -t["bytes"])
                execute(tasks, on_result, client=client)
        report = summarize(manifest, {}, results, file_report(problems, manifest), mode="integrity")
        report["summary"]["seconds"] = round(time.time() - start, 3)
    elif any(folder.rglob("*.safetensors")):
        from .seedcheck import completeness
        report = completeness(folder)
    else:
        raise PipelineError(f"{folder}: not a model folder (no manifest.json and no .safetensors files)")
    print_report(report)
    if report["verdict"] != "pass":
        s = report["summary"]
        files_failed = f", {s['files_failed']} files failed" if s["files_failed"] else ""
        e = VerifyFailed(f"{folder}: {s['failed']} of {s['tensors']} tensors failed{files_failed}")
        e.report = report
        raise e
    return report


def fingerprint(ctx: Context) -> dict:
    return {"thresholds": ggml_types.thresholds_fingerprint()}


STAGE = Stage("verify", needs=("fetch", "write"),
              inputs="the merged folder (manifest.json, shards); both sources read afresh",
              outputs="verify.json (per tensor: integrity hash, rel. error, cosine, threshold); "
                      "manifest.json verified: true when all pass",
              version=VERSION, fingerprint=fingerprint, run=run,
              options={"workers": Option(int, minimum=1), "scheduler": Option(str)})
