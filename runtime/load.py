"""Open a merged model folder (docs/FORMAT.md) without copying it: manifest, config, memory-mapped tensors.

Also opens folders merged by the seed system's script (no manifest.json: GGUF-style keys, U8 + `.ggml_type`);
their logical shapes then come from config.json. Those have no checksums, nor has a merged folder whose
manifest.json is gone: both open only with allow_unverified. Every path read from manifest.json must stay inside
the folder; config.json, the tokenizer files and the chat template are checked against manifest.json's `files`.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT, FORMAT_VERSION = "dsv3-hybrid", 1
SAMPLE_BYTES = 64 << 20          # bytes re-hashed on open: all small tensors plus a rotating sample of big ones
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "added_tokens.json", "vocab.json",
             "merges.txt", "model.safetensors.index.json")   # what the runtime or its tokenizer may read
NP_DTYPE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F8_E4M3": np.uint8, "U8": np.uint8,
            "I64": np.int64}


class ModelError(Exception):
    """A folder that cannot be served, phrased for the user (one line)."""


@dataclass
class TensorInfo:
    shard: str
    begin: int
    end: int
    dtype: str
    shape: tuple
    logical_shape: tuple | None = None
    ggml_type: int | None = None
    checksum: str | None = None


@dataclass
class Folder:
    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    verified: bool
    manifest: dict | None = None
    _maps: dict = field(default_factory=dict)

    def bytes(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 memmap slice (no copy)."""
        t = self.tensors[name]
        if t.shard not in self._maps:
            self._maps[t.shard] = np.memmap(self.path / t.shard, dtype=np.uint8, mode="r")
        return self._maps[t.shard][t.begin:t.end]

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (no copy), typed by its dtype: BF16 as uint16, F8_E4M3 as uint8 codes."""
        t = self.tensors[name]
        return self.bytes(name).view(NP_DTYPE[t.dtype]).reshape(t.shape)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors


def load(path, allow_unverified: bool = False, check: bool = True) -> Folder:
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: no such model folder")
    manifest_path = path / "manifest.json"
    if manifest_path.exists():
        try:
            m = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"{manifest_path}: not valid JSON") from None
        folder = _from_manifest(path, m)
        if not folder.verified and not allow_unverified:
            raise ModelError(f"{path}: not verified (manifest.json verified: false); run `python pipeline.py verify` "
                             "on it first, or pass --allow-unverified")
    elif list(path.rglob("*.safetensors")):
        if not allow_unverified:
            if _merged_by_pipeline(path):
                raise ModelError(f"{path}: manifest.json is missing (the folder was merged by the pipeline, but its "
                                 "checksums are gone); serve it anyway with --allow-unverified")
            raise ModelError(f"{path}: no manifest.json (a seed-format folder: no checksums, nothing verified); "
                             "check it with `python pipeline.py verify --folder`, then pass --allow-unverified")
        folder = _from_seed_folder(path)
    else:
        raise ModelError(f"{path}: not a model folder (no manifest.json and no .safetensors files)")
    if check:
        quick_check(folder)
    return folder


def _merged_by_pipeline(path: Path) -> bool:
    try:
        return json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["format"] == FORMAT
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _inside(path: Path, rel, what: str) -> Path:
    """path / rel for a name read from manifest.json, refusing one that leads out of the folder."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ModelError(f"{path}/manifest.json: {what} {rel!r} leads outside the folder; refused")
    return path / rel


