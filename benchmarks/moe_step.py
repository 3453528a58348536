"""
One real-size DeepSeek-V3 MoE layer's expert step on the GPU machine, piece by piece (layer.py's two-layer slice:
a dense layer, then a MoE layer of 256 Q4_K/Q6_K experts, through runtime.model.Transformer(device="cuda", fp8=True)).

    bash benchmarks/device.sh python3 benchmarks/moe_step.py [--experts 256] [--steps 50] [--json $OUT/moe_step.json]

Decode, one token at position 512 through the runtime's CUDA graphs, per MoE layer:
  attn      the layer's attention + router graph alone;
  gpu side  the graph launched beside the CPU (shared expert, + the resident experts' share when there are any);
  cpu       the routed experts on the CPU alone (runtime.experts: its own kernel where it runs, else ggml; back to
            back), and GB/s of expert bytes;
  step      attention graph + the MoE step + a sync: 'old' as the runtime ran it before runtime.experts.LayerExperts
            (pageable .to("cpu") copies that wait for the whole stream, a fresh tensor uploaded back), 'new' as it
            runs now (pinned buffers, an event on the copies only, the GPU side queued first, the sum uploaded
            asynchronously into the graph's own buffer); alternating pairs, medians;
  (each call of cpu and step takes the next of 64 random sets of 8 experts, the graph's routing overwritten by a
  device copy, which the step's glue includes: one set called again and again stays in a large L3);
  glue      step - attn - max(cpu, gpu side), and the pieces it is made of (copies down and up, old and new; the
            host-side split of the routing);
  wake      the CPU experts after 300 us of idleness (a token's attention) vs hot, under four OpenMP wait
            policies, each in a child process (libgomp reads them once, at load): PASSIVE (the runtime's default),
            GOMP_SPINCOUNT 30000 and 300000 (bounded spins, ~0.3 and ~3 ms), ACTIVE.
Resident experts: the same step with all 256 experts on the GPU (8 of 8 there) and with every other expert there
(a token's 8 split ~4/4, both devices at once).
Projection, DeepSeek-V3 decode (3 dense + 58 MoE layers + lm_head): (a) all experts on the CPU; (b) whole layers of
resident experts filling this card after the real model's non-expert weights (from the slice's tensor sizes), a
4096-token KV cache, the prefill reserve and the streaming slots; (c) the same within 24 GiB. Bound of each case:
CPU expert bytes / CPU read bandwidth + GPU expert bytes / HBM bandwidth (both measured here), alone and plus the
serial GPU work measured here (attention + router per layer, dense layers, lm_head).
Prefill streaming: pinned host -> GPU bandwidth, memmap -> pinned fill rate (host threads), and one chunk's routed
experts of T tokens (random routing over all experts) on the CPU vs streamed (runtime.experts.Streamer)
with the runtime's prediction of each and its decision, the PCIe bound (bytes that cross / measured bandwidth).
"""
import argparse
import itertools
import json
import os
import statistics
import subprocess
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
from runtime import experts as X  # noqa: E402
from runtime.load import Folder, TensorInfo  # noqa: E402
from runtime.model import MoE, Transformer, cache_bytes, decode_span, prefill_reserve  # noqa: E402
from synthetic import HIDDEN, TOPK  # noqa: E402

ROUTES = 64          # expert sets the decode pieces cycle through
POLICIES = {"PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "spin 30000": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "30000"},
            "spin 300000": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "300000"},
            "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"}}


def save_folder(folder: Folder, path: Path) -> None:
    (path / "tensors.json").write_text(json.dumps({n: vars(t) for n, t in folder.tensors.items()}))


def open_saved(path: Path) -> Folder:
    spec = json.loads((path / "tensors.json").read_text())
    tensors = {n: TensorInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in t.items()})
               for n, t in spec.items()}
    return Folder(path, CONFIG, tensors, verified=True)


