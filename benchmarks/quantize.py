"""
The quantize stage's speed (gguf: {quantize: Q4_K_M}) on real-size DeepSeek-V3 experts, and what it means for the
whole model beside downloading the ~400 GB Q4_K_M GGUF.

    python benchmarks/quantize.py [--experts 4] [--threads N] [--json]

Synthetic FP8 experts of DeepSeek-V3's shapes (gate/up 2048 x 7168, down 7168 x 2048; e4m3 codes of Gaussian
weights with 128x128 tile scales, as DeepSeek's checkpoint stores them) are written to a temp safetensors-like
file and quantized by the stage's own per-expert function (stages.quantize.quantize_expert: pread, FP8 x scale,
BF16 rounding, then Q4_K and Q6_K by stages/fastquant.c where it built and matched ggml, else
ggml_quantize_chunk), with the types of Q4_K_M: Q4_K gate/up, down Q6_K or Q4_K by layer.
Measured in one run:
- per matrix type, CPU seconds per expert matrix on one thread (thread_time: what a core spends, whatever else
  this shared host runs; the least of --repeats), and the same for ggml_quantize_chunk alone on ready float32 values
  (the baseline: what the stage cost when it called ggml for every type) and for fastquant alone (the rest of the
  stage's time is reading, dequantizing and rounding);
- the pool: all matrices on --threads threads, wall clock: experts/s and GB/s of FP8 read on this machine; the
  cores it really got (process CPU time / wall) and its CPU time against one thread's (> 1: threads cost extra).
Projection: DeepSeek-V3 has 58 MoE layers x 256 experts x 3 matrices; under Q4_K_M 27 of the 58 layers' down
matrices are Q6_K (stages.mixes, n = 61). CPU-seconds for all of them / 64 cores, assuming the per-core rate holds
on 64 cores (the work is independent per expert; it reads ~0.1 GB/s of FP8 per core, far below memory bandwidth,
but the disk must deliver 654 GB of FP8 experts in that time: stated beside it). Compared with 400 GB at 1 and
10 Gbit/s.
"""
import argparse
import ctypes
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from stages import quantize as Q  # noqa: E402
from stages.mixes import mix_type  # noqa: E402

