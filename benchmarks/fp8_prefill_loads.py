"""
Is the sm_90 prefill kernel bound by its loads? Times runtime/fp8_hopper.py's kernel against a copy of it whose
consumers skip the wgmmas (the same TMA stream into shared memory, barriers and output stores, no math), at 4096
tokens on five DeepSeek-V3 shapes, with 256- and 128-row tiles; also group_m 4/16/32 against the default 8 and
three stages against four, and torch._scaled_mm. Prints the TB/s the loads reach alone and inside the kernel.

    python benchmarks/fp8_prefill_loads.py          (on an H100/H200; under a minute)
"""
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp8_only import fp8, fp8_hopper  # noqa: E402
import fp8_gemm as B  # noqa: E402

src = (Path(__file__).parent.parent / "runtime" / "fp8_hopper.py").read_text()
mma = "            acc0 = warpgroup_mma(a0_bufs.index(s * CONSUMERS + WG), w, acc0, is_async=True)\n"
wait = "                acc0 = warpgroup_mma_wait(0, deps=(acc0, ))\n"
assert mma in src and wait in src
probe_src = src.replace(mma, "").replace(wait, "                pass\n")
path = Path(tempfile.mkdtemp()) / "fp8_hopper_loads_only.py"
path.write_text(probe_src)
spec = importlib.util.spec_from_file_location("probe_hopper", path)
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)
dev = torch.device("cuda")


def t(mod, case, M, **kw):
    q, s = fp8.act_quant(B.x_for(M, case.K), 1)
    out = torch.empty(M, case.N, dtype=torch.bfloat16, device=dev)
    r = len(case.w)
    return B.graph_time(lambda i: mod.prefill_gemm(q, s, case.w[i % r], case.ws[i % r], out, 1, **kw),
                        case.calls()) * 1e6


M = 4096
for name in ("o", "dense gate/up", "q_b", "shared gate+up", "kv_b"):
    case = B.Case(*B.SHAPES[name])
    fl = 2 * M * case.N * case.K
    res = {"c4": t(fp8_hopper, case, M, consumers=4), "c4 loads only": t(probe, case, M, consumers=4),
           "c2 loads only": t(probe, case, M, consumers=2), "c2": t(fp8_hopper, case, M, consumers=2),
           "c4 gm4": t(fp8_hopper, case, M, consumers=4, group_m=4),
           "c4 gm16": t(fp8_hopper, case, M, consumers=4, group_m=16),
           "c4 gm32": t(fp8_hopper, case, M, consumers=4, group_m=32),
           "c4 s3": t(fp8_hopper, case, M, consumers=4, stages=3),
           "smm": (B.time_scaled_mm(case, M)[0] or float("nan")) * 1e6}
    tiles4 = -(-M // 256) * -(-case.N // 128)
    l2 = tiles4 * -(-case.K // 128) * 48 * 1024           # bytes the 256-row tiles pull into shared memory
    print(f"{name:15s} " + " ".join(f"{k} {v:.1f}" for k, v in res.items()) +
          f" | c4 {fl / res['c4'] / 1e6:.0f} TFLOP/s, loads {l2 / res['c4 loads only'] / 1e6:.2f} TB/s alone, "
          f"{l2 / res['c4'] / 1e6:.2f} TB/s in the kernel", flush=True)
