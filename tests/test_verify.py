"""The verify stage through the real CLI: the fixture passes; broken twins fail on exactly the right tensor (and
expert) with a rel. error near 1.4; bit rot is caught by the integrity check; an old-layout GGUF passes; a dask
cluster really does the work; a killed verify resumes; --junit / --json report what verify.json says.

Broken sources are built under tmp_path from copies of examples/tiny-deepseek-v3/ (the fixture is only read), and
`python pipeline.py ...` runs in a child process. Failing lines the CLI printed are echoed (see them with -rP / -s).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import quants
from gguf.constants import GGMLQuantizationType
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import KV, GTensor, rewrite_gguf
from helpers import FP8, GGUF_ONE, GGUF_SPLIT, ROOT, pipeline, write_manifest

GGUF_NAME = "tiny-Q4_K_M.gguf"
ENV = {"HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
LOG = Path(".pipeline") / "verify" / "results.jsonl"
FAIL_LINE = re.compile(r"^FAIL (?P<tensor>\S+): (?:expert (?P<expert>\d+): )?(?P<text>.*)$")
REL = re.compile(r"rel\. error (?P<rel>[0-9.]+|inf|nan) > (?P<thr>[0-9.]+)")
MISMAPPED = 1.0      # two unrelated weights of equal scale differ by ~1.41 (sqrt 2); a right twin by its quant error
WELL_BELOW = 0.7     # the fixture's right twins sit at ~0.5 of their thresholds


# -- helpers ----------------------------------------------------------------------------------------------------------

def cli(*args) -> subprocess.CompletedProcess:
    return pipeline(*args, env=ENV, check=False)


@dataclasses.dataclass
class Merged:
    """A merged output folder and the manifest that made it."""
    manifest: Path
    out: Path
    proc: subprocess.CompletedProcess | None = None     # the `run` that made it

    def read(self, name: str) -> dict:
        return json.loads((self.out / name).read_text())

    @property
    def report(self) -> dict:
        return self.read("verify.json")

    def verify(self, *args) -> subprocess.CompletedProcess:
        return cli("verify", "--manifest", self.manifest, "--out", self.out, *args)

    def copy(self, dst: Path) -> Merged:
        """A private copy to break or re-verify (copy2 keeps mtimes, so its stages stay done)."""
        shutil.copytree(self.out, dst, symlinks=True)
        return Merged(self.manifest, dst)


def merge(tmp: Path, fp8: Path = FP8, gguf: Path = GGUF_ONE) -> Merged:
    m = Merged(write_manifest(tmp / "m.yaml", fp8=fp8, gguf=gguf), tmp / "out")
    m.proc = cli("run", "--manifest", m.manifest, "--out", m.out)
    return m


def fail_lines(res: subprocess.CompletedProcess) -> list[str]:
    lines = [ln for ln in res.stderr.splitlines() if FAIL_LINE.match(ln)]
    print("\n".join(lines))                   # shown with -rP: judge the wording
    return lines


def log_ids(out: Path) -> list[str]:
    """Task ids of the parseable lines of verify's per-task log, in order."""
    ids = []
    for line in (out / LOG).read_text().splitlines():
        try:
            ids.append(json.loads(line)["id"])
        except json.JSONDecodeError:
            pass
    return ids


def complete_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def without_timings(report: dict) -> dict:
    r = json.loads(json.dumps(report))
    r["summary"].pop("seconds", None)
    for t in r["tensors"].values():
        t.pop("seconds", None)
    return r


def parity_names(manifest: dict) -> set[str]:
    """Merged tensors that have a twin in the other source (all but FP8 scales and the experts' .ggml_type)."""
    return {n for n in manifest["tensors"] if not n.endswith(("_scale_inv", ".ggml_type"))}


