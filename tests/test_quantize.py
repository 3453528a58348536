"""gguf: {quantize: MIX}: the routed experts made from the FP8 checkpoint as llama.cpp would, instead of a GGUF.

One merged folder of the fixture with `quantize: Q4_K_M` for the module. Checked against independent code: the
fixture's own GGUF (made by llama-quantize) for the per-tensor types; for the bytes, the checkpoint read with
safetensors and decoded by torch's float8, multiplied by its tile scales in float64 (exact: a 4-bit by 24-bit
product), rounded to float32 (what the float32 multiply of llama.cpp's converter and of DeepSeek's fp8_cast_bf16
gives), then to bfloat16 by torch, then ggml's quantizer called directly; the runtime against transformers on the
result (test_runtime's bars); a SIGKILL of a real run during the stage.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import signal
import time

import runtime  # before torch: OpenMP's wait policy (runtime/__init__)

import ggml  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gguf import GGUFReader  # noqa: E402
from gguf.constants import GGMLQuantizationType  # noqa: E402
from safetensors import safe_open  # noqa: E402

from helpers import FP8, GGUF_ONE, final_files, pipeline, spawn, status  # noqa: E402

MIX = "Q4_K_M"


def quantize_manifest(path, mix=MIX, extra=""):
    path.write_text(f"name: q\nsources:\n  fp8: {{local: {FP8}}}\n  gguf: {{quantize: {mix}}}\n{extra}")
    return path


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quantize")
    out = tmp / "out"
    pipeline("run", "--manifest", quantize_manifest(tmp / "m.yaml"), "--out", out)
    return out


@functools.cache
def checkpoint() -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(FP8.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors.update({n: f.get_tensor(n) for n in f.keys()})
    return tensors


def checkpoint_tensor(name: str) -> torch.Tensor:
    return checkpoint()[name]


def reference_bf16(name: str) -> tuple[np.ndarray, int]:
    """The expert as llama-quantize sees it: float32 holding BF16 values. Also how many values rounding the float64
    product straight to bfloat16 would have given differently (double rounding), for the record."""
    w, s = checkpoint_tensor(name), checkpoint_tensor(name + "_scale_inv")
    rows, cols = w.shape
    tiles = s.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    exact = w.double() * tiles
    bf = exact.float().to(torch.bfloat16)
    return bf.float().numpy(), int((exact.to(torch.bfloat16) != bf).sum())


def ggml_quantize(x: np.ndarray, type_id: int) -> bytes:
    rows, cols = x.shape
    out = np.empty(rows * ggml.ggml_row_size(type_id, cols), np.uint8)
    x = np.ascontiguousarray(x, np.float32)
    n = ggml.ggml_quantize_chunk(type_id, x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                 out.ctypes.data_as(ctypes.c_void_p), 0, rows, cols, None)
    assert n == out.nbytes
    return out.tobytes()


def merged_bytes(folder, name: str) -> bytes:
    e = json.loads((folder / "manifest.json").read_text())["tensors"][name]
    with open(folder / e["shard"], "rb") as f:
        f.seek(e["offsets"][0])
        return f.read(e["offsets"][1] - e["offsets"][0])


EXPERT_TENSORS = [f"blk.{i}.ffn_{p}_exps.weight" for i in (1, 2, 3) for p in ("gate", "up", "down")]


def test_types_are_the_fixture_ggufs(quantized):
    """llama-quantize made the fixture's GGUF with Q4_K_M: our per-tensor choices must be its choices."""
    gguf = {t.name: GGMLQuantizationType(int(t.tensor_type)).name
            for t in GGUFReader(next(GGUF_ONE.glob("*.gguf"))).tensors}
    m = json.loads((quantized / "manifest.json").read_text())
    ours = {n: m["tensors"][n]["ggml_type"] for n in EXPERT_TENSORS}
    assert ours == {n: gguf[n] for n in EXPERT_TENSORS}
    assert {ours["blk.1.ffn_down_exps.weight"], ours["blk.2.ffn_down_exps.weight"]} == {"Q4_K", "Q6_K"}
    for n in EXPERT_TENSORS:                                          # the .ggml_type sibling says the same
        ggml_type = n.removesuffix(".weight") + ".ggml_type"
        assert m["tensors"][ggml_type]["source"]["value"] == int(GGMLQuantizationType[ours[n]])
    assert m["verified"] is True
    assert m["quantized"]["mix"] == MIX and m["quantized"]["ggml"] == ggml.ggml_version().decode()
    assert m["quantized"]["ggml_python"] == ggml.__version__ and m["quantized"]["imatrix"] is None
    src = m["tensors"]["blk.2.ffn_up_exps.weight"]["source"]
    assert src["side"] == "quantized" and src["mix"] == MIX
    assert src["name"] == [f"model.layers.2.mlp.experts.{e}.up_proj.weight" for e in range(16)]


