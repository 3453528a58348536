"""Chat with a merged model in the terminal, or answer one prompt (`--prompt`, for scripts and CI).

    python -m runtime.chat                                   # out/tiny-deepseek-v3, interactive
    python -m runtime.chat --model /data/dsv3 --prompt "Explain paging." --temperature 0 --max-new-tokens 64

Interactive commands: `/exit` (or Ctrl-D) leaves, `/reset` starts a new conversation (same system prompt).
Ctrl-C during a reply stops that reply and keeps the session.

How a turn is fed: the conversation is rendered with the tokenizer's chat template (add_generation_prompt), and
only the part of it that the conversation's tokens so far do not cover is tokenized; the engine (runtime.engine)
then prefills only what its cache does not hold. That is valid only when the text of the tokens so far is a prefix
of the new rendering, which is checked every turn: templates that rewrite earlier turns (R1's drops the reasoning of
earlier replies, for instance) fail the check, and the whole conversation is tokenized again (the engine still
reuses whatever prefix of those tokens it holds).

`Chat.cached` is the conversation's tokens in the engine's cache. Ctrl-C keeps what was generated: the partial reply
joins the conversation as the assistant's message and its tokens stay in the cache; a Ctrl-C before the first token
of a reply undoes the whole turn (the user message is dropped). A line that is not valid text (bytes that are not
UTF-8) is refused with one line on stderr; the session goes on.

After each reply a line of statistics goes to stderr (dimmed on a terminal): prompt tokens prefilled and their
rate, tokens generated and the decode rate. Errors (a folder that cannot be served, a prompt longer than the
context, an unknown device) are one line on stderr, exit status 2.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

from runtime.engine import (DEFAULT_MODEL, Engine, RequestError, Sampling, TextStream,  # noqa: F401 (re-exported)
                            check_text, generation_defaults)

ACT_TERMS_HELP = ("GPU FP8 linears: activations as 2 e4m3 terms (x and its remainder, ~7 bits) or 1 "
                  "(DeepSeek's scheme, 3 bits; faster prefill).")
GPU_MEMORY_HELP = ("GiB of GPU memory the model may take in all: weights, KV cache, buffers, and the routed experts "
                   "that fill the rest (default: all that is free).")


class ContextFull(Exception):
    """The turn's prompt does not fit the context that is left."""


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
    cached_tokens: int = 0        # prompt tokens found in the cache (not prefilled)

    def stats(self) -> str:
        pp = self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else float("nan")
        n = len(self.tokens)
        tg = (n - 1) / self.decode_s if n > 1 and self.decode_s > 0 else float("nan")
        notes = [w for w, on in (("interrupted", self.interrupted), ("re-prefilled", self.reprefilled),
                                 ("context full", self.context_full)) if on]
        return (f"[prompt: {self.prompt_tokens} tokens, {pp:.1f} tok/s | decode: {n} tokens, {tg:.1f} tok/s"
                + (f" | {', '.join(notes)}" if notes else "") + "]")