def assert_passed(res: subprocess.CompletedProcess, m: Merged) -> dict:
    text = res.stdout + res.stderr
    assert res.returncode == 0, text
    assert "Traceback" not in text and not fail_lines(res), text
    report, manifest = m.report, m.read("manifest.json")
    assert report["verdict"] == "pass" and report["failed"] == [], report["failed"]
    assert manifest["verified"] is True
    assert set(report["tensors"]) == set(manifest["tensors"])
    for name, t in report["tensors"].items():
        assert t["status"] == "pass" and t["problems"] == [], (name, t)
        assert t["xxh3_128"] == manifest["tensors"][name]["xxh3_128"], name       # integrity ran on every tensor
    checked = {n for n, t in report["tensors"].items() if "rel_error" in t}
    assert checked == parity_names(manifest)
    assert report["summary"]["parity_checked"] == len(checked)
    for name in checked:
        t = report["tensors"][name]
        assert t["rel_error"] < WELL_BELOW * t["threshold"], (name, t["rel_error"], t["threshold"])
        assert t["cosine"] > 0.99, (name, t["cosine"])
        if name.endswith("_exps.weight"):
            n_experts = manifest["tensors"][name]["logical_shape"][0]
            assert len(t["experts"]["rel_error"]) == n_experts
            assert max(t["experts"]["rel_error"]) < WELL_BELOW * t["threshold"], (name, t["experts"]["rel_error"])
    return report


def assert_fails_only(res: subprocess.CompletedProcess, m: Merged, tensor: str, experts=None) -> list[str]:
    """Exit 1; FAIL lines only for `tensor` (and exactly `experts`), each with a rel. error > MISMAPPED; every other
    tensor passes; the bytes were copied right (no integrity problem): it is the mapping that is wrong."""
    text = res.stdout + res.stderr
    assert "Traceback" not in text, text
    assert res.returncode == 1, text
    lines = fail_lines(res)
    got = {}
    for line in lines:
        g = FAIL_LINE.match(line)
        assert g["tensor"] == tensor, line
        rel = REL.search(g["text"])
        assert rel and float(rel["rel"]) > MISMAPPED, line
        got[None if g["expert"] is None else int(g["expert"])] = float(rel["rel"])
    assert set(got) == ({None} if experts is None else set(experts)), lines
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "verify: 1 of" in errors[0] and "verified: false" in errors[0], errors

    report = m.report
    assert report["verdict"] == "fail" and report["failed"] == [tensor]
    assert [n for n, t in report["tensors"].items() if t["status"] != "pass"] == [tensor]
    t = report["tensors"][tensor]
    assert t["rel_error"] > MISMAPPED and not any(p.startswith("integrity") for p in t["problems"]), t
    if experts is not None:
        assert t["worst_expert"] in experts
        for e, rel in enumerate(t["experts"]["rel_error"]):
            if e in experts:
                assert rel > MISMAPPED, (e, rel)
            else:
                assert rel < WELL_BELOW * t["threshold"], (e, rel)
    assert m.read("manifest.json")["verified"] is False
    return lines


def broken_gguf(tmp: Path, edit_tensors) -> Path:
    """A copy of the fixture's one-file GGUF with its tensors edited, in its own folder (a GGUF source)."""
    folder = tmp / "gguf"
    rewrite_gguf(GGUF_ONE / GGUF_NAME, folder / GGUF_NAME, edit_tensors=edit_tensors)
    return folder


def by_name(tensors: list[GTensor]) -> dict[str, GTensor]:
    return {t.name: t for t in tensors}


# -- fixtures ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def merged_fixture(tmp_path_factory):
    """The unmodified fixture merged once per module, per GGUF form (built on first use)."""
    cache: dict[str, Merged] = {}

    def get(form: str = "single") -> Merged:
        if form not in cache:
            cache[form] = merge(tmp_path_factory.mktemp(form), gguf=GGUF_ONE if form == "single" else GGUF_SPLIT)
        return cache[form]
    return get


@pytest.fixture(scope="module")
def clean(merged_fixture) -> Merged:
    m = merged_fixture("single")
    assert m.proc.returncode == 0, m.proc.stderr
    return m


