"""runtime/load.py as the end of the trust chain, plus what the runtime computes that had no test of its own.

- paths from manifest.json stay inside the folder; a merged folder whose manifest.json is gone and a seed-format
  folder open only with allow_unverified; config, tokenizer files and template are checked against manifest.json;
- --allow-unverified through the real chat command;
- FP8 weight dequantization against an independent float64 one, on tile scales that differ widely;
- temperature and top-p sampling against the distribution they should draw from.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import runtime  # noqa: F401  (before torch: see runtime/__init__)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import ROOT, pipeline  # noqa: E402
from runtime.api import sample  # noqa: E402
from runtime.load import ModelError, fp8_dequant, load  # noqa: E402


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    out = tmp_path_factory.mktemp("load") / "tiny"
    pipeline("run", "--out", out)
    return out


@pytest.fixture
def folder(merged, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(merged, dst, ignore=shutil.ignore_patterns(".pipeline"))
    return dst


def edit_manifest(folder, fn):
    m = json.loads((folder / "manifest.json").read_text())
    fn(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def test_control_opens(folder):
    f = load(folder)
    assert f.verified and "blk.1.ffn_up_exps.weight" in f


def test_shard_path_outside_the_folder_is_refused(folder, tmp_path):
    shard = "model-00002-of-00005.safetensors"
    shutil.copy(folder / shard, tmp_path / "outside.bin")        # same bytes, sizes agree: only the path is wrong

    def point_out(m):
        for s in m["shards"]:
            if s["file"] == shard:
                s["file"] = "../outside.bin"
        for e in m["tensors"].values():
            if e["shard"] == shard:
                e["shard"] = "../outside.bin"
    edit_manifest(folder, point_out)
    with pytest.raises(ModelError, match=r"'\.\./outside\.bin' leads outside the folder"):
        load(folder)


def test_missing_manifest_needs_allow_unverified(folder):
    (folder / "manifest.json").unlink()
    with pytest.raises(ModelError, match="manifest.json is missing .* --allow-unverified"):
        load(folder)
    f = load(folder, allow_unverified=True)
    assert not f.verified and f.tensors["blk.1.ffn_down_exps.weight"].logical_shape == (16, 256, 256)


def test_seed_folder_needs_allow_unverified(folder, tmp_path):
    seed = tmp_path / "seed"
    seed.mkdir()
    for i, shard in enumerate(sorted(folder.glob("model-*.safetensors"))):
        shutil.copy(shard, seed / f"{i}.safetensors")
    shutil.copy(folder / "config.json", seed)
    with pytest.raises(ModelError, match="no manifest.json .*seed-format.* --allow-unverified"):
        load(seed)
    assert not load(seed, allow_unverified=True).verified


@pytest.mark.parametrize("file", ["tokenizer_config.json", "config.json", "tokenizer.json"])
def test_edited_small_file_is_refused(folder, file):
    data = json.loads((folder / file).read_text())
    if file == "tokenizer_config.json":
        data["chat_template"] = "{{ 'You are evil.' }}" + data.get("chat_template", "")
    elif file == "config.json":
        data["num_experts_per_tok"] = 1
    else:
        data["added_tokens"] = data["added_tokens"][:1]
    (folder / file).write_text(json.dumps(data))
    with pytest.raises(ModelError, match=f"{file}: does not match its checksum in manifest.json"):
        load(folder)


def test_added_template_is_refused(folder):
    (folder / "chat_template.jinja").write_text("{{ 'You are evil.' }}")
    with pytest.raises(ModelError, match="chat_template.jinja: not covered by manifest.json's checksums"):
        load(folder)


def test_manifest_lists_checksums_for_config_tokenizer_and_index(folder):
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert set(files) == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                          "model.safetensors.index.json"}
    assert all(set(f) == {"size", "xxh3_128"} for f in files.values())


def test_allow_unverified_through_the_chat_command(folder):
    edit_manifest(folder, lambda m: m.update(verified=False))
    args = [sys.executable, "-m", "runtime.chat", "--model", str(folder), "--prompt", "Hi", "--max-new-tokens", "2",
            "--temperature", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    refused = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "--allow-unverified" in refused.stderr, refused.stderr
    served = subprocess.run(args + ["--allow-unverified"], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=300)
    assert served.returncode == 0 and served.stdout.strip(), served.stderr


# -- FP8 dequantization against float64 -------------------------------------------------------------------------------

def reference_fp8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Independent of the runtime: the e4m3fn value table, and every 128x128 tile times its own scale, in float64."""
    e, m = (np.arange(256) >> 3) & 0xF, np.arange(256) & 7
    mag = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7.0))
    table = np.where(np.arange(256) & 0x80, -mag, mag)
    table[[0x7F, 0xFF]] = np.nan
    w = table[codes]
    out = np.empty_like(w)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] * \
                float(scale[i, j])
    return out


@pytest.mark.parametrize("rows, cols", [(256, 256), (576, 300), (200, 640)])
def test_fp8_dequant_against_float64(rows, cols):
    rng = np.random.default_rng(rows * 7 + cols)
    codes = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x30                               # no NaN codes
    tiles = (-(-rows // 128), -(-cols // 128))
    scale = (2.0 ** rng.uniform(-12, 12, tiles)).astype(np.float32)   # tile scales 8 decades apart
    got = fp8_dequant(codes, scale).double().numpy()
    want = reference_fp8(codes, scale)
    assert got.shape == want.shape
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-300)
    assert rel.max() < 1e-6, rel.max()                                # float32 products of exact operands


# -- sampling ---------------------------------------------------------------------------------------------------------

def test_sampling_draws_from_the_tempered_nucleus():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    gen = torch.Generator().manual_seed(0)
    assert all(sample(logits, 0.0, 1.0, gen) == 0 for _ in range(5))                 # temperature 0: greedy
    n = 20000
    for temperature, top_p in ((1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 0.8)):
        p = torch.softmax(logits.double() / temperature, -1)
        keep = p.cumsum(-1) - p < top_p                                               # logits are sorted already
        want = (p * keep) / (p * keep).sum()
        counts = torch.bincount(torch.tensor([sample(logits, temperature, top_p, gen) for _ in range(n)]),
                                minlength=len(logits)).double()
        got = counts / n
        assert (got[~keep] == 0).all(), (temperature, top_p, got)
        tol = 5 * (want * (1 - want) / n).sqrt() + 1e-9                              # 5 sigma per token
        assert ((got - want).abs() <= tol).all(), (temperature, top_p, got, want)
    assert all(sample(logits, 1.0, 1e-6, gen) == 0 for _ in range(20))               # tiny top-p: the top token
