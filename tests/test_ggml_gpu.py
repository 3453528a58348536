"""runtime.ggml_gpu: Triton kernels on GGML blocks. Without a GPU they run in Triton's CPU interpreter (conftest sets
TRITON_INTERPRET) on tiny shapes; with one, on the GPU, plus real DeepSeek-V3 shapes.

- dequantize: bit-exact (float32 bits) with gguf.quants.dequantize on fresh random valid blocks of all five types,
  and gguf's checked bit-exact with ggml's own C to_float (ggml-python's type traits) on the same blocks.
- moe: against a float64 reference built from `dequantize`d weights. The GEMV path (decode) is float32 throughout:
  bound 1e-4 relative. The grouped GEMM (prefill) feeds the tensor cores bf16 weights and activations (fp32
  accumulation): ~3e-3, bound 1.5e-2. On the fixture's real expert bytes, also against ggml's CPU kernels
  (runtime.experts), which round activations to 8 bits (tests/test_experts.py: 1.6e-2..2e-2 from float64): 3e-2.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

from helpers import GGUF_ONE
from runtime import ggml_gpu as GG

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
TYPES = [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0, QT.Q5_0]
F16_FIELDS = {QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208], QT.Q5_0: [0], QT.Q8_0: [0]}   # fp16 fields' offsets
F16_SCALE = {QT.Q4_K: 2e-4, QT.Q5_K: 1e-4, QT.Q6_K: 5e-5, QT.Q5_0: 6e-3, QT.Q8_0: 1e-3}   # weights ~ 0.05 in moe
GEMV_BOUND, GEMM_BOUND, GGML_BOUND = 1e-4, 1.5e-2, 3e-2


def random_blocks(rng, t, rows, cols, scale=None) -> np.ndarray:
    """uint8 (rows, row_bytes) of random valid blocks: every byte random, except the fp16 fields, which are any
    finite fp16 (normals of all exponents, subnormals, zeros of both signs) or, with `scale`, sane magnitudes."""
    qk, nb = GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, (rows * cols // qk, nb), dtype=np.uint8)
    for at in F16_FIELDS[t]:
        if scale is None:
            bits = rng.integers(0, 1 << 16, len(raw), dtype=np.uint16)
            bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF                  # Inf/NaN exponent -> a finite one
            bits[:4] = [0x0000, 0x8000, 0x0001, 0x83FF]                 # +0, -0, subnormals
        else:
            bits = (rng.uniform(0.5, 1.5, len(raw)) * scale * rng.choice([-1, 1], len(raw))).astype(np.float16)
            bits = bits.view(np.uint16)
        raw[:, at:at + 2] = bits.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def ggml_c_to_float(raw: np.ndarray, t) -> np.ndarray | None:
    """ggml's C dequantizer (ggml_get_type_traits(t)->to_float), or None without ggml-python."""
    try:
        import ggml
    except ImportError:
        return None
    traits = ggml.ggml_get_type_traits(int(t)).contents
    raw = np.ascontiguousarray(raw)
    out = np.empty(raw.size // GGML_QUANT_SIZES[t][1] * GGML_QUANT_SIZES[t][0], np.float32)
    traits.to_float(raw.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                    out.size)
    return out


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a.view(np.uint32),
                                                                                       b.view(np.uint32))


# ----------------------------------------------------------------------------------------- dequantize

@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact(t):
    rng = np.random.default_rng()
    shape = (2, 3, 512) if not CUDA else (5, 37, 4096)         # stacked (expert, rows, cols); rows not a tile multiple
    raw = random_blocks(rng, t, shape[0] * shape[1], shape[2])
    ref = gguf_dequantize(raw, t).reshape(shape)
    c = ggml_c_to_float(raw, t)
    if c is not None:
        assert same_bits(c.reshape(shape), ref), "gguf's dequantize differs from ggml's C to_float"
    blocks = torch.from_numpy(raw.reshape(*shape[:2], -1)).to(DEV)
    out = GG.dequantize(blocks, int(t), shape[2])
    assert out.shape == shape and out.dtype == torch.float32
    assert same_bits(out.cpu().numpy(), ref)
    bf = GG.dequantize(blocks, int(t), shape[2], dtype=torch.bfloat16)      # straight from the kernel, no float32
    assert bf.dtype == torch.bfloat16 and torch.equal(bf.view(torch.int16), out.to(torch.bfloat16).view(torch.int16))


