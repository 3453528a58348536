"""Shared test helpers.

`rewrite_gguf` makes a modified copy of a GGUF file (metadata and/or tensors edited) with gguf's own reader and
writer, so tests can build "a GGUF of a different model" from the real fixture without hand-packing bytes.
Import it from a test module with `from conftest import rewrite_gguf`.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "examples" / "tiny-deepseek-v3"
if not torch.cuda.is_available():      # runtime.fp8's Triton kernels run on Triton's CPU interpreter (before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")
if str(REPO) not in sys.path:          # so tests can `import stages` under plain `pytest` too (not only python -m)
    sys.path.insert(0, str(REPO))

_UNQUANTIZED = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.F64,
                GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32,
                GGMLQuantizationType.I64}


@dataclasses.dataclass
class KV:
    """One metadata field: its value (python scalar, str, or list for arrays), its type, and an array's item type."""
    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None


@dataclasses.dataclass
class GTensor:
    """One tensor as the writer wants it.

    `data` is what GGUFReader hands out: for quantized types (and BF16) a uint8 array whose numpy shape is the
    *byte* shape (last axis = bytes per row); for F32/F16/integer types an array of that dtype. `shape` is the
    logical numpy-order shape (GGUF `ne` reversed), given for information; `raw_shape` is what goes to
    `GGUFWriter.add_tensor`: None means `data.shape` (the writer turns a uint8 byte shape into the element shape
    with `quant_shape_from_byte_shape`), so to change a quantized tensor's shape, give `data` of the new *byte*
    shape (see `quant_bytes`).
    """
    name: str
    data: np.ndarray
    raw_dtype: GGMLQuantizationType | int   # an int not in the enum writes an unknown type id (data as-is)
    shape: tuple
    raw_shape: tuple | None = None


def quant_bytes(ggml_type: GGMLQuantizationType, shape, fill: int = 0) -> np.ndarray:
    """A uint8 array of the right byte shape for a `ggml_type` tensor of numpy-order `shape` (filled with `fill`)."""
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    *lead, row = shape
    assert row % block == 0, f"row of {row} values is not a whole number of {ggml_type.name} blocks ({block})"
    return np.full((*lead, row // block * nbytes), fill, dtype=np.uint8)


def _infer_kv(value) -> KV:
    if isinstance(value, bool):
        return KV(value, GGUFValueType.BOOL)
    if isinstance(value, int):
        return KV(value, GGUFValueType.UINT32)
    if isinstance(value, float):
        return KV(value, GGUFValueType.FLOAT32)
    if isinstance(value, str):
        return KV(value, GGUFValueType.STRING)
    if isinstance(value, (list, tuple)) and value:
        return KV(list(value), GGUFValueType.ARRAY, _infer_kv(value[0]).type)
    raise TypeError(f"cannot infer a GGUF type for {value!r}: pass a KV")


def read_gguf_fields(reader: GGUFReader) -> tuple[str, dict[str, KV]]:
    """(architecture, metadata without the GGUF.* virtual fields and general.architecture)."""
    arch, kv = None, {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if key == "general.architecture":
            arch = f.contents()
            continue
        main = GGUFValueType(f.types[0])
        sub = GGUFValueType(f.types[-1]) if main == GGUFValueType.ARRAY else None
        kv[key] = KV(f.contents(), main, sub)
    return arch, kv


def rewrite_gguf(src, dst, edit_kv: dict | Callable | None = None, edit_tensors: dict | Callable | None = None,
                 arch: str | None = None) -> Path:
    """Write `dst`, a copy of GGUF file `src` with its metadata and tensors edited; returns `dst`.

    edit_kv:      a dict {key: new value | KV(value, type[, sub_type]) | None to delete}, or a callable taking the
                  dict {key: KV} and returning the dict to write. A plain new value keeps the field's existing
                  type (a new key gets one inferred: int -> UINT32, float -> FLOAT32, str, bool, list -> ARRAY).
    edit_tensors: a dict {name: None to drop | GTensor | callable(GTensor) -> GTensor or None}, or a callable
                  taking the list of GTensor (file order) and returning the list to write.
    arch:         the new `general.architecture` (default: src's). Metadata keys under the old arch prefix
                  (`deepseek2.*`) are renamed to the new one, as a real GGUF of that architecture would have them.
    """
    src, dst = Path(src), Path(dst)
    reader = GGUFReader(src)
    old_arch, kv = read_gguf_fields(reader)
    arch = arch or old_arch
    if arch != old_arch:
        kv = {(arch + k[len(old_arch):] if k.startswith(old_arch + ".") else k): v for k, v in kv.items()}

    if callable(edit_kv):
        kv = edit_kv(kv)
    elif edit_kv:
        for key, value in edit_kv.items():
            if value is None:
                kv.pop(key, None)
            elif isinstance(value, KV):
                kv[key] = value
            elif key in kv:
                kv[key] = KV(value, kv[key].type, kv[key].sub_type)
            else:
                kv[key] = _infer_kv(value)

    tensors = [GTensor(t.name, t.data, GGMLQuantizationType(int(t.tensor_type)),
                       tuple(int(x) for x in reversed(t.shape))) for t in reader.tensors]
    if callable(edit_tensors):
        tensors = list(edit_tensors(tensors))
    elif edit_tensors:
        unknown = set(edit_tensors) - {t.name for t in tensors}
        if unknown:
            raise KeyError(f"rewrite_gguf: no tensor {sorted(unknown)} in {src}")
        edited = []
        for t in tensors:
            if t.name not in edit_tensors:
                edited.append(t)
                continue
            e = edit_tensors[t.name]
            e = e(t) if callable(e) else e
            if e is not None:
                edited.append(e)
        tensors = edited

    dst.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(dst, arch)
    if "general.alignment" in kv:
        writer.data_alignment = int(kv["general.alignment"].value)
    for key, v in kv.items():
        writer.add_key_value(key, v.value, v.type, sub_type=v.sub_type)
    for t in tensors:
        data = t.data
        if isinstance(t.raw_dtype, GGMLQuantizationType) and t.raw_dtype not in _UNQUANTIZED \
                and data.dtype != np.uint8:
            data = np.ascontiguousarray(data).view(np.uint8)
        writer.add_tensor(t.name, data, raw_shape=t.raw_shape, raw_dtype=t.raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    del reader
    return dst
