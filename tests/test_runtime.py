"""runtime/ end to end on the fixture: against transformers' DeepseekV3ForCausalLM, cache vs full pass, the chat and
perplexity commands, bad input.

The reference is transformers' own DeepSeek-V3 (float32, eager attention, eager experts) loaded with exactly the
weights the runtime serves: FP8 tensors dequantized per 128x128 tile and rounded to bf16 (runtime/model.py's
Weights.linear), BF16/F32 tensors as stored, routed experts dequantized from the merged folder's GGML bytes with
gguf.quants.dequantize. What is left between the two is the runtime's own arithmetic: ggml rounds each expert
matmul's activations to Q8_K (~1% relative through an expert, see tests/test_experts.py), which now and then
flips a routing choice downstream; everything else is float32 in both. Run with -s to see the measured numbers.

One merged folder per module (`pipeline.py run --out tmp`), one loaded model shared by the in-process tests.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import runtime  # before torch: if no libgomp is loaded yet, OpenMP's wait policy becomes PASSIVE (runtime/__init__)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from helpers import ROOT, pipeline  # noqa: E402
from runtime.api import encode  # noqa: E402
from runtime.chat import Chat, TextStream  # noqa: E402
from runtime.load import ModelError, bf16, fp8_dequant  # noqa: E402
from runtime.load import load as open_folder  # noqa: E402
from runtime.model import MoE, Transformer, decode_span  # noqa: E402
from stages.names import expected_weights  # noqa: E402

PROSE = ROOT / "tests" / "data" / "prose.txt"
N_REF = 512            # tokens compared with the reference (>= 256)
KL_BOUND, TOP1_BOUND = 5e-3, 0.97


class Command:
    """`python -m runtime.<module> ARGS`, for real, from the repo root, started now; result() waits for it. The
    command-line tests start all theirs at once (the `commands` fixture): on 2 cores that halves their time, most of
    which is each process importing torch and transformers."""

    def __init__(self, module: str, *args):
        self.p = subprocess.Popen([sys.executable, "-m", f"runtime.{module}", *map(str, args)], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        self._done = None

    def result(self, timeout: int = 180) -> subprocess.CompletedProcess:
        if self._done is None:
            out, err = self.p.communicate(timeout=timeout)
            self._done = subprocess.CompletedProcess(self.p.args, self.p.returncode, out, err)
        return self._done


def kl_top1(p_logits: torch.Tensor, q_logits: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-token KL(p || q) (nats) and the fraction of tokens whose argmax agrees."""
    lp, lq = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return kl, float((p_logits.argmax(-1) == q_logits.argmax(-1)).double().mean())


# ----------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    out = tmp_path_factory.mktemp("runtime") / "tiny"
    pipeline("run", "--out", out)
    return out


@pytest.fixture(scope="module")
def model(merged):
    import transformers
    transformers.utils.logging.set_verbosity_error()
    return runtime.load(merged, max_len=1024, device="cpu")


@pytest.fixture(scope="module")
def prose_ids(model):
    ids = encode(model, PROSE.read_text())
    assert len(ids) >= N_REF, f"{PROSE} is {len(ids)} tokens, the tests need {N_REF}"
    return ids[:N_REF]


@pytest.fixture(scope="module")
def runtime_logits(model, prose_ids):
    return runtime.logits(model, prose_ids)


def _copy(merged, to):
    shutil.copytree(merged, to, ignore=shutil.ignore_patterns(".pipeline"))
    return to


def _unverified(merged, to):
    folder = _copy(merged, to)
    m = json.loads((folder / "manifest.json").read_text())
    m["verified"] = False
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder


TAMPERED = "blk.0.attn_norm.weight"        # a small tensor: always re-hashed on load


def _tampered(merged, to):
    folder = _copy(merged, to)
    e = json.loads((folder / "manifest.json").read_text())["tensors"][TAMPERED]
    with open(folder / e["shard"], "r+b") as f:         # flip one bit of one byte of the tensor
        f.seek(e["offsets"][0] + 5)
        byte = f.read(1)[0]
        f.seek(e["offsets"][0] + 5)
        f.write(bytes([byte ^ 0x10]))
    return folder


