"""The fetch stage's `repo:` path, for real: the CLI in a subprocess, the real huggingface_hub 2.4.0 code, and a local
server speaking the Hub's HTTP API (tests/fakehub.py) in place of huggingface.co.

Every test gets a fresh HF_HOME under tmp_path and HF_ENDPOINT pointing at the server (bound to 127.0.0.1 only).
One test runs the whole pipeline from the hub; the others run the stages they are about (`--only fetch`, or
fetch/reconcile/write for the merged bytes) to stay fast: verify takes seconds and never touches the hub.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from fakehub import FakeHub, files_from

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "examples" / "tiny-deepseek-v3"
FP8_REPO = "deepseek-ai/DeepSeek-V3"
GGUF_REPO = "unsloth/DeepSeek-V3-GGUF"
ONE_SHARD_REPO = "deepseek-ai/DeepSeek-V3-one-shard"     # the same checkpoint as one 21 MB shard
PRIVATE_REPO = "private-org/DeepSeek-V3"
TOKEN = "hf_fakehub_test_token"
QUANT = "DeepSeek-V3-Q4_K_M"
ONE_SHARD = "model-00001-of-00001.safetensors"
RUN_TIMEOUT = 60                                         # seconds, per pipeline run
MERGE_STAGES = ("fetch", "reconcile", "quantize", "write")           # the stages that make model-*.safetensors
HF_CHUNK = 10 * 1024 * 1024                              # huggingface_hub 2.4.0's DOWNLOAD_CHUNK_SIZE

# Files of the hub repos that the fetch stage must never ask for.
UNWANTED = {
    FP8_REPO: {"README.md", "LICENSE-MODEL", "figures/benchmark.png", "inference/model.py",
               "inference/configs/config_671B.json"},
    GGUF_REPO: {"README.md", "DeepSeek-V3-Q2_K/DeepSeek-V3-Q2_K.gguf"},
}


# -- fixtures -------------------------------------------------------------------------------------------------------

def one_shard_checkpoint(folder: Path) -> dict[str, bytes]:
    """The hf-fp8 checkpoint re-packed as a single safetensors shard (bigger than huggingface_hub's 10 MiB chunk,
    which is its resume granularity) with a matching index; tensor bytes unchanged."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    header, blobs, offset = {}, [], 0
    for shard in sorted(set(index["weight_map"].values())):
        raw = (folder / shard).read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        meta, data = json.loads(raw[8:8 + n]), raw[8 + n:]
        meta.pop("__metadata__", None)
        for name, info in meta.items():
            a, b = info["data_offsets"]
            header[name] = {**info, "data_offsets": [offset, offset + b - a]}
            blobs.append(data[a:b])
            offset += b - a
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    files = files_from(folder, pattern="*.json")
    index["weight_map"] = {k: ONE_SHARD for k in index["weight_map"]}
    files["model.safetensors.index.json"] = json.dumps(index, indent=2).encode()
    files[ONE_SHARD] = struct.pack("<Q", len(text)) + text + b"".join(blobs)
    return files


@pytest.fixture(scope="module")
def hub_server():
    fp8 = files_from(FIXTURE / "hf-fp8")
    extras = {"README.md": b"# DeepSeek-V3\n", "LICENSE-MODEL": b"license\n",
              "figures/benchmark.png": b"\x89PNG\r\n\x1a\n" + bytes(2048),
              "inference/model.py": b"import torch\n", "inference/configs/config_671B.json": b"{}\n"}
    gguf = files_from(FIXTURE / "gguf" / "Q4_K_M-split", prefix=f"{QUANT}/")
    gguf["DeepSeek-V3-Q2_K/DeepSeek-V3-Q2_K.gguf"] = (FIXTURE / "gguf/Q4_K_M/tiny-Q4_K_M.gguf").read_bytes()
    gguf["README.md"] = b"# GGUF\n"
    hub = FakeHub(max_requests=400)
    hub.add_repo(FP8_REPO, {**fp8, **extras})
    hub.add_repo(GGUF_REPO, gguf)
    hub.add_repo(ONE_SHARD_REPO, one_shard_checkpoint(FIXTURE / "hf-fp8"))
    hub.add_repo(PRIVATE_REPO, fp8, token=TOKEN)
    assert len(hub.repos[ONE_SHARD_REPO].files[ONE_SHARD].data) > 2 * HF_CHUNK
    with hub:
        yield hub


@pytest.fixture
def hub(hub_server, tmp_path, monkeypatch):
    """The server with a clean request log, and this test's environment: fresh HF_HOME, HF_ENDPOINT -> server."""
    hub_server.reset()
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    yield hub_server
    hub_server.reset()