@pytest.fixture(scope="module")
def swapped_experts(tmp_path_factory) -> Merged:
    """Experts 3 and 7 of blk.2.ffn_up_exps.weight swapped in the GGUF."""
    tmp = tmp_path_factory.mktemp("swapped")

    def swap(t: GTensor) -> GTensor:
        data = np.array(t.data)                               # (expert, rows, bytes per row)
        assert not np.array_equal(data[3], data[7])
        data[[3, 7]] = data[[7, 3]]
        return dataclasses.replace(t, data=data)
    return merge(tmp, gguf=broken_gguf(tmp, {"blk.2.ffn_up_exps.weight": swap}))


# -- 1. the fixture passes --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["single", "split"])
def test_fixture_passes(merged_fixture, form):
    m = merged_fixture(form)
    report = assert_passed(m.proc, m)
    n, k = report["summary"]["tensors"], report["summary"]["parity_checked"]
    assert (n, k) == (107, 66) and f"PASS: {n}/{n} tensors verified ({k} against the other source)" in m.proc.stderr
    if form == "split":                          # the same bytes, so the very same numbers
        single = without_timings(merged_fixture("single").report)["tensors"]
        assert without_timings(report)["tensors"] == single


# -- 2. broken twins: the failure is reported on the right tensor and expert ------------------------------------------

def test_swapped_experts_fail_on_those_experts(swapped_experts):
    assert_fails_only(swapped_experts.proc, swapped_experts, "blk.2.ffn_up_exps.weight", experts={3, 7})


def test_expert_from_another_layer_fails_on_that_expert(tmp_path):
    donor, target = "blk.2.ffn_down_exps.weight", "blk.3.ffn_down_exps.weight"   # blk.1's down experts are Q4_K

    def edit(tensors):
        t = by_name(tensors)
        assert t[donor].raw_dtype == t[target].raw_dtype == GGMLQuantizationType.Q6_K
        data = np.array(t[target].data)
        data[5] = t[donor].data[5]
        return [dataclasses.replace(x, data=data) if x.name == target else x for x in tensors]
    m = merge(tmp_path, gguf=broken_gguf(tmp_path, edit))
    assert_fails_only(m.proc, m, target, experts={5})


def test_transposed_fp8_tensor_fails(tmp_path):
    name = "model.layers.1.self_attn.q_a_proj.weight"
    fp8 = tmp_path / "hf-fp8"
    shutil.copytree(FP8, fp8)
    index = json.loads((fp8 / "model.safetensors.index.json").read_text())
    shard = fp8 / index["weight_map"][name]
    with safe_open(shard, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(shard)
    w, s = tensors[name], tensors[name + "_scale_inv"]
    assert w.dtype == torch.float8_e4m3fn and w.shape[0] == w.shape[1] == 256 and s.shape == (2, 2)
    tensors[name] = w.t().contiguous()                     # a consistent transposed tensor: weight and its scale
    tensors[name + "_scale_inv"] = s.t().contiguous()
    save_file(tensors, shard, metadata=metadata)
    with safe_open(shard, "pt") as f:                      # the index (same names, same file) stays valid
        assert set(f.keys()) == {n for n, file in index["weight_map"].items() if file == shard.name}
        assert torch.equal(f.get_tensor(name).view(torch.uint8), w.t().contiguous().view(torch.uint8))
    m = merge(tmp_path, fp8=fp8)
    assert_fails_only(m.proc, m, "blk.1.attn_q_a.weight")


def flip_byte(path: Path, at: int, keep_mtime: bool = False) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))
    if keep_mtime:                                            # bit rot: same size, same mtime
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_flipped_bytes_in_merged_shards_are_named(clean, tmp_path):
    m = clean.copy(tmp_path / "out")
    entries = m.read("manifest.json")["tensors"]
    flips = {}
    for name in ("blk.2.ffn_gate_exps.weight", "blk.1.attn_q_a.weight"):
        e = entries[name]
        begin, end = e["offsets"]
        at = (end - begin) // 2 + 37
        path = m.out / e["shard"]
        st = path.stat()
        with open(path, "r+b") as f:
            f.seek(begin + at)
            byte = f.read(1)[0]
            f.seek(begin + at)
            f.write(bytes([byte ^ 0x10]))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))   # bit rot: same size, same mtime
        flips[name] = (at, e["source"]["file"])
    res = m.verify("--force")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    lines = fail_lines(res)
    for name, (at, source) in flips.items():
        want = f"FAIL {name}: integrity: byte {at} differs from the source {source}"
        assert want in lines, (want, lines)
    assert {FAIL_LINE.match(ln)["tensor"] for ln in lines} == set(flips)
    report = m.report
    assert report["failed"] == sorted(flips)
    assert all(t["status"] == "pass" for n, t in report["tensors"].items() if n not in flips)
    assert m.read("manifest.json")["verified"] is False