@pytest.fixture(scope="module")
def commands(merged, tmp_path_factory):
    """Every command-line run of this module, started together: {name: (Command, folder named in errors)}."""
    tmp = tmp_path_factory.mktemp("commands")
    notes = tmp / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("not a model")
    bad = {"unverified": _unverified(merged, tmp / "unverified"), "not-a-model": notes,
           "tampered": _tampered(merged, tmp / "tampered")}
    chat = ("--prompt", "How does the kernel schedule threads?", "--temperature", 0, "--max-new-tokens", 16)
    runs = {
        "chat-a": (merged, "chat", "--model", merged, *chat),
        "chat-b": (merged, "chat", "--model", merged, *chat),
        "ppl-json": (merged, "perplexity", "--model", merged, "--file", PROSE, "--ctx", 256, "--json",
                     "--save-logits", tmp / "logits.npy"),
        "ppl-text": (merged, "perplexity", "--model", merged, "--file", PROSE, "--ctx", 64),
        "ppl-unverified": (bad["unverified"], "perplexity", "--model", bad["unverified"], "--file", PROSE),
        "chat-unverified": (bad["unverified"], "chat", "--model", bad["unverified"], "--prompt", "Hello"),
        "chat-not-a-model": (notes, "chat", "--model", notes, "--prompt", "Hello"),
        "chat-prompt-too-long": (merged, "chat", "--model", merged, "--ctx", 32, "--prompt", PROSE.read_text()[:600]),
        "chat-unknown-device": (merged, "chat", "--model", merged, "--device", "tpu", "--prompt", "Hello"),
        "chat-tampered": (bad["tampered"], "chat", "--model", bad["tampered"], "--prompt", "Hi"),
    }
    started = {name: (Command(*args), folder) for name, (folder, *args) in runs.items()}
    yield {name: (c, folder) for name, (c, folder) in started.items()}, tmp
    for c, _ in started.values():
        if c.p.poll() is None:
            c.p.kill()
        c.p.communicate()


# ---------------------------------------------------------------------------------------------- the reference

def effective_weights(folder) -> dict[str, torch.Tensor]:
    """The merged folder's weights as the runtime computes with them, float32, under transformers' names."""
    f = open_folder(folder)

    def w(name):
        t = f.tensors[name]
        if t.dtype == "F8_E4M3":                                     # = runtime.model.Weights.linear
            return fp8_dequant(f.raw(name), f.raw(name + "_scale_inv")).to(torch.bfloat16).float()
        if t.dtype == "BF16":
            return bf16(f.raw(name)).float()
        return torch.from_numpy(np.array(f.raw(name))).float()

    def experts(name):                                              # GGML bytes -> (experts, out, in)
        t = f.tensors[name]
        e, rows, cols = t.logical_shape
        return torch.from_numpy(dequantize(np.asarray(f.raw(name)).reshape(e * rows, -1), t.ggml_type)
                                .reshape(e, rows, cols).copy())

    sd, fused = {}, {}
    for wt in expected_weights(f.config, f.manifest["gguf_layout"]):     # the pipeline's one HF <-> GGUF map
        if wt.source == "fp8":
            sd[wt.hf[0]] = w(wt.out)
            continue
        # routed experts: transformers 5 fuses them: gate_up_proj (E, 2 I, H) whose output is chunked
        # gate-then-up (DeepseekV3Experts.forward: linear(x, gate_up_proj[e]).chunk(2)), down_proj (E, H, I)
        prefix, proj = wt.hf[0].split(".experts.")[0] + ".experts.", wt.hf[0].rsplit(".", 2)[1]
        fused.setdefault(prefix, {})[proj] = experts(wt.out)
    for prefix, parts in fused.items():
        sd[prefix + "gate_up_proj"] = torch.cat([parts["gate_proj"], parts["up_proj"]], dim=1)
        sd[prefix + "down_proj"] = parts["down_proj"]
    return sd