@pytest.fixture(scope="module")
def local_output(tmp_path_factory) -> Path:
    """The merge of the same sources from local folders: the bytes a hub run must reproduce."""
    d = tmp_path_factory.mktemp("local")
    manifest = write_manifest(d / "local.yaml", f"{{local: {FIXTURE / 'hf-fp8'}}}",
                              f"{{local: {FIXTURE / 'gguf' / 'Q4_K_M-split'}}}")
    p = merge(manifest, d / "out", env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.returncode == 0, p.stderr
    return d / "out"


# -- helpers --------------------------------------------------------------------------------------------------------

def write_manifest(path: Path, fp8: str, gguf: str) -> Path:
    path.write_text(f"name: hubtest\nsources:\n  fp8:  {fp8}\n  gguf: {gguf}\n")
    return path


def hub_manifest(tmp_path: Path, fp8_repo: str = FP8_REPO, revision: str = "main") -> Path:
    return write_manifest(tmp_path / "hub.yaml", f"{{repo: {fp8_repo}, revision: {revision}}}",
                          f'{{repo: {GGUF_REPO}, include: "{QUANT}/*"}}')


def run_pipeline(manifest: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipeline.py", "run", "--manifest", str(manifest), "--out", str(out),
                           *extra], cwd=REPO, env=env if env is not None else dict(os.environ),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)


