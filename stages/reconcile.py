"""reconcile: match every HF tensor with its GGUF twin, check both sources describe the same model, write a plan.

Reads only metadata (safetensors headers, GGUF tensor tables). Every disagreement is collected and reported as one
line each; if there is any, nothing is written. The plan names, for every merged tensor, the exact byte ranges to
copy: routed experts from the GGUF, everything else from the FP8 checkpoint.
"""
from __future__ import annotations

import math
from pathlib import Path

from . import ggml_types
from .dag import Context, Result, Stage
from .errors import PipelineError
from .formats import TensorRef, read_gguf, read_hf_checkpoint
from .fsio import write_json
from .names import (EXPERT_NAMES, HF_TO_GGUF_SUFFIX, LAYOUT_KV_B, LAYOUT_SPLIT_KB, config_problems, expected_weights,
                    mtp_layers)

VERSION = 1
RESULT = ".pipeline/plan.json"
BLOCK = 128                      # DeepSeek FP8 weight_block_size
MAX_LINES = 40

# config.json key -> GGUF metadata key (under `deepseek2.`). Optional ones are absent from older GGUFs.
META_CHECKS = [
    ("num_hidden_layers", "block_count", True), ("hidden_size", "embedding_length", True),
    ("intermediate_size", "feed_forward_length", True), ("moe_intermediate_size", "expert_feed_forward_length", True),
    ("n_routed_experts", "expert_count", True), ("num_experts_per_tok", "expert_used_count", True),
    ("n_shared_experts", "expert_shared_count", True), ("first_k_dense_replace", "leading_dense_block_count", True),
    ("num_attention_heads", "attention.head_count", True), ("q_lora_rank", "attention.q_lora_rank", False),
    ("kv_lora_rank", "attention.kv_lora_rank", True), ("qk_rope_head_dim", "rope.dimension_count", True),
    ("n_group", "expert_group_count", False), ("topk_group", "expert_group_used_count", False),
    ("routed_scaling_factor", "expert_weights_scale", False), ("vocab_size", "vocab_size", False),
    ("rope_theta", "rope.freq_base", False), ("rms_norm_eps", "attention.layer_norm_rms_epsilon", False),
    ("max_position_embeddings", "context_length", False),
    ("rope_scaling.factor", "rope.scaling.factor", False),
    ("rope_scaling.original_max_position_embeddings", "rope.scaling.original_context_length", False),
    ("rope_scaling.beta_fast", "rope.scaling.yarn_beta_fast", False),
    ("rope_scaling.beta_slow", "rope.scaling.yarn_beta_slow", False),
]
CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
               "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "moe_intermediate_size", "intermediate_size",
               "vocab_size", "num_experts_per_tok"]


def gguf_layout(meta: dict) -> str:
    return LAYOUT_SPLIT_KB if "deepseek2.attention.key_length_mla" in meta else LAYOUT_KV_B


def _dotted(cfg: dict, key: str):
    """cfg["rope_scaling"]["factor"] for "rope_scaling.factor"; None if any part is absent."""
    for part in key.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def _same_number(have, want) -> bool:
    ok = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)     # noqa: E731
    return ok(have) and ok(want) and math.isclose(float(have), float(want), rel_tol=1e-6)


def check_config(cfg: dict, meta: dict, cfg_path: str, gguf_path: str) -> list[str]:
    problems = []
    arch = meta.get("general.architecture")
    if arch != "deepseek2":
        return [f"{gguf_path}: architecture '{arch}', expected 'deepseek2' (DeepSeek-V3/R1)"]
    if cfg.get("model_type") not in ("deepseek_v3",):
        return [f"{cfg_path}: model_type '{cfg.get('model_type')}', expected 'deepseek_v3'"]
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        return [f"{cfg_path}: missing {', '.join(missing)}"]
    meta = dict(meta)
    if "deepseek2.vocab_size" not in meta and "tokenizer.ggml.tokens" in meta:
        meta["deepseek2.vocab_size"] = meta["tokenizer.ggml.tokens"]
    wants = [(c, g, req, _dotted(cfg, c)) for c, g, req in META_CHECKS]
    nope, rope, v, kvr = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    if gguf_layout(meta) == LAYOUT_SPLIT_KB:
        wants += [("qk_nope_head_dim+qk_rope_head_dim", "attention.key_length_mla", True, nope + rope),
                  ("v_head_dim", "attention.value_length_mla", True, v),
                  ("kv_lora_rank+qk_rope_head_dim", "attention.key_length", True, kvr + rope),
                  ("kv_lora_rank", "attention.value_length", True, kvr)]
    else:
        wants += [("qk_nope_head_dim+qk_rope_head_dim", "attention.key_length", True, nope + rope),
                  ("v_head_dim", "attention.value_length", True, v)]
    for ckey, gkey, required, want in wants:
        have = meta.get("deepseek2." + gkey)
        if have is None:
            if required:
                problems.append(f"{gguf_path}: metadata deepseek2.{gkey} missing (config {ckey} = {want})")
            continue
        if not _same_number(have, want):
            problems.append(f"config mismatch: {cfg_path} {ckey} = {want}, {gguf_path} deepseek2.{gkey} = {have}")
    return problems


