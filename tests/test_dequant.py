import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import gguf
import gguf.quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import stages.dequant as dq  # noqa: E402
from stages.dequant import GGML_BLOCK, dequantize_fp8_block, dequantize_ggml, ggml_nbytes  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "tiny-deepseek-v3")
GGUF_FIXTURE = f"{FIXTURES}/gguf/Q4_K_M/tiny-Q4_K_M.gguf"
FP8_FIXTURE = f"{FIXTURES}/hf-fp8"

# byte offsets of each type's fp16 scale fields (ggml-common.h); random bytes there could be NaN/Inf
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
    T.IQ4_NL: [0], T.IQ4_XS: [0], T.IQ2_XXS: [0],
}
OURS = list(dq.KERNELS)
SHAPES = [(1, 256), (4, 512), (3, 7, 256), (2, 3, 1024)]  # the 3-D ones are stacked (expert, out, in)


def random_blocks(t, shape, seed):
    rng = np.random.default_rng(seed)
    block, nbytes = GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, (int(np.prod(shape)) // block, nbytes), dtype=np.uint8)
    for at in F16_FIELDS.get(t, []):
        raw[:, at:at + 2] = rng.uniform(-2, 2, (len(raw), 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(*shape[:-1], -1)  # GGUFReader's layout: (..., bytes per row)


def gguf_ref(raw, t, shape):
    return gguf.quants.dequantize(raw, t).reshape(shape)


def assert_bits_equal(a, b):
    # stricter than np.array_equal: -0.0 vs 0.0 (and NaN payloads) must agree too
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("backend", ["numpy", "ggml"])
@pytest.mark.parametrize("t", OURS, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_exact_vs_gguf(t, shape, backend):
    raw = random_blocks(t, shape, seed=int(t) + 100 * SHAPES.index(shape))
    assert_bits_equal(dequantize_ggml(raw, t, shape, backend=backend), gguf_ref(raw, t, shape))


IQ = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M, T.IQ4_NL, T.IQ4_XS]


@pytest.mark.parametrize("t", IQ, ids=lambda t: t.name)
def test_ggml_backend_bit_exact_on_iq_types(t):
    """The IQ types go to ggml's C code by default: bit-exact with gguf's too (scales made finite where known)."""
    shape = (4, 512)
    rng = np.random.default_rng(int(t))
    block, nbytes = GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, (int(np.prod(shape)) // block, nbytes), dtype=np.uint8)
    raw[:, 0:2] = rng.uniform(-2, 2, (len(raw), 1)).astype(np.float16).view(np.uint8)
    if t == T.IQ1_M:                                   # its scale's fp16 bits are spread over the block's last bytes
        raw[:, -8:] &= 0x0F
    ref = gguf_ref(raw, t, shape)
    ours = dequantize_ggml(raw, t, shape, backend="ggml")
    assert_bits_equal(np.nan_to_num(ours), np.nan_to_num(ref))


@pytest.mark.parametrize("t", OURS, ids=lambda t: t.name)
def test_many_ragged_chunks_on_threads(t, monkeypatch):
    # tiny chunks and spans that don't line up: many of each on the thread pool, the last ones partial
    monkeypatch.setattr(dq, "CHUNK_VALUES", 3 * 256)
    monkeypatch.setattr(dq, "SPAN_VALUES", 7 * 256)
    monkeypatch.setattr(dq, "THREADS", 3)
    shape = (5, 1280)
    raw = random_blocks(t, shape, seed=int(t))
    ref = gguf_ref(raw, t, shape)
    assert_bits_equal(dequantize_ggml(raw, t, shape, backend="numpy"), ref)
    with ThreadPoolExecutor(1) as caller:  # from a worker thread (a dask task) the chunks run inline
        assert_bits_equal(caller.submit(dequantize_ggml, raw, t, shape, None, "numpy").result(), ref)


def test_signed_zeros():
    # d < 0 times a zero quant is -0.0 in gguf: the same op order must give it too
    t, shape = T.Q4_0, (64, 32)
    raw = random_blocks(t, shape, seed=1)
    raw[:, :2] = np.array([-0.5], np.float16).view(np.uint8)
    raw[:, 2:] = 0x88  # every nibble 8 -> q - 8 = 0
    for backend in ("numpy", "ggml"):
        ours = dequantize_ggml(raw, t, shape, backend=backend)
        assert np.all(np.signbit(ours)) and not ours.any()
        assert_bits_equal(ours, gguf_ref(raw, t, shape))


@pytest.mark.parametrize("t", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types(t):
    rng = np.random.default_rng(int(t))
    shape = (3, 5, 64)
    x = rng.standard_normal(shape).astype(np.float32)
    raw = {T.F32: x, T.F16: x.astype(np.float16), T.BF16: (x.view(np.uint32) >> 16).astype(np.uint16)}[t]
    ours = dequantize_ggml(raw.view(np.uint8), t, shape)
    assert_bits_equal(ours, gguf.quants.dequantize(raw.view(np.uint8), t).reshape(shape))
    assert_bits_equal(dequantize_ggml(raw, t, shape), ours)  # GGUFReader hands these as typed arrays


@pytest.mark.parametrize("t", [T.IQ4_NL, T.IQ4_XS, T.IQ2_XXS], ids=lambda t: t.name)
def test_iq_types_delegate(t):
    shape = (2, 3, 512)
    raw = random_blocks(t, shape, seed=int(t))
    ours = dequantize_ggml(raw, t, shape)
    assert ours.shape == shape and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, gguf_ref(raw, t, shape))


def test_raw_layouts_and_out():
    t, shape = T.Q6_K, (2, 4, 512)
    raw = random_blocks(t, shape, seed=7)
    ref = gguf_ref(raw, t, shape)
    assert_bits_equal(dequantize_ggml(raw.reshape(-1), t, shape), ref)  # 1-D bytes
    assert_bits_equal(dequantize_ggml(raw.reshape(8, -1), t, shape), ref)  # (rows, bytes per row)
    out = np.full(shape, np.nan, np.float32)
    assert dequantize_ggml(raw, t, shape, out=out) is out
    assert_bits_equal(out, ref)
    with pytest.raises(AssertionError):
        dequantize_ggml(raw.reshape(-1)[:-1], t, shape)


def test_block_table_and_nbytes():
    assert GGML_BLOCK[int(T.Q4_K)] == (256, 144) and GGML_BLOCK[int(T.Q8_0)] == (32, 34)
    assert ggml_nbytes(T.Q6_K, (256, 2048, 7168)) == 256 * 2048 * 7168 // 256 * 210
    assert ggml_nbytes(int(T.F32), (3, 5)) == 60
    with pytest.raises(AssertionError):
        ggml_nbytes(T.Q4_K, (4, 100))


@pytest.mark.skipif(not os.path.exists(GGUF_FIXTURE), reason="fixture missing")
def test_real_gguf_fixture():
    reader = gguf.GGUFReader(GGUF_FIXTURE)
    seen = set()
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        ours = dequantize_ggml(t.data, t.tensor_type, shape)
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        assert_bits_equal(ours, ref)
        seen.add(t.tensor_type.name)
    assert {"Q4_K", "Q6_K", "Q5_0", "F32"} <= seen


# -----------------------------------------------------------------------------
# FP8

def fp8_reference(codes, scale, block=128):
    w = torch.from_numpy(codes).view(torch.float8_e4m3fn).to(torch.float64)
    s = torch.from_numpy(scale).to(torch.float64).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return (w * s[:w.shape[0], :w.shape[1]]).numpy()


def test_e4m3fn_table_matches_torch():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ref = codes.view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(dq.E4M3FN, ref)  # NaN == NaN here
    assert np.isnan(dq.E4M3FN[[0x7F, 0xFF]]).all() and np.isnan(dq.E4M3FN).sum() == 2
    assert np.signbit(dq.E4M3FN[0x80]) and dq.E4M3FN[0x7E] == 448 and dq.E4M3FN[1] == 2.0 ** -9


@pytest.mark.parametrize("shape", [(576, 256), (256, 512), (300, 200)], ids=str)
def test_fp8_block(shape):
    rng = np.random.default_rng(shape[0])
    codes = rng.integers(0, 256, shape, dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x42  # no NaN codes: compare numbers
    scale = rng.uniform(1e-5, 1e-2, (-(-shape[0] // 128), -(-shape[1] // 128))).astype(np.float32)
    ref = fp8_reference(codes, scale)
    ours = dequantize_fp8_block(codes, scale)
    assert ours.dtype == np.float32 and ours.shape == shape
    assert np.all(np.abs(ours - ref) <= 1e-6 * np.abs(ref))
    # each edge tile gets its own scale: the last row/column tile is partial for 576, 300, 200
    r, c = (shape[0] - 1) // 128, (shape[1] - 1) // 128
    assert ours[-1, -1] == np.float32(dq.E4M3FN[codes[-1, -1]] * scale[r, c])
    # torch float8 tensors are taken as they come from safetensors
    w8 = torch.from_numpy(codes).view(torch.float8_e4m3fn)
    np.testing.assert_array_equal(dequantize_fp8_block(w8, torch.from_numpy(scale)), ours)


def test_fp8_nan_codes():
    codes = np.full((130, 130), 0x7F, np.uint8)
    codes[0, 0] = 0x38  # 1.0
    out = dequantize_fp8_block(codes, np.ones((2, 2), np.float32))
    assert out[0, 0] == 1.0 and np.isnan(out).sum() == codes.size - 1


@pytest.mark.skipif(not os.path.exists(FP8_FIXTURE), reason="fixture missing")
def test_real_fp8_fixture():
    from safetensors import safe_open
    weight_map = json.load(open(f"{FP8_FIXTURE}/model.safetensors.index.json"))["weight_map"]
    shard = weight_map["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    n = 0
    with safe_open(f"{FP8_FIXTURE}/{shard}", framework="pt") as f:
        for name in f.keys():
            if not name.endswith("_scale_inv"):
                continue
            w, s = f.get_tensor(name[:-len("_scale_inv")]), f.get_tensor(name)
            assert w.dtype == torch.float8_e4m3fn
            ours = dequantize_fp8_block(w, s)
            ref = fp8_reference(w.view(torch.uint8).numpy(), s.numpy())
            assert np.all(np.abs(ours - ref) <= 1e-6 * np.abs(ref))
            n += 1
    assert n > 0
