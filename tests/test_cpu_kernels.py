"""runtime.cpu_kernels (the own AVX-512 kernel for a chunk of tokens' routed experts) against ggml's graph and float64.

The kernel is meant to give the graph's results bit for bit (same Q8_K rounding of x and h, same integer sums and
float order in each dot product, ggml's own silu): where ggml's CPU code is built for AVX-512 (its silu is then the
AVX-512 one the kernel copies) we ask for exact equality, elsewhere for 1e-5. Both are also held to the float64
reference of tests/test_experts.py (dequantized weights, no activation rounding). Also: the fallbacks to ggml (other
types, DSV3_CPU_KERNEL=0, no compiler or CPU support, a kernel that fails runtime.experts' check against the graph).
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as QT

from runtime import cpu_kernels, experts as X, ggml_ops
from runtime.experts import MoEExperts
from test_experts import check, random_experts, rel, routing

KERNEL = X.own_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="the own CPU kernel does not run here (see its note)")
GGML_AVX512 = bool(ggml_ops._g.ggml_cpu_has_avx512())

EXPERTS, HIDDEN, INTER, K = 20, 512, 256, 8
COMBOS = [(QT.Q4_K, QT.Q4_K, QT.Q6_K), (QT.Q6_K, QT.Q6_K, QT.Q4_K), (QT.Q4_K, QT.Q6_K, QT.Q4_K),
          (QT.Q6_K, QT.Q6_K, QT.Q6_K)]


def layer(rng, types, experts=EXPERTS):
    g, u, d = types
    return [random_experts(rng, g, (experts, INTER, HIDDEN)), random_experts(rng, u, (experts, INTER, HIDDEN)),
            random_experts(rng, d, (experts, HIDDEN, INTER))]


def graph_only(parts, monkeypatch, **kw) -> MoEExperts:
    monkeypatch.setenv("DSV3_CPU_KERNEL", "0")
    moe = MoEExperts(*parts, **kw)
    monkeypatch.delenv("DSV3_CPU_KERNEL")
    assert moe._kernel is None
    return moe


def same(a, b):
    assert rel(a, b) < 1e-5
    if GGML_AVX512:
        np.testing.assert_array_equal(a, b)


@needs_kernel
@pytest.mark.parametrize("types", COMBOS, ids=lambda ts: "-".join(t.name for t in ts))
@pytest.mark.parametrize("T", [1, 3, 8])
def test_kernel_equals_graph(types, T, monkeypatch):
    rng = np.random.default_rng(T)
    parts = layer(rng, types)
    x = rng.standard_normal((T, HIDDEN)).astype(np.float32)
    ids, w = routing(rng, T, EXPERTS, K)            # 8 of 20 per row: rows share experts
    graph = graph_only(parts, monkeypatch, threads=2).forward(x, ids, w)
    moe = MoEExperts(*parts, threads=2)
    assert moe._kernel is KERNEL
    for threads in (1, 2):
        out = np.empty_like(graph)
        KERNEL.moe(x, ids, w, *parts, out, threads)
        same(out, graph)
    same(moe.forward(x, ids, w), graph)             # forward takes the kernel for T <= KERNEL_MAX_TOKENS
    check(parts, x, ids, w, graph, "graph")
    check(parts, x, ids, w, out, "own kernel")


@needs_kernel
def test_many_pairs_per_expert_and_repeats_in_a_row(monkeypatch):
    """More (token, slot) pairs on one expert than the kernel dots in one pass (8), and an expert twice in a row."""
    rng = np.random.default_rng(5)
    parts = layer(rng, (QT.Q4_K, QT.Q4_K, QT.Q6_K), experts=16)
    T = 16
    x = rng.standard_normal((T, HIDDEN)).astype(np.float32)
    ids, w = routing(rng, T, 16, K)
    ids[:, 0] = 3                                   # every token: expert 3 first ...
    ids[:, 1] = np.where(ids[:, 1] == 3, 4, ids[:, 1])
    ids[0, 1] = 3                                   # ... and token 0 twice
    graph = graph_only(parts, monkeypatch).forward(x, ids, w)
    same(MoEExperts(*parts).forward(x, ids, w), graph)
    check(parts, x, ids, w, graph, "graph, one expert for every token")


@pytest.mark.parametrize("why", ["Q5_K down", "DSV3_CPU_KERNEL=0"])
def test_ggml_runs_where_the_kernel_does_not(why, monkeypatch):
    types = (QT.Q4_K, QT.Q4_K, QT.Q5_K if why == "Q5_K down" else QT.Q6_K)
    if why == "DSV3_CPU_KERNEL=0":
        monkeypatch.setenv("DSV3_CPU_KERNEL", "0")
        assert cpu_kernels.kernel() is None and X.own_kernel() is None
    rng = np.random.default_rng(6)
    parts = layer(rng, types)
    moe = MoEExperts(*parts)
    assert moe._kernel is None
    x = rng.standard_normal((3, HIDDEN)).astype(np.float32)
    ids, w = routing(rng, 3, EXPERTS, K)
    check(parts, x, ids, w, moe.forward(x, ids, w), f"{why}: ggml")


@pytest.mark.parametrize("cause", ["no compiler", "no AVX-512 VNNI"])
def test_unavailable_says_so_once(cause, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))   # nothing built yet
    if cause == "no compiler":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    else:
        monkeypatch.setattr(cpu_kernels, "_cpu", lambda: ("a CPU", {"avx2", "fma", "f16c"}))
    cpu_kernels._load.cache_clear()
    try:
        assert cpu_kernels.kernel() is None and cpu_kernels.kernel() is None
        err = capsys.readouterr().err
        assert err.count("note: own CPU expert kernel unavailable") == 1 and "ggml runs" in err
        assert ("no C compiler" if cause == "no compiler" else "the CPU lacks avx512") in err
    finally:
        cpu_kernels._load.cache_clear()


@needs_kernel
def test_a_kernel_that_differs_from_ggml_is_not_used(monkeypatch, capsys):
    """own_kernel() checks the kernel against the graph once per process; a mismatch keeps the graph, with a note."""
    class Off:
        def moe(self, x, ids, w, gate, up, down, out, threads):
            KERNEL.moe(x, ids, w, gate, up, down, out, threads)
            out[0, 0] = np.nextafter(out[0, 0], np.inf)

    monkeypatch.setattr(X, "_own", None)
    monkeypatch.setattr(cpu_kernels, "kernel", lambda: Off())
    assert X.own_kernel() is None and X.own_kernel() is None
    assert capsys.readouterr().err.count("does not give ggml's exact results") == 1
    monkeypatch.setattr(X, "_own", None)
    monkeypatch.setattr(cpu_kernels, "kernel", lambda: KERNEL)
    assert X.own_kernel() is KERNEL


@needs_kernel
def test_bad_input_is_refused():
    rng = np.random.default_rng(8)
    parts = layer(rng, (QT.Q4_K, QT.Q4_K, QT.Q6_K), experts=2)
    out = np.empty((1, HIDDEN), np.float32)
    args = (rng.standard_normal((1, HIDDEN)).astype(np.float32), np.zeros((1, 1), np.int32),
            np.ones((1, 1), np.float32))
    with pytest.raises(ValueError, match="code -1"):
        KERNEL.moe(*args, *layer(rng, (QT.Q4_K, QT.Q4_K, QT.Q5_K), experts=2), out, 1)
    KERNEL.moe(*args, *parts, out, 1)
    assert np.isfinite(out).all()
