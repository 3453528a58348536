"""verify: prove, tensor by tensor, that the merged folder holds the right weights in the right places.

Two checks per merged tensor, both against the sources read afresh (no trust in reconcile's plan or the writer):
1. integrity: the shard bytes equal the source bytes, and their xxh3-128 equals the one in manifest.json;
2. parity: the merged tensor, dequantized, against the same logical weight from the *other* source (routed experts
   from the GGUF against the FP8 checkpoint's experts; FP8 tensors against their GGUF twins, attn_kv_b against
   attn_k_b/attn_v_b rebuilt per head). A right tensor differs by its quantization error; a mis-mapped one
   (wrong layer, swapped experts, transposed, k/v mixed up) by ~1.4 (two unrelated weights of equal scale).
Work is one dask task per tensor and per bounded chunk of rows (whole experts), so it spreads over local cores or a
distributed cluster with bounded memory per task; per-task results are logged so a killed verify resumes.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType

from .dag import Context, Result, Stage
from .dequant import GGML_BLOCK, dequantize_fp8_block, dequantize_ggml
from .errors import PipelineError
from .formats import read_gguf, read_hf_checkpoint
from .fsio import CHUNK, HASH_NAME, read_json, state_dir, write_json
from .mixes import expert_type
from .names import LAYOUT_KV_B, expected_weights
from .quantize import DONE_DIR as QUANTIZED_DIR
from .reconcile import gguf_layout
from .ui import byte_progress, console

VERSION = 1
RESULT = "verify.json"
LOG = "verify/results.jsonl"             # under .pipeline/
BUDGET = 1 << 24                         # values per side per parity task: 64 MB of float32, whatever the model

# Relative RMS error of each type against the unquantized weight, measured by benchmarks/quant_error.py on Gaussian
# weights (std 0.02, 512x4096) with ggml's own quantizer (IQ types with a uniform importance matrix). On the fixture,
# llama-quantize's Q4_K / Q6_K experts sit at 0.0766 / 0.0321 against the FP8 checkpoint: hypot(own, FP8_ERROR) of
# these numbers predicts 0.076 / 0.032, so the table transfers to real weights.
OWN_ERROR = {"F32": 0.0, "F16": 0.0002, "BF16": 0.0017, "Q8_0": 0.0054, "Q6_K": 0.0178, "Q5_K": 0.0361,
             "Q5_1": 0.0378, "Q5_0": 0.0427, "Q4_K": 0.0713, "IQ4_NL": 0.0761, "IQ4_XS": 0.0767, "Q4_1": 0.0782,
             "Q4_0": 0.0860, "Q3_K": 0.1510, "IQ3_S": 0.1660, "IQ3_XXS": 0.2131, "IQ2_S": 0.2648, "Q2_K": 0.2966,
             "IQ2_XS": 0.2997, "IQ2_XXS": 0.3438, "IQ1_S": 0.4856, "IQ1_M": 0.5821}
FP8_ERROR = 0.0264                       # e4m3 with 128x128 block scales, same Gaussian weights
MARGIN = 2.0                             # pass below twice the measured error ...
CAP = 0.9                                # ... but never near the ~1.4 of two unrelated weights (IQ1 types)
FLOOR = 0.005                            # bf16 rounding of norms and routers


def threshold(ggml_type: str, fp8_side: bool) -> float:
    own = max(OWN_ERROR[ggml_type], FLOOR)
    return min(CAP, MARGIN * math.hypot(own, FP8_ERROR if fp8_side else 0.0))


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
        block, nbytes = GGML_BLOCK[spec["type"]]
        row = cols // block * nbytes
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
    if "value" in t:
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
    return {"fmt": "ggml", "type": {"F32": 0, "F16": 1, "BF16": 30}[dtype], "path": path, "offset": offset,
            "rows": rows, "cols": cols}


def as_2d(shape) -> tuple[int, int]:
    return (1, shape[0]) if len(shape) == 1 else (math.prod(shape[:-1]), shape[-1])


def build_tasks(out: Path, manifest: dict, fp8_root: Path, gguf_files: list[Path],
                mix: str | None = None) -> tuple[list[dict], dict]:
    """`mix`: the experts were quantized here (gguf: {quantize: mix}); there is no GGUF, so FP8 tensors get integrity
    only and the experts' parity is against the checkpoint they were made from."""
    cfg, hf = read_hf_checkpoint(fp8_root)
    gg = None if mix else read_gguf(gguf_files)
    weights = {w.out: w for w in expected_weights(cfg, gguf_layout(gg.meta) if gg else LAYOUT_KV_B)}
    tensors = manifest["tensors"]
    tasks, info = [], {}
    for name, e in tensors.items():
        shard = str(out / e["shard"])
        st = os.stat(shard)              # the file as it is now: a shard written again since is checked again,
        key = f"v{VERSION}:{name}:{e[HASH_NAME]}:{st.st_size}.{st.st_mtime_ns}"   # not from an earlier run's log
        src = e["source"]
        integrity = {"kind": "integrity", "id": f"integrity:{key}", "name": name, "merged": [shard, *e["offsets"]],
                     "expect": e[HASH_NAME], "bytes": e["offsets"][1] - e["offsets"][0]}
        if src["side"] == "value" and mix:           # the type llama.cpp's mix gives these experts
            w = weights[name.removesuffix(".ggml_type") + ".weight"]
            proj = name.split(".")[2].removeprefix("ffn_").removesuffix("_exps")
            integrity["value"] = int(GGMLQuantizationType[expert_type(mix, proj, w.layer, cfg["num_hidden_layers"],
                                                                      w.shape[-1])])
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
                kind = max((k_ref.dtype, v_ref.dtype), key=lambda k: OWN_ERROR[k])
            else:
                ref = gg.tensors[next(iter(w.gguf))]
                twin, unit, kind = ggml_spec(ref, rows, cols), 128 if fp8_side else 1, ref.dtype
            info[name] = {"twin": "GGUF " + " + ".join(w.gguf)}
        info[name].update(threshold=threshold(kind, fp8_side), type=kind)
        step = max(unit, BUDGET // cols // unit * unit)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            tasks.append({"kind": "parity", "id": f"parity:{key}:{r0}", "name": name, "rows": [r0, r1],
                          "group_rows": group,
                          "merged": merged, "twin": twin, "bytes": (r1 - r0) * cols})
    return tasks, info