def test_every_expert_is_ggmls_quantizer_on_the_bf16_rounded_checkpoint(quantized):
    m = json.loads((quantized / "manifest.json").read_text())
    double_rounded = 0
    for name in EXPERT_TENSORS:
        e = m["tensors"][name]
        experts, rows, cols = e["logical_shape"]
        got = merged_bytes(quantized, name)
        per = len(got) // experts
        layer, proj = name.split(".")[1], name.split(".")[2].split("_")[1]
        for x in range(experts):
            w, n = reference_bf16(f"model.layers.{layer}.mlp.experts.{x}.{proj}_proj.weight")
            double_rounded += n
            assert got[x * per:(x + 1) * per] == ggml_quantize(w, e["ggml_type_id"]), f"{name} expert {x}"
    print(f"\nfloat64 products rounded straight to bf16 would differ in {double_rounded} values")


@pytest.mark.parametrize("mix, down", [("Q3_K_M", "Q4_K"), ("Q4_K_S", "Q4_K"), ("Q5_K_M", "Q6_K"), ("Q6_K", "Q6_K"),
                                       ("Q8_0", "Q8_0")])
def test_other_mixes_types_and_bytes(mix, down):
    """The other mixes through reconcile's plan (types for 4 layers: n/8 = n/16 = 0, so layer 2 is a use_more_bits
    layer and no layer is below n/8) and the stage's own per-expert function against the independent reference."""
    from stages import quantize
    from stages.reconcile import build_plan
    plan = build_plan(FP8, None, [], False, mix)
    types = {n: plan["tensors"][n]["ggml_type"] for n in EXPERT_TENSORS}
    default = {"Q3_K_M": "Q3_K", "Q4_K_S": "Q4_K", "Q5_K_M": "Q5_K"}.get(mix, mix)
    assert types["blk.1.ffn_gate_exps.weight"] == types["blk.3.ffn_up_exps.weight"] == default
    assert types["blk.2.ffn_down_exps.weight"] == down
    t = plan["tensors"]["blk.2.ffn_down_exps.weight"]
    _, rows, cols = t["logical_shape"]
    got = quantize.quantize_expert(t["experts"][5], str(FP8), t["ggml_type_id"], rows, cols).tobytes()
    w, _ = reference_bf16("model.layers.2.mlp.experts.5.down_proj.weight")
    assert got == ggml_quantize(w, t["ggml_type_id"])


def test_runtime_on_quantized_experts_within_the_bars(quantized):
    from test_runtime import KL_BOUND, PROSE, TOP1_BOUND, effective_weights, hf_model, kl_top1
    from runtime.api import encode
    model = runtime.load(quantized, max_len=512, device="cpu")
    ids = encode(model, PROSE.read_text())[:256]
    ours = runtime.logits(model, ids)
    ref = hf_model(model.folder.config, effective_weights(quantized))
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits[0].float()
    kl, top1 = kl_top1(ref_logits, ours)
    print(f"\nquantized experts, runtime vs transformers float32: mean KL {kl.mean():.3e}, top-1 {top1:.4f}")
    assert torch.isfinite(ours).all()
    assert kl.mean() <= KL_BOUND and top1 >= TOP1_BOUND