def routing(rng, T: int, experts: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.stack([rng.choice(experts, TOPK, replace=False) for _ in range(T)]).astype(np.int32)
    return ids, rng.uniform(0.05, 0.5, (T, TOPK)).astype(np.float32)


def wake_child(path: Path, threads: int, n: int) -> dict:
    """In a child process (its own libgomp settings): 8 experts on the CPU hot and after 300 us idle."""
    cpu = X.MoEExperts.from_folder(open_saved(path), 1, threads=threads)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, HIDDEN), np.float32)
    ids, w = routing(rng, 1, cpu.experts)
    out = np.empty((1, HIDDEN), np.float32)
    cpu.forward(x, ids, w, out=out)
    hot, cold = [], []
    for _ in range(n):
        t = time.perf_counter()
        cpu.forward(x, ids, w, out=out)
        hot.append(time.perf_counter() - t)
        end = time.perf_counter() + 300e-6                  # idle as during a token's attention (busy host clock,
        while time.perf_counter() < end:                   # no sleep: its wake-up would be timed too)
            pass
        t = time.perf_counter()
        cpu.forward(x, ids, w, out=out)
        cold.append(time.perf_counter() - t)
    return {"hot_s": statistics.median(hot), "after_idle_s": statistics.median(cold)}


def find_moe_step(net: Transformer, pos: int):
    steps = net.graphs.sets[1, decode_span(pos, net.max_len)][0]
    i = next(i for i, s in enumerate(steps) if not isinstance(s, torch.cuda.CUDAGraph))
    return steps[i - 1], steps[i], steps[0]                 # attention + router graph, the MoE step, the dense layer


