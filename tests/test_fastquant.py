"""stages/fastquant.c: Q4_K and Q6_K bytes equal to ggml's own quantizer (its reference code, no importance matrix)
on fresh random data, and the quantize stage's fallbacks to ggml (no compiler, bytes that differ) said in one note."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import pipeline
from stages import fastquant, ggml_types, quantize


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("type_name", sorted(fastquant.KERNELS))
def test_bytes_equal_ggmls(type_name, seed):
    fast = quantize.fast_quantizer(ggml_types.get(type_name).id)
    assert fast is not None, f"the fast {type_name} quantizer did not build or did not match ggml on this machine"
    rng = np.random.default_rng(seed)
    rows = [rng.standard_normal(7168) * rng.uniform(1e-3, 1), rng.standard_t(3, 7168) * 0.02,    # heavy tails
            fastquant.sample(seed)[:7168], np.round(rng.standard_normal(7168) * 4) / 4,
            quantize.round_bf16((rng.standard_normal(7168) * 0.05).astype(np.float32))]            # as the stage has
    x = np.concatenate(rows).astype(np.float32)
    x[rng.integers(0, x.size, 50)] *= 100                                                         # outliers
    out = np.empty(ggml_types.get(type_name).nbytes((x.size,)), np.uint8)
    fast(x, out)
    ref = np.frombuffer(quantize.ggml_bytes(type_name, x), np.uint8)
    bad = np.nonzero(out != ref)[0]
    assert not len(bad), f"{len(bad)} bytes differ, first in block {bad[0] // fastquant.KERNELS[type_name][1]}"


def test_a_quantizer_that_differs_is_not_used(capsys):
    assert fastquant._check("Q6_K", lambda x: b"not ggml's bytes") is None
    assert "fast Q6_K quantizer built with this compiler differs from ggml's bytes" in capsys.readouterr().err


def test_without_a_compiler_the_stage_quantizes_with_ggml(tmp_path):
    from test_quantize import quantize_manifest
    m = quantize_manifest(tmp_path / "m.yaml")
    env = {"CC": "/bin/false", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    p = pipeline("run", "--manifest", m, "--out", tmp_path / "ggml", env=env)
    assert "note: the fast quantizers (fastquant.c) did not build" in p.stderr
    assert "by stages/fastquant.c" not in p.stdout
    assert p.stderr.count("note: the fast quantizers") == 1
    q = pipeline("run", "--manifest", m, "--out", tmp_path / "fast", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert "Q4_K and Q6_K by stages/fastquant.c" in q.stdout + q.stderr
    made = lambda out: {p.name: p.read_bytes() for p in (out / quantize.DONE_DIR).iterdir()}
    assert made(tmp_path / "ggml") == made(tmp_path / "fast")
