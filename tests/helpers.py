"""Shared by the tests: where things are, and running the real CLI in a child process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "examples" / "tiny-deepseek-v3"
FP8 = FIXTURE / "hf-fp8"
GGUF_ONE = FIXTURE / "gguf" / "Q4_K_M"
GGUF_SPLIT = FIXTURE / "gguf" / "Q4_K_M-split"


def write_manifest(path: Path, fp8: Path = FP8, gguf: Path = GGUF_ONE, name: str = "t", extra: str = "") -> Path:
    path.write_text(f"name: {name}\nsources:\n  fp8: {{local: {fp8}}}\n  gguf: {{local: {gguf}}}\n{extra}")
    return path


def pipeline(*args, env=None, check=True, **kw) -> subprocess.CompletedProcess:
    """Run `python pipeline.py ARGS` for real and return the finished process."""
    p = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, **(env or {})}, timeout=600, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(map(str, args))} exited {p.returncode}:\n{p.stderr}")
    return p


def spawn(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "pipeline.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def status(manifest: Path, out: Path) -> dict:
    rows = json.loads(pipeline("status", "--manifest", manifest, "--out", out, "--json").stdout)["stages"]
    return {r["stage"]: r for r in rows}


def final_files(out: Path) -> dict[str, bytes]:
    """Every file of the merged model (the pipeline's state and verify's timed report excluded)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != "verify.json"}