def merge(manifest: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the stages that produce the merged shards, one CLI call each; the first failure (or the last call)."""
    for stage in MERGE_STAGES:
        p = run_pipeline(manifest, out, "--only", stage, *extra, env=env)
        if p.returncode != 0:
            break
    return p


def assert_fetched_bytes(tmp_path: Path, hub: FakeHub, repo: str, names) -> None:
    """The hub cache's snapshot holds exactly the server's bytes for these files."""
    sha = hub.repos[repo].sha
    for name in names:
        assert snapshot_file(tmp_path, repo, sha, name).read_bytes() == hub.repos[repo].files[name].data, name


def assert_same_model(out: Path, reference: Path) -> None:
    names = sorted(p.name for p in reference.glob("model-*.safetensors"))
    assert names and names == sorted(p.name for p in out.glob("model-*.safetensors"))
    for name in names:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs from the local run"


def assert_one_line_error(p: subprocess.CompletedProcess, *words: str) -> str:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, p.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def snapshot_file(tmp_path: Path, repo: str, sha: str, name: str) -> Path:
    return tmp_path / "hf-home" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / sha / name


# -- tests ----------------------------------------------------------------------------------------------------------

def test_hub_run_matches_local_run_and_fetches_only_what_it_needs(hub, tmp_path, local_output):
    p = run_pipeline(hub_manifest(tmp_path), tmp_path / "out")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert "it/s" not in p.stderr, "huggingface_hub's tqdm bars should be off when stderr is not a terminal"
    assert_same_model(tmp_path / "out", local_output)

    fp8_files = {p.name for p in (FIXTURE / "hf-fp8").iterdir()}
    gguf_files = {f"{QUANT}/{p.name}" for p in (FIXTURE / "gguf" / "Q4_K_M-split").iterdir()}
    assert hub.files_requested(FP8_REPO) == fp8_files
    assert hub.files_requested(GGUF_REPO) == gguf_files
    for repo, unwanted in UNWANTED.items():
        assert not hub.files_requested(repo) & unwanted
    paths = [r.path for r in hub.log()]
    assert not [x for x in paths if any(w in x for w in ("README", "LICENSE", "figures", "inference", "Q2_K"))]
    for repo, names in ((FP8_REPO, fp8_files), (GGUF_REPO, gguf_files)):
        for name in names:                           # each file's bytes travel once, whole
            gets = hub.log("GET", repo, name)
            assert len(gets) == 1 and gets[0].range is None and gets[0].status == 200, (name, gets)

    sources = json.loads((tmp_path / "out" / ".pipeline" / "sources.json").read_text())
    for kind, repo in (("fp8", FP8_REPO), ("gguf", GGUF_REPO)):
        sha = hub.repos[repo].sha
        assert sources[kind]["repo"] == repo and sources[kind]["revision"] == sha
        assert Path(sources[kind]["root"]).name == sha
        assert {f["hash"] for f in sources[kind]["files"].values()} == {f"hub:{repo}@{sha}"}
    assert sources["gguf"]["order"] == sorted(gguf_files)


def test_cut_off_downloads_are_resumed(hub, tmp_path):
    """Three broken transfers in one run, each recovered a different way (huggingface_hub 2.4.0 semantics):
    a short read past the first 10 MiB chunk resumes with a Range request; a short read inside the first chunk
    restarts that file; a connection reset makes huggingface_hub give up, and the pipeline's retry fetches again only
    that file (the ones that completed stay in the cache)."""
    part1, part2 = (f"{QUANT}/tiny-Q4_K_M-0000{i}-of-00002.gguf" for i in (1, 2))
    cut = HF_CHUNK + 1_500_000                        # past the first 10 MiB chunk, well before the end
    hub.cut_after[(ONE_SHARD_REPO, ONE_SHARD)] = cut
    hub.cut_after[(GGUF_REPO, part1)] = 1_000_000     # inside the first chunk: nothing kept to resume from
    hub.reset_after[(GGUF_REPO, part2)] = 2_000_000

    p = run_pipeline(hub_manifest(tmp_path, ONE_SHARD_REPO), tmp_path / "out", "--only", "fetch")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert "Trying to resume download" in p.stderr    # huggingface_hub's own retry, inside one call
    assert f"download of {GGUF_REPO} interrupted" in p.stderr and "retrying (1/2)" in p.stderr   # the pipeline's

    first, second = hub.log("GET", ONE_SHARD_REPO, ONE_SHARD)
    assert first.range is None and first.status == 200
    assert second.range is not None and second.range.startswith("bytes=") and second.range.endswith("-")
    k = int(second.range[len("bytes="):-1])
    assert 0 < k <= cut and second.status == 206, second

    for name in (part1, part2):                       # each fetched twice, the second time whole
        gets = hub.log("GET", GGUF_REPO, name)
        assert [(g.range, g.status) for g in gets] == [(None, 200), (None, 200)], (name, gets)
    for name in hub.repos[ONE_SHARD_REPO].files:      # the pipeline's retry re-fetched nothing of the other repo
        assert len(hub.log("GET", ONE_SHARD_REPO, name)) == (2 if name == ONE_SHARD else 1)

    assert_fetched_bytes(tmp_path, hub, ONE_SHARD_REPO, hub.repos[ONE_SHARD_REPO].files)
    assert_fetched_bytes(tmp_path, hub, GGUF_REPO, (part1, part2))
    assert not list((tmp_path / "hf-home").rglob("*.incomplete"))


def test_offline_rerun_uses_the_cache_and_offline_without_cache_fails_clearly(hub, tmp_path, monkeypatch,
                                                                                local_output):
    manifest = hub_manifest(tmp_path)
    p = run_pipeline(manifest, tmp_path / "out", "--only", "fetch")
    assert p.returncode == 0, p.stderr
    assert hub.log("GET", FP8_REPO)

    hub.reset_log()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = run_pipeline(manifest, tmp_path / "out", "--only", "fetch", "--force")
    assert p.returncode == 0, p.stderr
    assert "fetch: running (forced)" in p.stderr and "✓ fetch:" in p.stderr, p.stderr   # it ran, from the cache
    p = merge(manifest, tmp_path / "out")             # and the merge from it, still offline
    assert p.returncode == 0, p.stderr
    assert hub.log() == [], "an offline rerun must not touch the network"
    assert_same_model(tmp_path / "out", local_output)

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    p = run_pipeline(manifest, tmp_path / "out2", "--only", "fetch")
    assert_one_line_error(p, FP8_REPO, "HF_HUB_OFFLINE")
    assert p.returncode == 2
    assert hub.log() == []


@pytest.mark.parametrize("repo, revision, words", [
    ("deepseek-ai/No-Such-Model", "main", ["deepseek-ai/No-Such-Model", "not found"]),
    (FP8_REPO, "v9.9", ["no revision v9.9"]),
])
def test_missing_repo_or_revision_is_one_clear_line(hub, tmp_path, repo, revision, words):
    p = run_pipeline(hub_manifest(tmp_path, repo, revision), tmp_path / "out", "--only", "fetch")
    assert_one_line_error(p, "sources.fp8", *words)
    assert p.returncode == 2
    assert not [r for r in hub.log() if r.file], "nothing is downloaded"


def test_token_protected_repo(hub, tmp_path, monkeypatch):
    manifest = hub_manifest(tmp_path, PRIVATE_REPO)
    p = run_pipeline(manifest, tmp_path / "out", "--only", "fetch")
    assert_one_line_error(p, PRIVATE_REPO, "HF_TOKEN")
    assert not hub.log(repo=PRIVATE_REPO)[0].authorized

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    p = run_pipeline(manifest, tmp_path / "out", "--only", "fetch")
    assert_one_line_error(p, PRIVATE_REPO, "HTTP 401", "HF_TOKEN")

    hub.reset_log()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    p = run_pipeline(manifest, tmp_path / "out", "--only", "fetch")
    assert p.returncode == 0, p.stderr
    log = hub.log(repo=PRIVATE_REPO)
    assert log and all(r.authorized and r.status in (200, 206) for r in log)
    assert hub.files_requested(PRIVATE_REPO) == set(hub.repos[PRIVATE_REPO].files)
    assert_fetched_bytes(tmp_path, hub, PRIVATE_REPO, hub.repos[PRIVATE_REPO].files)
