"""
The write stage (FP8 checkpoint + Q4_K_M GGUF -> merged safetensors shards) vs `cp` + `sync` of the same source files,
on synthetic sources with DeepSeek-V3's real per-layer shapes but only a few layers.

    python benchmarks/merge.py                      # generate (once) into /tmp/merge-bench, run, print the table
    python benchmarks/merge.py --workdir /data/mb --repeats 3 --layers 2 --dense 1
    python benchmarks/merge.py --generate-only      # just the sources (+ bench.yaml)

Sources (reused when <workdir>/.generated matches the parameters):
  <workdir>/hf-fp8/   DeepSeek's FP8 layout: `*_proj.weight` F8_E4M3 + F32 `weight_scale_inv`, norms/embeddings/lm_head/
                      router BF16, `e_score_correction_bias` F32. The routed experts (never read by the merge: they come
                      from the GGUF) sit in their own shards as sparse holes; every other shard holds random bytes.
  <workdir>/gguf/     one `deepseek2` GGUF (current attn_k_b/attn_v_b layout) with Q4_K_M's types and random, valid blocks
                      (f16 scales finite), written tensor by tensor with gguf.GGUFWriter.
Timed (median of --repeats, alternating, each after deleting outputs + `sync; echo 3 > /proc/sys/vm/drop_caches` + a
--settle pause):
  write: `python pipeline.py run --manifest <workdir>/bench.yaml --out <workdir>/out --only write --force`
         (the write stage alone; it fsyncs each shard; `--from write` would also run the stages after it)
  cp:    `cp <every source file the plan reads> <workdir>/cp-out/ && sync`
Peak RSS and CPU time are the child's rusage (os.wait4). <workdir>/cp-out is always removed at the end, <workdir>/out
unless --keep-outputs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.gguf_writer import WriterState

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny-deepseek-v3" / "hf-fp8"
AUX = ["generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
       "tokenizer.model"]
CHUNK = 32 << 20                      # generation chunk (bytes): memory stays at a few of these
ST_SIZE = {"BF16": 2, "F32": 4, "F8_E4M3": 1}
F16_AT = {Q.Q4_K: [0, 2], Q.Q6_K: [208], Q.Q5_0: [0]}     # byte offsets of each block's f16 scale fields

DSV3 = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
            num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, num_experts_per_tok=8,
            n_group=8, topk_group=4, n_shared_experts=1, routed_scaling_factor=2.5, num_nextn_predict_layers=0,
            max_position_embeddings=163840, bos_token_id=0, eos_token_id=1)


# -- random data ---------------------------------------------------------------------------------------------------

class Rand:
    """Chunks of random bytes shaped as finite values of a dtype (never zeros, never NaN/Inf)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def raw(self, nbytes: int) -> np.ndarray:
        return self.rng.bit_generator.random_raw(-(-nbytes // 8)).view(np.uint8)[:nbytes]

    def st(self, dtype: str, nbytes: int) -> np.ndarray:
        b = self.raw(nbytes)
        if dtype == "F8_E4M3":                    # S.1111.111 is NaN in e4m3fn
            nan = (b & 0x7F) == 0x7F
            b[nan] ^= 1
        elif dtype == "BF16":                     # clear the exponent's top bit: finite, |x| < 2
            b.view(np.uint16)[:] &= 0xBFFF
        elif dtype == "F32":
            b.view(np.uint32)[:] &= 0xBFFFFFFF
        return b

    def scales(self, n: int) -> np.ndarray:      # weight_scale_inv: positive, DeepSeek-like magnitudes
        return self.rng.uniform(1e-5, 1e-3, n).astype(np.float32).view(np.uint8)

    def ggml(self, qtype: Q, nbytes: int) -> np.ndarray:
        if qtype == Q.F32:
            return self.st("F32", nbytes)
        b = self.raw(nbytes)
        blocks = b.reshape(-1, GGML_QUANT_SIZES[qtype][1])
        for at in F16_AT[qtype]:                  # f16 high byte: clear the exponent's top bit -> finite, |x| < 2
            blocks[:, at + 1] &= 0xBF
        return b


def chunked(total: int, unit: int):
    step = max(unit, CHUNK // unit * unit)
    for pos in range(0, total, step):
        yield min(step, total - pos)


# -- the two sources -------------------------------------------------------------------------------------------------

def make_config(layers: int, dense: int) -> dict:
    cfg = json.loads((TINY / "config.json").read_text())
    cfg.update(DSV3, num_hidden_layers=layers, first_k_dense_replace=dense)
    return cfg


def hf_tensors(cfg: dict) -> list[tuple[str, str, tuple, str]]:
    """(name, dtype, shape, group) of DeepSeek-V3's checkpoint; group "experts.N" marks layer N's routed experts."""
    H, V, nh = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    qr, kvr, dn, dr, dv = (cfg[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                            "v_head_dim"))
    E, Im, I = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["intermediate_size"]
    Ish = Im * cfg["n_shared_experts"]
    out = []

    def lin(name, shape, group):
        out.append((name, "F8_E4M3", shape, group))
        out.append((name + "_scale_inv", "F32", (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)), group))

    out.append(("model.embed_tokens.weight", "BF16", (V, H), "head"))
    for i in range(cfg["num_hidden_layers"]):
        m, g = f"model.layers.{i}.", f"layer.{i}"
        out.append((m + "input_layernorm.weight", "BF16", (H,), g))
        lin(m + "self_attn.q_a_proj.weight", (qr, H), g)
        out.append((m + "self_attn.q_a_layernorm.weight", "BF16", (qr,), g))
        lin(m + "self_attn.q_b_proj.weight", (nh * (dn + dr), qr), g)
        lin(m + "self_attn.kv_a_proj_with_mqa.weight", (kvr + dr, H), g)
        out.append((m + "self_attn.kv_a_layernorm.weight", "BF16", (kvr,), g))
        lin(m + "self_attn.kv_b_proj.weight", (nh * (dn + dv), kvr), g)
        lin(m + "self_attn.o_proj.weight", (H, nh * dv), g)
        out.append((m + "post_attention_layernorm.weight", "BF16", (H,), g))
        if i < cfg["first_k_dense_replace"]:
            lin(m + "mlp.gate_proj.weight", (I, H), g)
            lin(m + "mlp.up_proj.weight", (I, H), g)
            lin(m + "mlp.down_proj.weight", (H, I), g)
            continue
        out.append((m + "mlp.gate.weight", "BF16", (E, H), g))
        out.append((m + "mlp.gate.e_score_correction_bias", "F32", (E,), g))
        lin(m + "mlp.shared_experts.gate_proj.weight", (Ish, H), g)
        lin(m + "mlp.shared_experts.up_proj.weight", (Ish, H), g)
        lin(m + "mlp.shared_experts.down_proj.weight", (H, Ish), g)
        for e in range(E):
            for proj, shape in (("gate_proj", (Im, H)), ("up_proj", (Im, H)), ("down_proj", (H, Im))):
                lin(f"{m}mlp.experts.{e}.{proj}.weight", shape, f"experts.{i}")
    out.append(("model.norm.weight", "BF16", (H,), "tail"))
    out.append(("lm_head.weight", "BF16", (V, H), "tail"))
    return out


def gguf_tensors(cfg: dict) -> list[tuple[str, Q, tuple]]:
    """(llama.cpp name, GGML type, numpy shape) of a Q4_K_M deepseek2 GGUF, in llama-quantize's order."""
    H, V, nh = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    qr, kvr, dn, dr, dv = (cfg[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                            "v_head_dim"))
    E, Im, I = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["intermediate_size"]
    Ish = Im * cfg["n_shared_experts"]
    out = [("output.weight", Q.Q6_K, (V, H)), ("output_norm.weight", Q.F32, (H,)),
           ("token_embd.weight", Q.Q4_K, (V, H))]
    for i in range(cfg["num_hidden_layers"]):
        t = {"attn_norm.weight": (Q.F32, (H,)), "attn_q_a.weight": (Q.Q4_K, (qr, H)),
             "attn_q_a_norm.weight": (Q.F32, (qr,)), "attn_q_b.weight": (Q.Q4_K, (nh * (dn + dr), qr)),
             "attn_kv_a_mqa.weight": (Q.Q4_K, (kvr + dr, H)), "attn_kv_a_norm.weight": (Q.F32, (kvr,)),
             "attn_k_b.weight": (Q.Q5_0, (nh, kvr, dn)), "attn_v_b.weight": (Q.Q4_K, (nh, dv, kvr)),
             "attn_output.weight": (Q.Q4_K, (H, nh * dv)), "ffn_norm.weight": (Q.F32, (H,))}
        if i < cfg["first_k_dense_replace"]:
            t |= {"ffn_gate.weight": (Q.Q4_K, (I, H)), "ffn_up.weight": (Q.Q4_K, (I, H)),
                  "ffn_down.weight": (Q.Q6_K, (H, I))}
        else:
            t |= {"ffn_gate_inp.weight": (Q.F32, (E, H)), "exp_probs_b.bias": (Q.F32, (E,)),
                  "ffn_gate_shexp.weight": (Q.Q4_K, (Ish, H)), "ffn_up_shexp.weight": (Q.Q4_K, (Ish, H)),
                  "ffn_down_shexp.weight": (Q.Q6_K, (H, Ish)), "ffn_gate_exps.weight": (Q.Q4_K, (E, Im, H)),
                  "ffn_up_exps.weight": (Q.Q4_K, (E, Im, H)), "ffn_down_exps.weight": (Q.Q6_K, (E, H, Im))}
        out += [(f"blk.{i}.{n}", q, s) for n, (q, s) in sorted(t.items())]
    return out


def ggml_nbytes(q: Q, shape: tuple) -> int:
    block, size = GGML_QUANT_SIZES[q]
    assert shape[-1] % block == 0, (q, shape)
    return math.prod(shape) // block * size


def write_safetensors(path: Path, tensors: list, rand: Rand | None) -> int:
    """Stream one safetensors file; rand=None leaves the data as a sparse hole (header only, then truncate)."""
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, _ in tensors:
        n = math.prod(shape) * ST_SIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        if rand is None:
            f.truncate(8 + len(raw) + pos)
            return pos
        for name, dtype, shape, _ in tensors:
            n = math.prod(shape) * ST_SIZE[dtype]
            if name.endswith("_scale_inv"):
                f.write(rand.scales(n // 4).tobytes())
                continue
            for k in chunked(n, ST_SIZE[dtype]):
                f.write(rand.st(dtype, k).data)
    return pos


def generate_fp8(folder: Path, cfg: dict, rand: Rand) -> dict:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in AUX:
        if (TINY / name).is_file():
            shutil.copyfile(TINY / name, folder / name)
    tensors = hf_tensors(cfg)
    # shards: embed + dense layers | MoE layers' non-expert tensors + norm + lm_head | each expert projection (holes)
    dense = {f"layer.{i}" for i in range(cfg["first_k_dense_replace"])}
    shards = [[t for t in tensors if t[3] == "head" or t[3] in dense],
              [t for t in tensors if (t[3].startswith("layer.") and t[3] not in dense) or t[3] == "tail"]]
    holes = []
    for i in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            holes.append([t for t in tensors if t[3] == f"experts.{i}" and f".{proj}." in t[0]])
    assert sum(map(len, shards + holes)) == len(tensors)
    n = len(shards) + len(holes)
    weight_map, total, files = {}, 0, {"data": [], "holes": []}
    for k, group in enumerate(shards + holes, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        sparse = k > len(shards)
        total += write_safetensors(folder / fname, group, None if sparse else rand)
        weight_map.update({t[0]: fname for t in group})
        files["holes" if sparse else "data"].append(fname)
        print(f"  fp8 {fname}: {len(group)} tensors{' (sparse)' if sparse else ''}", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def generate_gguf(path: Path, cfg: dict, rand: Rand) -> None:
    path.parent.mkdir(parents=True)
    w = GGUFWriter(path, "deepseek2")
    a = "deepseek2."
    w.add_string("general.type", "model")
    w.add_string("general.name", "DeepSeek V3 synthetic")
    w.add_uint32(a + "block_count", cfg["num_hidden_layers"])
    w.add_uint32(a + "context_length", cfg["max_position_embeddings"])
    w.add_uint32(a + "embedding_length", cfg["hidden_size"])
    w.add_uint32(a + "feed_forward_length", cfg["intermediate_size"])
    w.add_uint32(a + "attention.head_count", cfg["num_attention_heads"])
    w.add_uint32(a + "attention.head_count_kv", 1)
    rs = cfg["rope_scaling"]
    w.add_string(a + "rope.scaling.type", "yarn")
    w.add_float32(a + "rope.scaling.factor", rs["factor"])
    w.add_uint32(a + "rope.scaling.original_context_length", rs["original_max_position_embeddings"])
    w.add_float32(a + "rope.scaling.yarn_beta_fast", rs["beta_fast"])
    w.add_float32(a + "rope.scaling.yarn_beta_slow", rs["beta_slow"])
    w.add_float32(a + "rope.scaling.yarn_log_multiplier", 0.1 * rs["mscale_all_dim"])
    w.add_float32(a + "rope.freq_base", cfg["rope_theta"])
    w.add_float32(a + "attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    w.add_uint32(a + "expert_count", cfg["n_routed_experts"])
    w.add_uint32(a + "expert_used_count", cfg["num_experts_per_tok"])
    w.add_uint32(a + "expert_group_count", cfg["n_group"])
    w.add_uint32(a + "expert_group_used_count", cfg["topk_group"])
    w.add_uint32(a + "expert_gating_func", 2)                       # sigmoid
    kvr, rope = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    w.add_uint32(a + "attention.key_length", kvr + rope)             # current MLA layout (attn_k_b / attn_v_b)
    w.add_uint32(a + "attention.value_length", kvr)
    w.add_uint32(a + "attention.key_length_mla", cfg["qk_nope_head_dim"] + rope)
    w.add_uint32(a + "attention.value_length_mla", cfg["v_head_dim"])
    w.add_uint32(a + "leading_dense_block_count", cfg["first_k_dense_replace"])
    w.add_uint32(a + "vocab_size", cfg["vocab_size"])
    w.add_uint32(a + "attention.q_lora_rank", cfg["q_lora_rank"])
    w.add_uint32(a + "attention.kv_lora_rank", kvr)
    w.add_uint32(a + "expert_feed_forward_length", cfg["moe_intermediate_size"])
    w.add_uint32(a + "expert_shared_count", cfg["n_shared_experts"])
    w.add_float32(a + "expert_weights_scale", cfg["routed_scaling_factor"])
    w.add_bool(a + "expert_weights_norm", True)
    w.add_uint32(a + "rope.dimension_count", rope)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "deepseek-v3")
    w.add_uint32("general.quantization_version", 2)
    w.add_uint32("general.file_type", 15)                           # MOSTLY_Q4_K_M
    tensors = gguf_tensors(cfg)
    for name, q, shape in tensors:
        w.add_tensor_info(name, shape, np.float32, ggml_nbytes(q, shape), raw_dtype=q)
    w.open_output_file()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, q, shape in tensors:
        nbytes = ggml_nbytes(q, shape)
        if nbytes <= CHUNK:
            w.write_tensor_data(rand.ggml(q, nbytes))
            continue
        # GGUFWriter.write_tensor_data takes the whole array; stream big tensors chunk by chunk the same way
        fout = w.fout[0]
        assert next(iter(w.tensors[0])) == name
        ti = w.tensors[0].pop(name)
        w.write_padding(fout, fout.tell())
        for k in chunked(nbytes, GGML_QUANT_SIZES[q][1]):
            fout.write(rand.ggml(q, k).data)
        w.write_padding(fout, ti.nbytes)
        w.state = WriterState.WEIGHTS
    w.close()
    print(f"  gguf {path.name}: {len(tensors)} tensors, {path.stat().st_size / 1e9:.2f} GB", flush=True)


def generate(workdir: Path, layers: int, dense: int, seed: int) -> None:
    params = {"layers": layers, "dense": dense, "seed": seed, "generator": 1}
    marker = workdir / ".generated"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        print(f"sources: reusing {workdir} ({params})")
        return
    for sub in ("hf-fp8", "gguf"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    marker.unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"sources: generating into {workdir} ({params})", flush=True)
    cfg, rand, t0 = make_config(layers, dense), Rand(seed), time.time()
    generate_fp8(workdir / "hf-fp8", cfg, rand)
    generate_gguf(workdir / "gguf" / "DeepSeek-V3-synthetic-Q4_K_M.gguf", cfg, rand)
    os.sync()
    marker.write_text(json.dumps(params) + "\n")
    print(f"sources: done in {time.time() - t0:.0f} s", flush=True)


# -- the benchmark ---------------------------------------------------------------------------------------------------

def run_child(cmd, **kw) -> tuple[float, int, int, float]:
    """(wall seconds, exit status, peak RSS bytes, CPU seconds) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, **kw)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return wall, p.returncode, ru.ru_maxrss * 1024, ru.ru_utime + ru.ru_stime


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def remove_outputs(out: Path | None, cp_dir: Path | None) -> None:
    if out is not None:
        for p in out.glob("model-*.safetensors"):
            p.unlink()
        for p in (out / ".pipeline" / "write").glob("*.json"):
            p.unlink()
    if cp_dir is not None:
        shutil.rmtree(cp_dir, ignore_errors=True)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.strip().split("\n\n")[0].split()))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/merge-bench"))
    ap.add_argument("--layers", type=int, default=2, help="num_hidden_layers (default 2)")
    ap.add_argument("--dense", type=int, default=1, help="first_k_dense_replace (default 1)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each side, alternating (default 2)")
    ap.add_argument("--settle", type=float, default=10, help="seconds to wait after dropping caches (default 10): "
                    "lets a VM's free-page reporting hand the freed memory back, so every run starts alike")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--keep-outputs", action="store_true", help="keep <workdir>/out (the last merged model)")
    args = ap.parse_args()
    wd = args.workdir.resolve()
    generate(wd, args.layers, args.dense, args.seed)
    manifest = wd / "bench.yaml"
    manifest.write_text("name: dsv3-synthetic-bench\nsources:\n  fp8:  {local: hf-fp8}\n  gguf: {local: gguf}\n"
                        "output: out\n")
    if args.generate_only:
        return
    out, cp_dir = wd / "out", wd / "cp-out"
    pipeline = [sys.executable, str(ROOT / "pipeline.py"), "run", "--manifest", str(manifest), "--out", str(out)]

    # fetch (hashes the sources), reconcile (plans), write (merges); stages after write (verify: parity against the
    # FP8 experts, which are holes here) are not part of this benchmark
    print("first run: fetch, reconcile, write (untimed)", flush=True)
    t0 = time.perf_counter()
    for stage in ("fetch", "reconcile", "write"):
        _, rc, _, _ = run_child(pipeline + ["--only", stage], cwd=ROOT)
        if rc:
            sys.exit(f"pipeline stage {stage} failed (exit {rc})")
    wall = time.perf_counter() - t0
    plan = json.loads((out / ".pipeline" / "plan.json").read_text())
    roots = {k: Path(v) for k, v in plan["sources"].items()}
    used = sorted({(t["side"], s[0]) for t in plan["tensors"].values() for s in t.get("segments", [])})
    cp_files = [roots[side] / rel for side, rel in used]
    cp_bytes = sum(p.stat().st_size for p in cp_files)
    merge_bytes = plan["total_bytes"]
    print(f"  reconcile: {len(plan['tensors'])} tensors in {len(plan['shards'])} shards, {gb(merge_bytes)} to write; "
          f"full run {wall:.0f} s")
    for p in cp_files:
        print(f"  cp source: {p} ({gb(p.stat().st_size)})")

    results = {"write": [], "cp": []}
    dropped = True
    for r in range(args.repeats):
        for side in (("write", "cp") if r % 2 == 0 else ("cp", "write")):
            keep_merged = args.keep_outputs and side == "cp"      # else both go: same free space for each run
            remove_outputs(None if keep_merged else out, cp_dir)
            dropped &= drop_caches()
            time.sleep(args.settle)
            load0 = os.getloadavg()[0]        # other work on the machine skews a run: shown with each one
            if side == "write":
                wall, rc, rss, cpu = run_child(pipeline + ["--only", "write", "--force"], cwd=ROOT,
                                               stderr=subprocess.DEVNULL)
                if rc:
                    sys.exit(f"write stage failed (exit {rc})")
                stage_s = json.loads((out / ".pipeline" / "write.json").read_text())["seconds"]
                written = sum(p.stat().st_size for p in out.glob("model-*.safetensors"))
                results["write"].append({"wall": wall, "rss": rss, "cpu": cpu, "stage": stage_s, "bytes": written})
            else:
                cp_dir.mkdir()
                wall, rc, rss, cpu = run_child(["sh", "-c", 'cp "$@" "$0" && sync', str(cp_dir),
                                                *map(str, cp_files)])
                if rc:
                    sys.exit(f"cp failed (exit {rc})")
                results["cp"].append({"wall": wall, "rss": rss, "cpu": cpu, "bytes": cp_bytes})
            x = results[side][-1]
            x["load"] = (load0, os.getloadavg()[0])
            print(f"  run {r + 1} {side:5s}: {x['wall']:6.1f} s  {x['bytes'] / x['wall'] / 1e9:.3f} GB/s  "
                  f"CPU {x['cpu']:.1f} s  peak RSS {x['rss'] / 2**20:.0f} MiB  loadavg {load0:.1f} -> {x['load'][1]:.1f}", flush=True)
    if not args.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cp_dir, ignore_errors=True)

    w_bytes = results["write"][0]["bytes"]
    w_med = statistics.median(x["wall"] for x in results["write"])
    s_med = statistics.median(x["stage"] for x in results["write"])
    c_med = statistics.median(x["wall"] for x in results["cp"])
    w_rate, c_rate = w_bytes / w_med / 1e9, cp_bytes / c_med / 1e9
    rss = max(x["rss"] for x in results["write"])
    runs = lambda k: ", ".join(f"{x['wall']:.1f}" for x in results[k])
    print(f"\npage cache dropped before each timed run: {'yes' if dropped else 'NO (not permitted)'} "
          f"(then {args.settle:g} s pause); median of {args.repeats}, alternating")
    cpu = lambda k: statistics.median(x["cpu"] for x in results[k])
    print("| what | bytes | runs (s) | median (s) | GB/s | CPU (s, median) | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    print(f"| write stage (`pipeline.py run --only write --force`, fsync per shard) | {gb(w_bytes)} written "
          f"| {runs('write')} | {w_med:.1f} (stage record: {s_med:.1f}) | {w_rate:.3f} | {cpu('write'):.1f} "
          f"| {rss / 2**20:.0f} MiB |")
    print(f"| `cp` {len(cp_files)} source files + `sync` | {gb(cp_bytes)} copied | {runs('cp')} | {c_med:.1f} "
          f"| {c_rate:.3f} | {cpu('cp'):.1f} | - |")
    print(f"| ratio write/cp (GB/s) | | | | **{w_rate / c_rate:.2f}** | | |")


if __name__ == "__main__":
    main()
