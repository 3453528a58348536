#!/usr/bin/env python3
"""Merge DeepSeek-V3/R1: FP8 checkpoint + Q4_K_M GGUF -> one self-describing model folder.

    python pipeline.py run                 # the embedded tiny model -> out/tiny-deepseek-v3/
    python pipeline.py run --manifest manifests/deepseek-v3.yaml --out /data/dsv3-hybrid
    python pipeline.py status
    python pipeline.py verify                    # read and check the merged folder as it is, against the sources
    python pipeline.py verify --folder DIR       # a folder alone: every tensor against its manifest.json checksum
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from stages import STAGES
from stages.dag import Context, all_status, run_explicit, run_stages
from stages.errors import PipelineError
from stages.manifest import load_manifest
from stages.verify import check_folder, junit_xml
from stages.ui import console

ROOT = Path(__file__).resolve().parent
DEFAULT_MANIFEST = ROOT / "manifests" / "tiny-deepseek-v3.yaml"
STAGE_NAMES = [s.name for s in STAGES]


def make_context(manifest_path, out, keep_mtp=None, bwlimit=None, scheduler=None, workers=None) -> Context:
    m = load_manifest(Path(manifest_path), {s.name: s.options for s in STAGES})
    out_dir = Path(out).resolve() if out else (m.output or ROOT / "out" / m.name)
    verify = dict(m.stage_options.get("verify", {}))
    verify.update({k: v for k, v in (("scheduler", scheduler), ("workers", workers)) if v is not None})
    return Context(manifest=m, out=out_dir, keep_mtp=m.keep_mtp if keep_mtp is None else keep_mtp,
                   bwlimit=bwlimit if bwlimit is not None else m.stage_options.get("write", {}).get("bwlimit"),
                   verify=verify)


def main_guard(fn):
    """User errors: one clear line (per problem), exit 2 for bad input; no traceback."""
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            for line in str(e).splitlines():
                console.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True)
            sys.exit(getattr(e, "exit_code", 2))
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: rerun to resume where it stopped[/]")
            sys.exit(130)
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


manifest_option = click.option("--manifest", "manifest_path", default=str(DEFAULT_MANIFEST), show_default=True,
                               type=click.Path(dir_okay=False), help="Manifest YAML naming the sources.")
out_option = click.option("--out", type=click.Path(file_okay=False), help="Output folder (overrides `output`).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
scheduler_option = click.option("--scheduler", metavar="ADDRESS", help="verify on this dask.distributed scheduler "
                                                                       "(e.g. tcp://10.0.0.5:8786).")
workers_option = click.option("--workers", type=click.IntRange(1), help="verify on a LocalCluster of N worker "
                                                                        "processes (default: dask's local scheduler "
                                                                        "on all cores).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Turn an FP8 DeepSeek-V3/R1 checkpoint plus a GGUF into one merged model folder."""


@cli.command()
@manifest_option
@out_option
@click.option("--from", "start", type=click.Choice(STAGE_NAMES), help="Redo this stage and everything after it.")
@click.option("--only", type=click.Choice(STAGE_NAMES), help="Run this stage alone (its inputs must be done).")
@click.option("--force", is_flag=True, help="Redo the selected stages even if their inputs are unchanged.")
@click.option("--keep-mtp/--no-keep-mtp", default=None, help="Keep the MTP layer (default: the manifest's keep_mtp, "
                                                             "else skipped).")
@click.option("--bwlimit", type=click.FloatRange(min=0, min_open=True), metavar="MB/S",
              help="Cap the write rate, leaving disk bandwidth to others.")
@scheduler_option
@workers_option
@json_option
@main_guard
def run(manifest_path, out, start, only, force, keep_mtp, bwlimit, scheduler, workers, as_json):
    """Run the pipeline: skip what is done, redo what is stale, resume what was interrupted.

    Exit status: 0 done and verified, 1 verification failed, 2 could not run (bad input, disk, lock)."""
    ctx = make_context(manifest_path, out, keep_mtp, bwlimit, scheduler, workers)
    console.print(f"[bold]{escape(ctx.manifest.name)}[/] -> {escape(str(ctx.out))}")
    events = run_stages(ctx, STAGES, start=start, only=only, force=force)
    if as_json:
        print(json.dumps({"manifest": str(ctx.manifest.path), "out": str(ctx.out), "stages": events}))


