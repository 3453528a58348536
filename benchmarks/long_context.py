"""
Long prompts and batched decode through the runtime, on the real-size layer pair of benchmarks/layer.py (one dense
and one MoE layer of DeepSeek-V3, random valid weights, 256 Q4_K/Q6_K routed experts), run by
runtime.model.Transformer(device="cuda", fp8=True) as a merged folder would be.

    python -m benchmarks.long_context [--prompts 512,2048,8192,32768] [--positions 1024,8192,32768]
                                      [--batches 1,4,8,16] [--chunk 2048] [--json FILE]

Prefill: each prompt from an empty cache, `--repeat` times (the last reported: the first pays kernel compilation and
the memory map's page registration), `--chunk` tokens a pass, last-token logits only; tokens/s, the peak GPU
memory, and the time per layer (each layer's pass synchronized once), projected to DeepSeek-V3 as
3 x dense + 58 x MoE. The PCIe bound: the routed experts' bytes that cross for a prompt (the runtime prefills layer by
layer, so each expert the prompt routes to crosses once per MoE layer; a long prompt routes to all 256) over the
pinned host-to-device bandwidth measured here. No expert is resident (make_resident([])): each of DeepSeek-V3's 58
layers would have to stream, as on a card that holds few.
Decode: one sequence at positions --positions (its cache filled with random values, which costs what real ones
do): the step through the runtime's graphs, and the MoE layer's GPU attention + router alone (a graph), whose time
at 32K should stay within 1.25x of its time at 1K.
Batched decode: B sequences at position 1024 in one step; the MoE layer's step (the runtime's step less the dense
layer's and the logits' graphs, timed alone); the distinct experts it touches; its bound = their bytes / the CPU read
bandwidth measured here + its GPU part (attention + router and shared-expert graphs, timed alone). Projected
DeepSeek-V3: 3 x dense + 58 x MoE step + lm_head (129280 x 7168 bf16 for B rows, timed).
"""
from __future__ import annotations

import argparse
import json
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
from layer import CONFIG, LAYERS_DENSE, LAYERS_MOE, VOCAB_REAL, build_folder, median_time  # noqa: E402
from runtime.model import MoE, Transformer, decode_span, prefill_reserve  # noqa: E402
from synthetic import HIDDEN, MATS, TOPK, expert_nbytes  # noqa: E402

