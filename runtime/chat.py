"""Chat with a merged model in the terminal, or answer one prompt (`--prompt`, for scripts and CI).

    python -m runtime.chat                                   # out/tiny-deepseek-v3, interactive
    python -m runtime.chat --model /data/dsv3 --prompt "Explain paging." --temperature 0 --max-new-tokens 64

Interactive commands: `/exit` (or Ctrl-D) leaves, `/reset` starts a new conversation (same system prompt).
Ctrl-C during a reply stops that reply and keeps the session.

How a turn is fed: the conversation is rendered with the tokenizer's chat template (`apply_chat_template`,
add_generation_prompt), and only the part of it the KV cache does not hold yet is tokenized and prefilled. That is
valid only when the text the cache holds (its tokens, decoded) is a prefix of the new rendering, which is checked
every turn: templates that rewrite earlier turns (R1's drops the reasoning of earlier replies, for instance) fail
the check, and the whole conversation is then prefilled again from an empty cache.

The cache always holds exactly `Chat.cached` (positions 0 .. model.pos - 1). Ctrl-C keeps what was generated: the
partial reply joins the conversation as the assistant's message and its tokens stay in the cache; a Ctrl-C before
the first token of a reply undoes the whole turn (the user message is dropped, the cache rewound to before it).

After each reply a line of statistics goes to stderr (dimmed on a terminal): prompt tokens prefilled and their
rate, tokens generated and the decode rate. Errors (a folder that cannot be served, a prompt longer than the
context, an unknown device) are one line on stderr, exit status 2.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

ROOT = Path(__file__).resolve().parent.parent
ACT_TERMS_HELP = ("GPU FP8 linears: activations as 2 e4m3 terms (x and its remainder, ~7 bits) or 1 "
                  "(DeepSeek's scheme, 3 bits; faster prefill).")
DEFAULT_MODEL = ROOT / "out" / "tiny-deepseek-v3"
GPU_MEMORY_HELP = ("GiB of GPU memory the model may take in all: weights, KV cache, buffers, and the routed experts "
                   "that fill the rest (default: all that is free).")


class ContextFull(Exception):
    """The turn's prompt does not fit the context that is left."""


class TextStream:
    """Token ids in, text out as it becomes printable: a multi-byte character split over several byte-level tokens
    comes out whole once its last byte has arrived (never as U+FFFD halves). Decodes a short window only."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0          # ids[prefix:read] is printed context; ids[read:] is not printed yet

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Whatever is held back (bytes that never completed a character come out as U+FFFD)."""
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]


@dataclass
class Turn:
    text: str                # the reply as shown (special tokens skipped)
    tokens: list[int]        # generated tokens (an EOS included if one came)
    prompt_tokens: int       # tokens prefilled for this turn
    prompt_s: float          # prefill time (to the first token)
    decode_s: float          # first token to last
    interrupted: bool = False
    reprefilled: bool = False     # the cache could not be reused: the whole conversation was prefilled
    context_full: bool = False    # the reply stopped because the context is full

    def stats(self) -> str:
        pp = self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else float("nan")
        n = len(self.tokens)
        tg = (n - 1) / self.decode_s if n > 1 and self.decode_s > 0 else float("nan")
        notes = [w for w, on in (("interrupted", self.interrupted), ("re-prefilled", self.reprefilled),
                                 ("context full", self.context_full)) if on]
        return (f"[prompt: {self.prompt_tokens} tokens, {pp:.1f} tok/s | decode: {n} tokens, {tg:.1f} tok/s"
                + (f" | {', '.join(notes)}" if notes else "") + "]")


