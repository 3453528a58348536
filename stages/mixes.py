"""llama.cpp's k-quant mixes for the routed experts: which GGML type each expert matrix gets under `gguf: {quantize:}`.

Facts from llama.cpp's `src/llama-quant.cpp` (llama_tensor_get_type_impl, tensor_type_fallback), for the tensors
named `ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps`, with no importance matrix and no overrides:
- every mix starts from its default type (Q3_K_M: Q3_K, Q4_K_S / Q4_K_M: Q4_K, Q5_K_M: Q5_K, Q6_K, Q8_0);
- gate and up keep it (only IQ3_XS changes them);
- down, by the layer index i of n layers (the GGUF's block_count: DeepSeek-V3's 61, MTP not counted; integer
  division as in C): Q3_K_M -> Q5_K if i < n/16 else Q4_K; Q4_K_M and Q5_K_M -> Q6_K where use_more_bits(i, n);
  Q4_K_S -> Q5_K if i < n/8; Q6_K and Q8_0 keep the default;
- a row whose length is not a whole number of the type's blocks falls back: Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0. (Q3_K's fallback changed between llama.cpp versions, so such a shape is refused here.)
The fixture's GGUF (llama-quantize Q4_K_M, 4 layers) shows the down rule: Q4_K in layer 1, Q6_K in layers 2 and 3.
"""
from __future__ import annotations

from . import ggml_types

DEFAULT = {"Q3_K_M": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q8_0": "Q8_0"}
MIXES = tuple(DEFAULT)
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
PROJECTIONS = ("gate", "up", "down")


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_type(mix: str, proj: str, layer: int, n_layers: int) -> str:
    """The type llama-quantize gives routed-expert matrix `proj` (gate / up / down) of `layer` under `mix`."""
    t = DEFAULT[mix]
    if proj != "down":
        return t
    if mix == "Q3_K_M":
        return "Q5_K" if layer < n_layers // 16 else "Q4_K"
    if mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
        return "Q6_K"
    if mix == "Q4_K_S" and layer < n_layers // 8:
        return "Q5_K"
    return t


def expert_type(mix: str, proj: str, layer: int, n_layers: int, row: int) -> str:
    """mix_type, then llama.cpp's fallback for a row of `row` values that is not a whole number of blocks.
    ValueError (phrased for the user) when there is no fallback we can reproduce."""
    t = mix_type(mix, proj, layer, n_layers)
    block = ggml_types.get(t).block
    if row % block == 0:
        return t
    fallback = FALLBACK.get(t)
    if fallback is None or row % ggml_types.get(fallback).block:
        raise ValueError(f"rows of {row} values are not a whole number of {t} blocks ({block}) and llama.cpp's "
                         f"fallback for it cannot be reproduced here; pick another mix")
    return fallback