def test_k_b_and_v_b_exchanged_stop_at_reconcile(tmp_path):
    # attn_k_b is (heads, kv_lora, nope) = (4, 512, 128) and attn_v_b (heads, v, kv_lora) = (4, 128, 512): with their
    # names exchanged both shapes disagree with the checkpoint, so reconcile refuses (exit 2) before anything is
    # written and verify never runs; the message must name both tensors.
    k, v = "blk.1.attn_k_b.weight", "blk.1.attn_v_b.weight"

    def exchange(tensors):
        return [dataclasses.replace(t, name={k: v, v: k}.get(t.name, t.name)) for t in tensors]
    m = merge(tmp_path, gguf=broken_gguf(tmp_path, exchange))
    res = m.proc
    assert res.returncode == 2 and "Traceback" not in res.stdout + res.stderr, res.stderr
    errors = "\n".join(ln for ln in res.stderr.splitlines() if ln.startswith("error:"))
    print(errors)
    assert k in errors and v in errors, errors
    assert "[4, 128, 512]" in errors and "[4, 512, 128]" in errors, errors
    assert not (m.out / "manifest.json").exists() and not (m.out / "verify.json").exists()
    states = {r["stage"]: r["state"] for r in json.loads(
        cli("status", "--manifest", m.manifest, "--out", m.out, "--json").stdout)["stages"]}
    assert states["reconcile"] == "failed" and states["verify"] == "pending", states


def old_layout_gguf(tmp: Path, k_first: bool = True) -> Path:
    """The fixture's GGUF as made before April 2025: one attn_kv_b per layer instead of attn_k_b + attn_v_b.

    kv_b is rebuilt from the GGUF's own k_b / v_b, per head [k_b[h].T ; v_b[h]] (k_first=False: the halves in the
    wrong order). It is stored as Q4_0, not Q8_0: the rebuilt weight carries k_b/v_b's Q5_0/Q4_K error (~0.063 against
    the checkpoint), which is above Q8_0's threshold (2 * hypot(0.0054, 0.0264) = 0.054), so as a Q8_0 tensor verify
    rightly says it is not Q8_0-accurate; Q4_0's own error (0.086) covers what it inherits.
    """
    qtype = GGMLQuantizationType.Q4_0

    def edit_tensors(tensors):
        t, out = by_name(tensors), []
        for x in tensors:
            if x.name.endswith(".attn_v_b.weight"):
                continue
            if x.name.endswith(".attn_k_b.weight"):
                blk = x.name.removesuffix("attn_k_b.weight")
                v_t = t[blk + "attn_v_b.weight"]
                k_b = quants.dequantize(x.data, x.raw_dtype)            # (heads, kv_lora, nope)
                v_b = quants.dequantize(v_t.data, v_t.raw_dtype)        # (heads, v, kv_lora)
                heads = [(k_b[h].T, v_b[h]) if k_first else (v_b[h], k_b[h].T) for h in range(k_b.shape[0])]
                kv_b = np.concatenate([part for pair in heads for part in pair]).astype(np.float32)
                assert kv_b.shape == (4 * (128 + 128), 512)
                x = GTensor(blk + "attn_kv_b.weight", quants.quantize(kv_b, qtype), qtype, kv_b.shape)
            out.append(x)
        return out

    def edit_kv(kv):
        kv = {k: v for k, v in kv.items() if k not in ("deepseek2.attention.key_length_mla",
                                                      "deepseek2.attention.value_length_mla")}
        heads = kv["deepseek2.attention.head_count"].value
        for key, value in (("head_count_kv", heads), ("key_length", 128 + 64), ("value_length", 128)):
            old = kv["deepseek2.attention." + key]
            kv["deepseek2.attention." + key] = KV(value, old.type)
        return kv
    folder = tmp / "gguf-old"
    rewrite_gguf(GGUF_ONE / GGUF_NAME, folder / GGUF_NAME, edit_kv=edit_kv, edit_tensors=edit_tensors)
    return folder