def _from_manifest(path: Path, m: dict) -> Folder:
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
        m = m if isinstance(m, dict) else {}
        raise ModelError(f"{path}/manifest.json: format {m.get('format')} v{m.get('format_version')}, this runtime "
                         f"reads {FORMAT} v{FORMAT_VERSION}")
    try:
        tensors = {n: TensorInfo(e["shard"], int(e["offsets"][0]), int(e["offsets"][1]), e["dtype"], tuple(e["shape"]),
                                 tuple(e["logical_shape"]) if "logical_shape" in e else None, e.get("ggml_type_id"),
                                 e.get(m.get("checksum", "xxh3_128")))
                   for n, e in m["tensors"].items()}
        shards = [(s["file"], int(s["size"])) for s in m["shards"]]
        config = dict(m["model"]["config"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        raise ModelError(f"{path}/manifest.json: malformed (tensors, shards, model.config)") from None
    listed = {f for f, _ in shards}
    for name, t in tensors.items():
        _inside(path, t.shard, f"tensor {name}: shard")
        if t.shard not in listed or not 0 <= t.begin <= t.end:
            raise ModelError(f"{path}/manifest.json: tensor {name}: shard {t.shard} / offsets do not add up")
    for file, size in shards:
        p = _inside(path, file, "shard")
        if not p.exists():
            raise ModelError(f"{p}: shard missing")
        if p.stat().st_size != size:
            raise ModelError(f"{p}: {p.stat().st_size} bytes, manifest.json says {size} (truncated or changed)")
    sizes = dict(shards)
    for name, t in tensors.items():
        if t.end > sizes[t.shard]:
            raise ModelError(f"{path / t.shard}: tensor {name} ends at byte {t.end}, past the end of the shard")
    _check_files(path, m)
    return Folder(path, config, tensors, bool(m.get("verified")), m)


def _check_files(path: Path, m: dict) -> None:
    """config, tokenizer, template and index against manifest.json's `files` (small: all of them, on every open).
    A folder written before `files` existed has none to check; one that has them may not gain new ones."""
    import xxhash
    files = m.get("files")
    if files is None:
        return
    if not isinstance(files, dict):
        raise ModelError(f"{path}/manifest.json: 'files' is not a mapping")
    for rel, f in files.items():
        p = _inside(path, rel, "file")
        try:
            data = p.read_bytes()
        except OSError:
            raise ModelError(f"{p}: missing (manifest.json lists it)") from None
        if not isinstance(f, dict) or len(data) != f.get("size") or \
                xxhash.xxh3_128_hexdigest(data) != f.get(m.get("checksum", "xxh3_128")):
            raise ModelError(f"{p}: does not match its checksum in manifest.json (the file was changed); "
                             "run `python pipeline.py verify`")
    for rel in AUX_FILES:
        if rel not in files and (path / rel).exists():
            raise ModelError(f"{path / rel}: not covered by manifest.json's checksums (added after the folder was "
                             "written); remove it or merge again")


def _from_seed_folder(path: Path) -> Folder:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ModelError(f"{path}: a folder without manifest.json needs the model's config.json beside its shards")
    config = json.loads(cfg_path.read_text())
    tensors = {}
    for shard in sorted(path.rglob("*.safetensors")):       # the seed loader scans recursively too
        size = shard.stat().st_size
        try:
            with open(shard, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError
                header = json.loads(f.read(n))
            entries = [(name, e["dtype"], [int(d) for d in e["shape"]], [8 + n + int(o) for o in e["data_offsets"]])
                       for name, e in header.items() if name != "__metadata__"]
            if not all(dt in NP_DTYPE and all(type(x) is int for x in header[nm]["data_offsets"] + header[nm]["shape"])
                       and len(o) == 2 and 8 + n <= o[0] <= o[1] for nm, dt, _, o in entries):
                raise ValueError
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError):
            raise ModelError(f"{shard}: not a safetensors file this runtime can read (malformed header)") from None
        for name, dtype, shape, (b, end) in entries:
            if end > size:
                raise ModelError(f"{shard}: truncated: tensor {name} ends at byte {end}, file has {size}")
            tensors[name] = TensorInfo(str(shard.relative_to(path)), b, end, dtype, tuple(shape))
    folder = Folder(path, config, tensors, verified=False)
    for name, t in tensors.items():                         # logical shapes of GGML tensors from config.json
        if name.endswith(".ggml_type"):
            w = tensors.get(name.removesuffix(".ggml_type") + ".weight")
            if w is not None:
                w.ggml_type = int(folder.raw(name))
                w.logical_shape = _seed_logical_shape(name, config)
    return folder


def _seed_logical_shape(name: str, c: dict) -> tuple:
    E, I, H = c["n_routed_experts"], c["moe_intermediate_size"], c["hidden_size"]
    kind = name.split(".")[2]
    return {"ffn_gate_exps": (E, I, H), "ffn_up_exps": (E, I, H), "ffn_down_exps": (E, H, I)}[kind]


def quick_check(folder: Folder) -> None:
    """Sizes were checked on open; re-hash the small tensors and a sample of big ones against the manifest."""
    import xxhash
    if folder.manifest is None:
        return
    items = sorted((t.end - t.begin, n) for n, t in folder.tensors.items() if t.checksum)
    budget, chosen = SAMPLE_BYTES, []
    for size, name in items:                                 # smallest first: many tensors for few bytes
        if size > budget:
            break
        chosen.append(name)
        budget -= size
    big = [n for s, n in items if n not in set(chosen)]
    if big:                                                  # and one big tensor, different on every open
        chosen.append(big[int.from_bytes(np.random.bytes(4), "little") % len(big)])
    for name in chosen:
        t = folder.tensors[name]
        if xxhash.xxh3_128_hexdigest(folder.bytes(name)) != t.checksum:
            raise ModelError(f"{folder.path / t.shard}: tensor {name} does not match its checksum in manifest.json "
                             "(the file was changed or damaged); run `python pipeline.py verify`")


def fp8_dequant(weight: np.ndarray, scale: np.ndarray, block: int = 128):
    """FP8 e4m3 codes (out, in) and float32 scales -> torch float32 (out, in): each 128x128 tile times its scale."""
    import torch
    w = torch.from_numpy(np.array(weight)).view(torch.float8_e4m3fn).float()
    s = torch.from_numpy(np.array(scale)).float()
    s = s.repeat_interleave(block, 0)[:w.shape[0]].repeat_interleave(block, 1)[:, :w.shape[1]]
    return w * s


def bf16(a: np.ndarray):
    import torch
    return torch.from_numpy(np.array(a)).view(torch.bfloat16)     # a copy: torch wants writable memory