# -- running the tasks: dask locally or on a cluster ----------------------------------------------------------------

def execute(tasks: list[dict], on_result, scheduler: str | None, workers: int | None) -> None:
    """Run every task once; `on_result(result)` is called in this process as each one finishes."""
    if scheduler or workers:
        from distributed import Client, LocalCluster, as_completed
        cluster = None
        if scheduler:
            client = Client(scheduler)
        else:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=":0", silence_logs="ERROR")   # a logging level name:
            # the worker process passes it to Logger.setLevel, which refuses "error" (Nanny failed to start)
            client = Client(cluster)
        console.print(f"dask cluster: {len(client.scheduler_info()['workers'])} workers, "
                      f"dashboard {client.dashboard_link}")
        try:
            futures = client.map(run_task, tasks, pure=False)
            for fut in as_completed(futures):
                try:
                    result = fut.result()
                except PipelineError:
                    raise
                except Exception as e:   # typically a worker that cannot import this project or see the files
                    raise PipelineError(f"dask cluster {client.scheduler.address}: a verify task failed on a worker "
                                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); workers "
                                        "need this project installed and the same paths to the model files") from None
                on_result(result)
                fut.release()
        finally:
            client.close()
            if cluster:
                cluster.close()
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


def summarize(manifest: dict, info: dict, results: dict[str, dict]) -> dict:
    per = {n: {"status": "pass", "problems": []} for n in manifest["tensors"]}
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
    return {"verdict": "fail" if failed else "pass",
            "summary": {"tensors": len(per), "passed": len(per) - len(failed), "failed": len(failed),
                        "parity_checked": len(sums), "bytes": sum(r["bytes"] for r in results.values()
                                                                    if r["kind"] == "integrity")},
            "failed": failed,
            "thresholds": {"own_error": OWN_ERROR, "fp8_error": FP8_ERROR, "margin": MARGIN, "cap": CAP},
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
    console.print(table)
    for n in report["failed"]:
        for p in report["tensors"][n]["problems"]:
            console.print(f"[red]FAIL[/] {n}: {p}", soft_wrap=True)
    s = report["summary"]
    verdict = "[bold green]PASS[/]" if report["verdict"] == "pass" else "[bold red]FAIL[/]"
    console.print(f"{verdict}: {s['passed']}/{s['tensors']} tensors verified ({s['parity_checked']} against the other "
                  f"source), {s['bytes'] / 1e9:.2f} GB checked")


def junit_xml(report: dict) -> str:
    """One testcase per merged tensor, grouped by layer: what CI dashboards show."""
    import xml.etree.ElementTree as ET
    s = report["summary"]
    suite = ET.Element("testsuite", name="verify", tests=str(s["tensors"]), failures=str(s["failed"]), errors="0")
    for n, t in sorted(report["tensors"].items()):
        case = ET.SubElement(suite, "testcase", classname=n.rsplit(".", 2)[0] if n.startswith("blk.") else "model",
                             name=n, time=f"{t.get('seconds', 0.0):.3f}")
        if t["status"] == "fail":
            ET.SubElement(case, "failure", message=t["problems"][0]).text = "\n".join(t["problems"])
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


def run(ctx: Context) -> Result:
    sources = ctx.result("fetch")
    manifest = read_json(ctx.out / "manifest.json")
    set_verified(ctx.out, False)
    mix = sources["gguf"].get("quantize")
    tasks, info = build_tasks(ctx.out, manifest, Path(sources["fp8"]["root"]),
                              [] if mix else [Path(sources["gguf"]["root"]) / n for n in sources["gguf"]["order"]], mix)
    log_path = state_dir(ctx.out) / LOG
    log_path.parent.mkdir(exist_ok=True)
    if ctx.forced:
        log_path.unlink(missing_ok=True)
    wanted = {t["id"] for t in tasks}
    results = {k: v for k, v in load_log(log_path).items() if k in wanted}
    todo = sorted((t for t in tasks if t["id"] not in results), key=lambda t: -t["bytes"])   # big first: balance
    if results:
        console.print(f"verify: {len(results)} of {len(tasks)} tasks already done by an earlier run")
    start = time.time()
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
            execute(todo, on_result, ctx.verify.get("scheduler"), ctx.verify.get("workers"))
    report = summarize(manifest, info, results)
    report["summary"]["seconds"] = round(time.time() - start, 3)
    write_json(ctx.out / RESULT, report, ctx.out)
    print_report(report)
    if report["verdict"] != "pass":
        raise VerifyFailed(f"verify: {report['summary']['failed']} of {report['summary']['tensors']} tensors failed "
                           f"(details in {ctx.out / RESULT}); manifest.json stays verified: false")
    set_verified(ctx.out, True)
    s = report["summary"]
    return Result(result=RESULT, outputs=[RESULT], json_checks={"manifest.json": {"field": "verified", "equals": True}},
                  summary=f"PASS: {s['passed']}/{s['tensors']} tensors, {s['parity_checked']} against the other "
                          f"source, {s['bytes'] / 1e9:.2f} GB")


def fingerprint(ctx: Context) -> dict:
    return {"thresholds": [OWN_ERROR, FP8_ERROR, MARGIN, CAP, FLOOR]}


STAGE = Stage("verify", needs=("fetch", "write"),
              inputs="the merged folder (manifest.json, shards); both sources read afresh",
              outputs="verify.json (per tensor: integrity hash, rel. error, cosine, threshold); "
                      "manifest.json verified: true when all pass",
              version=VERSION, fingerprint=fingerprint, run=run, options={"workers": int, "scheduler": str})