def test_old_layout_gguf_passes(tmp_path):
    m = merge(tmp_path, gguf=old_layout_gguf(tmp_path))
    report = assert_passed(m.proc, m)
    assert m.read("manifest.json")["gguf_layout"] == "attn_kv_b"
    for i in range(4):
        t = report["tensors"][f"blk.{i}.attn_kv_b.weight"]
        assert t["twin"] == f"GGUF blk.{i}.attn_kv_b.weight" and t["type"] == "Q4_0", t


def test_old_layout_gguf_with_kv_b_halves_mixed_up_fails(tmp_path):
    """The control for the test above: the same GGUF with each head's k and v rows in the wrong order must fail."""
    m = merge(tmp_path, gguf=old_layout_gguf(tmp_path, k_first=False))
    assert m.proc.returncode == 1, m.proc.stderr
    kv_b = [f"blk.{i}.attn_kv_b.weight" for i in range(4)]
    assert m.report["failed"] == kv_b
    lines = fail_lines(m.proc)
    assert {FAIL_LINE.match(ln)["tensor"] for ln in lines} == set(kv_b)
    assert all(float(REL.search(ln)["rel"]) > MISMAPPED for ln in lines), lines


# -- 3. distributed ---------------------------------------------------------------------------------------------------

def test_verify_on_a_given_dask_scheduler(clean, tmp_path):
    # The scheduler (this process) and its workers unpickle stages.verify.run_task by reference, so they must be able
    # to import `stages`: conftest puts the repo on sys.path, and spawned workers inherit it. (A real cluster needs
    # the project installed there; without it the CLI dies with a deserialization traceback.)
    from distributed import Client, LocalCluster
    m = clean.copy(tmp_path / "out")
    executed = lambda dask_worker: dask_worker.state.executed_count     # noqa: E731 (a lambda pickles by value)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        before = client.run(executed)
        res = m.verify("--force", "--scheduler", cluster.scheduler_address)
        after = client.run(executed)
    assert_passed(res, m)
    assert "dask cluster: 2 workers" in res.stderr, res.stderr
    ran = {w: after[w] - before.get(w, 0) for w in after}
    n_tasks = len(log_ids(m.out))
    assert n_tasks == len(log_ids(clean.out)) > 100
    assert sum(ran.values()) == n_tasks, ran                    # every task ran on this cluster's workers ...
    assert len(ran) == 2 and all(n > 0 for n in ran.values()), ran   # ... and on both of them


def test_verify_on_its_own_local_cluster(clean, tmp_path):
    m = clean.copy(tmp_path / "out")
    res = m.verify("--force", "--workers", "2")
    assert_passed(res, m)
    assert re.search(r"dask cluster: 2 workers, dashboard \S+", res.stderr), res.stderr
    assert without_timings(m.report) == without_timings(clean.report)


# -- 4. resume --------------------------------------------------------------------------------------------------------

