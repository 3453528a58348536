"""Open a merged model folder (docs/FORMAT.md) without copying it: manifest, config, memory-mapped tensors.

Also opens folders merged by the seed system's script (no manifest.json: GGUF-style keys, U8 + `.ggml_type`);
their logical shapes then come from config.json.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT, FORMAT_VERSION = "dsv3-hybrid", 1
SAMPLE_BYTES = 64 << 20          # bytes re-hashed on open: all small tensors plus a rotating sample of big ones
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
        folder = _from_manifest(path, json.loads(manifest_path.read_text()))
        if not folder.verified and not allow_unverified:
            raise ModelError(f"{path}: not verified (manifest.json verified: false); run `python pipeline.py verify` "
                             "on it first, or pass --allow-unverified")
    elif list(path.glob("*.safetensors")):
        folder = _from_seed_folder(path)
    else:
        raise ModelError(f"{path}: not a model folder (no manifest.json and no .safetensors files)")
    if check:
        quick_check(folder)
    return folder


def _from_manifest(path: Path, m: dict) -> Folder:
    if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path}/manifest.json: format {m.get('format')} v{m.get('format_version')}, this runtime "
                         f"reads {FORMAT} v{FORMAT_VERSION}")
    tensors = {n: TensorInfo(e["shard"], e["offsets"][0], e["offsets"][1], e["dtype"], tuple(e["shape"]),
                             tuple(e["logical_shape"]) if "logical_shape" in e else None, e.get("ggml_type_id"),
                             e.get(m.get("checksum", "xxh3_128")))
               for n, e in m["tensors"].items()}
    for s in m["shards"]:
        p = path / s["file"]
        if not p.exists():
            raise ModelError(f"{p}: shard missing")
        if p.stat().st_size != s["size"]:
            raise ModelError(f"{p}: {p.stat().st_size} bytes, manifest.json says {s['size']} (truncated or changed)")
    return Folder(path, m["model"]["config"], tensors, bool(m.get("verified")), m)


def _from_seed_folder(path: Path) -> Folder:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ModelError(f"{path}: a folder without manifest.json needs the model's config.json beside its shards")
    config = json.loads(cfg_path.read_text())
    tensors = {}
    for shard in sorted(path.rglob("*.safetensors")):       # the seed loader scans recursively too
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, e in header.items():
            if name == "__metadata__":
                continue
            b, end = (8 + n + o for o in e["data_offsets"])
            if end > size:
                raise ModelError(f"{shard}: truncated: tensor {name} ends at byte {end}, file has {size}")
            tensors[name] = TensorInfo(str(shard.relative_to(path)), b, end, e["dtype"], tuple(e["shape"]))
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
