"""Resumability: skip what is done, redo what is stale, survive SIGKILL, lock the output, fail cleanly on full disk."""
import json
import os
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from helpers import FIXTURE, final_files, pipeline, spawn, status, write_manifest


def shard_being_written(out: Path) -> bool:
    """A merged shard's partial with bytes in it. Stage records pass through .pipeline/tmp too, so a bare
    *.partial there can be fetch's or reconcile's JSON, written before the write stage has begun."""
    for p in (out / ".pipeline" / "tmp").glob("model-*.partial"):
        try:
            if p.stat().st_size > 0:
                return True
        except FileNotFoundError:                  # renamed to its final name between the glob and the stat
            pass
    return False


def wait_for(cond, timeout=60.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


STAGES = ["fetch", "reconcile", "write", "verify"]


def actions(p) -> dict:
    return {e["stage"]: e["action"] for e in json.loads(p.stdout)["stages"]}


@pytest.fixture
def sources(tmp_path):
    """A private copy of the fixture, so tests may change it."""
    dst = tmp_path / "src"
    shutil.copytree(FIXTURE, dst)
    return dst


def test_second_run_skips_everything(tmp_path):
    m, out = write_manifest(tmp_path / "m.yaml"), tmp_path / "out"
    assert actions(pipeline("run", "--manifest", m, "--out", out, "--json")) == dict.fromkeys(STAGES, "ran")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert actions(pipeline("run", "--manifest", m, "--out", out, "--json")) == dict.fromkeys(STAGES, "skipped")
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert {s["state"] for s in status(m, out).values()} == {"done"}


def test_changed_input_makes_downstream_stale(tmp_path, sources):
    m = write_manifest(tmp_path / "m.yaml", fp8=sources / "hf-fp8", gguf=sources / "gguf" / "Q4_K_M")
    out = tmp_path / "out"
    pipeline("run", "--manifest", m, "--out", out)

    os.utime(sources / "hf-fp8" / "config.json")               # touched, same content
    st = status(m, out)
    assert st["fetch"]["state"] == "stale" and "sources.fp8 changed" in st["fetch"]["why"]
    assert actions(pipeline("run", "--manifest", m, "--out", out, "--json")) == {
        "fetch": "ran", "reconcile": "skipped", "write": "skipped", "verify": "skipped"}

    gen = sources / "hf-fp8" / "generation_config.json"
    gen.write_text(gen.read_text().replace("0.6", "0.7"))      # new content: everything downstream reruns
    p = pipeline("run", "--manifest", m, "--out", out, "--json")
    assert actions(p) == dict.fromkeys(STAGES, "ran")     # verify too: write rewrote manifest.json, unverified
    assert "0 written, 5 kept" in json.loads(p.stdout)["stages"][2]["summary"]     # no shard depends on it
    assert (out / "generation_config.json").read_text() == gen.read_text()

    shard = sorted(out.glob("model-0000*.safetensors"))[2]
    shard.unlink()
    st = status(m, out)
    assert st["write"]["state"] == "stale" and f"{shard.name} is missing" in st["write"]["why"]
    p = pipeline("run", "--manifest", m, "--out", out, "--json")
    assert "1 written, 4 kept" in json.loads(p.stdout)["stages"][2]["summary"]

    p = pipeline("run", "--manifest", m, "--out", out, "--json", "--keep-mtp")
    assert actions(p) == {"fetch": "skipped", "reconcile": "ran", "write": "ran", "verify": "ran"}


def test_sigkill_mid_write_then_resume_is_byte_identical(tmp_path):
    m = write_manifest(tmp_path / "m.yaml")
    reference = tmp_path / "reference"
    pipeline("run", "--manifest", m, "--out", reference)

    out = tmp_path / "out"
    child = spawn("run", "--manifest", m, "--out", out, "--bwlimit", "3")    # ~12 MB at 3 MB/s: ~4 s of writing
    records = out / ".pipeline" / "write"
    wait_for(lambda: records.is_dir() and len(list(records.glob("*.json"))) >= 2, what="two finished shards")
    tmp = out / ".pipeline" / "tmp"
    wait_for(lambda: shard_being_written(out), what="a shard being written")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()

    finished = {p.name.removesuffix(".json") for p in records.glob("*.json")}
    on_disk = {p.name for p in out.glob("model-*.safetensors")}
    assert on_disk == finished and 2 <= len(finished) < 5, "only complete shards may carry a final name"
    assert not (out / "manifest.json").exists()
    assert status(m, out)["write"]["state"] == "interrupted"
    kept = {n: (out / n).stat().st_mtime_ns for n in finished}

    p = pipeline("run", "--manifest", m, "--out", out, "--json")
    assert f"{5 - len(finished)} written, {len(finished)} kept" in json.loads(p.stdout)["stages"][2]["summary"]
    assert kept == {n: (out / n).stat().st_mtime_ns for n in finished}
    assert final_files(out) == final_files(reference)
    assert not list(tmp.iterdir())


def test_lock_blocks_a_second_run_but_not_after_the_holder_dies(tmp_path):
    m, out = write_manifest(tmp_path / "m.yaml"), tmp_path / "out"
    child = spawn("run", "--manifest", m, "--out", out, "--bwlimit", "1")
    wait_for(lambda: shard_being_written(out), what="the first run to write")
    second = pipeline("run", "--manifest", m, "--out", out, check=False)
    assert second.returncode == 2
    assert "another run is using this output folder" in second.stderr and f"pid {child.pid}" in second.stderr
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    pipeline("run", "--manifest", m, "--out", out)          # the dead holder's lock does not block
    assert len(list(out.glob("model-*.safetensors"))) == 5


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of limited size: a full disk for real (needs root, as CI has)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()

    def mount(size_kb: int) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        return mnt
    yield mount
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_not_enough_space_is_refused_before_writing(tmp_path, small_disk):
    disk = small_disk(4096)
    m, out = write_manifest(tmp_path / "m.yaml"), disk / "out"
    p = pipeline("run", "--manifest", m, "--out", out, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "not enough disk space" in p.stderr and str(out) in p.stderr
    assert not list(out.glob("model-*")) and not (out / "manifest.json").exists()


def test_disk_filling_up_mid_write_fails_cleanly_and_resumes(tmp_path, small_disk):
    disk = small_disk(32 * 1024)
    m, out = write_manifest(tmp_path / "m.yaml"), disk / "out"
    child = spawn("run", "--manifest", m, "--out", out, "--bwlimit", "2")
    wait_for(lambda: shard_being_written(out), what="the write stage to start")
    filler = disk / "filler"
    with open(filler, "wb") as f:                        # another program takes all the space left
        try:
            while True:
                f.write(b"\xff" * (1 << 16))
                f.flush()
        except OSError:
            pass
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 2 and "Traceback" not in stderr
    assert "no space left" in stderr
    records = {p.name.removesuffix(".json") for p in (out / ".pipeline" / "write").glob("*.json")}
    assert {p.name for p in out.glob("model-*.safetensors")} == records
    assert not list((out / ".pipeline" / "tmp").glob("*.partial"))
    assert status(m, out)["write"]["state"] == "failed"

    filler.unlink()
    pipeline("run", "--manifest", m, "--out", out)
    reference = tmp_path / "reference"
    pipeline("run", "--manifest", m, "--out", reference)
    assert final_files(out) == final_files(reference)


def test_changed_source_bytes_rewrite_the_shards_that_hold_them(tmp_path, sources):
    """The same files, sizes and names, one tensor's bytes changed in the checkpoint: write must not keep a shard
    made from the old bytes (its record's spec holds the source files' content hashes)."""
    from safetensors import safe_open
    m = write_manifest(tmp_path / "m.yaml", fp8=sources / "hf-fp8", gguf=sources / "gguf" / "Q4_K_M")
    out = tmp_path / "out"
    pipeline("run", "--manifest", m, "--out", out)
    name, merged_name = "model.layers.1.input_layernorm.weight", "blk.1.attn_norm.weight"
    index = json.loads((sources / "hf-fp8" / "model.safetensors.index.json").read_text())
    src = sources / "hf-fp8" / index["weight_map"][name]
    with open(src, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        b, e = json.loads(f.read(n))[name]["data_offsets"]
    data = bytearray(src.read_bytes())
    for i in range(8 + n + b, 8 + n + e, 2):       # the lowest mantissa bit of every bf16 value: still the right
        data[i] ^= 1                               # weight for verify, but other bytes
    src.write_bytes(bytes(data))
    p = pipeline("run", "--manifest", m, "--out", out, "--json")
    assert actions(p)["write"] == "ran" and "0 written" not in json.loads(p.stdout)["stages"][2]["summary"]
    entry = json.loads((out / "manifest.json").read_text())["tensors"][merged_name]
    with safe_open(out / entry["shard"], "pt") as f, safe_open(src, "pt") as g:
        import torch
        assert torch.equal(f.get_tensor(merged_name).view(torch.int16), g.get_tensor(name).view(torch.int16))
    assert json.loads((out / "manifest.json").read_text())["verified"] is True


def test_disk_full_during_verify_is_one_line_and_recorded_as_failed(tmp_path, small_disk):
    disk = small_disk(48 * 1024)
    m, out = write_manifest(tmp_path / "m.yaml"), disk / "out"
    pipeline("run", "--manifest", m, "--out", out)
    filler = disk / "filler"
    with open(filler, "wb") as f:                  # take all the space, then give back a little: the running
        try:                                       # record fits, manifest.json and verify's log do not
            while True:
                f.write(b"\xff" * (1 << 16))
                f.flush()
        except OSError:
            pass
    os.truncate(filler, filler.stat().st_size - 8192)
    p = pipeline("verify", "--manifest", m, "--out", out, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "no space left" in p.stderr
    assert status(m, out)["verify"]["state"] == "failed"
    filler.unlink()
    assert pipeline("verify", "--manifest", m, "--out", out).returncode == 0


def test_read_only_folder(tmp_path, small_disk):
    disk = small_disk(48 * 1024)
    m, out = write_manifest(tmp_path / "m.yaml"), disk / "out"
    pipeline("run", "--manifest", m, "--out", out)
    r = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount read-only: {r.stderr.decode().strip()}")
    for cmd in ("verify", "run"):
        p = pipeline(cmd, "--manifest", m, "--out", out, check=False)
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert len(errors) == 1 and "read-only" in errors[0] and "verify --folder" in errors[0], errors
    p = pipeline("verify", "--folder", out)       # reads only: works on a read-only folder
    assert "PASS" in p.stderr
