"""
The tiny fixture model end to end on the GPU (runtime.api, --device cuda) against the CPU path, in one run.

    python benchmarks/tiny_gpu.py [--model out/tiny-deepseek-v3] [--json out.json]

Checks, then times:
- accuracy: logits over the prose test text (tests/data/prose.txt) on the GPU with FP8 kernels (activations in two
  e4m3 terms, the default, and in one), and with bf16 weights (the <sm89 fallback, forced), against the CPU path,
  and against the CPU path with the FP8 kernels' rounding emulated in torch (Transformer(emulate_fp8=True)): mean
  KL, top-1 agreement, relative logit error;
- decode through CUDA graphs (prefill, then one token at a time) against one full pass over the same tokens;
- speed: prefill tokens/s (512 tokens) and greedy decode tokens/s (128 tokens) on GPU and CPU, and the GPU memory
  the model holds (weights + caches + graphs; torch's peak allocation).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import runtime  # noqa: E402,F401  (ggml_ops before torch: OpenMP wait policy)
import torch  # noqa: E402
import runtime.api as api  # noqa: E402
from runtime.model import Transformer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def kl_top1(p, q):
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return float(kl.mean()), float((p.argmax(-1) == q.argmax(-1)).double().mean()), float((q - p).norm() / p.norm())


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def speed(model, ids, decode_tokens):
    model.reset()
    api.logits(model, ids[:8])                                  # warm up: Triton compiles
    model.reset()
    t_pre, _ = timed(lambda: api.logits(model, ids))
    model.reset()
    api.logits(model, ids[:16])
    first = model.net.forward(torch.tensor([ids[16]]), 16)      # decode graphs captured here (GPU)
    model.pos = 17
    t_dec, toks = timed(lambda: list(api.generate(model, [int(first.argmax())], max_new_tokens=decode_tokens)))
    return len(ids) / t_pre, len(toks) / t_dec


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, default=REPO / "out" / "tiny-deepseek-v3")
    p.add_argument("--json", type=Path)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=128)
    args = p.parse_args()
    cpu = api.load(args.model, device="cpu", max_len=1024)
    gpu = api.load(args.model, device="cuda", max_len=1024)
    held = torch.cuda.memory_allocated()
    assert gpu.net.layers[0].attn.wqkv_a.scale is not None, "expected the FP8 kernels on this GPU"
    text = (REPO / "tests" / "data" / "prose.txt").read_text()
    ids = api.encode(cpu, text * 4)[:args.prefill]

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    ref = api.logits(cpu, ids[:512])
    out = api.logits(gpu, ids[:512])
    emu = Transformer(cpu.folder, max_len=1024, emulate_fp8=True).forward(torch.tensor(ids[:512]))
    out1 = Transformer(gpu.folder, max_len=1024, device="cuda", fp8=True, act_terms=1).forward(torch.tensor(ids[:512]))
    emu1 = Transformer(cpu.folder, max_len=1024, emulate_fp8=True, act_terms=1).forward(torch.tensor(ids[:512]))
    bf_net = Transformer(gpu.folder, max_len=1024, device="cuda", fp8=False)
    bf = bf_net.forward(torch.tensor(ids[:512]))
    res["gpu_fp8_vs_cpu"] = kl_top1(ref, out)
    res["cpu_fp8_emulated_vs_cpu"] = kl_top1(ref, emu)
    res["gpu_fp8_vs_cpu_fp8_emulated"] = kl_top1(emu, out)
    res["gpu_fp8_1term_vs_cpu"] = kl_top1(ref, out1)
    res["cpu_fp8_1term_emulated_vs_cpu"] = kl_top1(ref, emu1)
    res["gpu_fp8_1term_vs_emulated"] = kl_top1(emu1, out1)
    res["gpu_bf16_vs_cpu"] = kl_top1(ref, bf)

    def incremental(net):          # prefill 200, then decode 56 one by one (CUDA graphs)
        parts = [net.forward(torch.tensor(ids[:200]), 0)]
        parts += [net.forward(torch.tensor([ids[i]]), i) for i in range(200, 256)]
        return torch.cat(parts)
    res["graph_decode_vs_full_pass_fp8"] = kl_top1(out[:256], incremental(gpu.net))
    res["graph_decode_vs_full_pass_bf16"] = kl_top1(bf[:256], incremental(bf_net))
    del bf_net
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    res["gpu_prefill_tok_s"], res["gpu_decode_tok_s"] = speed(gpu, ids, args.decode)
    res["gpu_held_mib"] = held / 2 ** 20
    res["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    res["cpu_prefill_tok_s"], res["cpu_decode_tok_s"] = speed(cpu, ids, args.decode)

    print(f"\n{res['device']}, torch {res['torch']}")
    print("fp8 = FP8 kernels, activations in two e4m3 terms (the default); fp8_1term = DeepSeek's one term")
    for k in ("gpu_fp8_vs_cpu", "cpu_fp8_emulated_vs_cpu", "gpu_fp8_vs_cpu_fp8_emulated", "gpu_fp8_1term_vs_cpu",
              "cpu_fp8_1term_emulated_vs_cpu", "gpu_fp8_1term_vs_emulated", "gpu_bf16_vs_cpu",
              "graph_decode_vs_full_pass_fp8", "graph_decode_vs_full_pass_bf16"):
        kl, top1, rel = res[k]
        print(f"{k:31s} mean KL {kl:.2e}  top-1 {top1:.4f}  rel logits {rel:.2e}")
    print(f"prefill {len(ids)} tokens: GPU {res['gpu_prefill_tok_s']:8.0f} tok/s, CPU {res['cpu_prefill_tok_s']:8.0f}"
          f" tok/s ({res['gpu_prefill_tok_s'] / res['cpu_prefill_tok_s']:.1f}x)")
    print(f"decode  {args.decode} tokens: GPU {res['gpu_decode_tok_s']:8.1f} tok/s, CPU {res['cpu_decode_tok_s']:8.1f}"
          f" tok/s ({res['gpu_decode_tok_s'] / res['cpu_decode_tok_s']:.1f}x)")
    print(f"GPU memory: {res['gpu_held_mib']:.0f} MiB held after load (weights + caches), peak "
          f"{res['gpu_peak_mib']:.0f} MiB while prefilling {len(ids)} tokens and decoding (torch allocations)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
