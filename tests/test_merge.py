"""The merged folder from the fixture: every byte where it should be, loadable by safetensors and the seed system."""
import json
import math

import pytest
import torch
from gguf import GGUFReader
from safetensors import safe_open

from helpers import FP8, GGUF_ONE, GGUF_SPLIT, final_files, pipeline, write_manifest


def checkpoint_bytes(name: str) -> bytes:
    index = json.loads((FP8 / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(FP8 / index[name], "pt") as f:
        return f.get_tensor(name).contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module", params=["single", "split"])
def merged(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    gguf_dir = GGUF_ONE if request.param == "single" else GGUF_SPLIT
    m = write_manifest(tmp / "m.yaml", gguf=gguf_dir)
    pipeline("run", "--manifest", m, "--out", tmp / "out")
    readers = [GGUFReader(p) for p in sorted(gguf_dir.glob("*.gguf"))]
    return tmp / "out", {t.name: t for r in readers for t in r.tensors}


def test_every_tensor_has_the_source_bytes(merged):
    out, gguf_tensors = merged
    manifest = json.loads((out / "manifest.json").read_text())
    seen_sides = set()
    for name, e in manifest["tensors"].items():
        with open(out / e["shard"], "rb") as f:
            f.seek(e["offsets"][0])
            data = f.read(e["offsets"][1] - e["offsets"][0])
        src = e["source"]
        seen_sides.add(src["side"])
        if src["side"] == "gguf":
            assert data == gguf_tensors[src["name"]].data.tobytes(), name
            assert e["ggml_type"] == gguf_tensors[src["name"]].tensor_type.name
        elif src["side"] == "fp8":
            names = src["name"] if isinstance(src["name"], list) else [src["name"]]
            assert data == b"".join(checkpoint_bytes(n) for n in names), name
        else:
            assert int.from_bytes(data, "little") == src["value"]
    assert seen_sides == {"gguf", "fp8", "value"}


def test_loads_with_safetensors_and_index_is_complete(merged):
    out, _ = merged
    index = json.loads((out / "model.safetensors.index.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(index["weight_map"]) == set(manifest["tensors"])
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(out / shard, "pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == shard
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
                assert list(t.shape) == manifest["tensors"][k]["shape"]
    assert total == index["metadata"]["total_size"]
    assert {p.name for p in out.glob("*.json")} >= {"config.json", "generation_config.json", "tokenizer_config.json",
                                                    "manifest.json", "model.safetensors.index.json"}
    assert (out / "tokenizer.json").read_bytes() == (FP8 / "tokenizer.json").read_bytes()


def test_layout_follows_the_seed_system_convention(merged):
    """What the seed system's loader needs: GGUF-style keys, FP8 + weight_scale_inv, U8 experts + 0-dim I64 type."""
    out, _ = merged
    cfg = json.loads((out / "config.json").read_text())
    tensors = {}
    for shard in out.glob("*.safetensors"):          # the seed loader scans every .safetensors file
        with safe_open(shard, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    L, E = cfg["num_hidden_layers"], cfg["n_routed_experts"]
    assert not any(k.startswith("model.") for k in tensors)
    assert not any(k.startswith(f"blk.{L}.") for k in tensors), "MTP layer must be skipped by default"
    for i in range(L):
        w, s = tensors[f"blk.{i}.attn_kv_b.weight"], tensors[f"blk.{i}.attn_kv_b.weight_scale_inv"]
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        assert list(s.shape) == [math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128)]
        if i < cfg["first_k_dense_replace"]:
            assert f"blk.{i}.ffn_up.weight_scale_inv" in tensors
            continue
        for proj in ("gate", "up", "down"):
            raw, kind = tensors[f"blk.{i}.ffn_{proj}_exps.weight"], tensors[f"blk.{i}.ffn_{proj}_exps.ggml_type"]
            assert raw.dtype == torch.uint8 and raw.dim() == 1
            assert kind.dtype == torch.int64 and kind.dim() == 0 and int(kind) in (12, 14)   # Q4_K / Q6_K
            assert raw.numel() % E == 0
        assert tensors[f"blk.{i}.exp_probs_b.bias"].dtype == torch.float32
        assert tensors[f"blk.{i}.ffn_gate_inp.weight"].dtype == torch.bfloat16


def test_large_tensors_are_64_byte_aligned(merged):
    out, _ = merged
    manifest = json.loads((out / "manifest.json").read_text())
    for name, e in manifest["tensors"].items():
        b, end = e["offsets"]
        if (end - b) % 64 == 0:
            assert b % 64 == 0, name


def test_single_and_split_gguf_give_identical_shards(tmp_path):
    outs = []
    for gguf_dir in (GGUF_ONE, GGUF_SPLIT):
        out = tmp_path / gguf_dir.name
        pipeline("run", "--manifest", write_manifest(tmp_path / f"{gguf_dir.name}.yaml", gguf=gguf_dir), "--out", out)
        outs.append({k: v for k, v in final_files(out).items() if k.endswith(".safetensors")})
    assert outs[0] == outs[1] and len(outs[0]) == 5


def test_keep_mtp_adds_the_mtp_layer_from_the_checkpoint(tmp_path):
    out = tmp_path / "out"
    pipeline("run", "--manifest", write_manifest(tmp_path / "m.yaml"), "--out", out, "--keep-mtp")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == []
    exps = manifest["tensors"]["blk.4.ffn_up_exps.weight"]
    assert exps["dtype"] == "F8_E4M3" and exps["shape"] == [16, 256, 256]
    assert manifest["tensors"]["blk.4.ffn_up_exps.weight_scale_inv"]["shape"] == [16, 2, 2]
    with safe_open(out / exps["shard"], "pt") as f:
        stacked = f.get_tensor("blk.4.ffn_up_exps.weight")
    for e in (0, 7, 15):
        one = checkpoint_bytes(f"model.layers.4.mlp.experts.{e}.up_proj.weight")
        assert stacked[e].contiguous().view(torch.uint8).numpy().tobytes() == one
    assert "blk.4.nextn.eh_proj.weight" in manifest["tensors"]
