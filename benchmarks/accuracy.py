"""What the hybrid costs in accuracy: logits of one text under four weight sets, against the FP8 checkpoint.

    python benchmarks/accuracy.py                       # the fixture (out/tiny-deepseek-v3) on tests/data/prose.txt
    python benchmarks/accuracy.py --model DIR --text FILE --ctx 512 [--fp8 DIR] [--gguf FILE|DIR] [--json]

Engine: transformers' DeepseekV3ForCausalLM in float32 (eager attention, eager experts), the same for every weight
set, so the rows differ by their weights only:
  truth    every weight from the FP8 checkpoint, dequantized (128x128 tiles x scale, float32); routed experts too
  hybrid   the merged folder's effective weights, what runtime/ serves: FP8 tensors dequantized then rounded to bf16
           (runtime/model.py's Weights.linear), BF16/F32 tensors as stored, routed experts dequantized from the folder's
           GGML bytes (Q4_K / Q6_K)
  gguf     every weight from the Q4_K_M GGUF, dequantized (attn_kv_b rebuilt per head from attn_k_b^T and attn_v_b)
  runtime  runtime/ itself on the merged folder (its MLA, its ggml experts: activations rounded to Q8_K)
plus one row to tell the two parts of the hybrid's error apart:
  bf16     truth with every FP8 tensor rounded to bf16 (the runtime's CPU-path rounding alone; experts from FP8)
Tokens: runtime.api.encode (BOS first), the first --ctx. Reported per row: mean KL(truth || row) in nats per token
(and its 99th percentile), top-1 agreement with truth, perplexity of the text. A markdown table on stdout.

Sources default to the merged folder's manifest.json `sources` (else the fixture's); weight names come from
stages/names.py, the pipeline's own map of DeepSeek-V3 names on both sides.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import runtime  # noqa: E402  (before torch: runtime/__init__.py sets OpenMP's wait policy)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from runtime.api import encode  # noqa: E402
from runtime.load import bf16 as bf16_view, fp8_dequant, load as open_folder  # noqa: E402
from stages.dequant import dequantize_fp8_block  # noqa: E402
from stages.formats import read_gguf, read_hf_checkpoint  # noqa: E402
from stages.names import expected_weights  # noqa: E402
from stages.reconcile import gguf_layout  # noqa: E402

FIXTURE = ROOT / "examples" / "tiny-deepseek-v3"


# ------------------------------------------------------------------------------------------------- weight sets
# Each returns {merged name: float32 tensor} for every stages.names.Weight (experts: (E, out, in)).

def _read(ref) -> np.ndarray:
    return np.fromfile(ref.file, np.uint8, count=ref.length, offset=ref.offset)


def _checkpoint_tensor(hf: dict, name: str, to_bf16: bool) -> torch.Tensor:
    ref = hf[name]
    raw = _read(ref)
    if ref.dtype == "F8_E4M3":
        s = hf[name + "_scale_inv"]
        w = torch.from_numpy(dequantize_fp8_block(raw.reshape(ref.shape), _read(s).view(np.float32).reshape(s.shape)))
        return w.to(torch.bfloat16).float() if to_bf16 else w
    if ref.dtype == "BF16":
        return torch.from_numpy(raw.view(np.uint16).reshape(ref.shape).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(raw.view(np.float32).reshape(ref.shape).copy())


def checkpoint_weights(weights, hf: dict, to_bf16: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for w in weights:
        parts = [_checkpoint_tensor(hf, n, to_bf16) for n in w.hf]
        out[w.out] = torch.stack(parts) if len(parts) > 1 else parts[0]
    return out


def hybrid_weights(weights, folder) -> dict[str, torch.Tensor]:
    f = open_folder(folder)
    out = {}
    for w in weights:
        t = f.tensors[w.out]
        if t.ggml_type is not None:
            e, rows, cols = t.logical_shape
            out[w.out] = torch.from_numpy(dequantize(np.asarray(f.raw(w.out)).reshape(e * rows, -1), t.ggml_type)
                                          .reshape(e, rows, cols).copy())
        elif t.dtype == "F8_E4M3":
            out[w.out] = fp8_dequant(f.raw(w.out), f.raw(w.out + "_scale_inv")).to(torch.bfloat16).float()
        elif t.dtype == "BF16":
            out[w.out] = bf16_view(f.raw(w.out)).float()
        else:
            out[w.out] = torch.from_numpy(np.array(f.raw(w.out))).float()
    return out


def gguf_weights(weights, gg) -> dict[str, torch.Tensor]:
    def deq(name):
        ref = gg.tensors[name]
        rows = int(np.prod(ref.shape[:-1])) if len(ref.shape) > 1 else 1
        return dequantize(_read(ref).reshape(rows, -1), ref.ggml_type).reshape(ref.shape).astype(np.float32)

    out = {}
    for w in weights:
        names = list(w.gguf)
        if len(names) == 2:                   # attn_kv_b from attn_k_b (h, kv_lora, nope) + attn_v_b (h, v, kv_lora)
            k_b, v_b = (deq(n) for n in names)
            a = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)      # per head: nope rows of k, then v rows
            out[w.out] = torch.from_numpy(a.reshape(-1, a.shape[-1]).copy())
        else:
            out[w.out] = torch.from_numpy(deq(names[0]).reshape(w.shape).copy())
    return out


# ---------------------------------------------------------------------------------------------------- the engine

def transformers_model(config: dict, weights, tensors: dict[str, torch.Tensor]):
    """DeepseekV3ForCausalLM, float32, eager, holding exactly `tensors` (merged names, mapped by stages/names.py)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    cfg = DeepseekV3Config(**{k: v for k, v in config.items() if k != "quantization_config"})
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    assert cfg.rope_interleave and cfg.rope_parameters["rope_type"] == "yarn"   # DeepSeek's interleaved YaRN rope
    sd = {}
    for w in weights:
        t = tensors[w.out]
        if len(w.hf) == 1:
            sd[w.hf[0]] = t
            continue
        prefix = w.hf[0].split(".experts.")[0] + ".experts."            # transformers 5 fuses the experts:
        kind = w.out.split(".")[2]                                        # gate_up_proj (E, 2I, H) = [gate; up]
        sd.setdefault(prefix + "_parts", {})[kind] = t                    # down_proj (E, H, I)
    for key in [k for k in sd if k.endswith("_parts")]:
        parts, prefix = sd.pop(key), key.removesuffix("_parts")
        sd[prefix + "gate_up_proj"] = torch.cat([parts["ffn_gate_exps"], parts["ffn_up_exps"]], dim=1)
        sd[prefix + "down_proj"] = parts["ffn_down_exps"]
    net = DeepseekV3ForCausalLM(cfg).float().eval()
    net.load_state_dict(sd, strict=True)
    return net


