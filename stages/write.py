"""write: stream the planned bytes into merged safetensors shards, then the index and manifest.json.

Bytes are copied, never converted: routed experts keep their GGUF block bytes (flat U8 + a 0-dim I64 `.ggml_type`),
FP8 weights and their scales keep the checkpoint's bytes. Memory stays at one copy buffer whatever the model size.
Each shard is written under .pipeline/tmp, fsynced and renamed; a per-shard record lets a killed run redo only the
shards that did not finish. Layout: docs/FORMAT.md.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import xxhash

from .dag import Context, Option, Result, Stage, digest
from .errors import PipelineError
from .fsio import CHUNK, HASH_NAME, atomic_file, disk_error, hash_file, read_json, state_dir, write_json
from .ui import byte_progress

VERSION = 1                                 # of a shard's bytes: a change rewrites every shard
STAGE_VERSION = 2                           # of the stage (2: manifest.json `files`, shard hashes): shards are kept
FORMAT_VERSION = 1
ALIGN = 64                                  # tensors whose size is a multiple of this start 64-byte aligned
SYNC_EVERY = 64 << 20                       # flush written bytes to disk and drop their pages this often
AUX_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "added_tokens.json", "vocab.json",
             "merges.txt"]               # whatever transformers' AutoTokenizer may read: each gets a checksum
INDEX = "model.safetensors.index.json"
MANIFEST = "manifest.json"


def tensor_nbytes(t: dict) -> int:
    return 8 if t["side"] == "value" else sum(s[2] for s in t["segments"])


def shard_layout(names: list[str], tensors: dict) -> tuple[bytes, list[tuple[str, int, int]]]:
    """Header bytes and (name, begin, end) data offsets. Aligned-size tensors go first so they stay aligned."""
    order = sorted(names, key=lambda n: tensor_nbytes(tensors[n]) % ALIGN != 0)
    header, spans, pos = {"__metadata__": {"format": "pt"}}, [], 0
    for n in order:
        size = tensor_nbytes(tensors[n])
        header[n] = {"dtype": tensors[n]["dtype"], "shape": tensors[n]["shape"], "data_offsets": [pos, pos + size]}
        spans.append((n, pos, pos + size))
        pos += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)            # pad so the data starts 64-byte aligned
    return len(raw).to_bytes(8, "little") + raw, spans


class Copier:
    """Streams byte ranges from source files into an open file, hashing as it goes, with an optional rate cap.

    Copied pages are dropped from the page cache on both sides as soon as they are on disk: a merge passes each byte
    once, and letting 400 GB of dead pages pile up made the kernel's page allocation the bottleneck (0.26 -> 0.60 GB/s
    on our VM, benchmarks/merge.py)."""

    def __init__(self, roots: dict, advance, bwlimit_mb: float | None):
        self.roots, self.advance, self.files = roots, advance, {}
        self.rate = bwlimit_mb * 1e6 if bwlimit_mb else None
        self.chunk = min(CHUNK, 1 << 18) if self.rate else CHUNK
        self.buf = bytearray(self.chunk)
        self.t0, self.sent = time.monotonic(), 0
        self.dst_fd, self.synced = None, 0

    def source(self, side: str, rel: str):
        key = (side, rel)
        if key not in self.files:
            self.files[key] = open(Path(self.roots[side]) / rel, "rb", buffering=0)
        return self.files[key]

    def copy(self, dst, side: str, rel: str, offset: int, length: int, h) -> None:
        src = self.source(side, rel)
        src.seek(offset)
        view = memoryview(self.buf)
        while length:
            n = src.readinto(view[:min(length, self.chunk)])
            if not n:
                raise PipelineError(f"{Path(self.roots[side]) / rel}: file ended early (changed since reconcile?)")
            for one in h:
                one.update(view[:n])
            dst.write(view[:n])
            _drop_pages(src.fileno(), offset, n)
            offset += n
            length -= n
            self.advance(n)
            self._throttle(n)
            self._sync(dst)

    def _sync(self, dst) -> None:
        if dst.fileno() != self.dst_fd:
            self.dst_fd, self.synced = dst.fileno(), 0
        pos = dst.tell()
        if pos - self.synced >= SYNC_EVERY:
            dst.flush()
            os.fdatasync(self.dst_fd)
            _drop_pages(self.dst_fd, self.synced, pos - self.synced)
            self.synced = pos

    def _throttle(self, n: int) -> None:
        if self.rate:
            self.sent += n
            ahead = self.sent / self.rate - (time.monotonic() - self.t0)
            if ahead > 0:
                time.sleep(ahead)

    def close(self):
        for f in self.files.values():
            f.close()


def _drop_pages(fd: int, offset: int, length: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def shard_spec(shard: dict, plan: dict) -> dict:
    """Everything that determines a shard's bytes: its tensors, their sources and the sources' content hashes."""
    files = plan["source_files"]
    tensors = {n: plan["tensors"][n] for n in shard["tensors"]}
    used = sorted({(t["side"], s[0]) for t in tensors.values() for s in t.get("segments", [])})
    return {"version": VERSION, "file": shard["file"], "tensors": tensors,
            "source_hashes": [[side, rel, files[side][rel]["hash"]] for side, rel in used]}


def write_shard(ctx: Context, shard: dict, plan: dict, copier: Copier, advance_items) -> dict:
    tensors = plan["tensors"]
    header, spans = shard_layout(shard["tensors"], tensors)
    final = ctx.out / shard["file"]
    out_tensors = {}
    whole = xxhash.xxh3_128(header)                 # the whole file's hash too: lets a copied shard be kept
    with atomic_file(final, ctx.out) as f:
        try:
            f.write(header)
            for name, begin, end in spans:
                t, h = tensors[name], xxhash.xxh3_128()
                if t["side"] == "value":
                    data = int(t["value"]).to_bytes(8, "little", signed=True)
                    h.update(data)
                    whole.update(data)
                    f.write(data)
                else:
                    for rel, offset, length in t["segments"]:
                        copier.copy(f, t["side"], rel, offset, length, (h, whole))
                out_tensors[name] = {"offsets": [len(header) + begin, len(header) + end], HASH_NAME: h.hexdigest()}
                advance_items()
        except OSError as e:
            raise disk_error(final, e) from None
    st = final.stat()
    return {"file": shard["file"], "size": st.st_size, "mtime_ns": st.st_mtime_ns, HASH_NAME: whole.hexdigest(),
            "tensors": out_tensors}


def manifest_entry(name: str, t: dict, where: dict, shard: str, plan: dict) -> dict:
    e = {"shard": shard, "offsets": where["offsets"], "dtype": t["dtype"], "shape": t["shape"]}
    if "logical_shape" in t:
        e["logical_shape"] = t["logical_shape"]
    if "ggml_type" in t:
        e["ggml_type"], e["ggml_type_id"] = t["ggml_type"], t["ggml_type_id"]
    if t["side"] == "value":
        e["source"] = {"side": "value", "value": t["value"]}
    else:
        files = sorted({s[0] for s in t["segments"]})
        e["source"] = {"side": t["side"], "file": files[0] if len(files) == 1 else files,
                       "name": t["source_names"][0] if len(t["source_names"]) == 1 else t["source_names"],
                       "revision": plan["revisions"][t["side"]]}
    e[HASH_NAME] = where[HASH_NAME]
    return e


def run(ctx: Context) -> Result:
    plan = ctx.result("reconcile")
    records_dir = state_dir(ctx.out) / "write"
    records_dir.mkdir(exist_ok=True)
    todo, records, recheck = [], {}, []
    for shard in plan["shards"]:
        spec_digest = digest(shard_spec(shard, plan))
        rec_path = records_dir / (shard["file"] + ".json")
        rec = read_json(rec_path) if rec_path.exists() else None
        final = ctx.out / shard["file"]
        st = final.stat() if final.exists() else None
        if ctx.forced or not rec or rec["spec"] != spec_digest or st is None or st.st_size != rec["size"]:
            todo.append((shard, spec_digest, rec_path))
        elif st.st_mtime_ns == rec["mtime_ns"]:
            records[shard["file"]] = rec                 # finished by an earlier (maybe killed) run: keep it
        else:                                            # touched or copied: kept if its bytes are still the same
            recheck.append((shard, spec_digest, rec_path, rec))
    if recheck:
        with byte_progress("check", sum(r["size"] for *_, r in recheck), len(recheck), "shards") as advance:
            for shard, spec_digest, rec_path, rec in recheck:
                final = ctx.out / shard["file"]
                if rec.get(HASH_NAME) and hash_file(final, advance) == rec[HASH_NAME]:
                    rec["mtime_ns"] = final.stat().st_mtime_ns
                    write_json(rec_path, rec, ctx.out)
                    records[shard["file"]] = rec
                else:
                    todo.append((shard, spec_digest, rec_path))
                advance(0, 1)

    sizes = {s["file"]: sum(tensor_nbytes(plan["tensors"][n]) for n in s["tensors"]) for s in plan["shards"]}
    need = sum(sizes[s["file"]] for s, _, _ in todo)
    free = shutil.disk_usage(ctx.out).free
    if need > free:
        raise PipelineError(f"{ctx.out}: not enough disk space: the merged model needs {need / 1e9:.1f} GB more, "
                            f"{free / 1e9:.1f} GB free; nothing was written")

    n_items = sum(len(s["tensors"]) for s, _, _ in todo)
    with byte_progress("write", need, n_items) as advance:
        copier = Copier(plan["sources"], advance, ctx.bwlimit)
        try:
            for shard, spec_digest, rec_path in todo:
                rec = write_shard(ctx, shard, plan, copier, lambda: advance(0, 1))
                rec["spec"] = spec_digest
                write_json(rec_path, rec, ctx.out)
                records[shard["file"]] = rec
        finally:
            copier.close()

    shard_of = {n: s["file"] for s in plan["shards"] for n in s["tensors"]}
    index = {"metadata": {"total_size": sum(sizes.values()), "format": "dsv3-hybrid"},
             "weight_map": {n: shard_of[n] for n in plan["tensors"]}}
    write_json(ctx.out / INDEX, index, ctx.out)
    aux = copy_aux_files(ctx, Path(plan["sources"]["fp8"]))
    files = {name: {"size": (ctx.out / name).stat().st_size, HASH_NAME: hash_file(ctx.out / name)}
             for name in [INDEX] + aux}
    manifest = {
        "format": "dsv3-hybrid", "format_version": FORMAT_VERSION, "checksum": HASH_NAME,
        "model": {"name": ctx.manifest.name, "config": json.loads((ctx.out / "config.json").read_text())},
        "gguf_layout": plan["gguf_layout"],
        "sources": {side: {"path": plan["sources"][side], "revision": plan["revisions"][side]}
                    for side in ("fp8", "gguf")},
        "shards": [{"file": s["file"], "size": records[s["file"]]["size"], "tensors": len(s["tensors"])}
                   for s in plan["shards"]],
        "tensors": {n: manifest_entry(n, plan["tensors"][n], records[shard_of[n]]["tensors"][n], shard_of[n], plan)
                    for n in plan["tensors"]},
        "files": files,
        "skipped": plan["skipped"],
        "verified": False,
    }
    write_json(ctx.out / MANIFEST, manifest, ctx.out)
    current = {s["file"] for s in plan["shards"]}
    for stale in records_dir.glob("*.safetensors.json"):          # shards of an older plan: ours, so remove
        name = stale.name.removesuffix(".json")
        if name not in current:
            (ctx.out / name).unlink(missing_ok=True)
            stale.unlink()
    outputs = [s["file"] for s in plan["shards"]] + [INDEX] + aux
    total = sum(sizes.values())
    # verify flips manifest.json's `verified`; that is not a change of what write made
    return Result(result=MANIFEST, outputs=outputs, json_checks={MANIFEST: {"ignore": ["verified"]}},
                  big=[s["file"] for s in plan["shards"]],
                  summary=f"{len(plan['shards'])} shards, {total / 1e9:.2f} GB "
                          f"({len(todo)} written, {len(plan['shards']) - len(todo)} kept from an earlier run)")


def copy_aux_files(ctx: Context, fp8_root: Path) -> list[str]:
    """config, generation config and tokenizer, so the merged folder stands alone."""
    copied = []
    for name in AUX_FILES:
        src = fp8_root / name
        if src.is_file():
            with atomic_file(ctx.out / name, ctx.out) as f, open(src, "rb") as s:
                shutil.copyfileobj(s, f)
            copied.append(name)
    return copied


def fingerprint(ctx: Context) -> dict:
    return {}


STAGE = Stage("write", needs=("reconcile",), inputs="plan.json; the source bytes it names",
              outputs="model-*-of-*.safetensors, model.safetensors.index.json, manifest.json, config + tokenizer",
              version=STAGE_VERSION, fingerprint=fingerprint, run=run, options={"bwlimit": Option(float, above=0)})


def _shard_records(out: Path, shards: set[str]):
    """(path of write's stage record, that record, {shard: (its per-shard record path, record)}) for `shards`."""
    rec_path = state_dir(out) / "write.json"
    rec = read_json(rec_path) if rec_path.exists() else None
    per = {}
    for rel in shards:
        p = state_dir(out) / "write" / (rel + ".json")
        if p.exists():
            per[rel] = (p, read_json(p))
    return rec_path, rec, per


def restamp_shards(out: Path, shards: set[str]) -> None:
    """verify read these shards and found every byte right: their current mtimes become write's own, so a copied
    folder (new mtimes, same bytes) is not written again."""
    rec_path, rec, per = _shard_records(out, shards)
    for rel, (p, r) in per.items():
        st = (out / rel).stat()
        if st.st_size == r["size"] and st.st_mtime_ns != r["mtime_ns"]:
            write_json(p, dict(r, mtime_ns=st.st_mtime_ns), out)
    if rec and rec.get("state") == "done":
        changed = False
        for rel in shards:
            info = rec["outputs"].get(rel)
            st = (out / rel).stat()
            if info and info.get("size") == st.st_size and info.get("mtime_ns") != st.st_mtime_ns:
                info["mtime_ns"], changed = st.st_mtime_ns, True
        if changed:
            write_json(rec_path, rec, out)


def invalidate_shards(out: Path, shards: set[str]) -> None:
    """verify found wrong bytes in these shards: forget that write made them, so `run` writes them (only them) again."""
    rec_path, rec, per = _shard_records(out, shards)
    for p, _ in per.values():
        p.unlink()
    if rec and rec.get("state") == "done" and any(rel in rec["outputs"] for rel in shards):
        for rel in shards:
            if rel in rec["outputs"]:
                rec["outputs"][rel] = {"size": -1, "mtime_ns": -1}
        write_json(rec_path, rec, out)
