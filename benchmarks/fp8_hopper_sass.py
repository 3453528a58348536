"""
Build runtime/fp8_hopper.py's kernel for sm_90a on a machine without a GPU, and print what ptxas says about it
(registers, spills, and C7514-style warnings that it serialized the wgmmas) and a count of the SASS instructions
that matter (QGMMA, WARPGROUP.ARRIVE / DEPBAR, BAR.SYNC, TMA loads).

    python benchmarks/fp8_hopper_sass.py [terms 1|2] [stages] [consumers 2|3] [consumer regs]   (default 2 4 2 232)

Needs Triton 3.6 (the Gluon API the kernel was written for; its wheel carries ptxas and cuobjdump) and torch (CPU
is enough): e.g. a scratch venv with `pip install triton==3.6.0 torch`. Writes the PTX, cubin and SASS to
/tmp/fp8_hopper_sass/. This is how the serialized-wgmma versions in BENCHMARKS.md were found before any device time.
"""
import importlib.util
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

ROOT = Path(__file__).resolve().parent.parent
OUT = Path("/tmp/fp8_hopper_sass")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

# the module alone: the runtime package would import ggml
spec = importlib.util.spec_from_file_location("fp8_hopper", ROOT / "runtime" / "fp8_hopper.py")
H = importlib.util.module_from_spec(spec)
spec.loader.exec_module(H)

terms = int(sys.argv[1]) if len(sys.argv) > 1 else 2
stages = int(sys.argv[2]) if len(sys.argv) > 2 else 4
consumers = int(sys.argv[3]) if len(sys.argv) > 3 else 2
REGS = int(sys.argv[4]) if len(sys.argv) > 4 else (232 if consumers == 2 else 160)
M, N, K = 4096, 7168, 7168
a = torch.empty(terms * M, K, dtype=torch.float8_e4m3fn)
w = torch.empty(N, K, dtype=torch.float8_e4m3fn)
layout = gl.NVMMASharedLayout.get_default_for([128, 128], gl.float8e4nv)
view = a.view(M, terms, K)
a_layout = gl.NVMMASharedLayout.get_default_for([64, 128], gl.float8e4nv)
a_descs = [TensorDescriptor(view[:, t], [M, K], [terms * K, 1], [64, 128], a_layout) for t in range(terms)]
args = dict(a0_desc=a_descs[0], a1_desc=a_descs[-1], w_desc=TensorDescriptor(w, [N, K], [K, 1], [128, 128], layout),
            as_ptr=torch.empty(4), ws_ptr=torch.empty(4), c_ptr=torch.empty(4, dtype=torch.bfloat16),
            M=M, N=N, n_groups=K // 128, stride_cm=N, stride_wsn=K // 128)
consts = dict(TERMS=terms, CONSUMERS=consumers, STAGES=stages, GROUP_M=8, CONSUMER_REGS=REGS, PRODUCER_REGS=40)
names = H._prefill_kernel.arg_names
signature = {n: "constexpr" if n in consts else mangle_type(args[n]) for n in names}
src = GluonASTSource(H._prefill_kernel, signature, constexprs={(names.index(k),): v for k, v in consts.items()})
kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))

OUT.mkdir(exist_ok=True)
(OUT / "kernel.ptx").write_text(kernel.asm["ptx"])
report = subprocess.run([BIN / "ptxas", "-arch=sm_90a", "-v", OUT / "kernel.ptx", "-o", OUT / "kernel.cubin"],
                        capture_output=True, text=True)
sass = subprocess.run([BIN / "cuobjdump", "-sass", OUT / "kernel.cubin"], capture_output=True, text=True).stdout
(OUT / "kernel.sass").write_text(sass)
print(f"terms={terms} stages={stages} consumers={consumers} regs={REGS}: shared memory {kernel.metadata.shared} bytes")
print("\n".join(line for line in report.stderr.splitlines() if "Compiling entry" not in line))
ops = Counter(re.findall(r"(QGMMA\.\S+|WARPGROUP\.\w+(?:\.LE gsb0, 0x\d)?|BAR\.SYNC|UTMALDG\.\w+)", sass))
for op, n in sorted(ops.items()):
    print(f"{n:5d} {op}")
