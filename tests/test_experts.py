"""runtime.experts (ggml's quantized CPU kernels) against a float64 numpy reference.

Two references, both from gguf.quants.dequantize'd weights:
- exact: sum_k w * (down_e @ (silu(gate_e @ x) * (up_e @ x))) in float64;
- emulated: the same, but every matmul input first rounded the way ggml rounds it (Q8_K blocks of 256 for
  K-quant weights, Q8_0 blocks of 32 for Q5_0/Q8_0), which checks the kernels themselves: ~3e-7 (float32
  rounding), except that now and then an activation that lies within float32 noise of a rounding boundary
  (ggml's silu uses its own expf) rounds the other way, one step of amax/127 on one value: up to ~3e-4.

The gap to the exact reference is that activation rounding and nothing else: an int8 grid of step amax/127 has
an rms error of step/sqrt(12), i.e. a relative error of (amax/rms) / (127 sqrt(12)) = 2.3e-3 * amax/rms per
rounded vector. x (gaussian, amax/rms ~ 3 per 256-block) gives ~7e-3 on gate and up, ~1e-2 through silu(g)*u;
h = silu(g)*u is heavy-tailed (amax/rms ~ 6.5 on the fixture) and gives ~1.5e-2 on down. Measured on the fixture:
1.6e-2 .. 2.0e-2 in all; we allow 3e-2.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize

from helpers import GGUF_ONE, pipeline, write_manifest
from runtime import ggml_ops
from runtime.experts import MoEExperts, StackedExperts
from runtime.load import load as open_folder

EXACT_BOUND = 3e-2      # activation rounding, see the module docstring
EMULATED_BOUND = 2e-3   # float32 noise, plus rare +-1 flips of a rounded activation (below)
K_QUANTS = {QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K}

FIXTURE_GGUF = GGUF_ONE / "tiny-Q4_K_M.gguf"


@pytest.fixture(scope="module")
def reader():
    return GGUFReader(FIXTURE_GGUF)


def fixture_layer(reader, layer):
    """The fixture's routed experts of `layer`, as (data, type, shape): the reader's memmap, used in place."""
    tensors = {t.name: t for t in reader.tensors}
    parts = []
    for name in ("gate", "up", "down"):
        t = tensors[f"blk.{layer}.ffn_{name}_exps.weight"]
        data = t.data.reshape(-1)
        assert np.shares_memory(data, reader.data)  # no copy
        parts.append(StackedExperts(data, int(t.tensor_type), tuple(int(n) for n in reversed(t.shape))))
    return parts


# ----------------------------------------------------------------------------------------- reference

def dequant(s: StackedExperts) -> np.ndarray:
    e, rows, cols = s.shape
    return dequantize(np.asarray(s.data).reshape(e * rows, -1), s.ggml_type).reshape(s.shape).astype(np.float64)


def round_like_ggml(v: np.ndarray, weight_type: int) -> np.ndarray:
    """v rounded as ggml rounds a matmul's activations for weights of weight_type (float64 result)."""
    v = v.astype(np.float32)
    if weight_type in K_QUANTS:  # quantize_row_q8_K_ref: 256-blocks, iscale = -127 / (the value of largest |.|)
        b = v.reshape(-1, 256)
        mx = b[np.arange(len(b)), np.argmax(np.abs(b), axis=1)]
        iscale = np.divide(np.float32(-127), mx, out=np.zeros_like(mx), where=mx != 0)
        d = np.divide(np.float32(1), iscale, out=np.zeros_like(mx), where=iscale != 0)
        q = np.minimum(127, np.rint(iscale[:, None] * b))
    else:                        # quantize_row_q8_0 (AVX): 32-blocks, d = amax/127 as fp16, q = rint(v * 127/amax)
        b = v.reshape(-1, 32)
        amax = np.abs(b).max(axis=1)
        d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
        q = np.rint(b * np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax != 0)[:, None])
    return (q * d[:, None]).reshape(v.shape).astype(np.float64)


def reference(parts, x, ids, w, emulate: bool):
    g, u, d = parts
    wg, wu, wd = (dequant(s) for s in parts)
    rx = (lambda v, t: round_like_ggml(v, t)) if emulate else (lambda v, t: v)
    out = np.zeros(x.shape)
    for t in range(len(x)):
        xt = x[t].astype(np.float64)
        for e, we in zip(ids[t], w[t]):
            a, b = wg[e] @ rx(xt, g.ggml_type), wu[e] @ rx(xt, u.ggml_type)
            h = a / (1 + np.exp(-a)) * b
            out[t] += we * (wd[e] @ rx(h, d.ggml_type))
    return out


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def routing(rng, T, experts, k):
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(T)]).astype(np.int32)
    return ids, rng.uniform(0.05, 1.0, (T, k)).astype(np.float32)


def check(parts, x, ids, w, out, label):
    exact, emulated = rel(out, reference(parts, x, ids, w, False)), rel(out, reference(parts, x, ids, w, True))
    types = "/".join(ggml_ops.type_name(s.ggml_type) for s in parts)
    print(f"\n{label} [{types}] T={len(x)}: rel err vs exact {exact:.2e}, "
          f"vs Q8-rounded-activation reference {emulated:.1e}")
    assert np.isfinite(out).all()
    assert exact < EXACT_BOUND
    assert emulated < EMULATED_BOUND


