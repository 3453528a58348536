"""The command line as users and CI see it: help, stages, status, --only/--from, default manifest, --json."""
import json

from helpers import ROOT, pipeline, status, write_manifest


def test_help_on_every_command():
    for cmd in ([], ["run"], ["status"], ["stages"], ["verify"]):
        p = pipeline(*cmd, "--help")
        assert "Usage:" in p.stdout
    assert "--from" in pipeline("run", "--help").stdout and "--only" in pipeline("run", "--help").stdout


def test_stages_lists_the_dag():
    rows = json.loads(pipeline("stages", "--json").stdout)
    assert [r["stage"] for r in rows] == ["fetch", "reconcile", "quantize", "write", "verify"]
    assert [r["needs"] for r in rows] == [[], ["fetch"], ["reconcile"], ["reconcile", "quantize"], ["fetch", "write"]]
    table = pipeline("stages").stderr
    assert all(name in table for name in ("fetch", "reconcile", "write", "plan.json"))


def test_status_pending_then_done_then_only_and_from(tmp_path):
    m, out = write_manifest(tmp_path / "m.yaml"), tmp_path / "out"
    assert {r["state"] for r in status(m, out).values()} == {"pending"}

    p = pipeline("run", "--manifest", m, "--out", out, "--only", "write", check=False)
    assert p.returncode == 2 and "needs reconcile" in p.stderr and "Traceback" not in p.stderr

    pipeline("run", "--manifest", m, "--out", out, "--only", "fetch")
    st = status(m, out)
    assert st["fetch"]["state"] == "done" and st["reconcile"]["state"] == "pending"

    pipeline("run", "--manifest", m, "--out", out)
    table = pipeline("status", "--manifest", m, "--out", out).stderr
    assert table.count("done") >= 4 and "shards" in table and "PASS" in table

    events = json.loads(pipeline("run", "--manifest", m, "--out", out, "--from", "reconcile", "--json").stdout)
    assert [e["action"] for e in events["stages"]] == ["skipped", "ran", "ran", "ran", "ran"]
    events = json.loads(pipeline("run", "--manifest", m, "--out", out, "--only", "reconcile", "--json").stdout)
    assert [e["action"] for e in events["stages"]] == ["skipped"]
    events = json.loads(pipeline("run", "--manifest", m, "--out", out, "--only", "reconcile", "--force",
                                 "--json").stdout)
    assert [e["action"] for e in events["stages"]] == ["ran"]


def test_relative_paths_resolve_against_the_manifest_folder(tmp_path):
    (tmp_path / "manifests").mkdir()
    (tmp_path / "models").symlink_to(ROOT / "examples" / "tiny-deepseek-v3")
    m = tmp_path / "manifests" / "rel.yaml"
    m.write_text("name: rel\nsources:\n  fp8: {local: ../models/hf-fp8}\n"
                 "  gguf: {local: ../models/gguf/Q4_K_M}\noutput: ../merged\n")
    pipeline("run", "--manifest", m)
    assert (tmp_path / "merged" / "manifest.json").exists()


def test_shipped_manifests_parse():
    for name in ("tiny-deepseek-v3", "deepseek-v3", "deepseek-r1", "deepseek-v3-quantize"):
        p = pipeline("status", "--manifest", ROOT / "manifests" / f"{name}.yaml", "--out", "/nonexistent/x", "--json")
        assert [r["state"] for r in json.loads(p.stdout)["stages"]] == ["pending"] * 5
