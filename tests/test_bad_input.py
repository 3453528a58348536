"""Bad inputs through the real CLI: each must fail with exit 2, one clear message naming the offending file (and
tensor), no traceback, and nothing left under a final output name.

Every test copies the tiny fixture (examples/tiny-deepseek-v3/) under tmp_path, breaks the copy, and runs
`python pipeline.py run --manifest M --out OUT` in a subprocess from the repo root. The fixture is never modified.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType

from conftest import FIXTURE, REPO, GTensor, quant_bytes, rewrite_gguf

GGUF_NAME = "tiny-Q4_K_M.gguf"
FINAL_NAMES = ("model-*.safetensors", "manifest.json", "model.safetensors.index.json")


# -- helpers ----------------------------------------------------------------------------------------------------------

def copy_fixture(tmp_path: Path, parts=("hf-fp8", "gguf/Q4_K_M")) -> Path:
    """A private copy of the fixture's folders under tmp_path/src (break this copy, never the fixture)."""
    src = tmp_path / "src"
    for part in parts:
        shutil.copytree(FIXTURE / part, src / part)
    return src


def write_manifest(tmp_path: Path, fp8: str = "src/hf-fp8", gguf: str = "src/gguf/Q4_K_M", text: str | None = None,
                   name: str = "manifest.yaml") -> Path:
    """A manifest next to src/ (relative paths resolve against the manifest's folder)."""
    m = tmp_path / name
    m.write_text(text if text is not None else
                 f"name: bad-input-test\nsources:\n  fp8: {{local: {fp8}}}\n  gguf: {{local: {gguf}}}\n")
    return m