@cli.command()
@manifest_option
@out_option
@click.option("--folder", type=click.Path(file_okay=False), help="Check this folder alone, without its sources: "
              "every tensor against manifest.json's xxh3_128 (parity NOT checked), or, for a seed-format folder, "
              "that it is complete (content NOT checked). Reads only.")
@click.option("--force", is_flag=True, help="Start over: do not resume an interrupted verify.")
@scheduler_option
@workers_option
@click.option("--junit", type=click.Path(dir_okay=False), help="Write a JUnit XML report (one testcase per tensor "
                                                                "and per file).")
@json_option
@main_guard
def verify(manifest_path, out, folder, force, scheduler, workers, junit, as_json):
    """Read and check the merged folder as it is, tensor by tensor, against both sources (or --folder alone).

    Always reads: a folder that changed, was copied or was damaged is checked, whatever the other stages' state.
    Exit status: 0 every tensor passed, 1 some failed (manifest.json says verified: false), 2 could not run."""
    if junit:
        check_writable(Path(junit))                     # before an hour of verify, not after
    failure, report = None, None
    try:
        if folder:
            report = check_folder(Path(folder), scheduler, workers)
        else:
            ctx = make_context(manifest_path, out, scheduler=scheduler, workers=workers)
            run_explicit(ctx, STAGES, "verify", force=force)
    except PipelineError as e:
        if not hasattr(e, "exit_code"):
            raise
        failure, report = e, getattr(e, "report", None)
    if report is None and not folder and (ctx.out / "verify.json").exists():
        report = json.loads((ctx.out / "verify.json").read_text())
    if report is not None:
        if junit:
            try:
                Path(junit).write_text(junit_xml(report))
            except OSError as e:
                raise PipelineError(f"{junit}: cannot write the JUnit report ({e.strerror})") from None
        if as_json:
            print(json.dumps({k: report[k] for k in ("verdict", "summary", "failed")}))
    if failure:
        raise failure


def check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK) or \
            (path.exists() and not os.access(path, os.W_OK)):
        raise PipelineError(f"{path}: cannot write the JUnit report there")


@cli.command()
@manifest_option
@out_option
@json_option
@main_guard
def status(manifest_path, out, as_json):
    """Show each stage: done / stale (and why) / pending, when, how long, what it produced."""
    ctx = make_context(manifest_path, out)
    statuses = all_status(ctx, STAGES) if ctx.out.exists() else {}
    rows = []
    for s in STAGES:
        st = statuses.get(s.name)
        rec = (st.record if st else None) or {}
        rows.append({"stage": s.name, "state": st.state if st else "pending",
                     "why": (st.why if st else "output folder does not exist yet"),
                     "when": rec.get("started", ""), "seconds": rec.get("seconds"), "produced": rec.get("summary", "")})
    if as_json:
        print(json.dumps({"out": str(ctx.out), "stages": rows}))
        return
    table = Table(title=f"{ctx.manifest.name} -> {ctx.out}")
    for col in ("stage", "state", "when", "took", "produced / why"):
        table.add_column(col)
    colour = {"done": "green", "stale": "yellow", "pending": "dim", "interrupted": "red", "failed": "red"}
    for r in rows:
        took = f"{r['seconds']:.1f} s" if r["seconds"] is not None else ""
        detail = r["produced"] if r["state"] == "done" else r["why"]
        table.add_row(r["stage"], f"[{colour[r['state']]}]{r['state']}[/]", r["when"], took, detail)
    console.print(table)


@cli.command()
@json_option
def stages(as_json):
    """List the stages with their inputs and outputs."""
    if as_json:
        print(json.dumps([{"stage": s.name, "needs": list(s.needs), "inputs": s.inputs, "outputs": s.outputs,
                           "version": s.version} for s in STAGES]))
        return
    table = Table(title="stages (in DAG order)")
    for col in ("stage", "needs", "inputs", "outputs"):
        table.add_column(col)
    for s in STAGES:
        table.add_row(s.name, ", ".join(s.needs) or "-", s.inputs, s.outputs)
    console.print(table)


if __name__ == "__main__":
    cli()