def hf_model(config: dict, state_dict: dict[str, torch.Tensor]):
    """transformers' DeepseekV3ForCausalLM, float32, eager attention and experts, with exactly these weights."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    c = {k: v for k, v in config.items() if k != "quantization_config"}     # the weights we give are float
    cfg = DeepseekV3Config(**c)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    # DeepSeek's rope rotates interleaved pairs (x0, x1), (x2, x3)... as runtime.model.apply_rope does; and YaRN
    # from rope_scaling, with mscale_all_dim in the softmax scale (as the runtime's MLA.scale)
    assert cfg.rope_interleave is True and cfg.rope_parameters["rope_type"] == "yarn"
    assert cfg.head_dim == config["qk_rope_head_dim"]
    net = DeepseekV3ForCausalLM(cfg).float().eval()
    expected = set(net.state_dict())
    assert set(state_dict) == expected, (sorted(expected - set(state_dict))[:5], sorted(set(state_dict) - expected)[:5])
    for name, t in state_dict.items():
        assert tuple(net.state_dict()[name].shape) == tuple(t.shape), name
    net.load_state_dict(state_dict, strict=True)
    return net


def test_runtime_matches_transformers_reference(merged, model, prose_ids, runtime_logits):
    ref = hf_model(model.folder.config, effective_weights(merged))
    with torch.no_grad():
        ref_logits = ref(torch.tensor([prose_ids])).logits[0].float()
    kl, top1 = kl_top1(ref_logits, runtime_logits)
    target = torch.tensor(prose_ids[1:])
    ppl = [float(F.cross_entropy(x[:-1].double(), target).exp()) for x in (ref_logits, runtime_logits)]
    print(f"\nruntime vs transformers float32 (same effective weights), {len(prose_ids)} tokens of {PROSE.name}: "
          f"mean KL {kl.mean():.3e} nats/token (max {kl.max():.3e}, median {kl.median():.3e}), top-1 agreement "
          f"{top1:.4f}, perplexity {ppl[0]:.3f} (reference) / {ppl[1]:.3f} (runtime)")
    assert torch.isfinite(runtime_logits).all()
    assert kl.mean() <= KL_BOUND, f"mean KL {kl.mean():.3e} > {KL_BOUND}"
    assert top1 >= TOP1_BOUND, f"top-1 agreement {top1:.4f} < {TOP1_BOUND}"
    assert abs(ppl[0] - ppl[1]) / ppl[0] < 0.02


@pytest.mark.parametrize("terms", [1, 2])
def test_fp8_activations_against_the_cpu_bars(model, prose_ids, runtime_logits, terms):
    """The GPU path's FP8 activation rounding, emulated in torch on the CPU (no kernels: tests/test_gpu.py holds the
    kernels to this emulation), against the CPU path. This random fixture's attention is unusually peaked (score std
    9-35), so DeepSeek's one e4m3 term (3 bits) moves the logits past the CPU path's bars (KL ~1.6e-2); the runtime's
    default, a second term for the remainder (~7 bits), stays within them. That is why two terms are the default."""
    net = Transformer(model.folder, max_len=len(prose_ids), emulate_fp8=True, act_terms=terms)
    kl, top1 = kl_top1(runtime_logits, net.forward(torch.tensor(prose_ids)))
    print(f"\nFP8 activations in {terms} term(s), emulated, vs the CPU path: mean KL {kl.mean():.2e}, top-1 {top1:.4f}")
    within = kl.mean() <= KL_BOUND and top1 >= TOP1_BOUND
    assert within == (terms == 2)


def test_decode_spans_cover_the_position_within_twice_its_need():
    """The GPU decode graphs attend over decode_span(pos) cache positions (tests/test_gpu.py runs them): every span
    holds the position, fits the cache, reads at most twice what the position needs (256 at least), and a cache of
    max_len tokens needs few sets of graphs."""
    for max_len in (64, 1000, 4096):
        spans = set()
        for pos in range(max_len):
            span = decode_span(pos, max_len)
            assert pos < span <= max_len and span <= max(256, 2 * (pos + 1)), (pos, max_len, span)
            spans.add(span)
        assert len(spans) <= (-(-max_len // 256) - 1).bit_length() + 1, (max_len, sorted(spans))   # log2 + 1
    assert {decode_span(p, 4096) for p in range(4096)} == {256, 512, 1024, 2048, 4096}


# ------------------------------------------------------------------------------------- cache vs one full pass

class FloatExperts:
    """Drop-in for runtime.experts.MoEExperts without ggml's activation rounding: gguf-dequantized float32."""

    def __init__(self, ggml_experts):
        def deq(s):
            e, rows, cols = s.shape
            return torch.from_numpy(dequantize(np.asarray(s.data).reshape(e * rows, -1), s.ggml_type)
                                    .reshape(e, rows, cols).copy())
        self.gate, self.up, self.down = (deq(s) for s in (ggml_experts.gate, ggml_experts.up, ggml_experts.down))
        self.hidden = ggml_experts.hidden

    def forward(self, x, ids, weights, out=None):
        x, ids, weights = torch.from_numpy(x), torch.from_numpy(ids).long(), torch.from_numpy(weights)
        acc = torch.zeros_like(x)
        for e in ids.unique().tolist():
            t, k = (ids == e).nonzero(as_tuple=True)
            h = F.silu(x[t] @ self.gate[e].T) * (x[t] @ self.up[e].T)
            acc.index_add_(0, t, (h @ self.down[e].T) * weights[t, k, None])
        if out is None:
            return acc.numpy()
        out[:] = acc.numpy()
        return out