def run_cli(manifest: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
    return subprocess.run([sys.executable, "pipeline.py", "run", "--manifest", str(manifest), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]


def assert_nothing_final(out: Path, allowed: tuple[str, ...] = ()) -> None:
    """No merged-model file under a final name; temp files only under OUT/.pipeline/tmp."""
    if not out.exists():
        return
    for pattern in FINAL_NAMES:
        found = [str(p.relative_to(out)) for p in out.rglob(pattern)]
        assert not found, f"final output left behind: {found}"
    for p in out.rglob("*"):
        rel = p.relative_to(out)
        if rel.parts[0] == ".pipeline":
            if p.name.endswith(".partial"):
                assert rel.parts[:2] == (".pipeline", "tmp"), f"temp file outside .pipeline/tmp: {rel}"
            continue
        assert rel.parts[0] in allowed, f"unexpected file in the output folder: {rel}"


def assert_user_error(res: subprocess.CompletedProcess, out: Path, *needles: str, allowed: tuple[str, ...] = ()):
    """Exit 2, no traceback, an `error:` line holding every needle, nothing final written. Returns the error text."""
    output = res.stdout + res.stderr
    assert "Traceback" not in output, output
    assert res.returncode == 2, f"exit {res.returncode}\n{output}"
    errors = error_lines(res)
    assert errors, f"no 'error:' line on stderr:\n{res.stderr}"
    text = "\n".join(errors)
    for needle in needles:
        assert str(needle) in text, f"{needle!r} not in the error message:\n{text}"
    assert_nothing_final(out, allowed)
    print(text)                                  # shown with `pytest -s` / `-rP`: judge the wording
    return text


def safetensors_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


# -- positive control -------------------------------------------------------------------------------------------------

def test_control_unmodified_copy_merges(tmp_path):
    copy_fixture(tmp_path)
    out = tmp_path / "out"
    res = run_cli(write_manifest(tmp_path), out)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert (out / "manifest.json").is_file() and (out / "model.safetensors.index.json").is_file()
    assert list(out.glob("model-*-of-*.safetensors"))


def test_control_rewritten_gguf_merges(tmp_path):
    """rewrite_gguf with no edit yields a GGUF the pipeline accepts (so the GGUF tests fail for their edit)."""
    src = copy_fixture(tmp_path, parts=("hf-fp8",))
    rewrite_gguf(FIXTURE / "gguf/Q4_K_M" / GGUF_NAME, src / "gguf/Q4_K_M" / GGUF_NAME)
    out = tmp_path / "out"
    res = run_cli(write_manifest(tmp_path), out)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (out / "manifest.json").is_file()


# -- 1. swapped sources -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "file"])
def test_gguf_given_as_fp8_source(tmp_path, as_file):
    copy_fixture(tmp_path)
    fp8 = "src/gguf/Q4_K_M" + (f"/{GGUF_NAME}" if as_file else "")
    out = tmp_path / "out"
    res = run_cli(write_manifest(tmp_path, fp8=fp8), out)
    text = assert_user_error(res, out, "sources.fp8", str(tmp_path / fp8))
    assert "GGUF" in text or GGUF_NAME in text, text


def test_fp8_given_as_gguf_source(tmp_path):
    copy_fixture(tmp_path)
    out = tmp_path / "out"
    res = run_cli(write_manifest(tmp_path, gguf="src/hf-fp8"), out)
    assert_user_error(res, out, "sources.gguf", str(tmp_path / "src/hf-fp8"), ".safetensors")


# -- 2. truncated files -----------------------------------------------------------------------------------------------

def test_truncated_safetensors_shard(tmp_path):
    src = copy_fixture(tmp_path)
    shard = src / "hf-fp8/model-00002-of-00004.safetensors"
    start, header = safetensors_header(shard)
    cut = shard.stat().st_size - 50_000                      # well inside the data part
    assert cut > start
    os.truncate(shard, cut)
    cut_tensors = [k for k, v in header.items() if k != "__metadata__" and start + v["data_offsets"][1] > cut]
    out = tmp_path / "out"
    text = assert_user_error(run_cli(write_manifest(tmp_path), out), out, str(shard), "truncated")
    assert any(t in text for t in cut_tensors), f"no cut tensor ({cut_tensors}) named in: {text}"


def test_truncated_gguf_in_tensor_data(tmp_path):
    src = copy_fixture(tmp_path)
    gguf = src / "gguf/Q4_K_M" / GGUF_NAME
    reader = GGUFReader(gguf)
    cut = gguf.stat().st_size - 100_000
    cut_tensors = [t.name for t in reader.tensors if int(t.data_offset) + int(t.n_bytes) > cut]
    del reader
    os.truncate(gguf, cut)
    out = tmp_path / "out"
    text = assert_user_error(run_cli(write_manifest(tmp_path), out), out, str(gguf), "truncated")
    assert any(t in text for t in cut_tensors), f"no cut tensor ({cut_tensors}) named in: {text}"


@pytest.mark.parametrize("where", ["metadata", "tensor_table"])
def test_truncated_gguf_in_header(tmp_path, where):
    src = copy_fixture(tmp_path)
    gguf = src / "gguf/Q4_K_M" / GGUF_NAME
    reader = GGUFReader(gguf)
    if where == "metadata":
        cut = int(reader.fields["tokenizer.ggml.tokens"].offset) + 1000   # inside the token list
    else:
        cut = int(reader.tensors[10].field.offset) + 5                  # inside the 11th tensor-info entry
    assert cut < reader.data_offset
    del reader
    os.truncate(gguf, cut)
    out = tmp_path / "out"
    assert_user_error(run_cli(write_manifest(tmp_path), out), out, str(gguf), "truncated")


# -- 3. index naming a missing shard ----------------------------------------------------------------------------------

def test_index_names_missing_shard(tmp_path):
    src = copy_fixture(tmp_path)
    (src / "hf-fp8/model-00003-of-00004.safetensors").unlink()
    out = tmp_path / "out"
    assert_user_error(run_cli(write_manifest(tmp_path), out), out,
                      "model.safetensors.index.json", "model-00003-of-00004.safetensors", "missing")


# -- 4. FP8 weight without its scale ----------------------------------------------------------------------------------

def test_fp8_weight_without_scale_inv(tmp_path):
    from safetensors.torch import load_file, save_file

    src = copy_fixture(tmp_path)
    weight = "model.layers.1.self_attn.q_b_proj.weight"
    index_path = src / "hf-fp8/model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard_name = index["weight_map"].pop(weight + "_scale_inv")
    shard = src / "hf-fp8" / shard_name
    tensors = load_file(shard)
    del tensors[weight + "_scale_inv"]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index, indent=2))
    out = tmp_path / "out"
    assert_user_error(run_cli(write_manifest(tmp_path), out), out,
                      index["weight_map"][weight], weight, weight + "_scale_inv")


