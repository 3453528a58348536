"""DeepSeek-V3 tensor names on both sides (HF checkpoint and llama.cpp GGUF) and their shapes from config.json.

One `Weight` per logical weight of the model. `out` is the merged name (the seed system's GGUF-style key),
`hf` the checkpoint name(s), `gguf` the twin(s) in a llama.cpp GGUF. Shapes are numpy/HF order (out, in).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

LAYOUT_SPLIT_KB = "attn_k_b+attn_v_b"      # llama.cpp since April 2025 (key_length_mla present)
LAYOUT_KV_B = "attn_kv_b"                  # older GGUFs


@dataclass
class Weight:
    out: str                   # merged key, e.g. blk.3.attn_q_a.weight
    hf: list[str]              # HF names; several for stacked routed experts (one per expert)
    shape: tuple               # logical shape (stacked experts: (E, out, in))
    source: str                # "fp8" or "gguf": where the merged bytes come from
    gguf: dict = field(default_factory=dict)   # GGUF twin name -> expected numpy shape
    linear: bool = False       # an FP8 linear: has weight_scale_inv in the checkpoint
    layer: int | None = None


def mtp_layers(cfg: dict) -> range:
    n = cfg["num_hidden_layers"]
    return range(n, n + int(cfg.get("num_nextn_predict_layers", 0) or 0))


# The HF <-> GGUF name map (llama.cpp's deepseek2 names), the one copy in the project. Non-layer tensors:
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
# Within a layer: `model.layers.N.<hf>` <-> `blk.N.<gguf>`.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight", "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight", "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight", "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
# Routed experts: `mlp.experts.E.<proj>.weight` for every E <-> one stacked `blk.N.<gguf>.weight`.
EXPERT_NAMES = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
# The llama.cpp split of kv_b_proj in GGUFs since April 2025 (see LAYOUT_SPLIT_KB).
KV_B_SPLIT = ("attn_k_b.weight", "attn_v_b.weight")
# MTP layer extras (llama.cpp drops the layer; these are its `nextn.` names).
NEXTN_NAMES = {
    "enorm.weight": "nextn.enorm.weight", "hnorm.weight": "nextn.hnorm.weight",
    "eh_proj.weight": "nextn.eh_proj.weight", "embed_tokens.weight": "nextn.embed_tokens.weight",
    "shared_head.norm.weight": "nextn.shared_head_norm.weight",
    "shared_head.head.weight": "nextn.shared_head_head.weight",
}
HF_TO_GGUF_SUFFIX = {**LAYER_NAMES, **NEXTN_NAMES}


def expected_weights(cfg: dict, layout: str) -> list[Weight]:
    """Every weight of the main model (MTP layers excluded), in merged-file order."""
    H, V, nh = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    qr, kvr = cfg.get("q_lora_rank"), cfg["kv_lora_rank"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    E, Im = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    Ish = Im * cfg.get("n_shared_experts", 1)
    w: list[Weight] = []

    def add(out, hf, shape, source="fp8", linear=False, layer=None, twins=None):
        twins = twins or {out: shape}     # by default the GGUF twin has the merged name and the same shape
        w.append(Weight(out, [hf] if isinstance(hf, str) else hf, shape, source, twins, linear, layer))

    add(GLOBAL_NAMES["model.embed_tokens.weight"], "model.embed_tokens.weight", (V, H))
    add(GLOBAL_NAMES["model.norm.weight"], "model.norm.weight", (H,))
    add(GLOBAL_NAMES["lm_head.weight"], "lm_head.weight", (V, H))
    for i in range(cfg["num_hidden_layers"]):
        b, m = f"blk.{i}.", f"model.layers.{i}."

        def lay(hf, shape, **kw):
            add(b + LAYER_NAMES[hf], m + hf, shape, layer=i, **kw)

        lay("input_layernorm.weight", (H,))
        if qr:
            lay("self_attn.q_a_proj.weight", (qr, H), linear=True)
            lay("self_attn.q_a_layernorm.weight", (qr,))
            lay("self_attn.q_b_proj.weight", (nh * (dn + dr), qr), linear=True)
        else:
            lay("self_attn.q_proj.weight", (nh * (dn + dr), H), linear=True)
        lay("self_attn.kv_a_proj_with_mqa.weight", (kvr + dr, H), linear=True)
        lay("self_attn.kv_a_layernorm.weight", (kvr,))
        k_b, v_b = (b + n for n in KV_B_SPLIT)
        kv_b_twins = ({k_b: (nh, kvr, dn), v_b: (nh, dv, kvr)} if layout == LAYOUT_SPLIT_KB
                      else {b + LAYER_NAMES["self_attn.kv_b_proj.weight"]: (nh * (dn + dv), kvr)})
        lay("self_attn.kv_b_proj.weight", (nh * (dn + dv), kvr), linear=True, twins=kv_b_twins)
        lay("self_attn.o_proj.weight", (H, nh * dv), linear=True)
        lay("post_attention_layernorm.weight", (H,))
        if i < cfg.get("first_k_dense_replace", 0):
            I = cfg["intermediate_size"]
            lay("mlp.gate_proj.weight", (I, H), linear=True)
            lay("mlp.up_proj.weight", (I, H), linear=True)
            lay("mlp.down_proj.weight", (H, I), linear=True)
            continue
        lay("mlp.gate.weight", (E, H))
        lay("mlp.gate.e_score_correction_bias", (E,))
        lay("mlp.shared_experts.gate_proj.weight", (Ish, H), linear=True)
        lay("mlp.shared_experts.up_proj.weight", (Ish, H), linear=True)
        lay("mlp.shared_experts.down_proj.weight", (H, Ish), linear=True)
        for proj, shape in (("gate_proj", (Im, H)), ("up_proj", (Im, H)), ("down_proj", (H, Im))):
            add(b + EXPERT_NAMES[proj] + ".weight", [f"{m}mlp.experts.{e}.{proj}.weight" for e in range(E)],
                (E, *shape), source="gguf", layer=i)
    return w


# config.json keys the pipeline computes with, and their JSON types: a wrong type (`"num_experts_per_tok": "4"`) is
# refused up front instead of merging, verifying and then failing in the runtime.
_POS_INT = "a positive whole number"
CONFIG_TYPES = {
    "hidden_size": _POS_INT, "num_hidden_layers": _POS_INT, "num_attention_heads": _POS_INT,
    "kv_lora_rank": _POS_INT, "qk_nope_head_dim": _POS_INT, "qk_rope_head_dim": _POS_INT, "v_head_dim": _POS_INT,
    "n_routed_experts": _POS_INT, "moe_intermediate_size": _POS_INT, "intermediate_size": _POS_INT,
    "vocab_size": _POS_INT, "num_experts_per_tok": _POS_INT, "first_k_dense_replace": "a whole number",
    "n_shared_experts": _POS_INT, "n_group": _POS_INT, "topk_group": _POS_INT,
    "q_lora_rank": "a positive whole number or null",
    "num_nextn_predict_layers": "a whole number", "max_position_embeddings": _POS_INT,
    "routed_scaling_factor": "a number", "rms_norm_eps": "a number", "rope_theta": "a number",
    "bos_token_id": "a whole number", "eos_token_id": "a whole number", "rope_scaling": "a mapping or null",
}
REQUIRED_CONFIG = ["hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                   "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "moe_intermediate_size", "intermediate_size",
                   "vocab_size", "num_experts_per_tok"]


def _config_value_ok(kind: str, v) -> bool:
    is_int = isinstance(v, int) and not isinstance(v, bool)
    if kind == _POS_INT:
        return is_int and v > 0
    if kind == "a whole number":
        return is_int and v >= 0
    if kind == "a positive whole number or null":
        return v is None or (is_int and v > 0)
    if kind == "a number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return v is None or isinstance(v, dict)


def config_problems(cfg, where: str) -> list[str]:
    """One line per config.json value the pipeline cannot compute with (missing, or of the wrong type)."""
    if not isinstance(cfg, dict):
        return [f"{where}: not a JSON object"]
    missing = [k for k in REQUIRED_CONFIG if k not in cfg]
    problems = [f"{where}: missing {', '.join(missing)}"] if missing else []
    for k, kind in CONFIG_TYPES.items():
        if k in cfg and not _config_value_ok(kind, cfg[k]):
            problems.append(f"{where}: {k} is {json.dumps(cfg[k])}, must be {kind}")
    return problems
