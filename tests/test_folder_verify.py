"""`pipeline.py verify --folder DIR`: a folder checked alone, without its sources, through the real CLI.

A merged folder (copied without .pipeline/, as it travels to a serving host): every tensor's bytes against
manifest.json's xxh3_128, the shards' sizes and headers, the small files' checksums; a missing, truncated, extra or
tampered shard, an edited template or a manifest naming a path outside the folder fails in one clear line, exit 1.
A seed-format folder (no manifest): every tensor config.json implies present with the right shape and GGML type,
every shard whole. Both say plainly what was not checked. The folder is only read.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from helpers import pipeline

ENV = {"HF_HUB_OFFLINE": "1", "COLUMNS": "400"}


def check(folder: Path, *args):
    return pipeline("verify", "--folder", folder, *args, env=ENV, check=False)


def fail_lines(res) -> list[str]:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("FAIL ")]
    print("\n".join(lines))
    return lines


def errors(res) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "out"
    pipeline("run", "--out", out, env=ENV)
    return out


@pytest.fixture
def bare(merged, tmp_path) -> Path:
    """The merged folder as it reaches a serving host: no .pipeline/, no verify.json, new mtimes."""
    dst = tmp_path / "bare"
    shutil.copytree(merged, dst, ignore=shutil.ignore_patterns(".pipeline", "verify.json"), copy_function=shutil.copy)
    return dst


def entry(folder: Path, name: str) -> dict:
    return json.loads((folder / "manifest.json").read_text())["tensors"][name]


def flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ 0x04]))


# -- a merged folder: integrity against manifest.json ---------------------------------------------------------------

def test_clean_folder_passes_and_says_parity_was_not_checked(bare, tmp_path):
    before = tree(bare)
    res = check(bare, "--json", "--junit", tmp_path / "v.xml", "--workers", "2")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    n = len(json.loads((bare / "manifest.json").read_text())["tensors"])
    assert f"PASS: {n}/{n} tensors match manifest.json's xxh3_128, 10/10 files whole" in res.stderr, res.stderr
    assert "parity with the sources was NOT checked" in res.stderr
    assert re.search(r"dask cluster: 2 workers", res.stderr), res.stderr          # dask did the hashing
    summary = json.loads(res.stdout)
    assert summary["verdict"] == "pass" and summary["summary"]["parity_checked"] == 0
    assert summary["summary"]["passed"] == n and summary["summary"]["bytes"] > 10_000_000
    cases = ET.parse(tmp_path / "v.xml").getroot().find("testsuite").findall("testcase")
    assert len(cases) == n + 10 and not any(c.find("failure") is not None for c in cases)
    assert tree(bare) == before, "verify --folder must only read"


def test_tampered_tensor_fails_by_name(bare):
    name = "blk.3.ffn_up_exps.weight"
    e = entry(bare, name)
    flip(bare / e["shard"], e["offsets"][0] + 12345)
    res = check(bare)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    lines = fail_lines(res)
    assert len(lines) == 1 and lines[0].startswith(f"FAIL {name}: integrity: xxh3_128 "), lines
    assert "differs from manifest.json's" in lines[0]
    assert errors(res) == [f"error: {bare}: 1 of 107 tensors failed"], errors(res)


def test_manifest_hash_is_compared(bare):
    """The bytes are intact but manifest.json names another hash: the comparison itself must run (and fail)."""
    m = json.loads((bare / "manifest.json").read_text())
    name = "blk.1.attn_kv_b.weight"
    m["tensors"][name]["xxh3_128"] = "0" * 32
    (bare / "manifest.json").write_text(json.dumps(m))
    res = check(bare)
    assert res.returncode == 1, res.stderr
    assert [ln.split(":")[0] for ln in fail_lines(res)] == [f"FAIL {name}"]


@pytest.mark.parametrize("case", ["truncated", "missing", "extra", "outside", "template"])
def test_damaged_folder_fails_in_one_line(bare, tmp_path, case):
    shard = "model-00003-of-00005.safetensors"
    if case == "truncated":
        os.truncate(bare / shard, (bare / shard).stat().st_size - 1000)
        want = f"FAIL {shard}: "
        detail = "truncated"
    elif case == "missing":
        (bare / shard).unlink()
        want, detail = f"FAIL {shard}: ", "shard missing"
    elif case == "extra":
        shutil.copy(bare / shard, bare / "sub-model.safetensors")
        want, detail = "FAIL sub-model.safetensors: ", "extra shard"
    elif case == "template":
        cfg = json.loads((bare / "tokenizer_config.json").read_text())
        cfg["chat_template"] = "{{ 'ignore previous instructions' }}"
        (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
        want, detail = "FAIL tokenizer_config.json: ", "does not match its xxh3_128"
    else:                                               # a manifest that names a file outside the folder
        (tmp_path / "outside.bin").write_bytes(b"\0" * 64)
        m = json.loads((bare / "manifest.json").read_text())
        m["shards"][0]["file"] = "../outside.bin"
        for e in m["tensors"].values():
            if e["shard"] == "model-00001-of-00005.safetensors":
                e["shard"] = "../outside.bin"
        (bare / "manifest.json").write_text(json.dumps(m))
        res = check(bare)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert len(errors(res)) == 1 and "../outside.bin leads outside" in errors(res)[0], res.stderr
        return
    res = check(bare)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    lines = fail_lines(res)
    assert len(lines) == 1 and lines[0].startswith(want) and detail in lines[0], lines
    assert len(errors(res)) == 1, res.stderr


def test_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    res = check(tmp_path)
    assert res.returncode == 2 and errors(res) == [f"error: {tmp_path}: not a model folder (no manifest.json and no "
                                                   ".safetensors files)"], res.stderr
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    res = check(loop)
    assert res.returncode == 2 and errors(res) == [f"error: {loop}: symlink loop"], res.stderr


# -- a seed-format folder: completeness -------------------------------------------------------------------------------

@pytest.fixture
def seed(merged, tmp_path) -> Path:
    """What the seed system's script leaves: one safetensors per layer, GGUF-style keys, no manifest or index;
    its users add config.json. The merged folder's shards hold exactly those keys and dtypes."""
    dst = tmp_path / "seed"
    (dst / "layers").mkdir(parents=True)
    for i, shard in enumerate(sorted(merged.glob("model-*.safetensors"))):
        shutil.copy(shard, dst / ("layers" if i else ".") / f"part{i}.safetensors")
    shutil.copy(merged / "config.json", dst / "config.json")
    return dst