def test_layout_facts_and_refusals():
    for t in TYPES:
        qk, nb = GGML_QUANT_SIZES[t]
        assert GG.supported(int(t)) and GG.row_bytes(int(t), 7 * 256) == 7 * 256 // qk * nb
    assert not GG.supported(int(QT.Q4_0)) and GG.SUPPORTED == frozenset(int(t) for t in TYPES)
    with pytest.raises(ValueError, match="Q4_K row of 100 values"):
        GG.row_bytes(int(QT.Q4_K), 100)
    with pytest.raises(ValueError, match="no GPU kernel"):
        GG.dequantize(torch.zeros(1, 18, dtype=torch.uint8, device=DEV), int(QT.Q4_0), 32)
    with pytest.raises(ValueError, match="want uint8"):
        GG.dequantize(torch.zeros(1, 140, dtype=torch.uint8, device=DEV), int(QT.Q4_K), 256)
    with pytest.raises(ValueError, match="stack"):
        GG.GpuStack(torch.zeros(2, 4, 144, dtype=torch.uint8, device=DEV), int(QT.Q6_K), 4, 256)


# ----------------------------------------------------------------------------------------- moe

def stack(rng, t, n, rows, cols) -> GG.GpuStack:
    raw = random_blocks(rng, t, n * rows, cols, F16_SCALE[t])
    return GG.GpuStack(torch.from_numpy(raw).reshape(n, rows, -1).to(DEV), int(t), rows, cols)


def reference(x, ids, w, local, gate, up, down) -> torch.Tensor:
    """float64, per token and expert, from dequantized weights: `dequantize` on a GPU (bit-exact with ggml's, tested
    above), else gguf's numpy dequantizer (the same bits, faster than the interpreter)."""
    def weights(s):
        if CUDA:
            return GG.dequantize(s.data, s.ggml_type, s.cols).double()
        return torch.from_numpy(gguf_dequantize(s.data.numpy(), s.ggml_type)).double()
    wg, wu, wd = (weights(s) for s in (gate, up, down))
    x, out = x.double(), torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for t in range(len(x)):
        for e, we in zip(ids[t].tolist(), w[t].double()):
            if local[e] >= 0:
                a, b = wg[local[e]] @ x[t], wu[local[e]] @ x[t]
                out[t] += we * (wd[local[e]] @ (a / (1 + torch.exp(-a)) * b))
    return out


def routing(rng, T, experts, k):
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(T)])
    return (torch.from_numpy(ids).to(DEV), torch.from_numpy(rng.uniform(0.05, 1.0, (T, k)).astype(np.float32)).to(DEV))


def rel(a, b) -> float:
    return float(torch.linalg.norm(a.double() - b) / torch.linalg.norm(b))


MIXED = [(QT.Q4_K, QT.Q4_K, QT.Q6_K), (QT.Q5_K, QT.Q8_0, QT.Q5_0), (QT.Q5_0, QT.Q6_K, QT.Q4_K)]


@pytest.mark.parametrize("types", MIXED, ids=lambda ts: "-".join(t.name for t in ts))
@pytest.mark.parametrize("method,T", [("gemv", 3), ("gemm", 20), ("dense", 20)])
def test_moe_vs_float64(types, method, T):
    """6 global experts, 4 here (2 map to -1: their pairs contribute nothing); token 0 routes only to absent ones."""
    rng = np.random.default_rng()
    hidden, inter, k = 512, 256, 3
    local = torch.tensor([2, -1, 0, 3, -1, 1], dtype=torch.int32, device=DEV)
    gate, up = (stack(rng, t, 4, inter, hidden) for t in types[:2])
    down = stack(rng, types[2], 4, hidden, inter)
    x = torch.from_numpy(rng.standard_normal((T, hidden)).astype(np.float32)).to(DEV)
    ids, w = routing(rng, T, 6, k)
    ids[0] = torch.tensor([1, 4, 1])
    out = GG.moe(x, ids, w, local, gate, up, down, method=method)
    ref = reference(x, ids, w, local, gate, up, down)
    err = rel(out, ref)
    print(f"\n{method} {'/'.join(t.name for t in types)} T={T}: rel err vs float64 {err:.2e}")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert err < (GEMV_BOUND if method == "gemv" else GEMM_BOUND)
    if CUDA or types == MIXED[0]:                                # bf16 x, same bounds
        xb = x.bfloat16()
        ref_b = reference(xb.float(), ids, w, local, gate, up, down)
        assert rel(GG.moe(xb, ids, w, local, gate, up, down, method=method), ref_b) < \
            (GEMV_BOUND if method == "gemv" else GEMM_BOUND)