HIDDEN, INTER, EXPERTS, LAYERS, N_LAYERS, FIRST_DENSE = 7168, 2048, 256, 58, 61, 3
GGUF_BYTES = 400e9
SHAPES = {"gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}


def fp8_matrix(rows, cols, rng):
    """e4m3 codes and float32 tile scales of Gaussian weights (std 0.02), as DeepSeek's checkpoint stores them."""
    w = torch.from_numpy(rng.standard_normal((rows, cols), np.float32) * 0.02)
    tiles = w.reshape(rows // 128, 128, cols // 128, 128)
    scale = tiles.abs().amax(dim=(1, 3)) / 448
    codes = (tiles / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(rows, cols)
    return codes.view(torch.uint8).numpy(), scale.float().numpy()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experts", type=int, default=4, help="synthetic experts (3 matrices, 44 MB of FP8 each)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--cores", type=int, default=64, help="cores of the projection")
    p.add_argument("--repeats", type=int, default=3, help="single-thread timings: the least of this many")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    g = Q.ggml_module()
    rng = np.random.default_rng(0)
    types = {"Q4_K": int(g.GGML_TYPE_Q4_K), "Q6_K": int(g.GGML_TYPE_Q6_K)}

    # the synthetic checkpoint: one file, every matrix's codes then its scales, read back with pread as the stage does
    tmp = tempfile.NamedTemporaryFile(suffix=".fp8", dir=os.environ.get("TMPDIR"))
    jobs, pos = [], 0
    for e in range(a.experts):
        for proj, (rows, cols) in SHAPES.items():
            codes, scale = fp8_matrix(rows, cols, rng)
            tmp.write(codes.tobytes())
            tmp.write(scale.tobytes())
            expert = {"dtype": "F8_E4M3", "weight": [os.path.basename(tmp.name), pos, codes.nbytes],
                      "scale": [os.path.basename(tmp.name), pos + codes.nbytes, scale.nbytes]}
            pos += codes.nbytes + scale.nbytes
            jobs.append((proj, expert, rows, cols))
    tmp.flush()
    root = os.path.dirname(tmp.name)

    # 1. one thread, CPU seconds per matrix, by type: the stage's function, and ggml's quantizer alone
    per, bound, alone = {}, {}, {}
    for proj, type_name in (("gate", "Q4_K"), ("down", "Q4_K"), ("down", "Q6_K")):
        _, expert, rows, cols = next(j for j in jobs if j[0] == proj)
        x = Q.round_bf16(Q.dequantize_fp8_block(Q._pread(os.path.join(root, expert["weight"][0]),
                                                         *expert["weight"][1:]).reshape(rows, cols),
                                                Q._pread(os.path.join(root, expert["scale"][0]),
                                                         *expert["scale"][1:]).view(np.float32).reshape(
                                                    rows // 128, -1)))
        out = np.empty(rows * g.ggml_row_size(types[type_name], cols), np.uint8)
        bound[(proj, type_name)] = per[(proj, type_name)] = float("inf")
        fast = Q.fast_quantizer(types[type_name])
        for _ in range(a.repeats):              # the least CPU time of a few: a shared host only ever adds to it
            t0 = time.thread_time()
            g.ggml_quantize_chunk(types[type_name], x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                  out.ctypes.data_as(ctypes.c_void_p), 0, rows, cols, None)
            bound[(proj, type_name)] = min(bound[(proj, type_name)], time.thread_time() - t0)
            if fast:
                mine = np.empty_like(out)
                t0 = time.thread_time()
                fast(x, mine)
                alone[(proj, type_name)] = min(alone.get((proj, type_name), float("inf")), time.thread_time() - t0)
                assert mine.tobytes() == out.tobytes(), "fastquant's bytes differ from ggml's quantizer"
            t0 = time.thread_time()
            got = Q.quantize_expert(expert, root, types[type_name], rows, cols)
            per[(proj, type_name)] = min(per[(proj, type_name)], time.thread_time() - t0)
        assert got.tobytes() == out.tobytes(), "the stage's bytes differ from ggml's quantizer on the same values"

    # 2. the pool: every matrix, Q4_K_M types (down as Q6_K, the slower), wall clock on --threads threads
    def one(job):
        proj, expert, rows, cols = job
        return Q.quantize_expert(expert, root, types["Q6_K" if proj == "down" else "Q4_K"], rows, cols).nbytes
    t0, c0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(a.threads) as pool:
        list(pool.map(one, jobs))
    wall, pool_cpu = time.perf_counter() - t0, time.process_time() - c0
    fp8_read = sum(j[1]["weight"][2] for j in jobs)

    # 3. projection: DeepSeek-V3 under Q4_K_M
    q6 = sum(mix_type("Q4_K_M", "down", i, N_LAYERS) == "Q6_K" for i in range(FIRST_DENSE, N_LAYERS))
    layer_cost = lambda d: 2 * d[("gate", "Q4_K")] + (q6 * d[("down", "Q6_K")] + (LAYERS - q6) * d[("down", "Q4_K")]) \
        / LAYERS
    cpu_total = EXPERTS * LAYERS * layer_cost(per)
    bound_total = EXPERTS * LAYERS * layer_cost(bound)
    projected = cpu_total / a.cores
    fp8_total = EXPERTS * LAYERS * 3 * HIDDEN * INTER
    download = {f"{gbit} Gbit/s": GGUF_BYTES * 8 / (gbit * 1e9) for gbit in (1, 10)}
    r = {
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
                   f"{platform.processor() or platform.machine()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "ggml": Q.ggml_versions(),
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "cpu_s_per_matrix": {f"{p}/{t}": round(v, 4) for (p, t), v in per.items()},
        "quantizer_alone_cpu_s_per_matrix": {f"{p}/{t}": round(v, 4) for (p, t), v in bound.items()},
        "fastquant_alone_cpu_s_per_matrix": {f"{p}/{t}": round(v, 4) for (p, t), v in alone.items()},
        "fastquant": sorted(t for t in types if Q.fast_quantizer(types[t])),
        "stage_vs_ggml_quantizer_alone": round(cpu_total / bound_total, 3),
        "pool": {"threads": a.threads, "experts": a.experts, "wall_s": round(wall, 3),
                 "cores_used": round(pool_cpu / wall, 2),           # what the host gave us: < threads when shared
                 "cpu_s_vs_one_thread": round(pool_cpu / (a.experts * (2 * per[("gate", "Q4_K")] +
                                                                        per[("down", "Q6_K")])), 3),
                 "experts_per_s": round(a.experts / wall, 3), "fp8_GB_per_s": round(fp8_read / wall / 1e9, 4)},
        "per_core": {"experts_per_s": round(EXPERTS * LAYERS / cpu_total, 4),
                     "fp8_GB_per_s": round(fp8_total / cpu_total / 1e9, 4)},
        "projection": {"experts": EXPERTS * LAYERS, "matrices": EXPERTS * LAYERS * 3, "q6_k_down_layers": q6,
                       "cpu_hours": round(cpu_total / 3600, 2), "cores": a.cores, "minutes": round(projected / 60, 2),
                       "ggml_quantizer_alone_minutes": round(bound_total / a.cores / 60, 2),
                       "fp8_read_GB": round(fp8_total / 1e9, 1),
                       "disk_GB_per_s_needed": round(fp8_total / projected / 1e9, 2)},
        "download_minutes": {k: round(v / 60, 2) for k, v in download.items()},
        "goal_met": projected < download["10 Gbit/s"],
    }
    if a.json:
        print(json.dumps(r))
        return
    print(f"{r['machine']}, ggml {r['ggml']['ggml']}, {r['date']}, load average {r['load_average']}")
    for k, v in r["cpu_s_per_matrix"].items():
        fq = r["fastquant_alone_cpu_s_per_matrix"].get(k)
        print(f"  {k:10s} {v:.3f} CPU s per matrix (ggml's quantizer alone {r['quantizer_alone_cpu_s_per_matrix'][k]:.3f}"
              + (f", fastquant alone {fq:.3f})" if fq is not None else ")"))
    pl = r["pool"]
    print(f"pool of {pl['threads']} threads: {pl['experts']} experts in {pl['wall_s']:.2f} s = {pl['experts_per_s']:.2f} "
          f"experts/s, {pl['fp8_GB_per_s']:.3f} GB/s of FP8 read; {pl['cores_used']:.2f} cores used, CPU time "
          f"{pl['cpu_s_vs_one_thread']:.2f}x one thread's")
    pj = r["projection"]
    print(f"DeepSeek-V3 Q4_K_M: {pj['experts']} experts x 3 matrices ({pj['q6_k_down_layers']}/58 down layers Q6_K): "
          f"{pj['cpu_hours']:.2f} CPU hours -> {pj['minutes']:.1f} min on {pj['cores']} cores (ggml's quantizer alone "
          f"{pj['ggml_quantizer_alone_minutes']:.1f} min: the stage is {r['stage_vs_ggml_quantizer_alone']:.2f}x "
          f"that), reading {pj['fp8_read_GB']} GB of FP8 at "
          f"{pj['disk_GB_per_s_needed']:.2f} GB/s")
    print("download of 400 GB: " + ", ".join(f"{k} {v:.1f} min" for k, v in r["download_minutes"].items())
          + f"; goal (faster than 10 Gbit/s) {'met' if r['goal_met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
