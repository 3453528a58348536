"""Perplexity of a merged model on a text file: one causal pass over its first --ctx tokens.

    python -m runtime.perplexity --model out/tiny-deepseek-v3 --file tests/data/prose.txt
    python -m runtime.perplexity --model DIR --file TEXT --ctx 1024 --save-logits logits.npy --json

Tokens are runtime.api.encode(model, text) (the tokenizer's input_ids, BOS first), cut to the first --ctx. The
perplexity is exp(mean negative log-likelihood) of tokens 1..n-1, each predicted from the tokens before it.
The pass is prefilled --chunk tokens at a time and scored chunk by chunk, so memory stays bounded by the KV cache
and one chunk's logits, whatever --ctx is. `--save-logits` writes the pass's float32 logits, shape (n_tokens,
vocab) (row i predicts token i + 1), as a .npy file filled chunk by chunk. Errors are one line on stderr, exit
status 2.
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import click

from runtime.chat import ACT_TERMS_HELP, DEFAULT_MODEL, GPU_MEMORY_HELP, _fail, load_model


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "folder", type=click.Path(path_type=Path), default=DEFAULT_MODEL, show_default=True,
              help="A merged model folder (docs/FORMAT.md).")
@click.option("--file", "text_file", type=click.Path(path_type=Path), required=True, help="A UTF-8 text file.")
@click.option("--ctx", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens scored (the first N).")
@click.option("--chunk", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Prefill chunk (tokens a pass).")
@click.option("--save-logits", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the logits, float32 (n_tokens, vocab), as a .npy file.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: physical cores).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--act-terms", type=click.IntRange(1, 2), default=2, show_default=True, help=ACT_TERMS_HELP)
@click.option("--gpu-memory", type=click.FloatRange(min=0), default=None, help=GPU_MEMORY_HELP)
@click.option("--allow-unverified", is_flag=True, help="Serve a folder whose manifest.json says verified: false.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout instead of the text line.")
def main(folder, text_file, ctx, chunk, save_logits, threads, device, act_terms, gpu_memory, allow_unverified,
         as_json):
    """Perplexity of a merged model on the first --ctx tokens of a text file."""
    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        click.echo(f"error: {text_file}: cannot read the text ({getattr(e, 'strerror', None) or e})", err=True)
        sys.exit(2)
    model = load_model(folder, device, threads, ctx, allow_unverified, act_terms, chunk=chunk, gpu_memory=gpu_memory)

    import numpy as np
    import torch
    import runtime.api as api

    all_tokens = api.encode(model, text)
    tokens = all_tokens[:ctx]
    if len(tokens) < 2:
        _fail(folder, f"{text_file}: {len(tokens)} token(s); perplexity needs at least 2")
    out = None
    if save_logits is not None:
        try:
            out = np.lib.format.open_memmap(save_logits, "w+", np.float32, (len(tokens), model.net.a.vocab))
        except OSError as e:
            click.echo(f"error: {save_logits}: cannot write the logits ({e.strerror or e})", err=True)
            sys.exit(2)
    start = time.perf_counter()
    nll_sum, ids = 0.0, torch.tensor(tokens)
    model.reset()
    for p0, logits in model.net.prefill_chunks(ids, 0, 0, all_logits=True):
        target = ids[p0 + 1:p0 + 1 + len(logits)]              # the last row of the pass predicts nothing
        nll_sum += float(torch.nn.functional.cross_entropy(logits[:len(target)].double(), target, reduction="sum"))
        if out is not None:
            out[p0:p0 + len(logits)] = logits.numpy()
    seconds = time.perf_counter() - start
    model.pos = len(tokens)
    if out is not None:
        out.flush()
        del out
    nll = nll_sum / (len(tokens) - 1)

    result = {"model": str(folder), "file": str(text_file), "tokens": len(tokens), "predicted": len(tokens) - 1,
              "file_tokens": len(all_tokens), "ctx": ctx, "nll": nll,
              "perplexity": math.exp(nll) if nll < 700 else float("inf"),
              "seconds": seconds, "tokens_per_s": len(tokens) / seconds if seconds > 0 else None,
              "logits": str(save_logits) if save_logits is not None else None,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if as_json:
        click.echo(json.dumps(result))
    else:
        cut = f" (first {len(tokens)} of {len(all_tokens)})" if len(all_tokens) > len(tokens) else ""
        click.echo(f"perplexity {result['perplexity']:.4f} over {len(tokens) - 1} predicted tokens{cut} | "
                   f"{result['tokens_per_s']:.1f} tok/s ({seconds:.2f} s)")


if __name__ == "__main__":
    main()
