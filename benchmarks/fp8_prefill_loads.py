"""
Is the sm_90 prefill kernel bound by its loads or its math? Times runtime/fp8_hopper.py's kernel against two copies
of it: one whose consumers skip the wgmmas (the same TMA stream into shared memory, barriers and output stores, no
math), one whose producer marks each stage ready without loading it (the wgmmas run on whatever shared memory holds).
At 4096 tokens on five DeepSeek-V3 shapes, one term, for each tile (128 x 256, 192 x 128, 128 x 128); also group_m
4/16 against the default 8 and three stages against four, and torch._scaled_mm. Prints the TB/s the loads reach
alone and inside the kernel.

    python benchmarks/fp8_prefill_loads.py          (on an H100/H200; under a minute)
"""
import importlib.util
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp8_only import fp8_hopper  # noqa: E402  (first: before fp8_gemm imports runtime)
import fp8_gemm as B  # noqa: E402

SRC = (Path(__file__).parent.parent / "runtime" / "fp8_hopper.py").read_text()


def variant(name: str, edits: list[tuple[str, str]]):
    """runtime/fp8_hopper.py with `edits` (old, new) made, imported from a scratch file."""
    src = SRC
    for old, new in edits:
        assert old in src, old
        src = src.replace(old, new)
    path = Path(tempfile.mkdtemp()) / f"fp8_hopper_{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"fp8_hopper_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# no math: the consumers skip their wgmmas
loads_only = variant("loads_only", [
    ("            acc0 = warpgroup_mma(a0_bufs.index(s * CONSUMERS + WG), w, acc0, is_async=True)\n", ""),
    ("                acc0 = warpgroup_mma_wait(0, deps=(acc0, ))\n", "                pass\n")])
# no loads: the producer marks each stage ready without filling it (the wgmmas read what is there)
start = SRC.index("            mbarrier.expect(bar, nbytes)\n")
load = SRC[start:SRC.index("            step += 1\n", start)]
math_only = variant("math_only", [(load, "            mbarrier.arrive(bar, count=1)\n")])


def t(mod, case, M, **kw):
    """us of mod's prefill_gemm, one term."""
    return B.time_prefill(mod.prefill_gemm, case, M, 1, **kw) * 1e6


M = 4096
TILES = {"n256": dict(consumers=2, BN=256), "c3": dict(consumers=3), "c2": dict(consumers=2)}
for name in ("o", "dense gate/up", "q_b", "shared gate+up", "kv_b"):
    case = B.Case(*B.SHAPES[name])
    fl = 2 * M * case.N * case.K
    res = {}
    for tile, kw in TILES.items():
        res[tile] = t(fp8_hopper, case, M, **kw)
        res[f"{tile} loads only"] = t(loads_only, case, M, **kw)
        res[f"{tile} math only"] = t(math_only, case, M, **kw)
    res.update({"n256 gm4": t(fp8_hopper, case, M, group_m=4, **TILES["n256"]),
                "n256 gm16": t(fp8_hopper, case, M, group_m=16, **TILES["n256"]),
                "n256 s3": t(fp8_hopper, case, M, stages=3, **TILES["n256"]),
                "smm": (B.time_scaled_mm(case, M)[0] or float("nan")) * 1e6})
    loaded = -(-M // 128) * -(-case.N // 256) * -(-case.K // 128) * 48 * 1024     # bytes n256 pulls into smem
    print(f"{name:15s} " + " ".join(f"{k} {v:.1f}" for k, v in res.items()) +
          f" | TFLOP/s: n256 {fl / res['n256'] / 1e6:.0f}, its math only {fl / res['n256 math only'] / 1e6:.0f}, smm "
          f"{fl / res['smm'] / 1e6:.0f}; n256 loads {loaded / res['n256 loads only'] / 1e6:.2f} TB/s alone, "
          f"{loaded / res['n256'] / 1e6:.2f} in the kernel", flush=True)
