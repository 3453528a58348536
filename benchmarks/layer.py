"""
One real-size DeepSeek-V3 layer pair through the runtime's own code, GPU + CPU at once: a dense layer and a MoE
layer (FP8 attention, FP8 dense MLP / shared expert on the GPU through runtime.fp8; 256 Q4_K/Q6_K routed experts on
the CPU through ggml with the machine's cores), built as a merged folder would be opened (runtime.load.Folder over
one memory-mapped file of random valid weights) and run by runtime.model.Transformer(device="cuda", fp8=True).

    python benchmarks/layer.py [--experts 256] [--threads N] [--prefill 512] [--steps 30] [--no-decode-kernel]

Decode (one token at position 512, CUDA graphs, as the runtime decodes), per MoE layer:
  GPU   = the layer's graphs alone (attention + router over the position's span, then the shared expert), replayed
          back to back; attention + router also over the whole 4096-token cache and with one activation term;
  CPU   = the routed experts alone on the same routed inputs (ggml, all threads);
  step  = the runtime's decode of the MoE layer: attention graph, copies to the host, shared-expert graph launched,
          CPU experts, copy back; measured with the shared expert launched first (overlap, the runtime's order)
          and after the CPU (serial), alternating, medians;
  overlap = the median of (serial - overlapped) over the alternating pairs.
Prefill: 512 tokens through both layers (eager GPU path, experts in 256-token chunks), tokens/s, with two activation
terms (the default) and one.
Projection for DeepSeek-V3 (3 dense + 58 MoE layers + lm_head 129280 x 7168 bf16, whose GEMV is timed here):
  decode step = 3 x dense layer (GPU graph) + 58 x MoE step + lm_head, tokens/s = 1 / that.
Bound: the routed experts' bytes per token (8 experts x 3 matrices x 58 layers) over the CPU memory-read bandwidth
measured here (torch sum over 4 GiB, all threads).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from runtime import ggml_ops as G  # noqa: E402  (first: OpenMP wait policy)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from runtime.load import Folder, TensorInfo  # noqa: E402
from runtime.model import Linear, MoE, Transformer, decode_span  # noqa: E402
from synthetic import HIDDEN, INTER, MATS, TOPK, expert_nbytes, random_expert  # noqa: E402

CONFIG = {"vocab_size": 1024, "hidden_size": HIDDEN, "intermediate_size": 18432, "moe_intermediate_size": INTER,
          "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 128, "q_lora_rank": 1536,
          "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
          "n_routed_experts": 256, "num_experts_per_tok": TOPK, "n_group": 8, "topk_group": 4,
          "routed_scaling_factor": 2.5, "rms_norm_eps": 1e-6, "rope_theta": 10000,
          "rope_scaling": {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                           "mscale": 1.0, "mscale_all_dim": 1.0, "type": "yarn"}}
VOCAB_REAL, LAYERS_DENSE, LAYERS_MOE = 129280, 3, 58


def layer_tensors(i: int, dense: bool, experts: int) -> dict:
    """name -> (dtype, shape, kind); kind: 'fp8' (+ a _scale_inv), 'bf16', 'norm', 'f32', or a ggml type."""
    b = f"blk.{i}."
    t = {b + "attn_norm.weight": "norm", b + "ffn_norm.weight": "norm", b + "attn_q_a_norm.weight": "norm",
         b + "attn_kv_a_norm.weight": "norm"}
    shapes = {b + "attn_norm.weight": (HIDDEN,), b + "ffn_norm.weight": (HIDDEN,), b + "attn_q_a_norm.weight": (1536,),
              b + "attn_kv_a_norm.weight": (512,)}
    fp8 = {"attn_q_a": (1536, HIDDEN), "attn_q_b": (128 * 192, 1536), "attn_kv_a_mqa": (576, HIDDEN),
           "attn_kv_b": (128 * 256, 512), "attn_output": (HIDDEN, 128 * 128)}
    if dense:
        fp8.update({"ffn_gate": (18432, HIDDEN), "ffn_up": (18432, HIDDEN), "ffn_down": (HIDDEN, 18432)})
    else:
        fp8.update({"ffn_gate_shexp": (INTER, HIDDEN), "ffn_up_shexp": (INTER, HIDDEN), "ffn_down_shexp": (HIDDEN, INTER)})
        t[b + "ffn_gate_inp.weight"], shapes[b + "ffn_gate_inp.weight"] = "bf16", (256, HIDDEN)
        t[b + "exp_probs_b.bias"], shapes[b + "exp_probs_b.bias"] = "f32", (256,)
        for name, qt, s in MATS:
            t[b + f"ffn_{name}_exps.weight"], shapes[b + f"ffn_{name}_exps.weight"] = qt, (experts, *s)
    for name, s in fp8.items():
        t[b + name + ".weight"], shapes[b + name + ".weight"] = "fp8", s
    return {n: (t[n], shapes[n]) for n in t}


def build_folder(path: Path, experts: int, rng) -> Folder:
    """One file holding every tensor (64-byte aligned), opened as the runtime opens a merged folder."""
    spec = {"token_embd.weight": ("bf16", (CONFIG["vocab_size"], HIDDEN)), "output_norm.weight": ("norm", (HIDDEN,)),
            "output.weight": ("bf16", (CONFIG["vocab_size"], HIDDEN))}
    spec.update(layer_tensors(0, True, experts))
    spec.update(layer_tensors(1, False, experts))
    tensors, at = {}, 0
    pool = {}                                              # 4 distinct images per expert matrix, reused
    with open(path / "layer.bin", "wb") as f:
        def put(name, data, dtype: str, shape, **extra):   # data: an array, or a list of arrays written in turn
            nonlocal at
            pad = -at % 64
            f.write(b"\0" * pad)
            at += pad
            parts = data if isinstance(data, list) else [data]
            for a in parts:
                f.write(a.data)
            size = sum(a.nbytes for a in parts)
            tensors[name] = TensorInfo("layer.bin", at, at + size, dtype, tuple(shape), **extra)
            at += size

        for name, (kind, shape) in spec.items():
            if kind == "fp8":                              # W = codes x scale ~ N(0, 1/K)
                codes = torch.randn(shape).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
                put(name, codes, "F8_E4M3", shape)
                sc = np.full((-(-shape[0] // 128), -(-shape[1] // 128)), shape[1] ** -0.5, np.float32)
                put(name + "_scale_inv", sc * rng.uniform(0.8, 1.2, sc.shape).astype(np.float32), "F32", sc.shape)
            elif kind in ("bf16", "norm"):
                v = np.ones(shape, np.float32) if kind == "norm" else rng.standard_normal(shape, np.float32) * HIDDEN ** -0.5
                put(name, (torch.from_numpy(v).to(torch.bfloat16).view(torch.uint16).numpy()), "BF16", shape)
            elif kind == "f32":
                put(name, rng.standard_normal(shape, np.float32) * 0.01, "F32", shape)
            else:                                          # routed experts: the ggml type; shape (E, rows, cols)
                rows, cols = shape[1:]
                if (kind, rows) not in pool:
                    pool[kind, rows] = [random_expert(kind, (rows, cols), rng) for _ in range(4)]
                data = [pool[kind, rows][e % 4] for e in range(shape[0])]
                put(name, data, "U8", (sum(a.size for a in data),), logical_shape=tuple(shape), ggml_type=int(kind))
    return Folder(path, CONFIG, tensors, verified=True)


def median_time(fn, n: int) -> float:
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def set_terms(net: Transformer, terms: int) -> None:
    """Activations of every FP8 linear in `terms` e4m3 terms."""
    for layer in net.layers:
        for part in (layer.attn, layer.ffn, getattr(layer.ffn, "shared", None)):
            for v in (vars(part).values() if part is not None else ()):
                if isinstance(v, Linear):
                    v.terms = terms


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="default: physical cores")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--json", type=Path)
    p.add_argument("--no-decode-kernel", action="store_true", help="decode's FP8 linears as act_quant + the "
                   "split-K GEMM (the path before fp8_hopper's decode kernel)")
    args = p.parse_args()
    if args.no_decode_kernel:
        from runtime import fp8
        fp8.DECODE_ROWS = 0
    threads = args.threads or G.physical_cores()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "cpu_threads": threads, "os_cpus": os.cpu_count(),
           "decode_kernel": not args.no_decode_kernel}

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        folder = build_folder(Path(tmp), args.experts, rng)
        net = Transformer(folder, max_len=4096, threads=threads, device="cuda", fp8=True, gpu_memory=0)  # CPU experts
        print(f"built and loaded in {time.perf_counter() - t0:.0f} s; {threads} CPU threads", flush=True)
        moe_layer = net.layers[1]
        assert isinstance(moe_layer.ffn, MoE) and not isinstance(net.layers[0].ffn, MoE)

        # ------------------------------------------------------------------ prefill
        toks = torch.randint(0, CONFIG["vocab_size"], (args.prefill,))
        net.forward(toks, 0)                                     # warm: Triton compiles, ggml graphs
        t_pre = median_time(lambda: net.forward(toks, 0), 3)
        res["prefill_tokens"], res["prefill_s"] = args.prefill, t_pre

        # ------------------------------------------------------------------ decode through the runtime's graphs
        pos = args.prefill
        net.forward(toks[:1], pos)                               # captures the decode graphs
        t_step = median_time(lambda: net.forward(toks[:1], pos), args.steps)   # both layers, as the runtime runs
        g = net.graphs
        span = decode_span(pos, net.max_len)                     # cache positions the step's attention reads
        moe_step = next(s for s in g.sets[1, span][0] if not isinstance(s, torch.cuda.CUDAGraph))
        moe, shared_graph, h, ids, weights, routed = moe_step
        host = [t.to("cpu") for t in (h.float(), ids.to(torch.int32), weights.float())]
        arrays = [t.numpy() for t in host]

        def gpu_only():
            attn_only.replay()
            shared_graph.replay()

        def cpu_only():
            moe.experts.cpu.forward(*arrays)

        def moe_part(overlap: bool):                             # what the runtime does between the two graphs
            if overlap:
                r, _ = moe.experts.cpu_part(h, ids, weights, shared_graph.replay)
            else:
                r, _ = moe.experts.cpu_part(h, ids, weights)
                shared_graph.replay()
            routed.copy_(r)

        # the dense layer alone, as a graph of its own (its GPU time; the MoE layer's attention is in `first` too)
        x0 = torch.randn(1, HIDDEN, device="cuda")
        p0 = torch.full((1,), pos, device="cuda")
        s0 = torch.zeros(1, dtype=torch.long, device="cuda")     # slot 0, as the runtime's decode passes it
        dense = net.layers[0]
        with torch.inference_mode():
            dense(x0, p0, s0, span, net.freqs[p0])
            dg = torch.cuda.CUDAGraph()
            with torch.cuda.graph(dg):
                dense(x0, p0, s0, span, net.freqs[p0])
            attn_only = torch.cuda.CUDAGraph()
            moe_layer.before_experts(x0, p0, s0, span, net.freqs[p0])
            with torch.cuda.graph(attn_only):
                moe_layer.before_experts(x0, p0, s0, span, net.freqs[p0])
            attn_whole = torch.cuda.CUDAGraph()                  # the same over the whole cache (max_len)
            moe_layer.before_experts(x0, p0, s0, net.max_len, net.freqs[p0])
            with torch.cuda.graph(attn_whole):
                moe_layer.before_experts(x0, p0, s0, net.max_len, net.freqs[p0])
        head = torch.randn(VOCAB_REAL, HIDDEN, device="cuda", dtype=torch.bfloat16)
        xh = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)

        with torch.inference_mode():
            t_dense = median_time(dg.replay, args.steps)
            t_attn = median_time(attn_only.replay, args.steps)
            t_attn_whole = median_time(attn_whole.replay, args.steps)
            t_shared = median_time(shared_graph.replay, args.steps)
            t_head = median_time(lambda: torch.matmul(xh, head.T), args.steps)
            t_gpu = median_time(gpu_only, args.steps)
            t_cpu = median_time(cpu_only, args.steps)
            over, serial = [], []
            for _ in range(5 * args.steps):                      # alternate, so drift hits both alike
                over.append(median_time(lambda: (attn_only.replay(), moe_part(True)), 1))
                serial.append(median_time(lambda: (attn_only.replay(), moe_part(False)), 1))
        t_moe, t_serial = statistics.median(over), statistics.median(serial)
        saved = statistics.median(b - a for a, b in zip(over, serial))      # per pair: the CPU's drift cancels

        # ------------------------------------------------------------------ the same with one activation term
        set_terms(net, 1)
        net.forward(toks, 0)
        t_pre1 = median_time(lambda: net.forward(toks, 0), 3)
        with torch.inference_mode():
            moe_layer.before_experts(x0, p0, s0, span, net.freqs[p0])
            attn_1 = torch.cuda.CUDAGraph()
            with torch.cuda.graph(attn_1):
                moe_layer.before_experts(x0, p0, s0, span, net.freqs[p0])
            t_attn1 = median_time(attn_1.replay, args.steps)
        set_terms(net, 2)

        # ------------------------------------------------------------------ CPU bandwidth bound
        buf = torch.ones(1 << 30)                                # 4 GiB of float32
        bw = 4 * (1 << 30) / median_time(buf.sum, 5)
        del buf
        per_expert = sum(expert_nbytes(t, s) for _, t, s in MATS)
        bytes_token = TOPK * per_expert * LAYERS_MOE
        step_real = LAYERS_DENSE * t_dense + LAYERS_MOE * t_moe + t_head
        res.update(dict(decode_step_2layers_s=t_step, dense_layer_gpu_s=t_dense, moe_attn_router_gpu_s=t_attn,
                        shared_expert_gpu_s=t_shared, moe_gpu_s=t_gpu, moe_cpu_experts_s=t_cpu,
                        moe_layer_overlapped_s=t_moe, moe_layer_serial_s=t_serial, overlap_saves_s=saved,
                        lm_head_s=t_head, cpu_read_gbs=bw / 1e9, expert_bytes_per_token=bytes_token,
                        projected_decode_tok_s=1 / step_real, bound_tok_s=bw / bytes_token,
                        prefill_tok_s=args.prefill / t_pre, prefill_tok_s_1term=args.prefill / t_pre1,
                        moe_attn_router_gpu_s_1term=t_attn1, attention_span=span,
                        moe_attn_router_gpu_s_whole_cache=t_attn_whole, max_len=net.max_len))

    us = lambda s: f"{s * 1e6:8.0f} us"  # noqa: E731
    print(f"\n{res['device']}; CPU experts on {threads} threads ({os.cpu_count()} logical CPUs)")
    print("decode, per MoE layer (one token):")
    print(f"  GPU: attention + router {us(t_attn)}, shared expert {us(t_shared)}; both as replayed {us(t_gpu)}")
    print(f"       attention over the {span} cache positions of position {pos}'s span; over all {net.max_len} "
          f"(the earlier graphs) {us(t_attn_whole)}")
    print(f"  CPU: 8 routed experts (ggml) {us(t_cpu)}  ({TOPK * per_expert / t_cpu / 1e9:.1f} GB/s of expert bytes)")
    print(f"  layer, shared expert overlapped with the CPU {us(t_moe)}; serial {us(t_serial)}; overlap saves "
          f"{us(saved)} (median of {len(over)} pairs; at most the shared expert's time)")
    print(f"  dense layer (GPU graph) {us(t_dense)}; lm_head {VOCAB_REAL} x {HIDDEN} bf16 {us(t_head)}")
    print(f"  runtime decode step over this 2-layer model {us(t_step)}")
    print(f"prefill {args.prefill} tokens (2 layers): {args.prefill / t_pre:.0f} tokens/s; "
          f"per MoE+dense layer pair {t_pre * 1e3:.0f} ms")
    print(f"one activation term instead of two: prefill {args.prefill / t_pre1:.0f} tokens/s "
          f"({t_pre / t_pre1:.3f}x the two-term time); decode attention + router {us(t_attn1)} ({us(t_attn)} with two)")
    print(f"projection, DeepSeek-V3 decode: {LAYERS_DENSE} x {t_dense * 1e3:.2f} + {LAYERS_MOE} x {t_moe * 1e3:.2f} + "
          f"{t_head * 1e3:.2f} ms = {step_real * 1e3:.0f} ms/token = {1 / step_real:.2f} tokens/s")
    print(f"bound: {bytes_token / 1e9:.1f} GB of expert bytes per token / {bw / 1e9:.0f} GB/s CPU read bandwidth = "
          f"{bw / bytes_token:.2f} tokens/s; projection is {(1 / step_real) / (bw / bytes_token):.0%} of it")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