# -- 5. a GGUF of a different model ------------------------------------------------------------------------------------

def _swap_gguf(tmp_path: Path, **edits) -> Path:
    """Copy the checkpoint; write the GGUF source as an edited copy of the fixture GGUF. Returns the GGUF path."""
    src = copy_fixture(tmp_path, parts=("hf-fp8",))
    return rewrite_gguf(FIXTURE / "gguf/Q4_K_M" / GGUF_NAME, src / "gguf/Q4_K_M" / GGUF_NAME, **edits)


def test_gguf_router_shape_mismatch(tmp_path):
    name = "blk.2.ffn_gate_inp.weight"          # F32 router (16, 256) -> (8, 256)
    gguf = _swap_gguf(tmp_path, edit_tensors={
        name: lambda t: GTensor(t.name, np.ascontiguousarray(t.data[:8]), t.raw_dtype, (8, 256))})
    out = tmp_path / "out"
    assert_user_error(run_cli(write_manifest(tmp_path), out), out,
                      gguf.name, name, "[8, 256]", "[16, 256]", "model.layers.2.mlp.gate.weight")


def test_gguf_expert_tensor_shape_mismatch(tmp_path):
    name = "blk.3.ffn_gate_exps.weight"         # Q4_K routed experts: 16 -> 8 experts
    gguf = _swap_gguf(tmp_path, edit_tensors={
        name: lambda t: GTensor(t.name, np.ascontiguousarray(t.data[:8]), t.raw_dtype, (8, 256, 256))})
    out = tmp_path / "out"
    assert_user_error(run_cli(write_manifest(tmp_path), out), out,
                      gguf.name, name, "[8, 256, 256]", "[16, 256, 256]")


def test_gguf_expert_count_metadata_mismatch(tmp_path):
    gguf = _swap_gguf(tmp_path, edit_kv={"deepseek2.expert_count": 32})
    out = tmp_path / "out"
    assert_user_error(run_cli(write_manifest(tmp_path), out), out,
                      str(gguf), "config.json", "n_routed_experts = 16", "deepseek2.expert_count = 32")


def test_gguf_layer_count_mismatch(tmp_path):
    gguf = _swap_gguf(tmp_path, edit_kv={"deepseek2.block_count": 3},
                      edit_tensors=lambda ts: [t for t in ts if not t.name.startswith("blk.3.")])
    out = tmp_path / "out"
    assert_user_error(run_cli(write_manifest(tmp_path), out), out,
                      str(gguf), "config.json", "num_hidden_layers = 4", "deepseek2.block_count = 3")


def test_gguf_other_architecture(tmp_path):
    gguf = _swap_gguf(tmp_path, arch="llama")
    out = tmp_path / "out"
    assert_user_error(run_cli(write_manifest(tmp_path), out), out, str(gguf), "llama", "deepseek2")


# -- 6. incomplete split set ------------------------------------------------------------------------------------------

def test_split_set_missing_part(tmp_path):
    src = copy_fixture(tmp_path, parts=("hf-fp8", "gguf/Q4_K_M-split"))
    (src / "gguf/Q4_K_M-split/tiny-Q4_K_M-00002-of-00002.gguf").unlink()
    out = tmp_path / "out"
    assert_user_error(run_cli(write_manifest(tmp_path, gguf="src/gguf/Q4_K_M-split"), out), out,
                      str(src / "gguf/Q4_K_M-split"), "tiny-Q4_K_M-00002-of-00002.gguf", "missing")


# -- 7. unsupported GGML type -----------------------------------------------------------------------------------------

