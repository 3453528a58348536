"""Verify throughput at DeepSeek-V3's real expert shapes: 1 vs 2 dask workers, and our dequantizers vs gguf's.

Makes N real-size routed experts (gate/up 2048x7168 Q4_K, down 7168x2048 Q6_K, quantized by ggml's own quantizer
from Gaussian weights) with their FP8 twins (e4m3, 128x128 block scales), then runs verify's own tasks (integrity:
merged bytes vs source bytes + xxh3; parity: dequantized merged expert vs dequantized FP8 expert) through
stages.verify.execute with a LocalCluster of 1 and of 2 worker processes, and dask's threaded scheduler.

    python benchmarks/verify.py [--experts 24] [--workdir /tmp/verify-bench]
"""
import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from quant_error import ggml_quantize  # noqa: E402
from stages.dequant import GGML_BLOCK, dequantize_ggml  # noqa: E402
from stages.verify import execute, threshold  # noqa: E402

Q4_K, Q6_K = 12, 14
H, I = 7168, 2048
MATS = [("gate", Q4_K, (I, H)), ("up", Q4_K, (I, H)), ("down", Q6_K, (H, I))]


def fp8_codes(w: np.ndarray):
    import torch
    t = torch.from_numpy(w).double()
    R, C = t.shape
    tiles = t.reshape(R // 128, 128, C // 128, 128)
    scale = tiles.abs().amax(dim=(1, 3)) / 448
    q = (tiles / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(R, C)
    return q.view(torch.uint8).numpy(), scale.float().numpy()


def make_data(work: Path, n: int) -> dict:
    """merged.bin (GGML experts, as in a merged shard), source.gguf.bin (the same bytes), fp8.bin (codes+scales)."""
    marker = work / f"ready-{n}"
    layout, pos, fpos = {}, 0, 0
    for name, qtype, (r, c) in MATS:
        block, nbytes = GGML_BLOCK[qtype]
        per = r * c // block * nbytes
        layout[name] = {"type": qtype, "rows": r, "cols": c, "offset": pos, "per": per, "fp8": []}
        pos += per * n
        for e in range(n):
            layout[name]["fp8"].append((fpos, fpos + r * c))
            fpos += r * c + (r // 128) * (c // 128) * 4
    if marker.exists():
        return layout
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(work / "merged.bin", "wb") as m, open(work / "fp8.bin", "wb") as f:
        for name, qtype, (r, c) in MATS:
            for e in range(n):
                w = (rng.standard_normal((r, c), dtype=np.float32) * 0.02)
                m.write(ggml_quantize(w, qtype).tobytes())
                codes, scale = fp8_codes(w)
                f.write(codes.tobytes())
                f.write(scale.tobytes())
    shutil.copyfile(work / "merged.bin", work / "source.gguf.bin")
    marker.touch()
    return layout


def tasks_for(work: Path, layout: dict, n: int) -> list[dict]:
    merged, src, fp8 = str(work / "merged.bin"), str(work / "source.gguf.bin"), str(work / "fp8.bin")
    tasks = []
    for name, L in layout.items():
        size = L["per"] * n
        tasks.append({"kind": "integrity", "id": f"integrity:{name}", "name": name, "bytes": size,
                      "merged": [merged, L["offset"], L["offset"] + size], "expect": "",
                      "segments": [[src, L["offset"], size]]})
        for e in range(n):
            r, c = L["rows"], L["cols"]
            b, end = L["fp8"][e]
            tasks.append({"kind": "parity", "id": f"parity:{name}:{e}", "name": name, "rows": [0, r], "group_rows": r,
                          "bytes": L["per"],
                          "merged": {"fmt": "ggml", "type": L["type"], "path": merged,
                                     "offset": L["offset"] + e * L["per"], "rows": r, "cols": c},
                          "twin": {"fmt": "fp8", "path": fp8, "offset": b, "scale_path": fp8, "scale_offset": end,
                                   "rows": r, "cols": c}})
    return tasks


def timed_verify(tasks, workers):
    """Wall time of the whole task list on dask's threads (workers None) or on an already running LocalCluster of
    `workers` processes, warmed up first, so worker start-up (~3 s of importing torch) is not counted."""
    results = []
    if workers is None:
        start = time.perf_counter()
        execute(tasks, results.append, None, None)
        seconds = time.perf_counter() - start
    else:
        from distributed import LocalCluster
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs="ERROR") as cluster:
            warm = [t for t in tasks if t["kind"] == "parity"][:workers]
            execute(warm, lambda r: None, cluster.scheduler_address, None)
            start = time.perf_counter()
            execute(tasks, results.append, cluster.scheduler_address, None)
            seconds = time.perf_counter() - start
    worst = max(np.sqrt(d2 / b2) for r in results if r["kind"] == "parity" for _, d2, b2, *_ in r["groups"])
    return seconds, worst


def per_expert_times(work: Path, layout: dict, repeats: int = 5) -> list[tuple]:
    rows = []
    raw_all = np.fromfile(work / "merged.bin", np.uint8)
    for name in ("gate", "down"):
        L = layout[name]
        raw = raw_all[L["offset"]:L["offset"] + L["per"]]
        shape = (L["rows"], L["cols"])
        t_g, t_n, t_c = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a = gguf_dequantize(raw.reshape(L["rows"], -1), L["type"])
            t1 = time.perf_counter()
            b = dequantize_ggml(raw, L["type"], shape, backend="numpy")
            t2 = time.perf_counter()
            c = dequantize_ggml(raw, L["type"], shape)          # the default: ggml's C dequantizer
            t3 = time.perf_counter()
            t_g.append(t1 - t0)
            t_n.append(t2 - t1)
            t_c.append(t3 - t2)
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)) and np.array_equal(a.view(np.uint32),
                                                                                        c.view(np.uint32))
        rows.append((f"{name} {'Q4_K' if L['type'] == Q4_K else 'Q6_K'} {shape[0]}x{shape[1]}",
                     statistics.median(t_g), statistics.median(t_n), statistics.median(t_c)))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=24)
    ap.add_argument("--workdir", default="/tmp/verify-bench")
    args = ap.parse_args()
    work, n = Path(args.workdir), args.experts
    t0 = time.perf_counter()
    layout = make_data(work, n)
    print(f"data: {n} experts x 3 matrices, ready in {time.perf_counter() - t0:.0f} s")
    tasks = tasks_for(work, layout, n)
    merged_gb = sum(L["per"] * n for L in layout.values()) / 1e9
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.2f}")
    execute(tasks[:4], lambda r: None, None, None)            # warm the page cache and imports
    runs = {}
    for label, workers in (("1 worker (LocalCluster)", 1), ("2 workers (LocalCluster)", 2),
                           ("threads (default)", None), ("1 worker (again)", 1), ("2 workers (again)", 2)):
        s, worst = timed_verify(tasks, workers)
        runs.setdefault(label.split(" (")[0], []).append(s)
        print(f"{label:26s} {s:7.2f} s  {merged_gb / s:6.3f} GB/s of merged bytes  worst rel. error {worst:.4f} "
              f"(threshold Q4_K {threshold('Q4_K', True):.3f})")
    one, two = min(runs["1 worker"]), min(runs["2 workers"])
    print(f"\nmerged bytes verified: {merged_gb:.2f} GB ({len(tasks)} tasks)")
    print("| scheduler | seconds (best of 2) | GB/s | speed-up vs 1 worker |")
    print("|---|---|---|---|")
    for label, vals in runs.items():
        print(f"| {label} | {min(vals):.2f} | {merged_gb / min(vals):.3f} | {one / min(vals):.2f}x |")
    print("\n| one expert matrix | gguf.quants.dequantize ms | numpy kernels ms | ggml to_float ms (default) | "
          "speed-up (numpy / ggml) |")
    print("|---|---|---|---|---|")
    for name, g, n, c in per_expert_times(work, layout):
        print(f"| {name} | {g * 1e3:.1f} | {n * 1e3:.1f} | {c * 1e3:.1f} | {g / n:.2f}x / {g / c:.2f}x |")
    print(f"\n2 workers / 1 worker: {one / two:.2f}x")


if __name__ == "__main__":
    main()