def check_fp8(name: str, shape: tuple, linear: bool, hf: dict[str, TensorRef], problems: list[str]) -> None:
    ref = hf.get(name)
    if ref is None:
        problems.append(f"checkpoint: tensor {name} is missing")
        return
    if ref.shape != tuple(shape):
        problems.append(f"{ref.file}: tensor {name} has shape {list(ref.shape)}, config says {list(shape)}")
        return
    if linear and ref.dtype == "F8_E4M3":
        scale = hf.get(name + "_scale_inv")
        want = [math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK)]
        if scale is None:
            problems.append(f"{ref.file}: FP8 tensor {name} has no {name}_scale_inv")
        elif list(scale.shape) != want or scale.dtype != "F32":
            problems.append(f"{scale.file}: {name}_scale_inv is {scale.dtype}{list(scale.shape)}, "
                            f"expected F32{want} for a {list(shape)} weight")


def plan_entry(name: str, dtype: str, shape, refs: list[TensorRef], side: str, roots: dict, **extra) -> dict:
    root = roots[side]
    return {"name": name, "dtype": dtype, "shape": list(shape), "side": side,
            "source_names": [r.name for r in refs],
            "segments": [[str(r.file.relative_to(root)), r.offset, r.length] for r in refs], **extra}


def fp8_entries(out: str, hf_names: list[str], hf: dict[str, TensorRef], roots: dict, **extra) -> list[dict]:
    """Weight (+ scale), stacked along a new first axis when several HF tensors form one merged tensor."""
    refs = [hf[n] for n in hf_names]
    stack = (len(refs),) if len(refs) > 1 else ()
    entries = [plan_entry(out, refs[0].dtype, stack + refs[0].shape, refs, "fp8", roots, **extra)]
    scales = [hf.get(n + "_scale_inv") for n in hf_names]
    if refs[0].dtype == "F8_E4M3" and all(scales):
        entries.append(plan_entry(out + "_scale_inv", "F32", stack + scales[0].shape, scales, "fp8", roots,
                                  layer=extra.get("layer")))
    return entries