def test_unsupported_ggml_type(tmp_path):
    name, qtype = "blk.1.ffn_up_exps.weight", GGMLQuantizationType.TQ2_0
    from stages import ggml_types
    assert not ggml_types.accepted(qtype.name) and not ggml_types.accepted(int(qtype))
    gguf = _swap_gguf(tmp_path, edit_tensors={
        name: lambda t: GTensor(t.name, quant_bytes(qtype, t.shape, fill=0x55), qtype, t.shape)})
    t = next(t for t in GGUFReader(gguf).tensors if t.name == name)     # the copy really holds TQ2_0 bytes
    assert t.tensor_type == qtype and list(reversed([int(x) for x in t.shape])) == [16, 256, 256]
    out = tmp_path / "out"
    assert_user_error(run_cli(write_manifest(tmp_path), out), out, gguf.name, name, "TQ2_0", "not supported")


def test_unknown_ggml_type_id(tmp_path):
    """A type id gguf does not know at all (a newer llama.cpp's type): GGUFReader itself refuses the file."""
    name, type_id = "blk.1.ffn_up_exps.weight", 250
    gguf = _swap_gguf(tmp_path, edit_tensors={
        name: lambda t: GTensor(t.name, np.zeros((16, 256, 64), np.float32), type_id, t.shape)})
    out = tmp_path / "out"
    assert_user_error(run_cli(write_manifest(tmp_path), out), out, str(gguf), name, str(type_id))


# -- 8. an output folder that is not ours -----------------------------------------------------------------------------