def prefill_then_decode(m, ids: list[int], prefill: int) -> torch.Tensor:
    m.reset()
    rows = [m.net.forward(torch.tensor(ids[:prefill]), 0)]
    for i in range(prefill, len(ids)):
        rows.append(m.net.forward(torch.tensor([ids[i]]), i))
    m.pos = len(ids)
    return torch.cat(rows)


def test_prefill_then_decode_equals_one_full_pass(merged, model, prose_ids):
    """Tolerances, measured: with float experts the two paths differ by float32 reassociation only (a (1, n)
    matmul is not summed in the order of an (n, m) one): <= 2.2e-5 on logits of magnitude ~12; we allow 1e-4. With
    ggml's experts a value that lies within that noise of a Q8_K rounding boundary now and then rounds the other
    way, one step of amax/127 on one activation, which moves a few rows' logits by up to ~0.04 (KL <= 1e-4): 98.5%
    of rows stay within 1e-4. We allow 0.1 on any row, KL <= 1e-3, at least 3/4 of rows within 1e-4, and the same
    argmax on all rows but at most one (other CPUs' kernels round differently; a near-tie could flip)."""
    ids, prefill = prose_ids[:264], 200
    full = runtime.logits(model, ids)
    inc = prefill_then_decode(model, ids, prefill)
    diff = (inc - full).abs().amax(-1)
    kl, top1 = kl_top1(full, inc)
    print(f"\nggml experts: prefill {prefill} + decode {len(ids) - prefill} vs one pass: max |dlogit| "
          f"{diff.max():.2e}, rows within 1e-4: {(diff <= 1e-4).double().mean():.3f}, max KL {kl.max():.2e}")
    assert diff.max() <= 0.1 and kl.max() <= 1e-3 and top1 >= 1 - 1.5 / len(ids)
    assert (diff <= 1e-4).double().mean() >= 0.75

    exact = runtime.load(merged, max_len=512, device="cpu")  # the same model, experts without activation rounding
    for layer in exact.net.layers:
        if isinstance(layer.ffn, MoE):
            layer.ffn.experts.cpu = FloatExperts(layer.ffn.experts.cpu)   # the CPU's side of LayerExperts
    ids = prose_ids[:160]
    full = runtime.logits(exact, ids)
    inc = prefill_then_decode(exact, ids, 96)
    print(f"float experts: max |dlogit| {(inc - full).abs().max():.2e}")
    assert (inc - full).abs().max() <= 1e-4
    chunked = torch.cat([exact.net.forward(torch.tensor(ids[:50]), 0), exact.net.forward(torch.tensor(ids[50:]), 50)])
    assert (chunked - full).abs().max() <= 1e-4          # a prompt fed in two pieces (a later chat turn)


# ----------------------------------------------------------------------------------------- perplexity command

