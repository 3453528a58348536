"""Reading the two source formats without reading tensor data: safetensors headers and GGUF tensor tables.

Both readers return byte ranges (absolute file offsets) so later stages can stream bytes straight from disk.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import PipelineError
from .fsio import inside

ST_DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                 "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MAX_HEADER = 512 << 20


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live: a file, an absolute offset and a length."""
    name: str
    file: Path
    dtype: str          # safetensors dtype, or the GGML type name for GGUF tensors
    shape: tuple        # numpy / HF order (for GGUF: `ne` reversed)
    offset: int
    length: int
    ggml_type: int | None = None


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PipelineError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if head[:4] == b"GGUF":
            raise PipelineError(f"{path}: this is a GGUF file, not safetensors")
        if n > min(MAX_HEADER, size - 8):
            raise PipelineError(f"{path}: not a safetensors file or truncated (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise PipelineError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise PipelineError(f"{path}: not a safetensors file (header is not a JSON object)")
    start = 8 + n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError):
            raise PipelineError(f"{path}: tensor {name}: malformed header entry (needs dtype, shape, "
                                "data_offsets)") from None
        if not isinstance(dtype, str) or dtype not in ST_DTYPE_SIZE:
            raise PipelineError(f"{path}: tensor {name}: unknown dtype {json.dumps(dtype)}")
        if not isinstance(shape, list) or not all(_whole(d) for d in shape):
            raise PipelineError(f"{path}: tensor {name}: shape {json.dumps(shape)} is not a list of whole numbers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise PipelineError(f"{path}: tensor {name}: data_offsets {json.dumps(offsets)} are not "
                                "[begin, end] with 0 <= begin <= end")
        (b, e), shape = offsets, tuple(shape)
        if e - b != math.prod(shape) * ST_DTYPE_SIZE[dtype]:
            raise PipelineError(f"{path}: tensor {name}: {e - b} bytes do not hold {dtype}{list(shape)}")
        if start + e > size:
            raise PipelineError(f"{path}: truncated: tensor {name} ends at byte {start + e}, file has {size}")
        tensors[name] = TensorRef(name, path, dtype, shape, start + b, e - b)
    spans = sorted((t.offset, t.offset + t.length, t.name) for t in tensors.values() if t.length)
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise PipelineError(f"{path}: tensors {a} and {b} overlap in the data (data_offsets)")
    return tensors


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_hf_checkpoint(folder: Path) -> tuple[dict, dict[str, TensorRef]]:
    """config.json and every tensor of an HF checkpoint (sharded with an index, or one model.safetensors)."""
    config = read_config(folder)
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise PipelineError(f"{index_path}: not a safetensors index (no weight_map)") from None
        for shard in shards:
            inside(folder, shard, f"{index_path}: weight_map")
    else:
        weight_map, shards = None, ["model.safetensors"]
    tensors = {}
    for shard in shards:
        path = folder / shard
        if not path.exists():
            raise PipelineError(f"{index_path}: names shard {shard}, which is missing from {folder}")
        tensors.update(read_safetensors_header(path))
    if weight_map is not None:
        for name, shard in weight_map.items():
            ref = tensors.get(name)
            if ref is None or ref.file.name != shard:
                raise PipelineError(f"{index_path}: tensor {name} is not in {shard}")
    return config, tensors


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


# -- GGUF ---------------------------------------------------------------------------------------------------------

SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def gguf_sets(paths: list[Path]) -> dict[str, list[Path]]:
    """Group .gguf files into models: a split set NAME-0000k-of-0000N.gguf, or one single file."""
    sets: dict[str, list[Path]] = {}
    for p in sorted(paths):
        m = SPLIT_RE.match(p.name)
        key = f"{m['stem']}-*-of-{m['count']}.gguf" if m else p.name   # a single file and a split set of one
        sets.setdefault(key, []).append(p)                              # model are two models to choose from
    return sets