def build_plan(fp8_root: Path, gguf_root: Path, gguf_names: list[str], keep_mtp: bool) -> dict:
    cfg_path = fp8_root / "config.json"
    cfg, hf = read_hf_checkpoint(fp8_root)
    problems = config_problems(cfg, str(cfg_path))
    if problems:
        raise PipelineError("\n".join(problems))
    gg = read_gguf([gguf_root / n for n in gguf_names])
    problems = check_config(cfg, gg.meta, str(cfg_path), str(gg.files[0]))
    if problems:
        raise PipelineError("\n".join(problems))
    layout = gguf_layout(gg.meta)
    weights = expected_weights(cfg, layout)
    roots = {"fp8": fp8_root, "gguf": gguf_root}
    gfile = {n: t.file for n, t in gg.tensors.items()}

    for w in weights:
        if w.source == "fp8":
            check_fp8(w.hf[0], w.shape, w.linear, hf, problems)
        else:
            for n in w.hf:
                check_fp8(n, w.shape[1:], True, hf, problems)
        for gname, gshape in w.gguf.items():
            t = gg.tensors.get(gname)
            if t is None:
                problems.append(f"GGUF: tensor {gname} is missing (twin of {w.hf[0]})")
            elif t.shape != tuple(gshape):
                problems.append(f"{gfile[gname]}: tensor {gname} has shape {list(t.shape)} (ne reversed), "
                                f"checkpoint {w.hf[0] if len(w.hf) == 1 else w.hf[0] + ' x' + str(len(w.hf))} "
                                f"implies {list(gshape)}")
            elif w.source == "gguf" and not ggml_types.accepted(t.dtype):
                problems.append(f"{gfile[gname]}: tensor {gname} has GGML type {t.dtype}, which is not supported "
                                f"(supported: {', '.join(sorted(ggml_types.TYPES))})")
    used_hf = {n for w in weights for n in w.hf} | {n + "_scale_inv" for w in weights for n in w.hf}
    mtp_prefixes = tuple(f"model.layers.{i}." for i in mtp_layers(cfg))
    extra_hf = sorted(n for n in hf if n not in used_hf and not n.startswith(mtp_prefixes))
    used_gg = {g for w in weights for g in w.gguf}
    extra_gg = sorted(n for n in gg.tensors if n not in used_gg)
    problems += [f"checkpoint: unexpected tensor {n} (not part of DeepSeek-V3 per config.json)" for n in extra_hf[:5]]
    problems += [f"GGUF: unexpected tensor {n} (not part of DeepSeek-V3 per its metadata)" for n in extra_gg[:5]]
    if problems:
        more = len(problems) - MAX_LINES
        raise PipelineError("\n".join(problems[:MAX_LINES] + ([f"... and {more} more problems"] if more > 0 else [])))

    tensors = []
    for w in weights:
        common = {"layer": w.layer, "logical_shape": list(w.shape), "twins": {g: list(s) for g, s in w.gguf.items()}}
        if w.source == "gguf":
            t = gg.tensors[w.out]
            tensors.append(plan_entry(w.out, "U8", [t.length], [t], "gguf", roots, ggml_type=t.dtype,
                                      ggml_type_id=t.ggml_type, fp8_names=w.hf, **common))
            tensors.append({"name": w.out.removesuffix(".weight") + ".ggml_type", "dtype": "I64", "shape": [],
                            "side": "value", "value": t.ggml_type, "layer": w.layer})
        else:
            tensors += fp8_entries(w.out, w.hf, hf, roots, **common)

    skipped = []
    for i in mtp_layers(cfg):
        prefix = f"model.layers.{i}."
        names = sorted(n for n in hf if n.startswith(prefix))
        if not keep_mtp:
            skipped.append({"names": f"{prefix}* ({len(names)} tensors)",
                            "reason": "MTP (multi-token prediction) layer: not in GGUFs, not used for decoding; "
                                      "--keep-mtp keeps it"})
            continue
        tensors += mtp_entries(i, names, hf, roots)

    shard_of = lambda layer: 0 if layer is None else layer + 1      # shard 1 holds the non-layer tensors
    n_shards = 1 + max(shard_of(t["layer"]) for t in tensors)
    shards = [[] for _ in range(n_shards)]
    for t in tensors:
        shards[shard_of(t["layer"])].append(t["name"])
    return {
        "format": "dsv3-merge-plan", "version": 1, "model_type": cfg.get("model_type"), "gguf_layout": layout,
        "sources": {"fp8": str(fp8_root), "gguf": str(gguf_root)},
        "gguf_files": gguf_names,
        "config": {k: cfg[k] for k in CONFIG_KEYS + ["first_k_dense_replace"]},
        "shards": [{"file": f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors", "tensors": names}
                   for k, names in enumerate(shards)],
        "tensors": {t["name"]: t for t in tensors},
        "skipped": skipped,
        "total_bytes": sum(s[2] for t in tensors for s in t.get("segments", [])) + 8 * sum(
            1 for t in tensors if t["side"] == "value"),
    }


def mtp_entries(i: int, names: list[str], hf: dict[str, TensorRef], roots: dict) -> list[dict]:
    """The MTP layer from the checkpoint alone (llama.cpp drops it); routed experts stacked per projection."""
    prefix, entries, experts = f"model.layers.{i}.", [], {}
    for n in names:
        rest = n[len(prefix):]
        if rest.endswith("_scale_inv"):
            continue
        if rest.startswith("mlp.experts."):
            e, proj = rest.split(".")[2], rest.split(".")[3]
            experts.setdefault(proj, {})[int(e)] = n
            continue
        out = f"blk.{i}." + HF_TO_GGUF_SUFFIX.get(rest, rest)
        entries += fp8_entries(out, [n], hf, roots, layer=i, logical_shape=list(hf[n].shape), twins={})
    for proj, by_e in sorted(experts.items()):
        gname = EXPERT_NAMES[proj]
        hf_names = [by_e[e] for e in sorted(by_e)]
        entries += fp8_entries(f"blk.{i}.{gname}.weight", hf_names, hf, roots, layer=i,
                               logical_shape=[len(hf_names), *hf[hf_names[0]].shape], twins={})
    return entries


def fingerprint(ctx: Context) -> dict:
    return {"keep_mtp": ctx.keep_mtp}


def run(ctx: Context) -> Result:
    sources = ctx.result("fetch")
    plan = build_plan(Path(sources["fp8"]["root"]), Path(sources["gguf"]["root"]), sources["gguf"]["order"],
                      ctx.keep_mtp)
    plan["source_files"] = {side: sources[side]["files"] for side in ("fp8", "gguf")}
    plan["revisions"] = {side: sources[side].get("revision") for side in ("fp8", "gguf")}
    write_json(ctx.out / RESULT, plan, ctx.out)
    n_g = sum(1 for t in plan["tensors"].values() if t["side"] == "gguf")
    return Result(result=RESULT, outputs=[RESULT],
                  summary=f"{len(plan['tensors'])} tensors in {len(plan['shards'])} shards ({n_g} from GGUF, "
                          f"layout {plan['gguf_layout']}), {plan['total_bytes'] / 1e9:.2f} GB to write")


STAGE = Stage("reconcile", needs=("fetch",), inputs="sources.json; checkpoint headers; GGUF tensor tables; keep_mtp",
              outputs=".pipeline/plan.json (every merged tensor: source file, name, byte range, dtype, shape)",
              version=VERSION, fingerprint=fingerprint, run=run)
