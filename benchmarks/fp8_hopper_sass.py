"""
Build one of runtime/fp8_hopper.py's kernels for sm_90a on a machine without a GPU, and print what ptxas says about it
(registers, spills, and C7514-style warnings that it serialized the wgmmas) and a count of the SASS instructions
that matter (QGMMA, WARPGROUP.ARRIVE / DEPBAR, BAR.SYNC, TMA loads).

    python benchmarks/fp8_hopper_sass.py [terms 1|2] [stages] [consumers 2|3] [consumer regs] [tma store 0|1] [BN]
                                                  (default 2 4 2 232 1 128)

Needs Triton 3.6 (the Gluon API the kernel was written for; its wheel carries ptxas and cuobjdump) and torch (CPU
is enough): e.g. a scratch venv with `pip install triton==3.6.0 torch`. Writes the PTX, cubin and SASS to
/tmp/fp8_hopper_sass/. This is how the serialized-wgmma versions in BENCHMARKS.md were found before any device time.
"""
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import mangle_type

from fp8_only import fp8_hopper as H  # noqa: E402  (the runtime package would import ggml)

OUT = Path("/tmp/fp8_hopper_sass")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def prefill(terms=2, stages=4, consumers=2, regs=None, tma_store=1, BN=128):
    store_cols = H.store_columns(BN)
    regs = regs or H.CONSUMER_REGS[consumers]
    M, N, K = 4096, 7168, 7168
    a = torch.empty(terms * M, K, dtype=torch.float8_e4m3fn)
    w = torch.empty(N, K, dtype=torch.float8_e4m3fn)
    layout = gl.NVMMASharedLayout.get_default_for([BN, 128], gl.float8e4nv)
    view = a.view(M, terms, K)
    a_layout = gl.NVMMASharedLayout.get_default_for([64, 128], gl.float8e4nv)
    a_descs = [TensorDescriptor(view[:, t], [M, K], [terms * K, 1], [64, 128], a_layout) for t in range(terms)]
    args = dict(a0_desc=a_descs[0], a1_desc=a_descs[-1],
                w_desc=TensorDescriptor(w, [N, K], [K, 1], [BN, 128], layout), as_ptr=torch.empty(4),
                ws_ptr=torch.empty(4), c_ptr=torch.empty(4, dtype=torch.bfloat16), M=M, N=N, n_groups=K // 128,
                c_desc=TensorDescriptor(torch.empty(M, N, dtype=torch.bfloat16), [M, N], [N, 1], [64, store_cols],
                                        gl.NVMMASharedLayout.get_default_for([64, store_cols], gl.bfloat16)),
                stride_cm=N, stride_wsn=K // 128)
    consts = dict(TERMS=terms, CONSUMERS=consumers, STAGES=stages, GROUP_M=8, CONSUMER_REGS=regs, PRODUCER_REGS=40,
                  TMA_STORE=bool(tma_store))
    what = f"prefill terms={terms} stages={stages} consumers={consumers} regs={regs} tma_store={tma_store} BN={BN}"
    return H._prefill_kernel, args, consts, {}, what


def decode(terms=2, tokens=1, groups=8, stages=None):
    N, K = 7168, 7168
    w = torch.empty(N, K, dtype=torch.float8_e4m3fn)
    w_layout = gl.NVMMASharedLayout.get_default_for([64, 128], gl.float8e4nv)
    args = dict(x_ptr=torch.empty(4, dtype=torch.bfloat16), w_desc=TensorDescriptor(w, [N, K], [K, 1], [64, 128],
                                                                                      w_layout),
                ws_ptr=torch.empty(4), c_ptr=torch.empty(4, dtype=torch.bfloat16), part_ptr=torch.empty(4),
                lock_ptr=torch.empty(4, dtype=torch.int32), M=tokens, N=N, K=K, n_groups=K // 128, stride_xm=K,
                stride_cm=N, stride_wsn=K // 128)
    consts = H.decode_constants(terms, tokens, N, K, None, groups, stages or groups)     # K split in 56 / groups
    what = f"decode terms={terms} tokens={tokens} groups={groups} stages={stages or groups}"
    return H._decode_kernel, args, consts, dict(enable_fp_fusion=False), what


numbers = [int(a) for a in sys.argv[2:]] if sys.argv[1:2] == ["decode"] else [int(a) for a in sys.argv[1:]]
fn, args, consts, extra, what = decode(*numbers) if sys.argv[1:2] == ["decode"] else prefill(*numbers)
names = fn.arg_names
signature = {n: "constexpr" if n in consts else mangle_type(args[n]) for n in names}
src = GluonASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in consts.items()})
kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, **extra))

OUT.mkdir(exist_ok=True)
(OUT / "kernel.ptx").write_text(kernel.asm["ptx"])
report = subprocess.run([BIN / "ptxas", "-arch=sm_90a", "-v", OUT / "kernel.ptx", "-o", OUT / "kernel.cubin"],
                        capture_output=True, text=True)
sass = subprocess.run([BIN / "cuobjdump", "-sass", OUT / "kernel.cubin"], capture_output=True, text=True).stdout
(OUT / "kernel.sass").write_text(sass)
print(f"{what}: shared memory {kernel.metadata.shared} bytes")
print("\n".join(line for line in report.stderr.splitlines() if "Compiling entry" not in line))
ops = Counter(re.findall(r"(QGMMA\.\S+|WARPGROUP\.\w+(?:\.LE gsb0, 0x\d)?|BAR\.SYNC|UTMALDG\.\w+)", sass))
for op, n in sorted(ops.items()):
    print(f"{n:5d} {op}")