# ----------------------------------------------------------------------------------------- random valid blocks

F16_FIELDS = {QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208], QT.Q5_0: [0], QT.Q8_0: [0]}  # fp16 scales' offsets
F16_SCALE = {QT.Q4_K: 2e-4, QT.Q5_K: 1e-4, QT.Q6_K: 5e-5, QT.Q5_0: 6e-3, QT.Q8_0: 1e-3}  # |weights| ~ 0.05


def random_experts(rng, ggml_type, shape) -> StackedExperts:
    """Random bytes as GGML blocks, fp16 scale fields set to finite values of a sane size."""
    block, nbytes = GGML_QUANT_SIZES[ggml_type]
    e, rows, cols = shape
    blocks = rng.integers(0, 256, (e * rows * cols // block, nbytes), dtype=np.uint8)
    for at in F16_FIELDS[ggml_type]:
        f16 = (rng.uniform(0.5, 1.5, len(blocks)) * F16_SCALE[ggml_type]).astype(np.float16)
        blocks[:, at:at + 2] = f16.view(np.uint8).reshape(-1, 2)
    return StackedExperts(blocks.reshape(-1), int(ggml_type), shape)


def random_layer(rng, types, experts=8, hidden=512, inter=256):
    g, u, d = types
    return [random_experts(rng, g, (experts, inter, hidden)), random_experts(rng, u, (experts, inter, hidden)),
            random_experts(rng, d, (experts, hidden, inter))]


# ----------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_fixture_experts(reader, layer, T):
    rng = np.random.default_rng(100 * layer + T)
    parts = fixture_layer(reader, layer)
    experts, _, hidden = parts[0].shape
    moe = MoEExperts(*parts)
    for _ in range(2):  # fresh x and routing each time, through the same cached graph
        x = rng.standard_normal((T, hidden)).astype(np.float32)
        ids, w = routing(rng, T, experts, 4)
        check(parts, x, ids, w, moe.forward(x, ids, w), f"fixture blk.{layer}")


MIXED = [(QT.Q4_K, QT.Q4_K, QT.Q6_K), (QT.Q5_0, QT.Q8_0, QT.Q5_K)]


@pytest.mark.parametrize("types", [(t, t, t) for t in F16_FIELDS] + MIXED, ids=lambda ts: "-".join(t.name for t in ts))
@pytest.mark.parametrize("T", [1, 17])
def test_random_blocks(types, T):
    rng = np.random.default_rng(T)
    parts = random_layer(rng, types)
    x = rng.standard_normal((T, 512)).astype(np.float32)
    ids, w = routing(rng, T, 8, 3)
    check(parts, x, ids, w, MoEExperts(*parts).forward(x, ids, w), "random")


def test_graph_reuse_gives_fresh_results(reader):
    """The cached graph is rerun with new inputs and, for another layer of the same types, new weights."""
    rng = np.random.default_rng(7)
    l2, l3 = MoEExperts(*fixture_layer(reader, 2)), MoEExperts(*fixture_layer(reader, 3))  # both Q4_K/Q4_K/Q6_K
    xa, xb = rng.standard_normal((2, 5, 256)).astype(np.float32)
    (ia, wa), (ib, wb) = routing(rng, 5, 16, 4), routing(rng, 5, 16, 4)
    a = l2.forward(xa, ia, wa)
    b = l2.forward(xb, ib, wb)
    c = l3.forward(xb, ib, wb)
    assert l2._graph(8, 4) is l3._graph(8, 4)  # one graph, shared
    np.testing.assert_array_equal(l2.forward(xa, ia, wa), a)
    assert rel(b, a) > 0.5 and rel(c, b) > 0.5
    for moe, x, i, w, out in ((l2, xb, ib, wb, b), (l3, xb, ib, wb, c)):
        assert rel(out, reference([moe.gate, moe.up, moe.down], x, i, w, True)) < EMULATED_BOUND


def test_only_selected_experts_are_read(reader):
    """Overwriting every unselected expert's bytes with garbage (random fp16 scales: huge, Inf, NaN) changes nothing."""
    rng = np.random.default_rng(3)
    parts = fixture_layer(reader, 2)
    x = rng.standard_normal((6, 256)).astype(np.float32)
    ids, w = routing(rng, 6, 16, 2)
    unused = sorted(set(range(16)) - set(ids.ravel().tolist()))
    garbage = []
    for s in parts:
        data = np.array(s.data)  # a copy: the fixture file is left alone
        per_expert = data.reshape(s.shape[0], -1)
        per_expert[unused] = rng.integers(0, 256, (len(unused), per_expert.shape[1]), dtype=np.uint8)
        garbage.append(StackedExperts(data, s.ggml_type, s.shape))
    clean, dirty = MoEExperts(*parts), MoEExperts(*garbage)
    np.testing.assert_array_equal(dirty.forward(x, ids, w), clean.forward(x, ids, w))
    ids[0, 0] = unused[0]  # now token 0 looks at garbage: it shows there, and only there
    a, b = dirty.forward(x, ids, w), clean.forward(x, ids, w)
    assert not np.array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1:], b[1:])