def test_sigkill_during_quantize_resumes_to_identical_bytes(tmp_path, quantized):
    """The fixture quantizes in well under a second, so once the stage has begun (its partial files exist) the test
    lets the real child run only 5 ms in every 50 (SIGSTOP / SIGCONT) until it has logged finished experts, then
    SIGKILLs it."""
    m, out = quantize_manifest(tmp_path / "m.yaml", extra="stages: {quantize: {workers: 1}}\n"), tmp_path / "out"
    work = out / ".pipeline" / "quantize"
    child = spawn("run", "--manifest", m, "--out", out)
    try:
        end = time.monotonic() + 120
        while not list(work.glob("*.partial")) and child.poll() is None and time.monotonic() < end:
            time.sleep(0.005)
        logged = 0
        while child.poll() is None and time.monotonic() < end:
            os.kill(child.pid, signal.SIGCONT)
            time.sleep(0.005)
            os.kill(child.pid, signal.SIGSTOP)
            logged = sum(len(p.read_text().splitlines()) - 1 for p in work.glob("*.log"))
            if logged >= 2:
                break
            time.sleep(0.045)
        assert child.poll() is None, f"the run finished before it could be killed:\n{child.communicate()[1]}"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    finished = list((out / ".pipeline" / "quantized").glob("*.ggml"))
    assert logged >= 2 and len(finished) < len(EXPERT_TENSORS)
    assert not list(out.glob("model-*.safetensors")) and not (out / "manifest.json").exists()
    assert status(m, out)["quantize"]["state"] == "interrupted"

    p = pipeline("run", "--manifest", m, "--out", out, "--json")
    assert "experts already done by an earlier run" in p.stderr
    assert not list(work.iterdir())
    assert final_files(out) == final_files(quantized)
    made = lambda folder: {f.name: f.read_bytes() for f in (folder / ".pipeline" / "quantized").iterdir()}
    assert made(out) == made(quantized)


def test_bad_quantize_values_are_one_clear_line(tmp_path):
    p = pipeline("run", "--manifest", quantize_manifest(tmp_path / "m.yaml", "Q4_K_X"), "--out", tmp_path / "o",
                 check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "sources.gguf.quantize" in lines[0] and "'Q4_K_X'" in lines[0], p.stderr
    assert all(mix in p.stderr for mix in ("Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"))
    assert not (tmp_path / "o").exists()

    from stages.errors import PipelineError
    from stages.manifest import load_manifest
    cases = {
        f"  fp8: {{local: {FP8}, quantize: Q4_K_M}}\n  gguf: {{quantize: Q4_K_M}}\n": "is only for sources.gguf",
        f"  fp8: {{local: {FP8}}}\n  gguf: {{quantize: Q4_K_M, local: {GGUF_ONE}}}\n": "either 'quantize' alone",
        f"  fp8: {{local: {FP8}}}\n  gguf: {{quantize: 4}}\n": "must be a string, not int",
        f"  fp8: {{local: {FP8}}}\n  gguf: {{quantize: IQ2_XXS}}\n": "not a mix made without an importance matrix",
        f"  fp8: {{local: {FP8}}}\n  gguf: {{}}\n": "or, for gguf, 'quantize: Q4_K_M'",
    }
    for sources, message in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(f"name: q\nsources:\n{sources}")
        with pytest.raises(PipelineError) as e:
            load_manifest(path)
        assert message in str(e.value) and "\n" not in str(e.value) and str(path) in str(e.value)


def test_bf16_checkpoint_experts(tmp_path):
    """A checkpoint whose experts are BF16 (no scales): widened to float32 exactly, then ggml's quantizer."""
    from stages import quantize
    w, _ = reference_bf16("model.layers.1.mlp.experts.3.up_proj.weight")     # float32 holding BF16 values
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)
    (tmp_path / "experts.bin").write_bytes(b"hdr" + bits.tobytes())
    expert = {"dtype": "BF16", "weight": ["experts.bin", 3, bits.nbytes], "scale": None}
    q4_k = int(GGMLQuantizationType.Q4_K)
    assert quantize.quantize_expert(expert, str(tmp_path), q4_k, *w.shape).tobytes() == ggml_quantize(w, q4_k)


def test_row_length_fallbacks():
    """llama.cpp's fallback when a row is not a whole number of a k-quant's 256-value blocks."""
    from stages.mixes import expert_type
    assert expert_type("Q4_K_M", "gate", 5, 61, 7168) == "Q4_K"
    assert expert_type("Q4_K_M", "gate", 5, 61, 7168 + 32) == "Q5_0"
    assert expert_type("Q4_K_M", "down", 3, 61, 2048 + 32) == "Q8_0"          # Q6_K's fallback
    assert expert_type("Q5_K_M", "up", 30, 61, 2048 + 32) == "Q5_1"
    for mix, row in (("Q3_K_M", 2048 + 32), ("Q4_K_M", 2048 + 16)):
        with pytest.raises(ValueError, match="pick another mix"):
            expert_type(mix, "gate", 30, 61, row)