def run_transformers(config, weights, tensors, tokens) -> torch.Tensor:
    net = transformers_model(config, weights, tensors)
    with torch.no_grad():
        return net(torch.tensor([tokens])).logits[0].float()


def compare(truth: torch.Tensor, x: torch.Tensor, tokens: list[int]) -> dict:
    lp, lq = truth.double().log_softmax(-1), x.double().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    nll = F.cross_entropy(x[:-1].double(), torch.tensor(tokens[1:]))
    return {"kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)), "kl_max": float(kl.max()),
            "top1": float((truth.argmax(-1) == x.argmax(-1)).double().mean()), "perplexity": float(nll.exp())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "out" / "tiny-deepseek-v3", help="merged folder")
    ap.add_argument("--fp8", type=Path, default=None, help="FP8 checkpoint folder (default: the manifest's source)")
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF file or folder (default: the manifest's source)")
    ap.add_argument("--text", type=Path, default=ROOT / "tests" / "data" / "prose.txt")
    ap.add_argument("--ctx", type=int, default=512, help="tokens scored (the first N)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="the numbers as JSON on stdout instead of the table")
    a = ap.parse_args(argv)
    import transformers
    transformers.utils.logging.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)
    if not (a.model / "manifest.json").exists():
        print(f"error: {a.model}: no merged model here; run `python pipeline.py run` first", file=sys.stderr)
        return 2
    sources = json.loads((a.model / "manifest.json").read_text()).get("sources", {})
    fp8 = a.fp8 or Path(sources.get("fp8", {}).get("path") or FIXTURE / "hf-fp8")
    gguf_path = a.gguf or Path(sources.get("gguf", {}).get("path") or FIXTURE / "gguf" / "Q4_K_M")
    gguf_files = sorted(gguf_path.glob("*.gguf")) if gguf_path.is_dir() else [gguf_path]

    started = time.perf_counter()
    model = runtime.load(a.model, threads=a.threads, max_len=max(a.ctx, 16))
    tokens = encode(model, a.text.read_text())[:a.ctx]
    config, hf = read_hf_checkpoint(fp8)
    gg = read_gguf(gguf_files)
    weights = expected_weights(config, gguf_layout(gg.meta))

    logits = {"truth": run_transformers(config, weights, checkpoint_weights(weights, hf), tokens),
              "hybrid": run_transformers(config, weights, hybrid_weights(weights, a.model), tokens),
              "gguf": run_transformers(config, weights, gguf_weights(weights, gg), tokens),
              "runtime": runtime.logits(model, tokens),
              "bf16": run_transformers(config, weights, checkpoint_weights(weights, hf, to_bf16=True), tokens)}
    rows = {name: compare(logits["truth"], x, tokens) for name, x in logits.items()}
    info = {"model": str(a.model), "fp8": str(fp8), "gguf": [str(p) for p in gguf_files], "text": str(a.text),
            "tokens": len(tokens), "seconds": time.perf_counter() - started, "rows": rows}
    if a.json:
        print(json.dumps(info, indent=1))
        return 0
    what = {"truth": "(a) truth: FP8 checkpoint, every weight (experts too), float32",
            "hybrid": "(b) hybrid's effective weights: FP8 rounded to bf16 + Q4_K_M experts (what runtime/ serves)",
            "gguf": "(c) every weight from the Q4_K_M GGUF (kv_b rebuilt from k_b/v_b)",
            "runtime": "(d) runtime/ itself (ggml experts, activations rounded to Q8_K)",
            "bf16": "(b') truth with FP8 tensors rounded to bf16, FP8 experts (bf16 rounding alone)"}
    print(f"Accuracy against the FP8 checkpoint: {a.model.name}, first {len(tokens)} tokens of {a.text.name}, "
          f"transformers float32 engine for (a)-(c)\n")
    print("| weights | mean KL(truth ‖ x), nats/token | p99 KL | top-1 agreement | perplexity |")
    print("|---|---|---|---|---|")
    for name in ("truth", "hybrid", "gguf", "runtime", "bf16"):
        r = rows[name]
        if name == "truth":
            print(f"| {what[name]} | 0 | 0 | 1 | {r['perplexity']:.3f} |")
        else:
            print(f"| {what[name]} | {r['kl_mean']:.2e} | {r['kl_p99']:.2e} | {r['top1']:.4f} | "
                  f"{r['perplexity']:.3f} |")
    print(f"\n({info['seconds']:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
