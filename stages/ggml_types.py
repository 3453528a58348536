"""The GGML types the pipeline accepts: id, name, block size, bytes per block, and the error verify allows.

The one place for these facts: reconcile refuses a GGUF tensor whose type is not here, verify reads blocks and sets
its thresholds from here, the folder check (verify --folder) sizes a seed folder's experts from here. Block sizes
and ids are gguf-py's (the GGUF spec's own table); this module adds which types we take and how accurate each is.

An accepted type is one verify can dequantize (stages/dequant.py, or gguf.quants for the IQ types) and ggml's CPU
kernels can multiply. `own_error` is its relative RMS error against the unquantized weight, measured by
benchmarks/quant_error.py on Gaussian weights (std 0.02, 512x4096) with ggml's own quantizer (IQ types with a
uniform importance matrix). On the fixture, llama-quantize's Q4_K / Q6_K experts sit at 0.0766 / 0.0321 against
the FP8 checkpoint: hypot(own, FP8_ERROR) predicts 0.076 / 0.032, so the table transfers to real weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

FP8_ERROR = 0.0264                       # e4m3 with 128x128 block scales, same Gaussian weights
MARGIN = 2.0                             # verify passes below twice the measured error ...
CAP = 0.9                                # ... but never near the ~1.4 of two unrelated weights (IQ1 types)
FLOOR = 0.005                            # bf16 rounding of norms and routers

_OWN_ERROR = {"F32": 0.0, "F16": 0.0002, "BF16": 0.0017, "Q8_0": 0.0054, "Q6_K": 0.0178, "Q5_K": 0.0361,
              "Q5_1": 0.0378, "Q5_0": 0.0427, "Q4_K": 0.0713, "IQ4_NL": 0.0761, "IQ4_XS": 0.0767, "Q4_1": 0.0782,
              "Q4_0": 0.0860, "Q3_K": 0.1510, "IQ3_S": 0.1660, "IQ3_XXS": 0.2131, "IQ2_S": 0.2648, "Q2_K": 0.2966,
              "IQ2_XS": 0.2997, "IQ2_XXS": 0.3438, "IQ1_S": 0.4856, "IQ1_M": 0.5821}


@dataclass(frozen=True)
class GGMLType:
    id: int                  # GGML type id, as in GGUF tensor tables and a seed folder's `.ggml_type` (Q4_K = 12)
    name: str                # "Q4_K"
    block: int               # values per block
    type_size: int           # bytes per block
    own_error: float         # rel. RMS error against the unquantized weight

    def nbytes(self, shape) -> int:
        """Bytes of a tensor of numpy-order `shape` (rows of shape[-1] values, whole blocks)."""
        if shape[-1] % self.block:
            raise ValueError(f"a row of {shape[-1]} values is not a whole number of {self.name} blocks "
                             f"({self.block})")
        return math.prod(shape) // self.block * self.type_size

    def row_bytes(self, cols: int) -> int:
        return self.nbytes((cols,))

    def threshold(self, fp8_side: bool) -> float:
        """verify's pass mark for the rel. error against the other source (FP8 checkpoint when fp8_side)."""
        return min(CAP, MARGIN * math.hypot(max(self.own_error, FLOOR), FP8_ERROR if fp8_side else 0.0))


TYPES: dict[str, GGMLType] = {
    name: GGMLType(int(GGMLQuantizationType[name]), name, *GGML_QUANT_SIZES[GGMLQuantizationType[name]], err)
    for name, err in _OWN_ERROR.items()}
BY_ID: dict[int, GGMLType] = {t.id: t for t in TYPES.values()}


def get(t: int | str) -> GGMLType:
    """The accepted type with this id or name; KeyError (naming it) if the pipeline does not take it."""
    found = BY_ID.get(t) if isinstance(t, int) else TYPES.get(t)
    if found is None:
        raise KeyError(f"GGML type {t} is not one the pipeline accepts ({', '.join(sorted(TYPES))})")
    return found


def accepted(t: int | str) -> bool:
    return (t in BY_ID) if isinstance(t, int) else (t in TYPES)


def name_of(type_id: int) -> str:
    """Any GGML type id's name (accepted or not), for messages; 'id N' if gguf-py does not know it."""
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"id {type_id}"


def threshold(t: int | str, fp8_side: bool) -> float:
    return get(t).threshold(fp8_side)


def thresholds_fingerprint() -> list:
    """What verify's verdicts depend on: a change here makes a done verify stale."""
    return [_OWN_ERROR, FP8_ERROR, MARGIN, CAP, FLOOR]