EXPERT_BYTES = sum(expert_nbytes(t, s) for _, t, s in MATS)


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def pinned_h2d(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / median_time(lambda: dst.copy_(src, non_blocking=True), 5)


def cpu_read() -> float:
    buf = torch.ones(1 << 30)
    bw = 4 * (1 << 30) / median_time(buf.sum, 5)
    del buf
    return bw


class LayerTimer:
    """Wall time per layer over one prefill: each layer's pass synchronized (negligible against long prompts)."""

    def __init__(self, net: Transformer):
        self.net, self.times = net, [0.0] * len(net.layers)

    def __enter__(self):
        for i, layer in enumerate(self.net.layers):
            def timed(*a, i=i, run=layer.prefill):
                torch.cuda.synchronize()
                t = time.perf_counter()
                run(*a)
                torch.cuda.synchronize()
                self.times[i] += time.perf_counter() - t
            layer.prefill = timed                                # shadows the method on this instance
        return self

    def __exit__(self, *exc):
        for layer in self.net.layers:
            del layer.prefill


def routed_experts(net: Transformer, tokens: torch.Tensor) -> set[int]:
    """Distinct experts the MoE layer routes `tokens` (its inputs, as rows) to."""
    moe = next(layer.ffn for layer in net.layers if isinstance(layer.ffn, MoE))
    ids, _ = moe.route(tokens)
    return set(ids.flatten().tolist())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=ints, default=ints("512,2048,8192,32768"))
    p.add_argument("--positions", type=ints, default=ints("1024,8192,32768"))
    p.add_argument("--batches", type=ints, default=ints("1,4,8,16"))
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--ctx", type=int, default=0, help="context to configure (default: what the runs need)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=2, help="prefill each prompt this many times, report the last")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    threads = args.threads or G.physical_cores()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    max_len = max(args.prompts + [q + 1 for q in args.positions] + [1025, args.ctx])
    res = {"device": torch.cuda.get_device_name(), "cpu_threads": threads, "chunk": args.chunk, "prefill": [],
           "decode": [], "batched": []}
    h2d, bw = pinned_h2d(), cpu_read()
    res.update(pinned_h2d_gbs=h2d / 1e9, cpu_read_gbs=bw / 1e9)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = build_folder(Path(tmp), 256, rng)
        slots = max(args.batches or [1])
        net = Transformer(folder, max_len=max_len, threads=threads, device="cuda", fp8=True, slots=slots,
                          chunk=args.chunk)
        dense_i, moe_i = 0, 1
        experts = net.layers[moe_i].ffn.experts
        experts.make_resident([], net.device)        # none resident: each of DeepSeek-V3's 58 layers would stream
        streamer = experts.streamer
        res["streaming"] = streamer is not None

        # ------------------------------------------------------------------ prefill
        warm = torch.randint(0, CONFIG["vocab_size"], (min(512, args.chunk),))
        net.prefill(warm, 0, 0)
        for T in args.prompts:
            toks = torch.randint(0, CONFIG["vocab_size"], (T,))
            first = None
            for _ in range(max(1, args.repeat)):          # the first pays compilation and page registration
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                with LayerTimer(net) as lt:
                    t0 = time.perf_counter()
                    net.prefill(toks, 0, 0)
                    torch.cuda.synchronize()
                    t = time.perf_counter() - t0
                first = t if first is None else first
            peak = torch.cuda.max_memory_allocated()
            crossing = min(256, T * TOPK) * EXPERT_BYTES * LAYERS_MOE   # each layer's experts once per prompt
            proj = LAYERS_DENSE * lt.times[dense_i] + LAYERS_MOE * lt.times[moe_i]
            row = dict(tokens=T, seconds=t, first_seconds=first, tok_s=T / t, peak_gpu_gib=peak / 2**30,
                       peak_above_weights_gib=(peak - base) / 2**30, dense_layer_s=lt.times[dense_i],
                       moe_layer_s=lt.times[moe_i], projected_tok_s=T / proj,
                       pcie_bound_tok_s=T / (crossing / h2d), projected_vs_pcie_bound=(crossing / h2d) / proj)
            if streamer is not None and streamer.decisions:
                row["streamed"] = bool(streamer.decisions[-1][-1])
            res["prefill"].append(row)
            print(f"prefill {T:6d}: {T / t:8.0f} tok/s (2 layers), peak GPU {peak / 2**30:6.1f} GiB; per layer dense "
                  f"{lt.times[dense_i]:.2f} s, MoE {lt.times[moe_i]:.2f} s; DeepSeek-V3 projected "
                  f"{T / proj:7.0f} tok/s, PCIe bound {T / (crossing / h2d):7.0f} tok/s"
                  f"{'; experts streamed' if row.get('streamed') else '; CPU experts'}", flush=True)

        # ------------------------------------------------------------------ decode at long positions
        moe_layer = net.layers[moe_i]
        for layer in net.layers:                                # random cache: same cost as a real one
            layer.attn.kv_cache.normal_()
            layer.attn.pe_cache.normal_()
        x0 = torch.randn(1, HIDDEN, device="cuda")
        s0 = torch.zeros(1, dtype=torch.long, device="cuda")
        for P in args.positions:
            tok = torch.tensor([7])
            net.decode(tok, torch.tensor([P]), torch.tensor([0]))                # captures this span's graphs
            t_step = median_time(lambda: net.decode(tok, torch.tensor([P]), torch.tensor([0])), args.steps)
            p0 = torch.full((1,), P, device="cuda")
            span = decode_span(P, net.max_len)
            with torch.inference_mode():
                moe_layer.before_experts(x0, p0, s0, span, net.freqs[p0])
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    moe_layer.before_experts(x0, p0, s0, span, net.freqs[p0])
                t_attn = median_time(g.replay, args.steps)
            cache_bytes = P * (CONFIG["kv_lora_rank"] + CONFIG["qk_rope_head_dim"]) * 2
            res["decode"].append(dict(position=P, step_2layers_s=t_step, attn_router_s=t_attn, span=span,
                                      cache_bytes=cache_bytes, cache_gbs_upper=cache_bytes / t_attn / 1e9))
            print(f"decode at {P:6d}: step (2 layers) {t_step * 1e6:7.0f} us; MoE layer attention + router "
                  f"{t_attn * 1e6:6.0f} us (span {span})", flush=True)
        if len(res["decode"]) > 1:
            d = res["decode"]
            res["attn_ratio_last_first"] = d[-1]["attn_router_s"] / d[0]["attn_router_s"]
            print(f"attention + router at {d[-1]['position']} / at {d[0]['position']}: "
                  f"{res['attn_ratio_last_first']:.2f}x (goal <= 1.25x)")

        # ------------------------------------------------------------------ batched decode
        head = torch.randn(VOCAB_REAL, HIDDEN, device="cuda", dtype=torch.bfloat16)
        def step_parts(B: int) -> dict:
            """One decode step of B sequences at position 1024 through the runtime's graphs, and its pieces."""
            toks = torch.randint(0, CONFIG["vocab_size"], (B,))
            pos, sl = torch.full((B,), 1024), torch.arange(B)
            net.decode(toks, pos, sl)
            t_step = median_time(lambda: net.decode(toks, pos, sl), args.steps)
            graphs = net.graphs.sets[B, decode_span(1024, net.max_len)][0]
            gpu_only = [s for s in graphs if isinstance(s, torch.cuda.CUDAGraph)]
            moe_steps = [s for s in graphs if not isinstance(s, torch.cuda.CUDAGraph)]
            t_dense, t_attn, t_logits = (median_time(g.replay, args.steps) for g in gpu_only)
            t_gpu_side = median_time(moe_steps[0][1].replay, args.steps)   # shared (+ resident experts)
            ids = moe_steps[0][3]
            return dict(step=t_step, dense=t_dense, attn=t_attn, logits=t_logits, gpu_side=t_gpu_side,
                        moe=t_step - t_dense - t_logits, ids=ids.cpu().numpy())

        for B in args.batches:
            r = step_parts(B)
            t_dense, t_attn, t_shared, t_moe, t_step = r["dense"], r["attn"], r["gpu_side"], r["moe"], r["step"]
            distinct = len(np.unique(r["ids"]))
            bound = distinct * EXPERT_BYTES / bw + t_attn + t_shared
            xh = torch.randn(B, HIDDEN, device="cuda", dtype=torch.bfloat16)
            t_head = median_time(lambda: torch.matmul(xh, head.T), args.steps)
            proj = LAYERS_DENSE * t_dense + LAYERS_MOE * t_moe + t_head
            expected = 256 * (1 - (1 - TOPK / 256) ** B)
            res["batched"].append(dict(batch=B, step_2layers_s=t_step, moe_layer_s=t_moe, dense_layer_s=t_dense,
                                       attn_router_s=t_attn, shared_s=t_shared, distinct_experts=distinct,
                                       expected_distinct=expected, moe_bound_s=bound, moe_vs_bound=t_moe / bound,
                                       projected_tok_s=B / proj, projected_tok_s_per_seq=1 / proj))
            print(f"batch {B:2d}: MoE layer step {t_moe * 1e3:6.2f} ms (attention + router {t_attn * 1e6:4.0f} us, "
                  f"shared {t_shared * 1e6:3.0f} us), {distinct} distinct experts (E(B) {expected:.1f}), bound "
                  f"{bound * 1e3:6.2f} ms -> {t_moe / bound:.2f}x; "
                  f"DeepSeek-V3 projected {B / proj:6.2f} tok/s total", flush=True)
        # ------------------------------------------------------------------ GPU-resident experts (issue 14)
        cpu1 = res["batched"][0] if res["batched"] and res["batched"][0]["batch"] == 1 else None
        if cpu1 is not None:
            xh = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
            t_head = median_time(lambda: torch.matmul(xh, head.T), args.steps)
            res["resident"] = {}
            for label, ids in (("all", np.arange(256)), ("half", np.arange(0, 256, 2))):
                experts.make_resident(ids, net.device)
                net.graphs = None                                # the GPU side's graph holds the stacks
                r = step_parts(1)
                on_gpu = float(experts.resident[r["ids"]].mean())
                res["resident"][label] = dict(moe_layer_s=r["moe"], gpu_side_s=r["gpu_side"], attn_s=r["attn"],
                                              token_experts_on_gpu=on_gpu)
                print(f"resident {label:4s}: MoE layer step {r['moe'] * 1e6:6.0f} us (GPU side {r['gpu_side'] * 1e6:4.0f} "
                      f"us, {on_gpu:.0%} of the token's experts on the GPU)", flush=True)
            experts.make_resident([], net.device)
            net.graphs = None
            # DeepSeek-V3: whole MoE layers' experts resident (no profile) in what the card leaves
            weights = sum(t.end - t.begin for n, t in folder.tensors.items() if "_exps." not in n and
                          n.startswith("blk.1.")) * LAYERS_MOE + sum(
                t.end - t.begin for n, t in folder.tensors.items() if n.startswith("blk.0.")) * LAYERS_DENSE \
                + 2 * VOCAB_REAL * HIDDEN * 2
            layer_experts = 256 * EXPERT_BYTES
            total = torch.cuda.get_device_properties(0).total_memory
            ctx = 32768
            kv = (LAYERS_DENSE + LAYERS_MOE) * ctx * 576 * 2
            extra = 2 * (1 << 30) + (1 << 30) + prefill_reserve(net.a, args.chunk, ctx)   # streaming slots, margin
            t_all = res["resident"]["all"]["moe_layer_s"]
            t_cpu, t_dense1 = cpu1["moe_layer_s"], cpu1["dense_layer_s"]
            serial = LAYERS_DENSE * t_dense1 + LAYERS_MOE * (cpu1["attn_router_s"] + cpu1["shared_s"]) + t_head
            res["projection"] = {}
            for case, card in (("cpu_only", 0), ("fill_card", total), ("cap_24GiB", 24 << 30)):
                budget = max(0, card - weights - kv - extra) if card else 0
                n_gpu = min(LAYERS_MOE, budget // layer_experts)
                step = LAYERS_DENSE * t_dense1 + (LAYERS_MOE - n_gpu) * t_cpu + n_gpu * t_all + t_head
                bound = (LAYERS_MOE - n_gpu) * TOPK * EXPERT_BYTES / bw + serial
                res["projection"][case] = dict(gpu_layers=int(n_gpu), tok_s=1 / step, bound_tok_s=1 / bound,
                                               of_bound=bound / step)
                print(f"DeepSeek-V3 decode, {case:9s}: {n_gpu:2d} of {LAYERS_MOE} MoE layers' experts on the GPU "
                      f"(weights {weights / 2**30:.0f} GiB, KV {ctx} tokens {kv / 2**30:.1f} GiB): {1 / step:5.2f} "
                      f"tok/s; bound {1 / bound:5.2f} (expert bytes / CPU bandwidth + serial GPU work): "
                      f"{bound / step:.0%}", flush=True)
    print(f"pinned host->device {h2d / 1e9:.1f} GB/s; CPU read {bw / 1e9:.1f} GB/s")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