def kill_verify_midway(m: Merged, tmp: Path, total: int, tries: int = 5) -> int:
    """Start `verify --force` and SIGKILL it once its log has some but not all lines; returns the lines it had.

    Results come big tasks first: on the fixture the first ~half of them take ~2 s, the small rest ~0.3 s, so an
    eighth is well inside the window (a try that overshoots is simply repeated)."""
    log, min_lines = m.out / LOG, max(2, total // 8)
    for attempt in range(tries):
        log.unlink(missing_ok=True)              # --force drops it too; this way only the child's own lines count
        with open(tmp / f"killed-{attempt}.txt", "w") as sink:
            p = subprocess.Popen([sys.executable, str(ROOT / "pipeline.py"), "verify", "--manifest", str(m.manifest),
                                  "--out", str(m.out), "--force"], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                 env={**os.environ, **ENV})
            try:
                deadline = time.monotonic() + 120
                while p.poll() is None and time.monotonic() < deadline:
                    if complete_lines(log) >= min_lines:
                        p.send_signal(signal.SIGKILL)
                        break
                    time.sleep(0.001)
            finally:
                if p.poll() is None:
                    p.kill()
                p.wait()
        n = complete_lines(log)
        if p.returncode == -signal.SIGKILL and min_lines <= n < total:
            print(f"verify killed with {n} of {total} task results logged (try {attempt + 1})")
            return n
    pytest.fail(f"could not kill verify midway in {tries} tries")


def test_killed_verify_resumes_with_the_unfinished_tasks(clean, tmp_path):
    m = clean.copy(tmp_path / "out")
    total = len(log_ids(clean.out))
    n = kill_verify_midway(m, tmp_path, total)
    done = set(log_ids(m.out))
    assert m.read("manifest.json")["verified"] is False
    res = m.verify()
    assert res.returncode == 0, res.stderr
    assert f"verify: {len(done)} of {total} tasks already done by an earlier run" in res.stderr, (n, res.stderr)
    ids = log_ids(m.out)
    assert len(ids) == total and set(ids) == set(log_ids(clean.out))   # the earlier ones were not run again
    assert set(ids[:len(done)]) == done
    assert_passed(res, m)
    assert without_timings(m.report) == without_timings(clean.report)


def test_resume_after_a_line_cut_by_the_kill(clean, tmp_path):
    """A kill in the middle of writing a log line: that task is redone and the log stays whole afterwards."""
    m = clean.copy(tmp_path / "out")
    total = len(log_ids(clean.out))
    n = kill_verify_midway(m, tmp_path, total)
    lines = (m.out / LOG).read_bytes().split(b"\n")[:n]
    (m.out / LOG).write_bytes(b"\n".join(lines[:-1]) + b"\n" + lines[-1][:len(lines[-1]) // 2])
    res = m.verify()
    assert res.returncode == 0, res.stderr
    assert f"verify: {n - 1} of {total} tasks already done by an earlier run" in res.stderr, res.stderr
    assert_passed(res, m)
    assert without_timings(m.report) == without_timings(clean.report)
    ids = log_ids(m.out)                        # a later kill must find every finished task in the log
    assert sorted(ids) == sorted(log_ids(clean.out)), f"{total - len(ids)} finished tasks lost from the log"


def test_rewritten_shard_is_verified_again(clean, tmp_path):
    """verify reads what is on disk now: a shard that write has rewritten is not taken as checked by an earlier run."""
    m = clean.copy(tmp_path / "out")
    entries = m.read("manifest.json")["tensors"]
    e = entries["blk.2.ffn_gate_exps.weight"]
    shard = e["shard"]
    in_shard = {n for n, e in entries.items() if e["shard"] == shard}
    flip_byte(m.out / shard, e["offsets"][0] + 99)   # changed (new mtime): write's hash check fails, it writes it again
    res = cli("run", "--manifest", m.manifest, "--out", m.out, "--json")
    assert res.returncode == 0, res.stderr
    actions = {e["stage"]: e["action"] for e in json.loads(res.stdout)["stages"]}
    assert actions["write"] == "ran" and actions["verify"] == "ran", actions
    assert "1 written, 4 kept" in res.stderr, res.stderr
    reused = re.search(r"verify: (\d+) of (\d+) tasks already done by an earlier run", res.stderr)
    shard_tasks = sum(1 for r in map(json.loads, (clean.out / LOG).read_text().splitlines()) if r["name"] in in_shard)
    total = len(log_ids(clean.out))
    assert reused is None or int(reused[1]) <= total - shard_tasks, reused[0]
    assert_passed(res, m)


# -- 5. --junit and --json ---------------------------------------------------------------------------------------------

def read_junit(path: Path) -> tuple[ET.Element, dict[str, ET.Element]]:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    cases = suites[0].findall("testcase")
    names = [c.get("name") for c in cases]
    assert len(names) == len(set(names))
    assert suites[0].get("tests") == str(len(cases))
    files = {c.get("name") for c in cases if c.get("classname") == "files"}
    assert files >= {"model-00001-of-00005.safetensors", "config.json", "tokenizer_config.json"}, files
    return suites[0], {n: c for n, c in zip(names, cases) if c.get("classname") != "files"}


def test_junit_and_json_when_all_pass(clean, tmp_path):
    m = clean.copy(tmp_path / "out")
    res = m.verify("--junit", tmp_path / "verify.xml", "--json")          # asked for: it reads everything again
    assert res.returncode == 0, res.stderr
    assert "verify: running (asked for)" in res.stderr and "already done" not in res.stderr
    summary = json.loads(res.stdout)
    assert set(summary) == {"verdict", "summary", "failed"}
    assert summary["verdict"] == "pass" and summary["failed"] == [] and summary["summary"]["failed"] == 0
    suite, cases = read_junit(tmp_path / "verify.xml")
    assert set(cases) == set(m.read("manifest.json")["tensors"])
    assert suite.get("failures") == "0" and not any(c.find("failure") is not None for c in cases.values())
    assert cases["blk.2.ffn_gate_exps.weight"].get("classname") == "blk.2"


def test_junit_and_json_when_some_fail(swapped_experts, tmp_path):
    m = swapped_experts.copy(tmp_path / "out")
    res = m.verify("--force", "--junit", tmp_path / "verify.xml", "--json")
    assert res.returncode == 1, res.stderr
    summary = json.loads(res.stdout)
    bad = "blk.2.ffn_up_exps.weight"
    assert summary["verdict"] == "fail" and summary["failed"] == [bad] and summary["summary"]["failed"] == 1
    suite, cases = read_junit(tmp_path / "verify.xml")
    assert set(cases) == set(m.read("manifest.json")["tensors"])
    failures = {n: c.find("failure") for n, c in cases.items() if c.find("failure") is not None}
    assert list(failures) == [bad] and suite.get("failures") == "1"
    assert failures[bad].get("message").startswith("expert 3: rel. error")
    assert "expert 7: rel. error" in failures[bad].text


# -- 6. verify always looks (issue 16) --------------------------------------------------------------------------------

def states(m: Merged) -> dict:
    rows = json.loads(cli("status", "--manifest", m.manifest, "--out", m.out, "--json").stdout)["stages"]
    return {r["stage"]: r["state"] for r in rows}


@pytest.mark.parametrize("keep_mtime", [True, False], ids=["mtime_kept", "mtime_changed"])
def test_verify_reads_a_changed_folder_and_run_repairs_only_that_shard(clean, tmp_path, keep_mtime):
    m = clean.copy(tmp_path / "out")
    name = "blk.2.ffn_up_exps.weight"
    e = m.read("manifest.json")["tensors"][name]
    flip_byte(m.out / e["shard"], e["offsets"][0] + 1000, keep_mtime)
    res = m.verify()                                       # no --force: an explicit verify always reads
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert fail_lines(res) == [f"FAIL {name}: integrity: byte 1000 differs from the source {GGUF_NAME}"]
    assert m.report["failed"] == [name] and m.read("manifest.json")["verified"] is False
    assert states(m)["verify"] == "failed"
    res = cli("run", "--manifest", m.manifest, "--out", m.out)
    assert "(1 written, 4 kept from an earlier run)" in res.stderr, res.stderr      # only the damaged shard
    assert_passed(res, m)
    assert (m.out / e["shard"]).read_bytes() == (clean.out / e["shard"]).read_bytes()


def test_copied_folder_verifies_clean_and_is_kept(clean, tmp_path):
    """cp -r: new mtimes everywhere. verify checks it (no 'stale' refusal); afterwards run has nothing to do."""
    m = Merged(clean.manifest, tmp_path / "copy")
    shutil.copytree(clean.out, m.out, copy_function=shutil.copy)
    assert (m.out / "model-00001-of-00005.safetensors").stat().st_mtime_ns != \
        (clean.out / "model-00001-of-00005.safetensors").stat().st_mtime_ns
    res = m.verify()
    assert_passed(res, m)
    assert set(states(m).values()) == {"done"}, states(m)
    res = cli("run", "--manifest", m.manifest, "--out", m.out, "--json")
    assert {e["stage"]: e["action"] for e in json.loads(res.stdout)["stages"]} == dict.fromkeys(
        ("fetch", "reconcile", "write", "verify"), "skipped"), res.stderr


def test_run_on_a_copied_folder_writes_nothing_again(clean, tmp_path):
    m = Merged(clean.manifest, tmp_path / "copy")
    shutil.copytree(clean.out, m.out, copy_function=shutil.copy)
    res = cli("run", "--manifest", m.manifest, "--out", m.out)
    assert "(0 written, 5 kept from an earlier run)" in res.stderr, res.stderr
    assert_passed(res, m)


def test_changed_source_is_not_taken_from_an_earlier_verify(tmp_path):
    """Reuse of per-task results must be keyed by everything a task read. Layer 0 is dense, so its shard reads no
    GGUF bytes and write keeps it when the GGUF changes; its parity tasks read the GGUF twins, which did change."""
    m = merge(tmp_path, gguf=broken_gguf(tmp_path, None))
    assert_passed(m.proc, m)
    name = "blk.0.attn_q_a.weight"
    broken_gguf(tmp_path, {name: lambda t: dataclasses.replace(t, data=np.ascontiguousarray(np.array(t.data)[::-1]))})
    res = cli("run", "--manifest", m.manifest, "--out", m.out)
    assert "(3 written, 2 kept from an earlier run)" in res.stderr, res.stderr       # shard 2 (layer 0) kept
    assert_fails_only(res, m, name)


def test_full_verify_compares_with_the_manifest_hash(clean, tmp_path):
    """Bytes equal to the source, but manifest.json records another hash: that comparison must run."""
    m = clean.copy(tmp_path / "out")
    manifest = m.read("manifest.json")
    name = "blk.0.attn_norm.weight"
    manifest["tensors"][name]["xxh3_128"] = "f" * 32
    (m.out / "manifest.json").write_text(json.dumps(manifest))
    res = m.verify()
    assert res.returncode == 1, res.stderr
    lines = fail_lines(res)
    assert len(lines) == 1 and lines[0].startswith(f"FAIL {name}: integrity: xxh3_128 ") and \
        "differs from manifest.json's ffffffff" in lines[0], lines


@pytest.mark.parametrize("where", ["no_folder", "a_folder"])
def test_unwritable_junit_path_is_refused_before_verifying(clean, tmp_path, where):
    m = clean.copy(tmp_path / "out")
    path = tmp_path / "nowhere" / "v.xml" if where == "no_folder" else tmp_path
    res = m.verify("--junit", path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    if where == "a_folder":                                   # click's own check of the option
        assert "Invalid value for '--junit'" in res.stderr and "is a directory" in res.stderr, res.stderr
    else:
        assert [ln for ln in res.stderr.splitlines() if ln.startswith("error:")] == [
            f"error: {path}: cannot write the JUnit report there"]
    assert "verify: running" not in res.stderr and m.read("manifest.json")["verified"] is True


def test_unreachable_scheduler_changes_nothing(clean, tmp_path):
    m = clean.copy(tmp_path / "out")
    before = m.read("manifest.json")
    res = pipeline("verify", "--manifest", m.manifest, "--out", m.out, "--scheduler", "tcp://127.0.0.1:9",
                   env={**ENV, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--scheduler tcp://127.0.0.1:9: cannot connect" in errors[0], errors
    assert m.read("manifest.json") == before and before["verified"] is True


def test_verify_without_a_merged_folder_points_the_way(clean, tmp_path):
    missing = tmp_path / "nothing"
    res = cli("verify", "--manifest", clean.manifest, "--out", missing)
    assert res.returncode == 2 and "no manifest.json" in res.stderr and not missing.exists(), res.stderr
    bare = tmp_path / "bare"
    shutil.copytree(clean.out, bare, ignore=shutil.ignore_patterns(".pipeline"))
    res = cli("verify", "--manifest", clean.manifest, "--out", bare)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and f"verify --folder {bare}" in errors[0], res.stderr
    assert not (bare / ".pipeline").exists()
