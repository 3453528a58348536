"""Where verify's thresholds come from: the relative RMS error each GGML type really has.

1. Gaussian weights (std 0.02, 512 x 4096): quantize with ggml's own quantizer (ggml-python, the same code as
   llama-quantize) or gguf.quants.quantize, dequantize, compare with the float64 original. Also DeepSeek's FP8
   (e4m3, 128x128 block scales).
2. The fixture: llama-quantize's real output against the FP8 checkpoint of the same weights.
Prints a table; stages/ggml_types.py holds these numbers (own_error, FP8_ERROR).
"""
import ctypes
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stages.dequant import GGML_BLOCK, dequantize_fp8_block, dequantize_ggml  # noqa: E402
from gguf.constants import GGMLQuantizationType as T  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K", "IQ3_S",
         "IQ3_XXS", "Q2_K", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "BF16", "F16"]


def rel(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


def ggml_quantize(w: np.ndarray, qtype: T) -> np.ndarray | None:
    import ggml
    rows, cols = w.shape
    block, nbytes = GGML_BLOCK[int(qtype)]
    out = np.empty(rows * cols // block * nbytes, np.uint8)
    imatrix = None
    if ggml.ggml_quantize_requires_imatrix(int(qtype)):
        imatrix = np.ones(cols, np.float32)            # uniform importance: what "no imatrix" means
    src = np.ascontiguousarray(w, np.float32)
    ggml.ggml_quantize_init(int(qtype))
    ggml.ggml_quantize_chunk(int(qtype), src.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                             out.ctypes.data_as(ctypes.c_void_p), 0, rows, cols,
                             imatrix.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if imatrix is not None else None)
    return out


def fp8_block(w: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(w).double()
    R, C = t.shape
    tiles = t.reshape(R // 128, 128, C // 128, 128)
    scale = tiles.abs().amax(dim=(1, 3)) / 448
    q = (tiles / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return dequantize_fp8_block(q.reshape(R, C).view(torch.uint8).numpy(), scale.float().numpy())


def gaussian_table():
    w = np.random.default_rng(0).standard_normal((512, 4096)).astype(np.float32) * 0.02
    rows = [("FP8 e4m3 128x128", rel(fp8_block(w), w))]
    for name in TYPES:
        q = ggml_quantize(w, T[name])
        rows.append((name, rel(dequantize_ggml(q, int(T[name]), w.shape), w)))
    return rows


def fixture_table():
    from gguf import GGUFReader
    from stages.formats import read_hf_checkpoint
    fx = ROOT / "examples" / "tiny-deepseek-v3"
    _, hf = read_hf_checkpoint(fx / "hf-fp8")

    def fp8(name):
        w, s = hf[name], hf[name + "_scale_inv"]
        raw = np.fromfile(w.file, np.uint8, w.length, offset=w.offset).reshape(w.shape)
        sc = np.fromfile(s.file, np.float32, s.length // 4, offset=s.offset).reshape(s.shape)
        return dequantize_fp8_block(raw, sc)
    g = {t.name: t for t in GGUFReader(fx / "gguf" / "Q4_K_M" / "tiny-Q4_K_M.gguf").tensors}
    errs = {}
    for i in range(4):
        for gname, proj in (("ffn_gate_exps", "gate_proj"), ("ffn_up_exps", "up_proj"), ("ffn_down_exps", "down_proj")):
            t = g.get(f"blk.{i}.{gname}.weight")
            if t is None:
                continue
            deq = dequantize_ggml(t.data, int(t.tensor_type), tuple(reversed([int(x) for x in t.shape])))
            for e in range(deq.shape[0]):
                errs.setdefault(t.tensor_type.name, []).append(rel(deq[e], fp8(f"model.layers.{i}.mlp.experts.{e}.{proj}.weight")))
    return [(k, float(np.median(v)), float(np.max(v))) for k, v in errs.items()]


if __name__ == "__main__":
    print("Gaussian weights, rel. RMS error against the float32 original")
    print(f"{'type':18s} {'rel. error':>10s}")
    for name, e in gaussian_table():
        print(f"{name:18s} {e:10.4f}")
    print("\nfixture routed experts: llama-quantize output against the FP8 checkpoint")
    print(f"{'type':18s} {'median':>10s} {'max':>10s}")
    for name, med, mx in fixture_table():
        print(f"{name:18s} {med:10.4f} {mx:10.4f}")