def test_perplexity_command(model, prose_ids, commands):
    runs, tmp = commands
    p = runs["ppl-json"][0].result()
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    saved = np.load(tmp / "logits.npy")
    assert saved.dtype == np.float32 and saved.shape == (256, model.folder.config["vocab_size"])
    assert r["tokens"] == 256 and np.isfinite(r["perplexity"]) and 1 < r["perplexity"] < 1024
    assert r["tokens_per_s"] > 0
    # the same tokens through runtime.logits in this process: same kernels, same thread count, same batch, so the
    # same numbers (measured: identical); 1e-4 leaves room for float32 reassociation only
    ours = runtime.logits(model, prose_ids[:256]).numpy()
    print(f"\nperplexity {r['perplexity']:.3f} over 256 tokens; saved vs runtime.logits max |d| "
          f"{np.abs(saved - ours).max():.2e}")
    np.testing.assert_allclose(saved, ours, rtol=0, atol=1e-4)
    nll = F.cross_entropy(torch.from_numpy(saved[:-1]).double(), torch.tensor(prose_ids[1:256]))
    assert abs(float(nll.exp()) - r["perplexity"]) < 1e-3 * r["perplexity"]

    p = runs["ppl-text"][0].result()
    assert p.returncode == 0 and "perplexity" in p.stdout and "tok/s" in p.stdout, p.stderr


# ------------------------------------------------------------------------------------------------ chat command

def test_chat_prompt_is_deterministic(commands):
    runs, _ = commands
    a, b = runs["chat-a"][0].result(), runs["chat-b"][0].result()
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout.strip() and a.stdout == b.stdout
    assert "tok/s" in a.stderr and "prompt:" in a.stderr and "decode:" in a.stderr
    print(f"\nchat: {a.stdout.strip()!r}\n{a.stderr.strip()}")


def test_chat_turns_reuse_the_cache(model):
    chat = Chat(model, system="Answer briefly.", max_new_tokens=6, temperature=0)
    slot = chat.engine.slots[0]
    t1 = chat.say("What is a page fault?")
    n1 = len(chat.cached)
    t2 = chat.say("And a TLB miss?")
    assert not t1.reprefilled and not t2.reprefilled
    assert slot.tokens == chat.cached and t2.cached_tokens == n1
    full = chat.encode(chat.render(chat.messages[:-1]))             # the second prompt from scratch
    assert t2.prompt_tokens < len(full) - len(t1.tokens)          # only the new part was fed
    prompt = chat.cached[:n1 + t2.prompt_tokens]                   # the cache = the rendered prompt + the reply
    assert chat.tok.decode(prompt) == chat.render(chat.messages[:-1])
    assert chat.cached[len(prompt):] == t2.tokens[:len(chat.cached) - len(prompt)]

    # the cache holds exactly chat.cached: a fresh pass over those tokens writes the same latents
    n = len(chat.cached)
    kv = [layer.attn.kv_cache[0, :n].clone() for layer in model.net.layers]
    runtime.logits(model, list(chat.cached))
    assert (model.net.layers[0].attn.kv_cache[0, :n] - kv[0]).abs().max() <= 1e-4   # dense layer: float32 noise
    for layer, before in zip(model.net.layers, kv):                                    # after MoE layers: Q8_K flips
        assert (layer.attn.kv_cache[0, :n] - before).abs().max() <= 0.05 * before.abs().max()

    # a template that rewrites an earlier turn (as R1's does) breaks the text prefix: the conversation is tokenized
    # again, and the engine reuses only the tokens that still match
    chat = Chat(model, max_new_tokens=4, temperature=0)
    chat.say("What is a socket?")
    chat.messages[-1]["content"] = "A socket is an endpoint."
    t = chat.say("And a port?")
    assert t.reprefilled and chat.engine.slots[0].tokens == chat.cached
    assert 0 < t.cached_tokens <= len(chat.encode(chat.render([{"role": "user", "content": "What is a socket?"}])))
    assert chat.tok.decode(chat.cached[:t.cached_tokens + t.prompt_tokens]) == chat.render(chat.messages[:-1])