def fixture_layer(layer):
    reader = GGUFReader(GGUF_ONE / "tiny-Q4_K_M.gguf")
    tensors = {t.name: t for t in reader.tensors}
    parts = []
    for name in ("gate", "up", "down"):
        t = tensors[f"blk.{layer}.ffn_{name}_exps.weight"]
        n, rows, cols = (int(v) for v in reversed(t.shape))
        parts.append((np.array(t.data.reshape(n, rows, -1)), int(t.tensor_type), rows, cols))
    return parts


@pytest.mark.parametrize("method,T", [("gemv", 2), ("gemm", 24), ("dense", 24)])
def test_moe_fixture_vs_float64_and_ggml(method, T):
    """blk.2 of the fixture (Q4_K gate/up, Q6_K down, 16 experts): all experts here, against float64 and ggml."""
    from runtime.experts import MoEExperts
    rng = np.random.default_rng()
    parts = fixture_layer(2)
    gate, up, down = (GG.GpuStack(torch.from_numpy(d).to(DEV), t, r, c) for d, t, r, c in parts)
    n = gate.data.shape[0]
    local = torch.arange(n, dtype=torch.int32, device=DEV)
    x = torch.from_numpy(rng.standard_normal((T, gate.cols)).astype(np.float32)).to(DEV)
    ids, w = routing(rng, T, n if method == "gemv" or CUDA else 6, 4)   # interpreter: few GEMM tiles
    out = GG.moe(x, ids, w, local, gate, up, down, method=method)
    ref = reference(x, ids, w, local, gate, up, down)
    cpu = MoEExperts(*((d.reshape(-1), t, (n, r, c)) for d, t, r, c in parts), threads=2)
    ggml_out = torch.from_numpy(cpu.forward(x.cpu().numpy(), ids.cpu().numpy(), w.cpu().numpy()))
    err, ggml_err = rel(out, ref), rel(ggml_out, ref.cpu())
    err_ggml = float(torch.linalg.norm(out.cpu() - ggml_out) / torch.linalg.norm(ggml_out))
    print(f"\nfixture blk.2 {method} T={T}: vs float64 {err:.2e}, vs ggml CPU {err_ggml:.2e} "
          f"(ggml vs float64 {ggml_err:.2e})")
    assert err < (GEMV_BOUND if method == "gemv" else GEMM_BOUND)
    assert err_ggml < GGML_BOUND


# ----------------------------------------------------------------------------------------- GPU only: real shapes

@pytest.mark.skipif(not CUDA, reason="needs a GPU (real DeepSeek-V3 shapes)")
@pytest.mark.parametrize("method,T", [("gemv", 1), ("gemv", 4), ("gemm", 300), ("dense", 300)])
def test_moe_deepseek_shapes(method, T):
    """8 experts of DeepSeek-V3's shape here out of 256 (gate/up 2048 x 7168 Q4_K, down 7168 x 2048 Q6_K), k = 8:
    the tokens route to both present and absent experts. Output poisoned first (NaN would show). A second call gives
    the same bits (no atomic adds: a prompt run twice gives the same logits)."""
    rng = np.random.default_rng()
    hidden, inter, n, k = 7168, 2048, 8, 8
    gate, up = stack(rng, QT.Q4_K, n, inter, hidden), stack(rng, QT.Q4_K, n, inter, hidden)
    down = stack(rng, QT.Q6_K, n, hidden, inter)
    local = torch.full((256,), -1, dtype=torch.int32, device=DEV)
    here = torch.from_numpy(rng.choice(256, n, replace=False)).to(DEV)
    local[here] = torch.arange(n, dtype=torch.int32, device=DEV)
    ids = torch.stack([torch.cat([here[torch.randperm(n, device=DEV)[:4]],
                                  torch.nonzero(local < 0)[torch.randperm(248, device=DEV)[:4], 0]]) for _ in range(T)])
    w = torch.rand(T, k, device=DEV) + 0.05
    x = torch.randn(T, hidden, device=DEV)
    out = GG.moe(x, ids, w, local, gate, up, down, method=method)
    assert torch.equal(out, GG.moe(x, ids, w, local, gate, up, down, method=method))
    ref = reference(x, ids, w, local, gate, up, down)
    err = rel(out, ref)
    print(f"\nDeepSeek shapes {method} T={T}: rel err vs float64 {err:.2e}")
    assert torch.isfinite(out).all() and err < (GEMV_BOUND if method == "gemv" else GEMM_BOUND)


