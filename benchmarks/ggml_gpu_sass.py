"""
Build runtime/ggml_gpu.py's kernels for sm_90 on a machine without a GPU (Triton's wheel carries ptxas and
cuobjdump), and print per kernel: registers, stack bytes (spills), and a count of the SASS instructions that say
whether it is built as meant: global load widths (LDG.E.128 = 16-byte loads of the quant bytes), int-to-float
conversions (I2F: slow pipe, none should be left), FFMA, HGMMA (the prefill GEMM on Hopper's tensor cores),
RED (atomic adds).

    python benchmarks/ggml_gpu_sass.py [--gemv R G WARPS] [--gemm BM BN G WARPS]
                                                (writes PTX, cubin and SASS to /tmp/ggml_gpu_sass/)

Costs no device time; tile shapes: the module's GEMV["cuda"] / GEMM["cuda"] defaults, or the ones given.
"""
import re
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parent.parent
if "runtime" not in sys.modules:        # the package without its __init__, which imports ggml
    _pkg = types.ModuleType("runtime")
    _pkg.__path__ = [str(ROOT / "runtime")]
    sys.modules["runtime"] = _pkg
from runtime import ggml_gpu as GG  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
OUT = Path("/tmp/ggml_gpu_sass")
ALIGNED = {"K", "N", "g_rb", "u_rb", "d_rb", "rbytes", "cols"}   # what Triton's launcher sees as multiples of 16
OPS = r"\b(LDG\.E[\.\w]*|STG\.E[\.\w]*|HGMMA[\.\w]*|HMMA[\.\w]*|RED[\.\w]*|ATOM[\.\w]*|I2F[\.\w]*|FFMA|LDL[\.\w]*|STL[\.\w]*)"


def build(name, fn, sig, consts, **opts):
    names = fn.arg_names
    signature = {n: "constexpr" if n in consts else sig[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in sig if sig[n].startswith("*") or n in ALIGNED}
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    (OUT / f"{name}.ptx").write_text(kernel.asm["ptx"])
    (OUT / f"{name}.cubin").write_bytes(kernel.asm["cubin"])
    res = subprocess.run([BIN / "cuobjdump", "-res-usage", OUT / f"{name}.cubin"], capture_output=True, text=True)
    sass = subprocess.run([BIN / "cuobjdump", "-sass", OUT / f"{name}.cubin"], capture_output=True, text=True).stdout
    (OUT / f"{name}.sass").write_text(sass)
    regs, stack = re.search(r"REG:(\d+)", res.stdout).group(1), re.search(r"STACK:(\d+)", res.stdout).group(1)
    ops = " ".join(f"{op}:{n}" for op, n in sorted(Counter(re.findall(OPS, sass)).items()))
    print(f"{name:16s} regs {regs:>3s} stack {stack:>3s}  {ops}")


def option(name, default):
    if name not in sys.argv:
        return default
    i = sys.argv.index(name) + 1
    return tuple(int(v) for v in sys.argv[i:i + len(default)])


def main():
    OUT.mkdir(exist_ok=True)
    u8, i32 = "*u8", "i32"
    for t in sorted(GG.SUPPORTED):
        build(f"dequant_{GG.NAMES[t]}", GG._dequant_kernel, dict(src=u8, dst="*fp32", n_rows=i32, rbytes=i32, cols=i32),
              dict(TYPE=t, R=GG.DEQ_ROWS, G=GG.DEQ_GROUPS), num_warps=4, enable_fp_fusion=False)
    R, G, warps = option("--gemv", GG.GEMV["cuda"])
    for gt, dt in ((GG.Q4_K, GG.Q6_K), (GG.Q4_K, GG.Q4_K)):
        build(f"gemv_gate_up_{GG.NAMES[gt]}", GG._gemv_gate_up_kernel,
              dict(x="*fp32", ids="*i64", local="*i32", gw=u8, uw=u8, h="*fp32", K=i32, N=i32, k_top=i32, g_rb=i32,
                   u_rb=i32), dict(GT=gt, UT=gt, R=R, G=G), num_warps=warps)
        build(f"gemv_down_{GG.NAMES[dt]}", GG._gemv_down_kernel,
              dict(h="*fp32", ids="*i64", wts="*fp32", local="*i32", dw=u8, y="*fp32", K=i32, N=i32,
                   d_rb=i32), dict(DT=dt, R=R, G=G), num_warps=warps)
    BM, BN, G, warps = option("--gemm", GG.GEMM["cuda"])
    tiles = dict(order="*i32", tile_e="*i32", tile_start="*i32", tile_stop="*i32")
    build("gemm_gate_up_Q4_K", GG._gemm_gate_up_kernel,
          dict(x="*fp32", **tiles, gw=u8, uw=u8, h="*bf16", K=i32, N=i32, k_top=i32, n_local=i32, g_rb=i32, u_rb=i32),
          dict(GT=GG.Q4_K, UT=GG.Q4_K, BM=BM, BN=BN, G=G, F32=False), num_warps=warps)
    build("gemm_down_Q6_K", GG._gemm_down_kernel,
          dict(h="*bf16", order="*i32", wts="*fp32", tile_e="*i32", tile_start="*i32", tile_stop="*i32", dw=u8,
               out="*fp32", K=i32, N=i32, n_local=i32, d_rb=i32),
          dict(DT=GG.Q6_K, BM=BM, BN=BN, G=G, F32=False), num_warps=warps)


if __name__ == "__main__":
    main()