class Chat:
    """A conversation over one loaded model (runtime.api.Model, or an Engine over one), through the engine."""

    def __init__(self, model, system: str | None = None, max_new_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None):
        self.engine = model if isinstance(model, Engine) else Engine(model)
        self.model, self.system = self.engine.model, system
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.tok = self.model.tokenizer
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cached: list[int] = []          # this conversation's tokens in the engine's cache (prompt + reply)

    def render(self, messages: list[dict] | None = None) -> str:
        return self.engine.render(self.messages if messages is None else messages)

    def encode(self, text: str) -> list[int]:
        return self.engine.encode(text)

    def cached_text(self) -> str:
        return self.tok.decode(self.cached, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def plan(self, messages: list[dict]) -> tuple[list[int], bool]:
        """(tokens to add after the cached ones, whether those cannot be kept) to bring the conversation up to
        `messages`' rendering. Only the new text is tokenized, so the reply's tokens stay as generated."""
        text = self.render(messages)
        held = self.cached_text() if self.cached else ""
        if self.cached and text.startswith(held):
            return self.encode(text[len(held):]), False
        return self.encode(text), bool(self.cached)

    def say(self, user: str, emit: Callable[[str], None] = lambda s: None) -> Turn:
        """One turn: the reply streamed through emit(text piece). Raises ContextFull (the turn undone) when the
        prompt does not fit, RequestError for text that is not valid UTF-8; on KeyboardInterrupt returns the
        partial reply (see the module docstring)."""
        check_text(user, "the message")
        eos, max_len = self.model.eos_id, self.model.net.max_len
        messages = self.messages + [{"role": "user", "content": user}]
        new, drop = self.plan(messages)
        base = [] if drop else self.cached           # what the cache holds below the new tokens
        room = max_len - len(base) - len(new)
        if room < 1:
            first = len(self.messages) == (1 if self.system else 0)
            raise ContextFull(f"{'the prompt' if first else 'the conversation'} is {len(base) + len(new)} tokens, "
                              f"the context is {max_len} (--ctx)"
                              + ("" if first else "; /reset to start over"))
        self.messages = messages
        n_max = min(self.max_new_tokens, room)
        t0 = time.perf_counter()
        seq = self.engine.submit(base + new, Sampling(n_max, self.temperature, self.top_p, self.seed))
        gen: list[int] = []
        interrupted = False
        try:
            for ev in self.engine.run_sync(seq):
                gen += ev.tokens
                if ev.content or (ev.tokens and ev.tokens[-1] != eos):
                    emit(ev.content)
        except KeyboardInterrupt:
            interrupted = True
        # a token is fed at the decode step after the one that sampled it: the last one never is (nor an EOS);
        # a step cut short changed nothing (the slot's tokens move only after a model call returns)
        self.cached = seq.cache_tokens()
        if interrupted and not gen:
            self.messages = messages[:-1]            # no reply: undo the turn
            self.cached = list(base)
        else:
            reply = [t for t in gen if t != eos]
            self.messages.append({"role": "assistant", "content": self.tok.decode(
                reply, skip_special_tokens=True, clean_up_tokenization_spaces=False)})
        end = time.perf_counter()
        t_first, t_last = seq.t_first or end, seq.t_last or end
        return Turn(self.messages[-1]["content"] if gen else "", gen, len(seq.prompt) - seq.cached,
                    t_first - t0, t_last - t_first, interrupted, drop,
                    context_full=not interrupted and len(gen) == n_max < self.max_new_tokens and gen[-1] != eos,
                    cached_tokens=seq.cached)


# ------------------------------------------------------------------------------------------------------------- CLI

def _fail(folder, message: str) -> None:
    message = " ".join(str(message).split())            # one line, whatever the cause
    if str(folder) not in message:
        message = f"{folder}: {message}"
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def load_model(folder: Path, device: str, threads: int | None, ctx: int, allow_unverified: bool, act_terms: int = 2,
               **options):
    """runtime.engine.load_model for a CLI (`options`: slots, chunk, gpu_memory); any failure is one line, exit 2."""
    from runtime.engine import ModelError, load_model as load
    try:
        return load(folder, device, threads, ctx, allow_unverified=allow_unverified, act_terms=act_terms, **options)
    except ModelError as e:
        _fail(folder, str(e))


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
@click.option("--chunk", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Prefill chunk (tokens a pass through attention).")
@click.option("--gpu-memory", type=click.FloatRange(min=0), default=None, help=GPU_MEMORY_HELP)
def main(folder, device, act_terms, threads, max_new_tokens, temperature, top_p, seed, system, prompt,
         allow_unverified, ctx, chunk, gpu_memory):
    """Chat with a merged DeepSeek-V3 model (interactive; /exit, /reset; Ctrl-C stops a reply)."""
    model = load_model(folder, device, threads, ctx, allow_unverified, act_terms, chunk=chunk, gpu_memory=gpu_memory)
    defaults = generation_defaults(folder)
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
        except (ContextFull, RequestError) as e:
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
        except UnicodeDecodeError as e:             # a terminal set to another encoding than stdin's
            click.echo(f"error: that line is not valid {e.encoding} text ({e.reason}); try again", err=True)
            continue
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
        except RequestError as e:                   # text that is not valid UTF-8: this line only
            click.echo(f"error: {e}; try again", err=True)
        except KeyboardInterrupt:                    # outside the reply itself (say() handles that)
            sys.stdout.write("\n")


if __name__ == "__main__":
    main()