def test_dense_matches_the_grouped_gemm():
    """The two prefill paths feed the same bf16 values to float32 sums (the dense one rounds its GEMMs' results to
    bf16): they agree to that rounding, and the dense path gives the same bits with the host's counts (no sync) as
    with its own, and the same result in groups of experts as in one (to float32 rounding: a GEMM's blocking may
    differ with the group). Bad methods are refused."""
    rng = np.random.default_rng()
    hidden, inter, k, T = 512, 256, 3, 24
    local = torch.tensor([2, -1, 0, 3, -1, 1], dtype=torch.int32, device=DEV)
    gate, up, down = stack(rng, QT.Q4_K, 4, inter, hidden), stack(rng, QT.Q5_K, 4, inter, hidden), \
        stack(rng, QT.Q6_K, 4, hidden, inter)
    x = torch.from_numpy(rng.standard_normal((T, hidden)).astype(np.float32)).to(DEV)
    ids, w = routing(rng, T, 6, k)
    dense = GG.moe(x, ids, w, local, gate, up, down, method="dense")
    e = local[ids.long()].cpu().numpy().ravel()
    counts = [int((e == j).sum()) for j in range(4)]
    assert torch.equal(GG.moe(x, ids, w, local, gate, up, down, method="dense", counts=counts), dense)
    assert rel(dense, GG.moe(x, ids, w, local, gate, up, down, method="gemm").double()) < 5e-3
    keep, GG.DENSE_BYTES = GG.DENSE_BYTES, 1                  # one expert a group
    try:
        assert rel(GG.moe(x, ids, w, local, gate, up, down, method="dense", counts=counts), dense.double()) < 1e-6
    finally:
        GG.DENSE_BYTES = keep
    keep, GG._grouped_error = GG._grouped_error, RuntimeError("no grouped GEMM")   # the per-expert loop instead
    try:
        assert rel(GG.moe(x, ids, w, local, gate, up, down, method="dense"), dense.double()) < 5e-3
    finally:
        GG._grouped_error = keep
    with pytest.raises(ValueError, match="counts: want one per local expert"):
        GG.moe(x, ids, w, local, gate, up, down, method="dense", counts=counts[:3])
    with pytest.raises(ValueError, match="method 'fast'"):
        GG.moe(x, ids, w, local, gate, up, down, method="fast")


@pytest.mark.skipif(not CUDA, reason="needs a GPU (CUDA graphs)")
def test_gemv_in_cuda_graph():
    """The decode path captured once and replayed on new inputs gives what an eager call gives, bit for bit."""
    rng = np.random.default_rng()
    hidden, inter, n, k, T = 1024, 512, 4, 4, 2
    gate, up, down = stack(rng, QT.Q4_K, n, inter, hidden), stack(rng, QT.Q4_K, n, inter, hidden), \
        stack(rng, QT.Q6_K, n, hidden, inter)
    local = torch.tensor([0, 1, -1, 2, 3, -1], dtype=torch.int32, device=DEV)
    x, (ids, w) = torch.randn(T, hidden, device=DEV), routing(rng, T, 6, k)
    GG.moe(x, ids, w, local, gate, up, down)                   # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = GG.moe(x, ids, w, local, gate, up, down)
    for _ in range(3):
        x.copy_(torch.randn(T, hidden, device=DEV))
        new_ids, new_w = routing(rng, T, 6, k)
        ids.copy_(new_ids), w.copy_(new_w)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, GG.moe(x, ids, w, local, gate, up, down))