def test_padding_chunking_and_threads_do_not_change_results(reader):
    rng = np.random.default_rng(11)
    parts = fixture_layer(reader, 3)
    x = rng.standard_normal((17, 256)).astype(np.float32)
    ids, w = routing(rng, 17, 16, 4)
    full = MoEExperts(*parts).forward(x, ids, w)                       # padded to 32
    np.testing.assert_array_equal(MoEExperts(*parts, max_tokens=4).forward(x, ids, w), full)  # 5 chunks
    np.testing.assert_array_equal(MoEExperts(*parts, threads=1).forward(x, ids, w), full)
    np.testing.assert_array_equal(MoEExperts(*parts).forward(x[:1], ids[:1], w[:1]), full[:1])
    assert MoEExperts(*parts).forward(x[:0], ids[:0], w[:0]).shape == (0, 256)


def test_top1(reader):
    rng = np.random.default_rng(12)
    parts = fixture_layer(reader, 1)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    ids, w = routing(rng, 3, 16, 1)
    check(parts, x, ids, w, MoEExperts(*parts).forward(x, ids, w), "fixture blk.1 top-1")


def test_bad_input_is_refused_not_aborted(reader):
    parts = fixture_layer(reader, 1)
    moe = MoEExperts(*parts)
    x = np.ones((2, 256), np.float32)
    with pytest.raises(ValueError, match="expert ids"):
        moe.forward(x, np.array([[0, 16], [1, 2]]), np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="x"):
        moe.forward(x[:, :128], np.array([[0, 1], [1, 2]]), np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="integer"):
        moe.forward(x, np.zeros((2, 2)), np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="expected 589824 bytes"):
        StackedExperts(parts[0].data[:-144], parts[0].ggml_type, parts[0].shape)
    with pytest.raises(ValueError, match="not a whole number"):
        StackedExperts(parts[0].data, parts[0].ggml_type, (16, 512, 128))
    with pytest.raises(ValueError, match="inconsistent"):
        MoEExperts(parts[0], parts[1], StackedExperts(parts[2].data, parts[2].ggml_type, (16, 128, 512)))


def test_binding_layout_check(monkeypatch):
    import ggml
    monkeypatch.setattr(ggml, "ggml_tensor_overhead", lambda: 400)
    with pytest.raises(ImportError, match="disagrees with its C library"):
        ggml_ops._check_binding()


def test_from_merged_folder(reader, tmp_path):
    """The merged folder's bytes (docs/FORMAT.md) give exactly what the GGUF's give."""
    pipeline("run", "--manifest", write_manifest(tmp_path / "m.yaml"), "--out", tmp_path / "out")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    ids, w = routing(rng, 4, 16, 4)
    for layer in (1, 2, 3):
        merged = MoEExperts.from_folder(open_folder(tmp_path / "out"), layer)
        assert isinstance(merged.down.data, np.memmap)
        gguf_side = MoEExperts(*fixture_layer(reader, layer))
        np.testing.assert_array_equal(merged.forward(x, ids, w), gguf_side.forward(x, ids, w))


def test_ggml_ops_mul_mat_and_get_rows():
    """The other wrapped calls: a Q8_0 matmul and a row gather, rerun with new input data."""
    rng = np.random.default_rng(9)
    w = random_experts(rng, QT.Q8_0, (1, 48, 64))
    ctx = ggml_ops.context(8)
    try:
        a = ggml_ops.tensor(ctx, ggml_ops.Q8_0, 64, 48)
        ggml_ops.set_data(a, w.data.ctypes.data)
        x = ggml_ops.tensor(ctx, ggml_ops.F32, 64, 3)
        x_np = rng.standard_normal((3, 64)).astype(np.float32)
        ggml_ops.set_array(x, x_np)
        rows = ggml_ops.tensor(ctx, ggml_ops.I32, 2)
        rows_np = np.array([2, 0], np.int32)
        ggml_ops.set_array(rows, rows_np)
        y = ggml_ops.mul_mat(ctx, a, x)                       # (3, 48)
        y_buf = ggml_ops.alloc(y)
        z = ggml_ops.get_rows(ctx, y, rows)                   # rows 2, 0 of y
        z_buf = ggml_ops.alloc(z)
        graph = ggml_ops.Graph(ctx, z, 2)
        wd = dequant(w)[0]
        for _ in range(2):
            x_np[:] = rng.standard_normal((3, 64))
            graph.compute()
            ref = np.stack([wd @ round_like_ggml(v, QT.Q8_0) for v in x_np])
            assert rel(y_buf.view(np.float32).reshape(3, 48), ref) < EMULATED_BOUND
            y_np, z_np = y_buf.view(np.float32).reshape(3, 48), z_buf.view(np.float32).reshape(2, 48)
            np.testing.assert_array_equal(z_np, y_np[[2, 0]])
    finally:
        ggml_ops.free(ctx)
