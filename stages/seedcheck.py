"""verify --folder on a folder in the seed system's format (no manifest.json, so no checksums): is it complete?

What people download as "pre-merged weights" comes with a warning to check the upload is complete. This checks what
can be checked without sources or checksums: every tensor config.json implies is present once, with the right dtype,
shape and (routed experts) GGML type and byte size, and every shard is whole. Content is not checked.
Layout: /work/shared/REFERENCE.md section 4 (GGUF-style keys; experts as flat U8 + a 0-dim I64 `.ggml_type`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from . import ggml_types
from .errors import PipelineError
from .formats import read_config, read_safetensors_header
from .names import LAYOUT_KV_B, config_problems, expected_weights

BLOCK = 128                                      # DeepSeek FP8 weight_block_size
PLAIN = ("BF16", "F16", "F32")


def completeness(folder: Path) -> dict:
    from .verify import VerifyFailed
    if not (folder / "config.json").is_file():
        raise PipelineError(f"{folder}: no manifest.json and no config.json: a seed-format folder needs the model's "
                            "config.json beside its shards to be checked")
    cfg = read_config(folder)
    bad_cfg = config_problems(cfg, str(folder / "config.json"))
    if bad_cfg:
        raise VerifyFailed("\n".join(bad_cfg))
    files, found = {}, {}
    for path in sorted(folder.rglob("*.safetensors")):          # the seed loader scans recursively too
        rel = str(path.relative_to(folder))
        files[rel] = {"status": "pass", "problems": []}
        try:
            header = read_safetensors_header(path)
        except PipelineError as e:
            files[rel]["problems"].append(str(e).removeprefix(f"{path}: "))
            continue
        for name, ref in header.items():
            if name in found:
                files[rel]["problems"].append(f"tensor {name} is also in {found[name][1]}: a loader takes either")
            else:
                found[name] = (ref, rel)
    per: dict[str, dict] = {}

    def entry(name: str, problems: list[str]) -> None:
        per[name] = {"status": "fail" if problems else "pass", "problems": problems}
        if name in found:
            per[name]["shard"] = found[name][1]

    def has(name: str, dtypes, shape) -> list[str]:
        if name not in found:
            return ["missing"]
        ref = found[name][0]
        if ref.dtype not in dtypes:
            return [f"dtype {ref.dtype}, expected {' or '.join(dtypes)}"]
        if list(ref.shape) != list(shape):
            return [f"shape {list(ref.shape)}, config.json implies {list(shape)}"]
        return []

    for w in expected_weights(cfg, LAYOUT_KV_B):                # the seed keeps the checkpoint's kv_b
        if w.source == "fp8":
            probs = has(w.out, ("F8_E4M3",) + PLAIN if w.linear else PLAIN, w.shape)
            entry(w.out, probs)
            if w.linear and not probs and found[w.out][0].dtype == "F8_E4M3":
                scale = [math.ceil(w.shape[0] / BLOCK), math.ceil(w.shape[1] / BLOCK)]
                entry(w.out + "_scale_inv", has(w.out + "_scale_inv", ("F32",), scale))
            continue
        type_name = w.out.removesuffix(".weight") + ".ggml_type"
        tprobs = has(type_name, ("I64",), [])
        type_id = None
        if not tprobs:
            ref = found[type_name][0]
            with open(ref.file, "rb") as f:
                type_id = int.from_bytes(os.pread(f.fileno(), 8, ref.offset), "little", signed=True)
            if not ggml_types.accepted(type_id):
                tprobs = [f"GGML type {ggml_types.name_of(type_id)}, which the pipeline does not accept "
                          f"({', '.join(sorted(ggml_types.TYPES))})"]
        entry(type_name, tprobs)
        probs = has(w.out, ("U8",), [found[w.out][0].length] if w.out in found else [0])
        if not probs and not tprobs:
            t = ggml_types.get(type_id)
            try:
                want = t.nbytes(w.shape)
            except ValueError as e:
                probs = [str(e)]
            else:
                if found[w.out][0].length != want:
                    probs = [f"{found[w.out][0].length} bytes, {t.name} {list(w.shape)} (config.json) takes {want}"]
        entry(w.out, probs)
    for name in sorted(set(found) - set(per)):
        entry(name, ["unexpected: not a tensor of the model config.json describes (a loader would read it)"])
    failed = sorted(n for n, t in per.items() if t["status"] == "fail")
    for f in files.values():
        f["status"] = "fail" if f["problems"] else "pass"
    files_failed = sum(f["status"] == "fail" for f in files.values())
    return {"verdict": "fail" if failed or files_failed else "pass", "mode": "completeness",
            "summary": {"tensors": len(per), "passed": len(per) - len(failed), "failed": len(failed),
                        "parity_checked": 0, "bytes": 0, "files": len(files), "files_failed": files_failed},
            "failed": failed, "files": files, "tensors": per}