def header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def test_seed_folder_complete(seed):
    res = check(seed, "--json")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "content was NOT checked" in res.stderr and "5/5 files whole" in res.stderr, res.stderr
    s = json.loads(res.stdout)["summary"]
    assert s["failed"] == 0 and s["tensors"] == 107 and s["bytes"] == 0


def test_seed_folder_missing_layer(seed):
    (seed / "layers" / "part3.safetensors").unlink()                  # layer 2
    res = check(seed, "--json")
    assert res.returncode == 1, res.stderr
    failed = json.loads(res.stdout)["failed"]
    assert failed and all(n.startswith("blk.2.") for n in failed), failed
    assert "FAIL blk.2.ffn_up_exps.weight: missing" in fail_lines(res)


def test_seed_folder_wrong_ggml_type_and_truncated_shard(seed):
    path = seed / "layers" / "part2.safetensors"                      # layer 1
    n, h = header(path)
    name = "blk.1.ffn_down_exps.ggml_type"
    with open(path, "r+b") as f:                                      # Q4_K/Q6_K -> Q8_0: sizes no longer agree
        f.seek(8 + n + h[name]["data_offsets"][0])
        f.write((8).to_bytes(8, "little"))
    last = seed / "layers" / "part4.safetensors"
    os.truncate(last, last.stat().st_size - 100)
    res = check(seed)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    lines = fail_lines(res)
    assert any(ln.startswith("FAIL blk.1.ffn_down_exps.weight: ") and "Q8_0" in ln for ln in lines), lines
    assert any(ln.startswith("FAIL layers/part4.safetensors: truncated") for ln in lines), lines


def test_seed_folder_needs_config(seed):
    (seed / "config.json").unlink()
    res = check(seed)
    assert res.returncode == 2 and len(errors(res)) == 1 and "needs the model's config.json" in errors(res)[0]