def test_chat_ctrl_c_keeps_a_consistent_cache(model):
    chat = Chat(model, max_new_tokens=12, temperature=0)
    slot = chat.engine.slots[0]
    chat.say("Explain virtual memory.")
    before = (list(chat.cached), [dict(m) for m in chat.messages])

    calls = []

    def interrupt_on_third(piece):
        calls.append(piece)
        if len(calls) == 3:
            raise KeyboardInterrupt

    t = chat.say("What is paging?", interrupt_on_third)
    assert t.interrupted and len(t.tokens) == 3
    assert chat.messages[-1]["role"] == "assistant" and len(chat.messages) == len(before[1]) + 2   # partial kept
    assert slot.tokens == chat.cached and len(chat.cached) == len(before[0]) + t.prompt_tokens + 2   # 3rd never fed
    t = chat.say("Go on.")
    assert not t.reprefilled and not t.interrupted and slot.tokens == chat.cached
    assert t.cached_tokens == len(chat.cached) - t.prompt_tokens - len(t.tokens) + (t.tokens[-1] != model.eos_id)

    # Ctrl-C before the first token: the turn is undone; the slot holds no token it has not computed
    state = (list(chat.cached), [dict(m) for m in chat.messages])
    prefill = model.net.prefill

    def interrupted_prefill(*a, **k):
        raise KeyboardInterrupt

    model.net.prefill = interrupted_prefill
    try:
        t = chat.say("Something long")
    finally:
        model.net.prefill = prefill
    assert t.interrupted and not t.tokens
    assert (chat.cached, chat.messages) == state and slot.tokens == chat.cached and slot.seq is None
    assert not chat.say("Go on.").reprefilled


def test_stream_never_splits_a_character(model):
    text = "Größe — naïve café ✓ 日本語 🙂 end"
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.encode()) // 2          # the 1024-entry BPE cuts multi-byte characters
    s = TextStream(model.tokenizer)
    pieces = [s.push(i) for i in ids] + [s.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


# --------------------------------------------------------------------------------------------------- bad input

def _one_line_error(p: subprocess.CompletedProcess, folder) -> str:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    assert str(folder) in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case, want", [
    ("chat-unverified", "not verified (manifest.json verified: false)"),
    ("ppl-unverified", "--allow-unverified"),
    ("chat-not-a-model", "not a model folder"),
    ("chat-prompt-too-long", "the context is 32 (--ctx)"),
    ("chat-unknown-device", "unknown device 'tpu'"),
    ("chat-tampered", f"tensor {TAMPERED} does not match its checksum"),
])
def test_bad_input_is_one_line_exit_2(case, want, commands):
    command, folder = commands[0][case]
    line = _one_line_error(command.result(), folder)
    assert want in line, line


def test_tampered_shard_fails_the_checksum_on_load(commands):
    folder = commands[0]["chat-tampered"][1]
    e = json.loads((folder / "manifest.json").read_text())["tensors"][TAMPERED]
    with pytest.raises(ModelError, match=rf"{e['shard']}: tensor {TAMPERED} does not match its checksum"):
        open_folder(folder)


def test_opens_a_seed_system_folder(merged, model, prose_ids, tmp_path):
    """What the seed system's merge script leaves: per-layer shards with GGUF-style keys and U8 + .ggml_type experts,
    no manifest and no index (its users add the model's config.json and tokenizer). Same weights, same logits."""
    seed = tmp_path / "seed"
    (seed / "sub").mkdir(parents=True)
    for i, shard in enumerate(sorted(merged.glob("model-*.safetensors"))):
        shutil.copy(shard, seed / ("sub" if i % 2 else ".") / f"{i}.safetensors")      # scanned recursively
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(merged / name, seed / name)
    with pytest.raises(ModelError, match="seed-format"):             # no checksums: never served by default
        open_folder(seed)
    folder = open_folder(seed, allow_unverified=True)
    assert not folder.verified and folder.manifest is None
    exps = folder.tensors["blk.1.ffn_down_exps.weight"]
    assert exps.logical_shape == (16, 256, 256) and exps.ggml_type in (12, 14)
    seed_model = runtime.load(seed, max_len=1024, device="cpu", allow_unverified=True)
    assert torch.equal(runtime.logits(seed_model, prose_ids[:64]), runtime.logits(model, prose_ids[:64]))