def check_split_set(files: list[Path]) -> None:
    """Every part of NAME-0000k-of-0000N.gguf present, and the counts agree."""
    m = SPLIT_RE.match(files[0].name)
    if not m:
        if len(files) > 1:
            raise PipelineError(f"{files[0].parent}: several GGUF files with one name: {[f.name for f in files]}")
        return
    count = int(m["count"])
    have = {int(SPLIT_RE.match(f.name)["no"]) for f in files if SPLIT_RE.match(f.name)["count"] == m["count"]}
    if len(have) != len(files):
        raise PipelineError(f"{files[0].parent}: split set {m['stem']} mixes part counts: {[f.name for f in files]}")
    missing = sorted(set(range(1, count + 1)) - have)
    if missing:
        names = ", ".join(f"{m['stem']}-{k:05d}-of-{count:05d}.gguf" for k in missing)
        raise PipelineError(f"{files[0].parent}: split set incomplete: missing {names}")


@dataclass
class GGUFModel:
    files: list[Path]
    meta: dict                     # scalar metadata of the first file; arrays as their length
    tensors: dict[str, TensorRef]


def _field_value(field):
    from gguf import GGUFValueType
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return len(field.data)
    return field.contents()


def _gguf_damage(path: Path) -> str | None:
    """Why GGUFReader refused a file whose header and tensor table are whole: the first tensor that is cut short or
    has an unknown type. None if the header or tensor table itself is damaged."""
    from gguf import GGUFReader
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    class TableOnly(GGUFReader):            # parses metadata + tensor table, maps no tensor data
        def _build_tensors(self, start_offs, fields):
            self.table = (start_offs, fields)
    try:
        start, fields = TableOnly(path).table
        size = path.stat().st_size
        for f in fields:
            _, name, _, dims, qtype, offset = f.parts
            name = bytes(name).decode(errors="replace")
            if int(qtype[0]) not in {int(t) for t in GGML_QUANT_SIZES}:
                return f"{path}: tensor {name}: unknown GGML type id {int(qtype[0])}"
            block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(int(qtype[0]))]
            end = start + int(offset[0]) + math.prod(int(d) for d in dims) // block * nbytes
            if end > size:
                return f"{path}: truncated: tensor {name} ends at byte {end}, file has {size}"
    except Exception:                       # only used to word an error message: the caller has a fallback
        return None
    return None


def read_gguf(files: list[Path]) -> GGUFModel:
    from gguf import GGUFReader
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    meta, tensors = {}, {}
    for no, path in enumerate(files):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            hint = " (this looks like a safetensors file)" if path.suffix == ".safetensors" else ""
            raise PipelineError(f"{path}: not a GGUF file{hint}")
        try:
            reader = GGUFReader(path)
        except (ValueError, IndexError, struct.error, OSError) as e:
            raise PipelineError(_gguf_damage(path) or f"{path}: not a valid GGUF file, or truncated inside its "
                                f"metadata or tensor table ({str(e).splitlines()[0]})") from None
        fields = {k: _field_value(f) for k, f in reader.fields.items()}
        if no == 0:
            meta = fields
        if len(files) > 1:
            if fields.get("split.count") != len(files) or fields.get("split.no") != no:
                raise PipelineError(f"{path}: split metadata says part {fields.get('split.no')} of "
                                    f"{fields.get('split.count')}, expected part {no} of {len(files)}")
        size = path.stat().st_size
        for t in reader.tensors:
            try:
                qtype = GGMLQuantizationType(int(t.tensor_type))
            except ValueError:
                raise PipelineError(f"{path}: tensor {t.name}: unknown GGML type id {int(t.tensor_type)}") from None
            shape = tuple(int(x) for x in reversed(t.shape))
            block, nbytes = GGML_QUANT_SIZES[qtype]
            length = math.prod(shape) // block * nbytes
            offset = int(t.data_offset)
            if offset + length > size:
                raise PipelineError(f"{path}: truncated: tensor {t.name} ends at byte {offset + length}, "
                                    f"file has {size}")
            if t.name in tensors:
                raise PipelineError(f"{path}: tensor {t.name} appears twice in the split set")
            tensors[t.name] = TensorRef(t.name, path, qtype.name, shape, offset, length, ggml_type=int(qtype))
        del reader
    if len(files) > 1 and meta.get("split.tensors.count") not in (None, len(tensors)):
        raise PipelineError(f"{files[0]}: split set holds {len(tensors)} tensors, its metadata says "
                            f"{meta['split.tensors.count']}")
    return GGUFModel(files=files, meta=meta, tensors=tensors)
