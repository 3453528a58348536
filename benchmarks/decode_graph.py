"""
What one decode step's GPU graphs launch, on the real-size layer pair of benchmarks/layer.py (a dense and a MoE layer
of DeepSeek-V3, random valid weights) through runtime.model.Transformer(device="cuda", fp8=True) at position 512:

- the MoE layer's attention + router graph and the dense layer's graph, replayed (median of 300 / 100), with the
  small operations in runtime.fused's kernels (the default) and as torch expressions (runtime.model.FUSED off, what
  DSV3_FUSED=0 selects), captured afresh each time, alternating twice;
- the kernels the attention + router graph runs (torch's profiler over 10 replays): count, mean time, name; their
  sum against the replay's time is what launches and gaps cost;
- the last logits of a 64-token prefill either way (the two paths' float32 rounding differs, not the choice).

    bash benchmarks/device.sh python3 benchmarks/decode_graph.py [--json FILE]
"""
import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import runtime  # noqa: E402,F401  (ggml_ops before torch: OpenMP wait policy)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from layer import CONFIG, build_folder, median_time  # noqa: E402
from moe_step import find_moe_step  # noqa: E402
from runtime import model as M  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    res = {"device": torch.cuda.get_device_name(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp), 256, np.random.default_rng(0))
        net = M.Transformer(folder, max_len=4096, device="cuda", fp8=True, gpu_memory=0)
        toks = torch.randint(0, CONFIG["vocab_size"], (512,))
        net.forward(toks, 0)
        pos = 512
        for fused in (False, True, False, True):
            M.FUSED = fused
            net.graphs = None
            net.forward(toks[:1], pos)                           # captures this path's graphs
            attn, _, dense = find_moe_step(net, pos)
            res["runs"].append({"fused": fused, "attn_router_s": median_time(attn.replay, 300),
                                "dense_s": median_time(dense.replay, 100)})
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                attn.replay()
            torch.cuda.synchronize()
        kernels = collections.OrderedDict()
        for e in prof.events():
            if e.device_type.name == "CUDA":
                k = kernels.setdefault(e.name, [0, 0.0])
                k[0] += 1
                k[1] += e.device_time * 1e-6
        res["kernels"] = [{"name": n, "count": c / 10, "mean_s": t / c} for n, (c, t) in kernels.items()]
        for fused in (False, True):
            M.FUSED = fused
            last = net.forward(toks[:64], 0)[-1].float()
            res[f"prefill_fused_{fused}"] = {"norm": float(last.norm()), "argmax": int(last.argmax())}
    for r in res["runs"]:
        print(f"{'fused kernels' if r['fused'] else 'torch ops    '}: attention + router graph "
              f"{r['attn_router_s'] * 1e6:6.1f} us, dense layer graph {r['dense_s'] * 1e6:6.1f} us")
    total = sum(k["count"] * k["mean_s"] for k in res["kernels"])
    print(f"attention + router graph (fused): {sum(k['count'] for k in res['kernels']):.0f} kernels, "
          f"{total * 1e6:.1f} us of kernel time in {res['runs'][-1]['attn_router_s'] * 1e6:.1f} us")
    for k in res["kernels"]:
        print(f"  {k['count']:4.1f} x {k['mean_s'] * 1e6:6.2f} us  {k['name'][:90]}")
    for fused in (False, True):
        r = res[f"prefill_fused_{fused}"]
        print(f"prefill 64, last logits ({'fused' if fused else 'torch ops'}): norm {r['norm']:.4f}, "
              f"argmax {r['argmax']}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