def test_config_checked_alone_without_a_gguf(tmp_path):
    """No GGUF to compare the config with: reconcile still refuses a config that cannot describe the model."""
    import shutil
    from stages.errors import PipelineError
    from stages.reconcile import build_plan
    for key, value, message in (("num_experts_per_tok", "4", 'num_experts_per_tok is "4", must be a positive whole number'),
                                ("num_experts_per_tok", 32, "num_experts_per_tok 32 > n_routed_experts 16"),
                                ("model_type", "llama", "model_type 'llama', expected 'deepseek_v3'"),
                                ("moe_intermediate_size", 512, "experts.0.gate_proj.weight has shape [256, 256], "
                                                               "config says [512, 256]")):
        fp8 = tmp_path / f"{key}-{value}"
        shutil.copytree(FP8, fp8)
        cfg = json.loads((fp8 / "config.json").read_text())
        cfg[key] = value
        (fp8 / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(PipelineError, match=re.escape(message)) as e:
            build_plan(fp8, None, [], False, MIX)
        assert str(fp8) in str(e.value)


def test_verify_keys_a_quantized_expert_by_the_file_it_read(tmp_path, quantized):
    """verify reuses a task's result only if every file it read is unchanged. The quantize stage's files are known
    by the content hash it recorded while they are the files it recorded: quantizing again to the same bytes (new
    mtime, record updated) keeps the key; bytes changed behind the record's back change it."""
    import shutil
    from stages import quantize, verify
    out = tmp_path / "copy"
    shutil.copytree(quantized, out)                   # copy2: mtimes kept, so quantized.json's records still match
    sources = json.loads((out / ".pipeline" / "sources.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    name = "blk.2.ffn_down_exps.weight"

    def key():
        tasks, _ = verify.build_tasks(out, manifest, sources)
        [t] = [t for t in tasks if t["kind"] == "integrity" and t["name"] == name]
        assert t["segments"][0][0] == str(out / quantize.DONE_DIR / f"{name}.ggml")
        return t["id"]

    before = key()
    made, rec_path = out / quantize.DONE_DIR / f"{name}.ggml", out / quantize.RESULT
    data = made.read_bytes()
    made.unlink()
    made.write_bytes(data)                            # the same bytes, written again: a new mtime
    rec = json.loads(rec_path.read_text())
    rec["files"][made.name]["mtime_ns"] = made.stat().st_mtime_ns
    rec_path.write_text(json.dumps(rec))
    assert key() == before

    st = made.stat()
    made.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    os.utime(made, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert key() != before


def test_a_copied_folder_is_not_quantized_again(tmp_path, quantized):
    """cp -r gives every file a new mtime: `run` on the copy reads the quantize stage's files back against the
    content hashes it recorded and keeps them (hours of quantizing on the real model, minutes of reading); a file
    whose bytes changed behind the record's back is quantized again, and only that one."""
    import shutil
    from stages import quantize
    m = tmp_path / "m.yaml"
    quantize_manifest(m)
    copy = tmp_path / "copy"
    shutil.copytree(quantized, copy, copy_function=shutil.copy)      # contents only: new mtimes, as cp -r
    made = sorted((copy / quantize.DONE_DIR).glob("*.ggml"))
    assert made and all(p.stat().st_mtime_ns != (quantized / quantize.DONE_DIR / p.name).stat().st_mtime_ns
                        for p in made)
    pipeline("run", "--manifest", m, "--out", copy)
    produced = status(m, copy)["quantize"]["produced"]
    assert f"(0 quantized, {len(made)} kept)" in produced, produced
    assert final_files(copy) == final_files(quantized)

    tampered = made[0]
    data = bytearray(tampered.read_bytes())
    data[100] ^= 1
    tampered.write_bytes(bytes(data))
    pipeline("run", "--manifest", m, "--out", copy)
    produced = status(m, copy)["quantize"]["produced"]
    assert f"(1 quantized, {len(made) - 1} kept)" in produced, produced
    assert tampered.read_bytes() == (quantized / quantize.DONE_DIR / tampered.name).read_bytes()
    assert final_files(copy) == final_files(quantized)
