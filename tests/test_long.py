"""Long contexts on the CPU path: chunked prefill equals one pass, batched decode equals one sequence at a time,
a 24K-token prompt in bounded memory, and contexts that cannot be served refused in one line."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import runtime
from helpers import ROOT, pipeline
from runtime.load import ModelError

LONG = ROOT / "tests" / "data" / "long.txt"


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    out = tmp_path_factory.mktemp("long") / "tiny"
    pipeline("run", "--out", out)
    return out


@pytest.fixture(scope="module")
def model(merged):
    return runtime.load(merged, device="cpu", max_len=1024, slots=3, chunk=96)


@pytest.fixture(scope="module")
def ids(model):
    return torch.tensor(runtime.api.encode(model, LONG.read_text())[:700])


def _kl(p, q):
    lp, lq = p.double().log_softmax(-1), q.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def test_chunked_prefill_equals_one_pass(model, ids):
    net = model.net
    chunked = net.prefill(ids, 0, 0, all_logits=True)             # 96-token chunks, the last one partial
    net.chunk = len(ids)
    try:
        whole = net.prefill(ids, 0, 1, all_logits=True)
    finally:
        net.chunk = 96
    kl = _kl(whole, chunked)
    print(f"chunked vs one pass over {len(ids)} tokens: max |logit diff| {float((whole - chunked).abs().max()):.2e}, "
          f"max KL {float(kl.max()):.2e}")
    assert chunked.shape == whole.shape == (len(ids), net.a.vocab)
    assert float(kl.max()) <= 1e-5
    last = net.prefill(ids, 0, 2)                                  # last-token logits only: the same row
    assert last.shape == (1, net.a.vocab) and torch.allclose(last[0], whole[-1], atol=1e-4, rtol=0)


def test_batched_decode_equals_one_at_a_time(model, ids):
    """Three sequences at different positions in one step: each row equals that sequence decoded alone."""
    net = model.net
    lengths = [700, 333, 64]
    for slot, n in enumerate(lengths):
        net.prefill(ids[:n], 0, slot)
    nxt = torch.tensor([11, 22, 33])
    step = net.decode(nxt, torch.tensor(lengths), torch.tensor([0, 1, 2]))
    for slot, n in enumerate(lengths):
        alone = net.prefill(torch.cat([ids[:n], nxt[slot:slot + 1]]), 0, slot, all_logits=True)[-1]
        assert float(_kl(alone[None], step[slot:slot + 1]).max()) <= 1e-6, f"row {slot}"
    # rows in another order, slots not in order: the same logits row for row
    for slot, n in enumerate(lengths):
        net.prefill(ids[:n], 0, slot)
    perm = net.decode(nxt[[2, 0, 1]], torch.tensor(lengths)[[2, 0, 1]], torch.tensor([2, 0, 1]))
    assert torch.allclose(perm, step[[2, 0, 1]], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="distinct"):
        net.decode(nxt[:2], torch.tensor([5, 6]), torch.tensor([1, 1]))


def test_copy_prefix_reuses_a_computed_prefix(model, ids):
    net = model.net
    net.prefill(ids[:400], 0, 0)
    net.copy_prefix(0, 2, 300)                                     # slot 2 holds the first 300 positions of slot 0
    rest = net.prefill(ids[300:400], 300, 2)
    whole = net.prefill(ids[:400], 0, 1)
    assert torch.allclose(rest, whole, atol=1e-4, rtol=0)


def test_context_plan_refuses_what_cannot_fit(model):
    net = model.net
    per_token = runtime.model.cache_bytes(net.a, 1, 4)
    assert per_token == net.a.n_layers * (net.a.kv_lora + net.a.rope) * 4
    net.plan_check(free=1 << 40, element=4)                        # plenty: no error
    with pytest.raises(ModelError, match=r"at most \d+ tokens per slot fit"):
        net.plan_check(free=runtime.model.prefill_reserve(net.a, net.chunk, net.max_len) + per_token * 100, element=4)
    with pytest.raises(ModelError, match="smaller chunk"):
        net.plan_check(free=1 << 20, element=4)


def _perplexity(merged, *args):
    return subprocess.run([sys.executable, "-m", "runtime.perplexity", "--model", merged, "--device", "cpu",
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_contexts_past_the_model_limit_are_refused_in_one_line(merged):
    for ctx in (163841, 1_000_000_000):
        p = _perplexity(merged, "--file", LONG, "--ctx", ctx)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "max_position_embeddings" in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_24k_prompt_in_bounded_memory(merged, tmp_path):
    """runtime.perplexity over 24,576 tokens on the CPU: peak RSS well under 4 GB, and the first 512 positions'
    logits equal a 512-token pass (causality through chunks and the blockwise attention)."""
    long_logits, short_logits = tmp_path / "long.npy", tmp_path / "short.npy"
    p = _perplexity(merged, "--file", LONG, "--ctx", 24576, "--json", "--save-logits", long_logits)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["tokens"] == 24576 and np.isfinite(r["nll"])
    print(f"24K tokens: {r['tokens_per_s']:.0f} tok/s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
    assert r["peak_rss_bytes"] < 2.5 * 2**30
    q = _perplexity(merged, "--file", LONG, "--ctx", 512, "--json", "--save-logits", short_logits)
    assert q.returncode == 0, q.stderr
    a, b = np.load(long_logits, mmap_mode="r")[:512], np.load(short_logits)
    kl = _kl(torch.from_numpy(np.array(b)), torch.from_numpy(np.array(a)))
    print(f"first 512 positions: max |logit diff| {np.abs(a - b).max():.2e}, max KL {float(kl.max()):.2e}")
    assert float(kl.max()) <= 1e-5