class Chat:
    """A conversation over one loaded model (runtime.api.Model), whose KV cache it owns."""

    def __init__(self, model, system: str | None = None, max_new_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None):
        self.model, self.system = model, system
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.tok = model.tokenizer
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cached: list[int] = []          # the tokens in the KV cache, positions 0 .. model.pos - 1
        self.model.reset()

    def render(self, messages: list[dict] | None = None) -> str:
        return self.tok.apply_chat_template(self.messages if messages is None else messages, tokenize=False,
                                            add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]   # the template writes BOS itself

    def cached_text(self) -> str:
        return self.tok.decode(self.cached, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def plan(self, messages: list[dict]) -> tuple[list[int], bool]:
        """(tokens to feed, whether the cache must be dropped first) to bring the cache up to `messages`' rendering."""
        text = self.render(messages)
        held = self.cached_text() if self.cached else ""
        if self.cached and text.startswith(held):
            return self.encode(text[len(held):]), False
        return self.encode(text), bool(self.cached)

    def say(self, user: str, emit: Callable[[str], None] = lambda s: None) -> Turn:
        """One turn: the reply streamed through emit(text piece). Raises ContextFull (the turn undone) when the
        prompt does not fit; on KeyboardInterrupt returns the partial reply (see the module docstring)."""
        from runtime.api import generate
        m = self.model
        messages = self.messages + [{"role": "user", "content": user}]
        new, drop = self.plan(messages)
        base = [] if drop else self.cached           # what the cache will hold below the new tokens
        room = m.net.max_len - len(base) - len(new)
        if room < 1:
            first = len(self.messages) == (1 if self.system else 0)
            raise ContextFull(f"{'the prompt' if first else 'the conversation'} is {len(base) + len(new)} tokens, "
                              f"the context is {m.net.max_len} (--ctx)"
                              + ("" if first else "; /reset to start over"))
        if drop:
            m.reset()
        self.messages = messages
        stream, gen = TextStream(self.tok), []
        n_max = min(self.max_new_tokens, room)
        t0 = time.perf_counter()
        t_first = t_last = None
        interrupted = False
        try:
            for token in generate(m, new, max_new_tokens=n_max, temperature=self.temperature, top_p=self.top_p,
                                  seed=self.seed):
                t_last = time.perf_counter()
                t_first = t_first or t_last
                gen.append(token)
                if token != m.eos_id:
                    emit(stream.push(token))
            emit(stream.flush())
        except KeyboardInterrupt:
            interrupted = True
        # generate feeds each token it yields when asked for the next one (not an EOS, nor one after which we
        # stopped asking); a forward cut short never moved model.pos, and what it wrote past model.pos is
        # overwritten before it is ever read
        self.cached = (base + new + gen)[:m.pos]
        if interrupted and not gen:
            self.messages = messages[:-1]            # no reply: undo the turn
            self.cached = self.cached[:len(base)]
            m.pos = len(self.cached)
        else:
            reply = [t for t in gen if t != m.eos_id]
            self.messages.append({"role": "assistant", "content": self.tok.decode(
                reply, skip_special_tokens=True, clean_up_tokenization_spaces=False)})
        end = time.perf_counter()
        return Turn(self.messages[-1]["content"] if gen else "", gen, len(new),
                    (t_first or end) - t0, (t_last or end) - (t_first or end), interrupted, drop,
                    context_full=not interrupted and len(gen) == n_max < self.max_new_tokens
                    and gen[-1] != m.eos_id)


# ------------------------------------------------------------------------------------------------------------- CLI

def _fail(folder, message: str) -> None:
    message = " ".join(str(message).split())            # one line, whatever the cause
    if str(folder) not in message:
        message = f"{folder}: {message}"
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _generation_defaults(folder: Path) -> dict:
    try:
        g = json.loads((folder / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    out = {k: float(g[k]) for k in ("temperature", "top_p") if isinstance(g.get(k), (int, float))}
    if g.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def load_model(folder: Path, device: str, threads: int | None, ctx: int, allow_unverified: bool, act_terms: int = 2,
               **options):
    """runtime.api.load for a CLI: quiet transformers (imported only once the folder opened), threads for torch too;
    any failure is one line, exit 2."""
    import os
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")   # its tokenizer-class notice is not for chat users
    import torch
    import runtime.api as api
    from runtime.load import ModelError
    if threads:
        torch.set_num_threads(threads)
    try:
        return api.load(folder, device=device, threads=threads, max_len=ctx, allow_unverified=allow_unverified,
                        act_terms=act_terms, **options)
    except ModelError as e:
        _fail(folder, str(e))
    except (OSError, ValueError, KeyError, TypeError) as e:  # a folder that is not what its files claim
        _fail(folder, f"cannot load the model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


class _Style:
    def __init__(self):
        self.tty = sys.stderr.isatty()

    def dim(self, s: str) -> str:
        return f"\033[2m{s}\033[0m" if self.tty else s


def _emit(piece: str) -> None:
    if piece:
        sys.stdout.write(piece)
        sys.stdout.flush()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "folder", type=click.Path(path_type=Path), default=DEFAULT_MODEL, show_default=True,
              help="A merged model folder (docs/FORMAT.md).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--act-terms", type=click.IntRange(1, 2), default=2, show_default=True, help=ACT_TERMS_HELP)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: physical cores).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=None,
              help="0 = greedy. Default: generation_config.json's, else 1.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Nucleus sampling mass. Default: generation_config.json's, else 1.")
@click.option("--seed", type=int, default=None, help="Sampling seed (reproducible sampled replies).")
@click.option("--system", default=None, help="System prompt.")
@click.option("--prompt", default=None, help="Answer this one prompt and exit.")
@click.option("--allow-unverified", is_flag=True, help="Serve a folder whose manifest.json says verified: false.")
@click.option("--ctx", type=click.IntRange(min=2), default=4096, show_default=True, help="Context length (tokens).")
@click.option("--gpu-memory", type=click.FloatRange(min=0), default=None, help=GPU_MEMORY_HELP)
def main(folder, device, act_terms, threads, max_new_tokens, temperature, top_p, seed, system, prompt,
         allow_unverified, ctx, gpu_memory):
    """Chat with a merged DeepSeek-V3 model (interactive; /exit, /reset; Ctrl-C stops a reply)."""
    model = load_model(folder, device, threads, ctx, allow_unverified, act_terms, gpu_memory=gpu_memory)
    defaults = _generation_defaults(folder)
    temperature = defaults.get("temperature", 1.0) if temperature is None else temperature
    top_p = defaults.get("top_p", 1.0) if top_p is None else top_p
    chat = Chat(model, system, max_new_tokens, temperature, top_p, seed)
    style = _Style()

    def turn(text: str) -> Turn:
        t = chat.say(text, _emit)
        sys.stdout.write("\n")
        sys.stdout.flush()
        click.echo(style.dim(t.stats()), err=True)
        return t

    if prompt is not None:
        try:
            turn(prompt)
        except ContextFull as e:
            _fail(folder, str(e))
        return

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    click.echo(style.dim(f"{folder} | temperature {temperature:g}, top-p {top_p:g}, context {ctx} | "
                         "/exit, /reset; Ctrl-C stops a reply"), err=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            sys.stdout.write("\n")
            return
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            click.echo(style.dim("(/exit or Ctrl-D to leave)"), err=True)
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            chat.reset()
            click.echo(style.dim("(new conversation)"), err=True)
            continue
        try:
            turn(line)
        except ContextFull as e:
            click.echo(f"error: {folder}: {e}", err=True)
        except KeyboardInterrupt:                    # outside the reply itself (say() handles that)
            sys.stdout.write("\n")


if __name__ == "__main__":
    main()
