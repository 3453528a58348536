"""The manifest: a small YAML file naming the two sources and the output folder.

Relative paths resolve against the manifest's own folder, so a manifest can be moved together with its data.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import PipelineError

SOURCE_KINDS = ("fp8", "gguf")
TOP_KEYS = {"name": str, "sources": dict, "output": str, "keep_mtp": bool, "stages": dict}
SOURCE_KEYS = {"local": str, "repo": str, "revision": str, "include": str, "file": str}


@dataclass(frozen=True)
class Option:
    """A setting a stage takes under `stages.<name>:` in a manifest: its type and range (the CLI's own checks)."""
    type: type
    minimum: float | None = None               # smallest allowed value
    above: float | None = None                 # values must be greater than this

    def problem(self, v) -> str:
        ok = isinstance(v, self.type) and not (self.type in (int, float) and isinstance(v, bool))
        if self.type is float and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok:
            return f"must be {_type_name(self.type)}, not {type(v).__name__}"
        if self.minimum is not None and v < self.minimum:
            return f"must be at least {self.minimum}, not {v}"
        if self.above is not None and not v > self.above:
            return f"must be greater than {self.above}, not {v}"
        return ""


@dataclass(frozen=True)
class Source:
    kind: str                      # "fp8" or "gguf"
    local: Path | None = None      # a folder (or, for gguf, a file) on disk
    repo: str | None = None        # a hub repo id
    revision: str = "main"
    include: str | None = None     # hub glob (gguf: the quant folder) or local file pattern
    raw: dict = field(default_factory=dict)   # the manifest section as written, for fingerprints


@dataclass(frozen=True)
class Manifest:
    path: Path
    name: str
    fp8: Source
    gguf: Source
    output: Path
    keep_mtp: bool
    raw: dict
    stage_options: dict                # stage name -> {option: value}, from the optional `stages:` section


def _type_name(t) -> str:
    return {str: "a string", dict: "a mapping", bool: "true or false", float: "a number", int: "a whole number"}[t]


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def load_manifest(path: Path, known_stages: dict[str, dict[str, Option]] | None = None) -> Manifest:
    """Parse and check a manifest. `known_stages`: stage name -> {option: Option} accepted under `stages:`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: manifest not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PipelineError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: a manifest is a YAML mapping with keys name, sources, output")

    def bad(key: str, why: str) -> PipelineError:
        return PipelineError(f"{path}: key '{key}' {why}")

    for key, value in raw.items():
        if key not in TOP_KEYS:
            raise bad(key, f"is unknown (known keys: {', '.join(TOP_KEYS)})")
        if not isinstance(value, TOP_KEYS[key]):
            raise bad(key, f"must be {_type_name(TOP_KEYS[key])}, not {type(value).__name__}")
    for key in ("name", "sources"):
        if key not in raw:
            raise bad(key, "is missing")
    if not NAME_RE.match(raw["name"]) or raw["name"] in (".", ".."):   # it names the default output folder
        raise bad("name", f"'{raw['name']}' must be a plain folder name (letters, digits, . _ -; no / or ..)")
    sources = raw["sources"]
    for kind in sources:
        if kind not in SOURCE_KINDS:
            raise bad(f"sources.{kind}", f"is unknown (known sources: {', '.join(SOURCE_KINDS)})")
    parsed = {}
    for kind in SOURCE_KINDS:
        sec = sources.get(kind)
        if sec is None:
            raise bad(f"sources.{kind}", "is missing")
        if not isinstance(sec, dict):
            raise bad(f"sources.{kind}", "must be a mapping like {local: PATH} or {repo: OWNER/NAME}")
        for k, v in sec.items():
            if k not in SOURCE_KEYS:
                raise bad(f"sources.{kind}.{k}", f"is unknown (known keys: {', '.join(SOURCE_KEYS)})")
            if not isinstance(v, str):
                raise bad(f"sources.{kind}.{k}", f"must be a string, not {type(v).__name__}")
        if ("local" in sec) == ("repo" in sec):
            raise bad(f"sources.{kind}", "needs exactly one of 'local' or 'repo'")
        local = _resolve(path, sec["local"]) if "local" in sec else None
        parsed[kind] = Source(kind=kind, local=local, repo=sec.get("repo"), revision=sec.get("revision", "main"),
                              include=sec.get("include") or sec.get("file"), raw=dict(sec))
    stage_options = {}
    for stage, opts in raw.get("stages", {}).items():
        known = (known_stages or {}).get(stage)
        if known is None:
            raise bad(f"stages.{stage}", f"is an unknown stage (stages: {', '.join(known_stages or {})})")
        if not isinstance(opts, dict):
            raise bad(f"stages.{stage}", "must be a mapping of options")
        for k, v in opts.items():
            if k not in known:
                raise bad(f"stages.{stage}.{k}", f"is unknown (options: {', '.join(known) or 'none'})")
            spec = known[k] if isinstance(known[k], Option) else Option(known[k])
            why = spec.problem(v)
            if why:
                raise bad(f"stages.{stage}.{k}", why)
        stage_options[stage] = dict(opts)
    output = _resolve(path, raw["output"]) if "output" in raw else None
    return Manifest(path=path.resolve(), name=raw["name"], fp8=parsed["fp8"], gguf=parsed["gguf"],
                    output=output, keep_mtp=raw.get("keep_mtp", False), raw=raw,
                    stage_options=stage_options)


def _resolve(manifest_path: Path, value: str) -> Path:
    try:
        p = Path(value).expanduser()
    except RuntimeError as e:                  # ~nosuchuser/x
        raise PipelineError(f"{manifest_path}: path {value}: {e}") from None
    if p.is_absolute():
        return p
    try:
        return (manifest_path.parent / p).resolve()
    except (RuntimeError, OSError):            # a symlink loop: fetch says so when it looks at the source
        return Path(os.path.abspath(manifest_path.parent / p))
