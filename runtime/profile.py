"""Record a routing profile: how often each MoE layer routes to each expert over a calibration text.

    python -m runtime.profile --model DIR --file calibration.txt            # writes DIR/routing-profile.json
    python -m runtime.profile --model DIR --file other.txt --against DIR/routing-profile.json

A GPU model keeps the most-hit experts of the profile resident (runtime.experts.setup_gpu reads
DIR/routing-profile.json when it loads). The file sits beside manifest.json and is not listed in it: it is a
measurement of the model, not part of it, so recording one changes none of the checksummed files and a
verified folder stays verified; a profile of another model is refused by its routers' checksums. `--out` writes
it elsewhere (a read-only folder). `--against PROFILE` records this text's counts and prints the share of expert
bytes a placement planned from PROFILE would serve, against whole layers, at 10-75% of the expert bytes (nothing
is written unless --out is given). The text runs through the model in windows of --ctx tokens (prefill only).
Errors are one line on stderr, exit status 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from runtime.chat import ACT_TERMS_HELP, DEFAULT_MODEL, _fail, load_model


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "folder", type=click.Path(path_type=Path), default=DEFAULT_MODEL, show_default=True,
              help="A merged model folder (docs/FORMAT.md).")
@click.option("--file", "text_file", type=click.Path(path_type=Path), required=True, help="A UTF-8 text file.")
@click.option("--ctx", type=click.IntRange(min=2), default=2048, show_default=True, help="Tokens per window.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Stop after this many tokens.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where to write the profile (default: MODEL/routing-profile.json, unless --against).")
@click.option("--against", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A profile of another text: report its placements' hit rates on this text.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: physical cores).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--act-terms", type=click.IntRange(1, 2), default=2, show_default=True, help=ACT_TERMS_HELP)
@click.option("--allow-unverified", is_flag=True, help="Profile a folder whose manifest.json says verified: false.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def main(folder, text_file, ctx, max_tokens, out, against, threads, device, act_terms, allow_unverified, as_json):
    """Record how often each MoE layer routes to each expert over a text."""
    from runtime import experts as X
    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        click.echo(f"error: {text_file}: cannot read the text ({getattr(e, 'strerror', None) or e})", err=True)
        sys.exit(2)
    model = load_model(folder, device, threads, ctx, allow_unverified, act_terms, gpu_memory=0)
    import torch
    import runtime.api as api
    from runtime.model import MoE

    layers = {i: b.ffn.experts for i, b in enumerate(model.net.layers) if isinstance(b.ffn, MoE)}
    if not layers:
        _fail(folder, "the model has no MoE layer to profile")
    routers = X.router_checksums(model.folder)
    reference = None
    if against is not None:
        try:
            reference = X.RoutingProfile.load(against, next(iter(layers.values())).n_experts, routers)
        except X.ProfileError as e:
            _fail(folder, str(e))
    tokens = api.encode(model, text)[:max_tokens]
    if len(tokens) < 2:
        _fail(folder, f"{text_file}: {len(tokens)} token(s); a profile needs at least 2")

    def run() -> int:
        for a in range(0, len(tokens), ctx):
            model.net.prefill(torch.tensor(tokens[a:a + ctx]), 0, 0, all_logits=False)
        return len(tokens)

    profile = X.record_profile(layers, run, text_file.name, routers)
    out = out if out is not None else (None if against is not None else Path(folder) / X.PROFILE_NAME)
    if out is not None:
        try:
            profile.save(out)
        except OSError as e:
            click.echo(f"error: {out}: cannot write the profile ({e.strerror or e})", err=True)
            sys.exit(2)
    result = {"model": str(folder), "file": str(text_file), "tokens": len(tokens), "out": str(out) if out else None,
              "layers": len(layers), "experts": next(iter(layers.values())).n_experts}
    if reference is not None:
        per_expert = {i: le.per_expert for i, le in layers.items()}
        result["against"] = str(against)
        result["hit_rates"] = X.compare_placements(per_expert, result["experts"], profile.counts, reference.counts)
    if as_json:
        click.echo(json.dumps(result))
        return
    written = f"; profile written to {out}" if out else ""
    click.echo(f"{len(tokens)} tokens through {len(layers)} MoE layers{written}")
    for r in result.get("hit_rates", []):
        click.echo(f"GPU holds {r['share']:4.0%} of the expert bytes: served from it, placed by {against.name} "
                   f"{r['profile']:6.1%}, by whole layers {r['whole_layers']:6.1%}")


if __name__ == "__main__":
    main()
