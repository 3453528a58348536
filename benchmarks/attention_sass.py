"""
Build runtime/attention.py's Triton kernels for sm_90a on a machine without a GPU, and print their registers, spills
and shared memory (Triton's build metadata), and a count of the SASS instructions that matter (HGMMA: Hopper's
warpgroup tensor-core products; HMMA: the older, slower ones; LDL/STL: local memory, i.e. spills).

    python benchmarks/attention_sass.py [decode|prefill|combine|all] [KEY=VALUE ...]     (default: all, the shipped
                                                                                           launch shapes)
e.g. `decode BLOCK_N=64 num_stages=1`. DeepSeek-V3's shapes (128 heads, kv_lora 512, rope 64). Needs the Triton
wheel's cuobjdump (the venv's); runs without TRITON_INTERPRET. Writes PTX, cubin and SASS to
/tmp/attention_sass/.
"""
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp8_only import fp8  # noqa: E402,F401  (the runtime package without ggml)
from runtime import attention as A  # noqa: E402

OUT = Path("/tmp/attention_sass")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
DL, DR, SPLITS = 512, 64, 66


def split_kernel(cfg, decode):
    block_h = cfg["BLOCK_H"] if decode else min(cfg["ROWS"], 128)
    sig = dict(q_ptr="*bf16", qr_ptr="*bf16", kv_ptr="*bf16", pe_ptr="*bf16", slot_ptr="*i64", pos_ptr="*i64",
               o_ptr="*bf16" if decode else "*fp32", lse_ptr="*fp32", T="i32", H="i32", qk_scale="fp32",
               s_qt="i32", s_qh="i32", s_rt="i32", s_rh="i32", s_kn="i32", s_kl="i32", s_pn="i32", s_pl="i32",
               s_ot="i32", s_oh="i32", s_os="i32", MIN_KEYS="i32")
    consts = dict(DL=DL, DR=DR, SPLITS=SPLITS if decode else 1, TOK=1 if decode else cfg["ROWS"] // block_h,
                  BLOCK_H=block_h, BLOCK_N=cfg["BLOCK_N"], D_LAT=DL, D_PE=DR, KEYS_MAJOR=bool(cfg["KEYS_MAJOR"]),
                  DOT_F32=False)
    return A._mla_split_kernel, sig, consts


def combine_kernel(cfg):
    sig = dict(part_ptr="*bf16", lse_ptr="*fp32", pos_ptr="*i64", out_ptr="*fp32", s_ot="i32",
               s_oh="i32", s_os="i32", MIN_KEYS="i32")
    p2 = triton.next_power_of_2(SPLITS)
    return A._mla_combine_kernel, sig, dict(DL=DL, SPLITS=SPLITS, SPLITS_P2=p2, BLOCK_N=cfg["BLOCK_N"],
                                            BLOCK_D=max(16, min(DL, cfg["MERGE_TILE"] // p2)), PDL=False)


def build(name, fn, sig, consts, warps, stages):
    names = fn.arg_names
    signature = {n: "constexpr" if n in consts else sig[n] for n in names}
    # As a launch specializes them on the real shapes: pointers 16-byte aligned, strides and H multiples of 16.
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if n not in consts and (sig[n].startswith("*") or n.startswith("s_") or n in ("H", "MIN_KEYS"))}
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=aligned)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.ptx").write_text(kernel.asm["ptx"])
    (OUT / f"{name}.ttgir").write_text(kernel.asm["ttgir"])
    (OUT / f"{name}.cubin").write_bytes(kernel.asm["cubin"])
    sass = subprocess.run([BIN / "cuobjdump", "-sass", OUT / f"{name}.cubin"], capture_output=True, text=True).stdout
    (OUT / f"{name}.sass").write_text(sass)
    usage = subprocess.run([BIN / "cuobjdump", "-res-usage", OUT / f"{name}.cubin"], capture_output=True, text=True)
    print(f"{name} {consts} warps={warps} stages={stages}: shared memory {kernel.metadata.shared} bytes")
    print("\n".join("  " + line.strip() for line in usage.stdout.splitlines() if "REG" in line))
    ops = Counter(re.findall(r"\b(HGMMA\.\S+|HMMA\.\S+|LDL\S*|STL\S*|LDGSTS\S*|UTMALDG\S*|BAR\.SYNC\S*)", sass))
    print("  " + ", ".join(f"{n} {op}" for op, n in sorted(ops.items())))


def main():
    what = sys.argv[1] if len(sys.argv) > 1 and "=" not in sys.argv[1] else "all"
    over = {k: int(v) for k, v in (a.split("=") for a in sys.argv[1:] if "=" in a)}
    if what in ("decode", "all"):
        cfg = dict(A.DECODE, **over)
        build("decode", *split_kernel(cfg, True), cfg["num_warps"], cfg["num_stages"])
    if what in ("prefill", "all"):
        cfg = dict(A.PREFILL, **over)
        build("prefill", *split_kernel(cfg, False), cfg["num_warps"], cfg["num_stages"])
    if what in ("combine", "all"):
        cfg = dict(A.DECODE, **over)
        build("combine", *combine_kernel(cfg), cfg["MERGE_WARPS"], 1)


if __name__ == "__main__":
    main()