def alternate(fns: dict, n: int) -> dict:
    """Medians of each fn, timed in turn n times (so drift hits all alike)."""
    t = {k: [] for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            t[k].append(median_time(fn, 1))
    return {k: statistics.median(v) for k, v in t.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="default: physical cores")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--json", type=Path)
    p.add_argument("--wake-child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    threads = args.threads or G.physical_cores()
    if args.wake_child:
        print(json.dumps(wake_child(args.wake_child, threads, args.steps)))
        return
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "cpu_threads": threads, "os_cpus": os.cpu_count()}
    us = lambda s: f"{s * 1e6:8.0f} us"  # noqa: E731

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        folder = build_folder(tmp, args.experts, rng)
        save_folder(folder, tmp)
        print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)

        # ------------------------------------------------------------------ OpenMP wake-up, in child processes
        wake = {}
        for name, env in POLICIES.items():
            r = subprocess.run([sys.executable, __file__, "--wake-child", str(tmp), "--threads", str(threads),
                                "--steps", str(args.steps)], env={**os.environ, **env}, capture_output=True,
                               text=True, check=True)
            wake[name] = json.loads(r.stdout.strip().splitlines()[-1])
        res["wake"] = wake

        net = Transformer(folder, max_len=4096, threads=threads, device="cuda", fp8=True, gpu_memory=0)
        layers = {i: b.ffn.experts for i, b in enumerate(net.layers) if isinstance(b.ffn, MoE)}
        le = layers[1]
        per = le.per_expert
        toks = torch.randint(0, CONFIG["vocab_size"], (512,))
        pos = 512
        net.forward(toks, 0)
        net.forward(toks[:1], pos)                               # captures the decode graphs
        attn, (moe, gpu_graph, h, ids, weights, routed), dense = find_moe_step(net, pos)

        # ------------------------------------------------------------------ decode pieces, all experts on the CPU
        host = [t.to("cpu") for t in (h.float(), ids.to(torch.int32), weights.float())]
        xa, ia, wa = (t.numpy() for t in host)
        # every timed call takes the next of ROUTES expert sets (each layer's 7.3 GB in turn), as a decode reads them:
        # one set called again and again stays in a large L3 (on some of these hosts: 129% of the DRAM bandwidth)
        routes = np.stack([np.sort(rng.choice(le.n_experts, TOPK, replace=False)) for _ in range(ROUTES)])
        routes_i32 = [r[None].astype(np.int32) for r in routes]
        routes_dev = torch.from_numpy(routes).to(dev, ids.dtype)
        turn = itertools.count()

        def reroute(dst):                                        # the graph's routing replaced by the next set
            dst.copy_(routes_dev[next(turn) % ROUTES][None])
        oa = np.empty_like(xa)
        b = X._host.get(1, HIDDEN, TOPK, pinned=True)

        def old_moe():                                           # the MoE step before LayerExperts
            hst = [t.to("cpu") for t in (h.float(), ids.to(torch.int32), weights.float())]
            gpu_graph.replay()
            r = le.cpu.forward(*(t.numpy() for t in hst))
            routed.copy_(torch.from_numpy(r).to(dev))

        def new_moe():
            le.cpu_part(h, ids, weights, gpu_graph.replay, out=routed)

        def d2h_new():
            b.x[:1].copy_(h, non_blocking=True)
            b.ids[:1].copy_(ids, non_blocking=True)
            b.w[:1].copy_(weights, non_blocking=True)
            b.event.record()
            b.event.synchronize()

        pieces = {"attn": attn.replay, "gpu_side": gpu_graph.replay, "dense": dense.replay,
                  "cpu": lambda: le.cpu.forward(xa, routes_i32[next(turn) % ROUTES], wa, out=oa),
                  "d2h_old": lambda: [t.to("cpu") for t in (h.float(), ids.to(torch.int32), weights.float())],
                  "d2h_new": d2h_new,
                  "h2d_old": lambda: routed.copy_(torch.from_numpy(oa).to(dev)),
                  "h2d_new": lambda: routed.copy_(b.out[:1], non_blocking=True),
                  "split_routing": lambda: X.cpu_routes(ia, wa, le.resident, b.ids32[:1], b.w_cpu[:1]),
                  "step_old": lambda: (attn.replay(), reroute(ids), old_moe()),
                  "step_new": lambda: (attn.replay(), reroute(ids), new_moe())}
        with torch.inference_mode():
            for fn in pieces.values():
                fn()
            t = alternate(pieces, args.steps)
        head = torch.randn(VOCAB_REAL, HIDDEN, device=dev, dtype=torch.bfloat16)
        xh = torch.randn(1, HIDDEN, device=dev, dtype=torch.bfloat16)
        t["head"] = median_time(lambda: xh @ head.T, args.steps)
        for k in ("old", "new"):
            t[f"glue_{k}"] = t[f"step_{k}"] - t["attn"] - max(t["cpu"], t["gpu_side"])
        res["decode_cpu_experts"] = t

        # ------------------------------------------------------------------ bandwidths
        buf = torch.ones(1 << 30)                                # 4 GiB float32
        cpu_bw = 4 * (1 << 30) / median_time(buf.sum, 5)
        del buf
        a = torch.empty(1 << 31, dtype=torch.uint8, device=dev)  # 2 GiB, read + written
        bb = torch.empty_like(a)
        hbm_bw = 2 * a.numel() / median_time(lambda: bb.copy_(a), 10)
        del a, bb
        res.update(cpu_read_gbs=cpu_bw / 1e9, hbm_copy_gbs=hbm_bw / 1e9, expert_bytes=per)

        # ------------------------------------------------------------------ resident experts: all, then half
        def resident_step(label, budget, counts=None):
            X.place_experts(layers, dev, budget, X.RoutingProfile(counts, 1) if counts else None)
            net.graphs = None
            net.forward(toks[:1], pos)                           # recapture with the resident experts
            at, (_, gg, hh, ii, ww, rr), _ = find_moe_step(net, pos)
            hst = [t.to("cpu") for t in (hh.float(), ii.to(torch.int32), ww.float())]
            shares = []                                          # each route's CPU share (ids, weights), if any
            for r in routes_i32:
                ia2, wa2 = np.empty((1, TOPK), np.int32), np.empty((1, TOPK), np.float32)
                if X.cpu_routes(r, hst[2].numpy(), le.resident, ia2, wa2):
                    shares.append((ia2, wa2))
            fns = {"attn": at.replay, "gpu_side": lambda: (reroute(ii), gg.replay()),
                   "step": lambda: (at.replay(), reroute(ii), le.cpu_part(hh, ii, ww, gg.replay, out=rr))}
            if shares:
                fns["cpu"] = lambda: le.cpu.forward(hst[0].numpy(), *shares[next(turn) % len(shares)], out=oa)
            with torch.inference_mode():
                for fn in fns.values():
                    fn()
                r = alternate(fns, args.steps)
            r["cpu"] = r.get("cpu", 0.0)
            r["gpu_experts_on_token"] = float(le.resident[routes].sum(1).mean())
            r["glue"] = r["step"] - r["attn"] - max(r["cpu"], r["gpu_side"])
            res[label] = r
            return r

        full = resident_step("decode_all_resident", per * le.n_experts)
        # prefill-size GPU math on resident experts (what streaming adds to the copies)
        gemm = {}
        for T in (256, 2048):
            i_np, w_np = routing(rng, T, le.n_experts)
            xg = torch.randn(T, HIDDEN, device=dev)
            ig, wg = torch.from_numpy(i_np).to(dev), torch.from_numpy(w_np).to(dev)
            le.gpu_part(xg, ig, wg)
            gemm[T] = median_time(lambda: le.gpu_part(xg, ig, wg), 5)
        res["resident_gemm_s"] = gemm
        half = resident_step("decode_half_resident", per * le.n_experts // 2,
                             {1: (np.arange(le.n_experts) % 2 == 0).astype(np.int64)})

        # ------------------------------------------------------------------ projection to DeepSeek-V3
        a = net.a
        dense_bytes = sum(t.end - t.begin for n, t in folder.tensors.items() if n.startswith("blk.0."))
        moe_bytes = sum(t.end - t.begin for n, t in folder.tensors.items()
                        if n.startswith("blk.1.") and "_exps." not in n)
        real_weights = LAYERS_DENSE * dense_bytes + LAYERS_MOE * moe_bytes + 2 * VOCAB_REAL * HIDDEN * 2
        kv = cache_bytes(a, 4096, 2) // a.n_layers * (LAYERS_DENSE + LAYERS_MOE)
        reserve = prefill_reserve(a, 2048) + 2 * X.STAGE_BYTES + X.MARGIN_BYTES
        layer_bytes = per * 256
        total = torch.cuda.get_device_properties(dev).total_memory
        step_cpu, step_gpu = t["step_new"], full["step"]
        serial = LAYERS_DENSE * t["dense"] + t["head"]
        proj = {}
        for case, mem in (("cpu_only", None), ("fill_card", total), ("cap_24GiB", 24 * 2**30)):
            n = 0 if mem is None else int(min(LAYERS_MOE, max(0, mem - real_weights - kv - reserve) // layer_bytes))
            step = serial + n * step_gpu + (LAYERS_MOE - n) * step_cpu
            bound = ((LAYERS_MOE - n) * TOPK * per / cpu_bw + n * TOPK * per / hbm_bw)
            bound_serial = bound + serial + LAYERS_MOE * t["attn"]
            proj[case] = {"gpu_layers": n, "tok_s": 1 / step, "bound_tok_s": 1 / bound,
                          "bound_with_serial_gpu_tok_s": 1 / bound_serial, "ratio": bound / step,
                          "ratio_with_serial_gpu": bound_serial / step}
        res.update(projection=proj, real_weights_bytes=real_weights, card_bytes=total)

        # ------------------------------------------------------------------ prefill streaming
        X.place_experts(layers, dev, 0)
        s = X.Streamer(dev, X.STAGE_BYTES)
        le.streamer = s
        pcie = s.measure_pcie()
        batch = np.arange(min(le.n_experts, X.STAGE_BYTES // per))
        s._fill(le, batch, s.slots[0])
        t_fill = median_time(lambda: s._fill(le, batch, s.slots[0]), 3)
        stream = {"pcie_gbs": pcie / 1e9, "fill_gbs": len(batch) * per / t_fill / 1e9, "chunks": {}}
        for T in (64, 256, 2048):
            i_np, w_np = routing(rng, T, le.n_experts)
            x_np = rng.standard_normal((T, HIDDEN), np.float32)
            xg, ig, wg = (torch.from_numpy(v).to(dev) for v in (x_np, i_np.astype(np.int64), w_np))
            row = {}
            if T <= 256:                                         # the CPU's time (compute-bound past ~64 rows)
                le.cpu.forward(x_np, i_np, w_np)
                t0 = time.perf_counter()
                le.cpu.forward(x_np, i_np, w_np)
                row["cpu_s"] = time.perf_counter() - t0
                s.cpu_timed(T * TOPK, row["cpu_s"])
            s.run(le, xg, ig, wg, i_np)
            row["stream_s"] = median_time(lambda: s.run(le, xg, ig, wg, i_np), 3)
            row["predicted_copy_s"], row["predicted_cpu_s"], row["bytes"] = s.predict(le, i_np)
            row["pcie_bound_s"] = row["bytes"] / pcie
            row["streams"] = X.stream_pays(row["predicted_copy_s"], row["predicted_cpu_s"])
            stream["chunks"][T] = row
        stream["cpu_pair_s"] = s.cpu_pair_s
        res["prefill_streaming"] = stream

    # ---------------------------------------------------------------------- report
    print(f"\n{res['device']}; CPU experts on {threads} threads ({os.cpu_count()} logical CPUs); CPU read "
          f"{cpu_bw / 1e9:.0f} GB/s, HBM copy {hbm_bw / 1e9:.0f} GB/s, one expert {per / 1e6:.1f} MB")
    print("decode, one token, per MoE layer, all experts on the CPU:")
    print(f"  attn + router {us(t['attn'])}   gpu side (shared expert) {us(t['gpu_side'])}   "
          f"cpu experts {us(t['cpu'])} ({TOPK * per / t['cpu'] / 1e9:.1f} GB/s, "
          f"{TOPK * per / t['cpu'] / cpu_bw:.0%} of the read bandwidth)")
    print(f"  step old {us(t['step_old'])} (glue {us(t['glue_old'])})   new {us(t['step_new'])} "
          f"(glue {us(t['glue_new'])})")
    print(f"  pieces: copies down old {us(t['d2h_old'])} new {us(t['d2h_new'])}; up old {us(t['h2d_old'])} "
          f"new {us(t['h2d_new'])}; routing split on the host {us(t['split_routing'])}")
    print("  CPU experts after 300 us idle / hot: " + "; ".join(f"{k} {us(v['after_idle_s'])} / {us(v['hot_s'])}"
                                                          for k, v in wake.items()))
    for label, r in (("all 256 resident", full), ("every other resident", half)):
        print(f"  {label} ({r['gpu_experts_on_token']:.1f}/8 of the token's experts on the GPU): step {us(r['step'])}, "
              f"attn {us(r['attn'])}, gpu side {us(r['gpu_side'])}, cpu {us(r['cpu'])}, glue {us(r['glue'])}")
    print(f"  resident experts, prefill math: 256 tokens {us(gemm[256])}, 2048 tokens {us(gemm[2048])}")
    print("projection, DeepSeek-V3 decode (whole layers resident):")
    for case, r in proj.items():
        print(f"  {case:10s} {r['gpu_layers']:2d} GPU layers: {r['tok_s']:.2f} tok/s; bound (expert bytes) "
              f"{r['bound_tok_s']:.2f} ({r['ratio']:.0%}); with the serial GPU work "
              f"{r['bound_with_serial_gpu_tok_s']:.2f} ({r['ratio_with_serial_gpu']:.0%})")
    print(f"prefill streaming: PCIe {stream['pcie_gbs']:.1f} GB/s pinned->GPU, memmap->pinned fill "
          f"{stream['fill_gbs']:.1f} GB/s; CPU per pair {s.cpu_pair_s * 1e3:.2f} ms")
    for T, r in stream["chunks"].items():
        cpu = f"{r['cpu_s'] * 1e3:.0f} ms" if "cpu_s" in r else "-"
        print(f"  {T:5d} tokens: CPU {cpu} (predicted {r['predicted_cpu_s'] * 1e3:.0f} ms), streamed "
              f"{r['stream_s'] * 1e3:.0f} ms (PCIe bound {r['pcie_bound_s'] * 1e3:.0f} ms, "
              f"{r['pcie_bound_s'] / r['stream_s']:.0%}), {r['bytes'] / 1e9:.2f} GB; runtime streams: {r['streams']}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
