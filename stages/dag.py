"""The DAG runner: fingerprints, skip/stale decisions, stage records, the order of stages.

A stage is a pure-ish function of its inputs. Its record (`<out>/.pipeline/<stage>.json`) holds the fingerprint of
those inputs (manifest section, source identities, upstream results, code version) and what it wrote. A stage is
*done* when the fingerprint is unchanged and every output is still there, untouched: same size and mtime, or, for a
small output whose mtime changed (a copied folder), the same content hash.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.markup import escape

from .errors import PipelineError
from .fsio import (OutputLock, claim_output, clean_tmp, disk_error, hash_bytes, hash_file, read_json, state_dir,
                   write_json)
from .manifest import Manifest, Option  # noqa: F401 (Option: for the stages)
from .ui import console


@dataclass
class Context:
    manifest: Manifest
    out: Path
    keep_mtp: bool = False
    bwlimit: float | None = None          # MB/s cap on writes (leave disk bandwidth to others)
    verify: dict = field(default_factory=dict)    # scheduler / workers for the verify stage
    forced: bool = False                  # the running stage was forced: redo partial work too, reuse nothing
    explicit: bool = False                # asked for by name (`pipeline.py verify`): check everything afresh
    resume: bool = False                  # ... except what an interrupted run of the same stage finished

    def record_path(self, stage: str) -> Path:
        return state_dir(self.out) / f"{stage}.json"

    def record(self, stage: str) -> dict | None:
        p = self.record_path(stage)
        return read_json(p) if p.exists() else None

    def result(self, stage: str) -> dict:
        """The main result file of a finished upstream stage (e.g. sources.json, plan.json)."""
        rec = self.record(stage)
        return read_json(self.out / rec["result"])


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    inputs: str
    outputs: str
    version: int
    fingerprint: Callable[[Context], dict]     # cheap: never reads tensor data
    run: Callable[[Context], "Result"]
    options: dict = field(default_factory=dict)   # option -> Option, settable under `stages.<name>:` in a manifest


@dataclass
class Result:
    result: str                               # relative path of the main result file (its hash feeds downstream)
    outputs: list[str]                        # relative paths of every file the stage owns (checked by size, mtime)
    summary: str = ""
    extra: dict = field(default_factory=dict)
    # JSON files shared with a later stage, checked by content instead: {"ignore": [keys]} = same content but for
    # those keys; {"field": key, "equals": value} = that key still has that value.
    json_checks: dict = field(default_factory=dict)
    # outputs too big to hash on every `status` (merged shards): these are checked by size and mtime alone, and a
    # copy of them is taken back by write's own hash check or by verify (write.restamp_shards)
    big: list[str] = field(default_factory=list)


def json_digest(path: Path, ignore: list[str]) -> str:
    obj = read_json(path)
    return digest({k: v for k, v in obj.items() if k not in ignore})


@dataclass
class Status:
    stage: str
    state: str                                # done | stale | pending | interrupted | failed
    why: str = ""
    record: dict | None = None


def digest(obj) -> str:
    return hash_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def full_fingerprint(ctx: Context, stage: Stage) -> dict:
    fp = {"code": stage.version, **stage.fingerprint(ctx)}
    for up in stage.needs:
        fp[f"upstream.{up}"] = (ctx.record(up) or {}).get("result_digest")
    return fp


SMALL = 64 << 20                          # outputs up to this size also get a content hash in the record


def outputs_intact(ctx: Context, record: dict) -> str:
    for rel, info in record.get("outputs", {}).items():
        path = ctx.out / rel
        try:
            st = path.stat()
        except FileNotFoundError:
            return f"output {rel} is missing"
        if "ignore" in info:
            if json_digest(path, info["ignore"]) != info["json_digest"]:
                return f"output {rel} was changed"
        elif "field" in info:
            if read_json(path).get(info["field"]) != info["equals"]:
                return f"output {rel}: {info['field']} is no longer {json.dumps(info['equals'])}"
        elif st.st_size != info["size"] or (st.st_mtime_ns != info["mtime_ns"] and
                                            ("xxh3" not in info or hash_file(path) != info["xxh3"])):
            return f"output {rel} was changed"
    return ""


def stage_status(ctx: Context, stage: Stage, upstream: dict[str, Status]) -> Status:
    rec = ctx.record(stage.name)
    if rec is not None and rec.get("state") == "failed":     # shown whatever upstream does: it is what happened last
        return Status(stage.name, "failed", rec.get("error", ""), rec)
    for up in stage.needs:
        if upstream[up].state != "done":
            state = "pending" if rec is None else "stale"
            return Status(stage.name, state, f"waits for {up} ({upstream[up].state})", rec)
    if rec is None:
        return Status(stage.name, "pending", "never ran")
    if rec.get("state") == "running":
        return Status(stage.name, "interrupted", f"run started {rec.get('started', '?')} did not finish", rec)
    now = full_fingerprint(ctx, stage)
    old = rec.get("fingerprint", {})
    changed = [k for k in sorted(set(now) | set(old)) if now.get(k) != old.get(k)]
    if changed:
        why = ", ".join("code version %s -> %s" % (old.get(k), now.get(k)) if k == "code" else f"{k} changed"
                        for k in changed)
        return Status(stage.name, "stale", why, rec)
    broken = outputs_intact(ctx, rec)
    if broken:
        return Status(stage.name, "stale", broken, rec)
    return Status(stage.name, "done", "", rec)


def all_status(ctx: Context, stages: list[Stage]) -> dict[str, Status]:
    out: dict[str, Status] = {}
    for s in stages:
        out[s.name] = stage_status(ctx, s, out)
    return out


def execute(ctx: Context, stage: Stage) -> dict:
    fingerprint = full_fingerprint(ctx, stage)
    started = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    write_json(ctx.record_path(stage.name), {"stage": stage.name, "state": "running", "pid": os.getpid(),
                                              "started": stamp}, ctx.out)
    try:
        try:
            res = stage.run(ctx)
        except OSError as e:                   # disk full, read-only, vanished file: one line, recorded as failed
            raise disk_error(Path(e.filename or ctx.out), e) from None
    except PipelineError as e:
        failed = {"stage": stage.name, "state": "failed", "started": stamp, "error": str(e).splitlines()[0]}
        try:
            write_json(ctx.record_path(stage.name), failed, ctx.out)
        except PipelineError:                  # the disk may be the thing that failed (full): overwrite the running
            _overwrite(ctx.record_path(stage.name), failed)    # record in place, in the blocks it already has
        raise
    outputs = {}
    for rel in res.outputs:
        st = (ctx.out / rel).stat()
        outputs[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if st.st_size <= SMALL and rel not in res.big:
            outputs[rel]["xxh3"] = hash_file(ctx.out / rel)
    for rel, check in res.json_checks.items():
        outputs[rel] = dict(check, json_digest=json_digest(ctx.out / rel, check["ignore"])) if "ignore" in check \
            else dict(check)
    result_digest = (outputs[res.result]["json_digest"] if "ignore" in res.json_checks.get(res.result, {})
                     else hash_bytes((ctx.out / res.result).read_bytes()))
    record = {"stage": stage.name, "state": "done", "started": stamp, "seconds": round(time.time() - started, 3),
              "fingerprint": fingerprint, "result": res.result, "result_digest": result_digest,
              "outputs": outputs, "summary": res.summary, **res.extra}
    write_json(ctx.record_path(stage.name), record, ctx.out)
    return record


def _overwrite(path: Path, obj: dict) -> None:
    data = json.dumps(obj).encode()
    try:
        with open(path, "r+b") as f:
            if len(data) > os.fstat(f.fileno()).st_size:
                obj = dict(obj, error=obj["error"][:max(0, os.fstat(f.fileno()).st_size - 120)])
                data = json.dumps(obj).encode()
            f.write(data)
            f.truncate()
    except OSError:                            # nothing more we can do; the error itself still reaches the user
        pass


def run_stages(ctx: Context, stages: list[Stage], start: str | None = None, only: str | None = None,
               force: bool = False) -> list[dict]:
    """Run what is not done, in order. Returns one event per stage (for --json)."""
    names = [s.name for s in stages]
    for opt, value in (("--from", start), ("--only", only)):
        if value is not None and value not in names:
            raise PipelineError(f"{opt} {value}: unknown stage (stages: {', '.join(names)})")
    claim_output(ctx.out)
    events = []
    with OutputLock(ctx.out):
        clean_tmp(ctx.out)
        statuses: dict[str, Status] = {}
        for i, stage in enumerate(stages):
            st = stage_status(ctx, stage, statuses)
            if only is not None and stage.name != only:
                statuses[stage.name] = st
                continue
            forced = force or (start is not None and i >= names.index(start))
            if st.state == "done" and not forced:
                console.print(f"[green]✓[/] {stage.name}: done, inputs unchanged (skipped)")
                events.append({"stage": stage.name, "action": "skipped", "summary": st.record.get("summary", "")})
                statuses[stage.name] = st
                continue
            for up in stage.needs:
                if statuses[up].state != "done":
                    raise PipelineError(f"stage {stage.name} needs {up}, which is {statuses[up].state}; "
                                        f"run `python pipeline.py run` without --only")
            why = "forced" if (forced and st.state == "done") else (st.why or st.state)
            console.print(f"[bold cyan]▶[/] {stage.name}: running ({escape(why)})")
            ctx.forced = forced
            rec = execute(ctx, stage)
            console.print(f"[green]✓[/] {stage.name}: {escape(rec['summary'])} [dim]({rec['seconds']:.1f} s)[/]")
            events.append({"stage": stage.name, "action": "ran", "seconds": rec["seconds"], "summary": rec["summary"]})
            statuses[stage.name] = Status(stage.name, "done", "", rec)
    return events


def run_explicit(ctx: Context, stages: list[Stage], name: str, force: bool = False) -> dict:
    """Run stage `name` now, on the folder as it is, whatever the DAG thinks of the stages between it and its
    sources (`pipeline.py verify`: a user who asks for a check wants one). Stages without `needs` (fetch) are
    brought up to date first; the others must have run once. Partial work is reused only from an interrupted run of
    the same stage (and not with --force)."""
    stage = next(s for s in stages if s.name == name)
    if not (ctx.out / "manifest.json").is_file():
        raise PipelineError(f"{ctx.out}: no merged model here (no manifest.json); `python pipeline.py run` makes one")
    if not state_dir(ctx.out).is_dir():
        raise PipelineError(f"{ctx.out}: not merged here (no {state_dir(ctx.out).name}/ with the sources it was made "
                            f"from); `python pipeline.py verify --folder {ctx.out}` checks it against its "
                            "manifest.json alone")
    claim_output(ctx.out)
    with OutputLock(ctx.out):
        clean_tmp(ctx.out)
        statuses: dict[str, Status] = {}
        for s in stages:
            if s.name == name:
                break
            st = statuses[s.name] = stage_status(ctx, s, statuses)
            if s.name in stage.needs and not s.needs and st.state != "done":
                console.print(f"[bold cyan]▶[/] {s.name}: running ({escape(st.why or st.state)})")
                rec = execute(ctx, s)
                console.print(f"[green]✓[/] {s.name}: {escape(rec['summary'])}")
                statuses[s.name] = Status(s.name, "done", "", rec)
        for up in stage.needs:
            rec = ctx.record(up)
            if rec is None or rec.get("state") != "done":
                raise PipelineError(f"{ctx.out}: stage {up} has not finished here; run `python pipeline.py run` first "
                                    f"(or `python pipeline.py verify --folder {ctx.out}` to check the folder alone)")
        prev = ctx.record(name)
        ctx.forced, ctx.explicit = force, True
        ctx.resume = not force and prev is not None and prev.get("state") == "running"
        console.print(f"[bold cyan]▶[/] {name}: running (asked for" + (", resuming an interrupted run)" if ctx.resume
                                                                       else ")"))
        rec = execute(ctx, stage)
        console.print(f"[green]✓[/] {name}: {escape(rec['summary'])} [dim]({rec['seconds']:.1f} s)[/]")
        return rec