def test_output_folder_not_ours(tmp_path):
    copy_fixture(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    notes = out / "notes.txt"
    notes.write_bytes(b"my notes, not a model\n")
    os.utime(notes, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    before = (notes.read_bytes(), notes.stat().st_mtime_ns)
    res = run_cli(write_manifest(tmp_path), out)
    assert_user_error(res, out, str(out), "not empty", allowed=("notes.txt",))
    assert (notes.read_bytes(), notes.stat().st_mtime_ns) == before
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"], "the run wrote into a folder that is not ours"


# -- 9. manifest errors -----------------------------------------------------------------------------------------------

GOOD = "name: bad-input-test\nsources:\n  fp8: {local: src/hf-fp8}\n  gguf: {local: src/gguf/Q4_K_M}\n"


@pytest.mark.parametrize("text, needles", [
    (GOOD + "colour: red\n", ["colour", "unknown"]),
    ("name: bad-input-test\nsources:\n  fp8: {local: src/hf-fp8}\n", ["sources.gguf", "missing"]),
    (GOOD + 'keep_mtp: "yes"\n', ["keep_mtp", "true or false"]),
    (GOOD + "keep_mtp: [true\n", ["not valid YAML", "line"]),
], ids=["unknown_key", "missing_gguf", "bad_type", "invalid_yaml"])
def test_manifest_error(tmp_path, text, needles):
    copy_fixture(tmp_path)
    manifest = write_manifest(tmp_path, text=text)
    out = tmp_path / "out"
    assert_user_error(run_cli(manifest, out), out, str(manifest), *needles)
    assert not out.exists(), "a manifest error must not create the output folder"


# -- error text is printed as-is ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder", ["[old]", "run[/old]"], ids=["tag", "closing_tag"])
def test_error_message_keeps_brackets_in_paths(tmp_path, folder):
    copy_fixture(tmp_path)
    missing = tmp_path / folder / "hf-fp8"                     # a source that does not exist, under a bracketed name
    out = tmp_path / "out"
    res = run_cli(write_manifest(tmp_path, fp8=f'"{missing}"'), out)
    assert_user_error(res, out, "sources.fp8", str(missing), "no such folder")


# -- 10. hostile headers, paths and settings (issue 16, the trust chain) ---------------------------------------------

def rewrite_header(shard: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header with `edit(header)` applied; the data part stays byte for byte."""
    start, header = safetensors_header(shard)
    data = shard.read_bytes()[start:]
    edit(header)
    raw = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


HEADER_SHARD = "hf-fp8/model-00002-of-00004.safetensors"


def _first_two(header: dict) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


@pytest.mark.parametrize("case, needle", [
    ("float_offsets", "data_offsets"), ("list_dtype", "unknown dtype"), ("string_shape", "shape"),
    ("negative_offsets", "data_offsets"), ("overlapping", "overlap"),
])
def test_malformed_safetensors_header(tmp_path, case, needle):
    src = copy_fixture(tmp_path)
    shard = src / HEADER_SHARD
    first, second = _first_two(safetensors_header(shard)[1])

    def edit(h):
        if case == "float_offsets":
            h[first]["data_offsets"] = [float(x) for x in h[first]["data_offsets"]]
        elif case == "list_dtype":
            h[first]["dtype"] = [h[first]["dtype"]]
        elif case == "string_shape":
            h[first]["shape"] = "".join(map(str, h[first]["shape"]))
        elif case == "negative_offsets":
            b, e = h[first]["data_offsets"]
            h[first]["data_offsets"] = [b - 8, e - 8]
        else:                                               # the second tensor shifted onto the first one's bytes
            b, e = h[second]["data_offsets"]
            h[second]["data_offsets"] = [b - 16, e - 16]
    rewrite_header(shard, edit)
    out = tmp_path / "out"
    text = assert_user_error(run_cli(write_manifest(tmp_path), out), out, str(shard), needle)
    assert first in text or second in text, text


def test_index_naming_a_file_outside_the_checkpoint(tmp_path):
    src = copy_fixture(tmp_path)
    index_path = src / "hf-fp8/model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = "model-00004-of-00004.safetensors"
    shutil.move(src / "hf-fp8" / shard, tmp_path / shard)            # the bytes exist, one level up
    index["weight_map"] = {k: ("../../" + shard if v == shard else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    out = tmp_path / "out"
    assert_user_error(run_cli(write_manifest(tmp_path), out), out, str(index_path), "../../" + shard,
                      "leads outside")


def test_gguf_folder_with_a_single_file_and_a_split_set_of_one_model(tmp_path):
    src = copy_fixture(tmp_path)
    for p in (FIXTURE / "gguf/Q4_K_M-split").iterdir():
        shutil.copy(p, src / "gguf/Q4_K_M" / p.name)
    out = tmp_path / "out"
    assert_user_error(run_cli(write_manifest(tmp_path), out), out, "several GGUF models", GGUF_NAME,
                      "tiny-Q4_K_M-*-of-00002.gguf", "include:")


def test_symlink_loop_is_named(tmp_path):
    copy_fixture(tmp_path)
    loop = tmp_path / "src" / "loop"
    loop.symlink_to(loop)
    out = tmp_path / "out"
    assert_user_error(run_cli(write_manifest(tmp_path, fp8="src/loop"), out), out, "sources.fp8", "symlink loop")


@pytest.mark.parametrize("text, needles", [
    (GOOD.replace("src/hf-fp8", "~nosuchuser/hf-fp8"), ["~nosuchuser/hf-fp8"]),
    (GOOD.replace("name: bad-input-test", "name: ../../evil"), ["'name'", "plain folder name"]),
    (GOOD + "stages:\n  verify: {workers: -2}\n", ["stages.verify.workers", "at least 1"]),
    (GOOD + "stages:\n  verify: {workers: 0}\n", ["stages.verify.workers", "at least 1"]),
    (GOOD + "stages:\n  write: {bwlimit: 0}\n", ["stages.write.bwlimit", "greater than 0"]),
    (GOOD + "stages:\n  write: {bwlimit: -5}\n", ["stages.write.bwlimit", "greater than 0"]),
], ids=["no_such_user", "name_escapes", "workers_negative", "workers_zero", "bwlimit_zero", "bwlimit_negative"])
def test_manifest_setting_error(tmp_path, text, needles):
    copy_fixture(tmp_path)
    manifest = write_manifest(tmp_path, text=text)
    out = tmp_path / "out"
    assert_user_error(run_cli(manifest, out), out, str(manifest), *needles)
    assert not out.exists() and not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize("flag", ["0", "-5"])
def test_cli_bwlimit_must_be_positive(tmp_path, flag):
    copy_fixture(tmp_path)
    res = subprocess.run([sys.executable, "pipeline.py", "run", "--manifest", str(write_manifest(tmp_path)),
                          "--out", str(tmp_path / "out"), "--bwlimit", flag], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "--bwlimit" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value", [("num_experts_per_tok", "4"), ("hidden_size", 256.0),
                                        ("rms_norm_eps", "1e-6"), ("num_hidden_layers", True)])
def test_config_value_of_the_wrong_type(tmp_path, key, value):
    src = copy_fixture(tmp_path)
    cfg_path = src / "hf-fp8/config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert_user_error(run_cli(write_manifest(tmp_path), out), out, str(cfg_path), key, json.dumps(value))


# config.json key -> GGUF metadata key (under deepseek2.), written out here, independently of stages/reconcile.py:
# every one must be compared, so a GGUF of another model (or a wrong config) stops at reconcile.
CONFIG_VS_GGUF = [
    ("num_hidden_layers", "block_count"), ("hidden_size", "embedding_length"),
    ("intermediate_size", "feed_forward_length"), ("moe_intermediate_size", "expert_feed_forward_length"),
    ("n_routed_experts", "expert_count"), ("num_experts_per_tok", "expert_used_count"),
    ("n_shared_experts", "expert_shared_count"), ("first_k_dense_replace", "leading_dense_block_count"),
    ("num_attention_heads", "attention.head_count"), ("q_lora_rank", "attention.q_lora_rank"),
    ("kv_lora_rank", "attention.kv_lora_rank"), ("qk_rope_head_dim", "rope.dimension_count"),
    ("n_group", "expert_group_count"), ("topk_group", "expert_group_used_count"),
    ("routed_scaling_factor", "expert_weights_scale"), ("vocab_size", "vocab_size"),
    ("rope_theta", "rope.freq_base"), ("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
    ("max_position_embeddings", "context_length"), ("rope_scaling.factor", "rope.scaling.factor"),
    ("rope_scaling.original_max_position_embeddings", "rope.scaling.original_context_length"),
    ("rope_scaling.beta_fast", "rope.scaling.yarn_beta_fast"),
    ("rope_scaling.beta_slow", "rope.scaling.yarn_beta_slow"),
    ("qk_nope_head_dim+qk_rope_head_dim", "attention.key_length_mla"), ("v_head_dim", "attention.value_length_mla"),
    ("kv_lora_rank+qk_rope_head_dim", "attention.key_length"), ("kv_lora_rank", "attention.value_length"),
]


@pytest.fixture(scope="module")
def fixture_config_and_meta():
    from stages.formats import read_config, read_gguf
    return read_config(FIXTURE / "hf-fp8"), read_gguf([FIXTURE / "gguf/Q4_K_M" / GGUF_NAME]).meta


def test_config_matches_gguf_metadata_as_is(fixture_config_and_meta):
    from stages.reconcile import check_config
    cfg, meta = fixture_config_and_meta
    assert check_config(cfg, meta, "config.json", "x.gguf") == []


@pytest.mark.parametrize("ckey, gkey", CONFIG_VS_GGUF, ids=[g for _, g in CONFIG_VS_GGUF])
def test_every_config_key_is_compared_with_the_gguf(fixture_config_and_meta, ckey, gkey):
    """The real fixture's config and GGUF metadata, one GGUF value changed: reconcile names that pair."""
    from stages.reconcile import check_config
    cfg, meta = fixture_config_and_meta
    key = "deepseek2." + gkey
    assert key in meta, key
    changed = dict(meta, **{key: meta[key] * 2 + 1})
    problems = check_config(cfg, changed, "config.json", "x.gguf")
    hits = [p for p in problems if f"x.gguf deepseek2.{gkey} = " in p and f"config.json {ckey} = " in p]
    assert len(hits) == 1, problems
