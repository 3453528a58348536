"""The serving engine: many sequences over one loaded model. No CLI, no HTTP: runtime.chat and runtime.serve are its
front ends.

    engine = Engine(load_model(folder, slots=4), max_batch=4)
    seq = engine.submit(engine.encode(engine.render(messages)), Sampling(max_tokens=64, temperature=0))
    for event in engine.run_sync(seq): print(event.content, end="")        # or engine.start() + on_event callbacks

Sequences and slots. The model holds `slots` KV caches of max_len positions each (runtime.model.Transformer); a
sequence runs in one slot from admission to its end. At most `max_batch` sequences run at once; more wait in a queue
of `max_queue` (QueueFull past that).

One scheduling step (`step`): admit waiting sequences into free slots; prefill ONE chunk (the model's `chunk`
tokens) of the oldest sequence still prefilling, or all of its prompt if no other sequence is decoding; then one
batched decode step of every sequence that is decoding (net.decode: row b is sequence b's last token at its own
position in its own slot). A long prompt therefore delays the others' next token by one chunk's prefill at most,
and all decoding sequences share each step's weight reads.

Prefix cache. A finished sequence's slot keeps its tokens (the KV entries stay valid). A new sequence takes a free
slot that its prompt extends (at least half of the slot's tokens are the prompt's prefix: a conversation's next
turn), else the least recently used free slot; it copies a longer prefix from any slot (net.copy_prefix), and
prefills only the rest. Reuse is by tokens, never by text: a prompt is always the same tokens whatever the cache
holds, so a reply does not depend on which requests came before (up to float rounding of a chunked prefill, ~1e-5).
Memory is bounded by the slots; a slot's cache is overwritten only when the slot is taken again.

Replies. Token ids become text through TextStream (a character split over byte-level tokens comes out whole), then
stop strings (text that may begin one is held back until it cannot), then, for chat, the markup parser: R1's
<think>...</think> as reasoning (also when the chat template opened the reply with <think>), and DeepSeek-V3's tool
call markup (calls-begin, then per call: call-begin, type, tool-sep, name, newline, a json fence, call-end;
calls-end; DeepSeek-V3.1's `name<sep>arguments` is read too) as tool calls, each emitted once it is complete.
"""
from __future__ import annotations

import itertools
import json
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from runtime.api import Model, sample
from runtime.load import ModelError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "out" / "tiny-deepseek-v3"

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
MARKUP = (THINK_OPEN, THINK_CLOSE, CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, TOOL_SEP,
          "<｜tool▁outputs▁begin｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁outputs▁end｜>")
MAX_TOP_LOGPROBS = 20


class RequestError(ValueError):
    """A request this engine cannot run as asked: an error for that request only (HTTP 400 in runtime.serve)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class QueueFull(RuntimeError):
    """Every slot is busy and the wait queue is full (HTTP 429)."""


def check_text(text: str, what: str) -> str:
    """Text must be valid Unicode that UTF-8 can carry: a lone surrogate (what undecodable bytes become under
    Python's surrogateescape, or a JSON "\\udc80") is refused for this request."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{what} is not valid UTF-8 (at character {e.start})", param=what) from None
    return text


# ------------------------------------------------------------------------------------------------------- loading

def load_model(folder, device: str = "auto", threads: int | None = None, ctx: int = 4096, slots: int = 1,
               allow_unverified: bool = False, act_terms: int = 2, chunk: int = 2048, **options) -> Model:
    """runtime.api.load with transformers quiet and torch's threads set (`options`: api.load's others, such as
    gpu_memory); every failure is a ModelError of one line that names the folder."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")   # its tokenizer-class notice is not for users
    import runtime.api as api
    if threads:
        torch.set_num_threads(threads)
    try:
        return api.load(folder, device=device, threads=threads, max_len=ctx, allow_unverified=allow_unverified,
                        act_terms=act_terms, slots=slots, chunk=chunk, **options)
    except ModelError as e:
        message = " ".join(str(e).split())
    except (OSError, ValueError, KeyError, TypeError) as e:  # a folder that is not what its files claim
        message = f"cannot load the model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    raise ModelError(message if str(folder) in message else f"{folder}: {message}")


def generation_defaults(folder: Path) -> dict:
    """temperature and top_p from the folder's generation_config.json (do_sample false: greedy)."""
    try:
        g = json.loads((Path(folder) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    out = {k: float(g[k]) for k in ("temperature", "top_p") if isinstance(g.get(k), (int, float))}
    if g.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


# -------------------------------------------------------------------------------------------------------- text out

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


def _held_tail(text: str, marks) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `marks` (it may still become one)."""
    best = 0
    for m in marks:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


class StopStrings:
    """Cuts the text at the first stop string; text that may be the start of one is held back until it is not."""

    def __init__(self, stop):
        self.stop, self.held, self.hit = tuple(s for s in stop if s), "", False

    def push(self, text: str) -> str:
        if self.hit:
            return ""
        text = self.held + text
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, self.held = True, ""
            return text[:cut]
        keep = _held_tail(text, self.stop)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        text, self.held = self.held, ""
        return "" if self.hit else text


def parse_tool_call(body: str) -> dict | None:
    """One call's text between call-begin and call-end: DeepSeek-V3's `TYPE<sep>NAME\\n```json\\nARGS\\n```` or
    V3.1's `NAME<sep>ARGS`. Returns an OpenAI tool call (arguments as the model wrote them), None if malformed."""
    if TOOL_SEP not in body:
        return None
    left, right = body.split(TOOL_SEP, 1)
    if "```" in right:                                    # V3: type, then name and a fenced block
        name, _, rest = right.partition("\n")
        args = rest.strip()
        if not args.startswith("```"):
            return None
        args = args[3:]
        args = args[4:] if args.startswith("json") else args
        if not args.rstrip().endswith("```"):
            return None
        typ, name, args = left.strip() or "function", name.strip(), args.rstrip()[:-3].strip()
    else:                                                 # V3.1: name, then the bare arguments
        typ, name, args = "function", left.strip(), right.strip()
    if not name:
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": typ,
            "function": {"name": name, "arguments": args}}


class ReplyParser:
    """A chat reply's text in pieces -> (content, reasoning, finished tool calls). `reasoning`: the reply starts
    inside <think> (the template opened it). `tools`: read tool-call markup (else it stays content). Markup that
    never completes (a malformed call, calls cut by max_tokens) comes out as content at the end: never lost."""

    def __init__(self, reasoning: bool = False, tools: bool = False):
        self.state = "reasoning" if reasoning else "start"      # start, reasoning, content, tools
        self.tools = tools
        self.buf = ""                    # text not given out yet (it may begin a marker)
        self.calls_text = ""             # after calls-begin, not parsed into calls yet
        self.calls: list[dict] = []

    def _markers(self) -> tuple[str, ...]:
        if self.state == "reasoning":
            return (THINK_CLOSE,)
        return ((CALLS_BEGIN,) if self.tools else ()) + ((THINK_OPEN,) if self.state == "start" else ())

    def push(self, text: str, final: bool = False) -> tuple[str, str, list[dict]]:
        content, reasoning, calls = [], [], []
        self.buf += text
        while True:
            if self.state == "tools":
                self.calls_text += self.buf
                self.buf = ""
                calls += self._take_calls()
                if self.state == "tools":
                    break
                continue                                    # calls-end: what follows is content again
            if self.state == "start":
                head = self.buf.lstrip()
                if head.startswith(THINK_OPEN):
                    self.state, self.buf = "reasoning", head[len(THINK_OPEN):]
                    continue
                if not final and (not head or THINK_OPEN.startswith(head)):
                    break                                   # may still become <think>
                self.state = "content"
            marks = self._markers()
            out = reasoning if self.state == "reasoning" else content
            hits = [(self.buf.find(m), m) for m in marks if m in self.buf]
            if hits:
                i, m = min(hits)
                out.append(self.buf[:i])
                self.buf = self.buf[i + len(m):]
                self.state = "tools" if m == CALLS_BEGIN else "content"
                continue
            keep = 0 if final else _held_tail(self.buf, marks)
            out.append(self.buf[:len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
            break
        if final and self.state == "tools" and self.calls_text.strip():
            content.append(("" if self.calls else CALLS_BEGIN) + self.calls_text)
            self.calls_text = ""
        self.calls += calls
        return "".join(content), "".join(reasoning), calls

    def _take_calls(self) -> list[dict]:
        out = []
        while True:
            t = self.calls_text.lstrip()
            if t.startswith(CALLS_END):
                self.calls_text, self.buf, self.state = "", t[len(CALLS_END):], "content"
                break
            if not (t.startswith(CALL_BEGIN) and CALL_END in t):
                break
            body, rest = t[len(CALL_BEGIN):].split(CALL_END, 1)
            call = parse_tool_call(body)
            if call is None:
                break                                       # stays text; given back as content at the end
            out.append(call)
            self.calls_text = rest
        return out


class Detokenizer:
    """One reply's generated tokens -> Events, as the engine gives them out: text through TextStream (special
    tokens other than the tool/think markup hidden), cut at stop strings, then (chat) split by ReplyParser."""

    def __init__(self, tokenizer, hidden: set[int], stop=(), chat: bool = False, reasoning: bool = False,
                 tools: bool = False):
        self.stream, self.hidden = TextStream(tokenizer, skip_special_tokens=False), hidden
        self.stops = StopStrings(stop)
        self.parser = ReplyParser(reasoning, tools) if chat else None

    @property
    def stopped(self) -> bool:
        return self.stops.hit

    @property
    def calls(self) -> list[dict]:
        return self.parser.calls if self.parser else []

    def push(self, token: int, ev: Event | None = None) -> Event:
        ev = ev or Event()
        piece = "" if token in self.hidden else self.stream.push(token)
        return self._route(self.stops.push(piece), ev, final=False)

    def finish(self, ev: Event | None = None) -> Event:
        ev = ev or Event()
        text = self.stops.push(self.stream.flush())
        return self._route(text + self.stops.flush(), ev, final=True)

    def _route(self, text: str, ev: Event, final: bool) -> Event:
        if self.parser is None:
            ev.content += text
            return ev
        content, reasoning, calls = self.parser.push(text, final)
        ev.content += content
        ev.reasoning += reasoning
        ev.tool_calls += calls
        return ev


# -------------------------------------------------------------------------------------------------------- requests

@dataclass
class Sampling:
    max_tokens: int | None = None          # None: until the context is full
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    def check(self) -> "Sampling":
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RequestError("max_tokens must be at least 1", "max_tokens")
        if not self.temperature >= 0:
            raise RequestError("temperature must be at least 0", "temperature")
        if not 0 < self.top_p <= 1:
            raise RequestError("top_p must be in (0, 1]", "top_p")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "top_logprobs")
        if len(self.stop) > 4:
            raise RequestError("at most 4 stop sequences", "stop")
        for s in self.stop:
            check_text(s, "stop")
        return self


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What a sequence gives out after a step: text pieces, finished tool calls, the tokens' log-probabilities;
    `finish_reason` on its last event ("stop", "length", "tool_calls", "cancelled" or "error")."""
    content: str = ""
    reasoning: str = ""
    tool_calls: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


_ids = itertools.count()


class Sequence:
    def __init__(self, prompt: list[int], sampling: Sampling, on_event: Callable[[Event], None] | None,
                 text: Detokenizer):
        self.id = next(_ids)
        self.prompt, self.sampling, self.on_event, self.text = prompt, sampling, on_event, text
        self.events: deque[Event] = deque()               # when there is no on_event: read by run_sync
        self.gen = torch.Generator().manual_seed(
            sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        self.slot: int | None = None
        self.done = 0                     # prompt tokens in the cache (reused or prefilled)
        self.cached = 0                   # of which reused from the prefix cache
        self.tokens: list[int] = []       # generated
        self.fed = 0                      # generated tokens in the cache
        self.next: int | None = None      # the last generated token, to feed at the next decode step
        self.max_new = 0
        self.finish_reason: str | None = None
        self.cancelled = False
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_last: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cache_tokens(self) -> list[int]:
        """The tokens this sequence has put in its slot's cache so far (prompt, then fed generated tokens)."""
        return self.prompt[:self.done] + self.tokens[:self.fed]


@dataclass
class Slot:
    index: int
    tokens: list[int] = field(default_factory=list)      # whose KV entries the slot's cache holds, from position 0
    seq: Sequence | None = None
    used: int = 0                                        # LRU clock at its last release


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


# ---------------------------------------------------------------------------------------------------------- engine

class Engine:
    def __init__(self, model: Model, max_batch: int | None = None, max_queue: int = 64,
                 chat_template: str | None = None):
        self.model, self.net, self.tok = model, model.net, model.tokenizer
        self.max_batch = min(max_batch or self.net.slots, self.net.slots)
        self.max_queue = max_queue
        self.chat_template = chat_template
        self.slots = [Slot(i) for i in range(self.net.slots)]
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self.lock = threading.Condition()
        self.clock = 0
        self.thread: threading.Thread | None = None
        self.closing = False
        self.stats = dict(requests=0, rejected=0, prompt_tokens=0, cached_tokens=0, generated_tokens=0,
                          prefill_chunks=0, decode_steps=0, decode_rows=0, finished=0, cancelled=0, errors=0,
                          prefill_s=0.0, decode_s=0.0, prefill_chunk_max_s=0.0)
        specials = set(getattr(self.tok, "all_special_ids", []))
        markup = {self.tok.convert_tokens_to_ids(m) for m in MARKUP} - {None, self.tok.unk_token_id}
        self.hidden = specials - markup                  # BOS, EOS, pad...: never part of a reply's text
        self.eos = model.eos_id
        self.added = set(getattr(self.tok, "added_tokens_encoder", {}).values())

    # ----------------------------------------------------------------------------------------------- prompts

    def render(self, messages: list[dict], tools: list[dict] | None = None, **template_kwargs) -> str:
        """The chat template's text for `messages` with the generation prompt. Tool definitions go to the template
        as `tools`; a template that never reads `tools` (DeepSeek-V3's and R1's own render calls and results, not
        definitions) gets them in the system prompt instead, in DeepSeek's "## Tools" form."""
        template = self.chat_template or getattr(self.tok, "chat_template", None)
        if not template:
            raise RequestError("this model's tokenizer has no chat template")
        if tools and not _reads(template, "tools"):
            messages = _with_tool_system_prompt(messages, tools)
        try:
            return self.tok.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                add_generation_prompt=True, chat_template=template,
                                                **template_kwargs)
        except Exception as e:                     # jinja's TemplateError, or a TypeError inside the template
            raise RequestError(f"the chat template cannot render these messages ({type(e).__name__}: "
                               f"{' '.join(str(e).split())})", "messages") from None

    def encode(self, text: str) -> list[int]:
        """Template text -> tokens (the template writes BOS itself)."""
        return self.tok(check_text(text, "prompt"), add_special_tokens=False)["input_ids"]

    def encode_prompt(self, text: str) -> list[int]:
        """A plain completion prompt -> tokens, BOS first."""
        from runtime.api import encode
        return encode(self.model, check_text(text, "prompt"))

    # ------------------------------------------------------------------------------------------------- submit

    def submit(self, prompt: list[int], sampling: Sampling, on_event: Callable[[Event], None] | None = None,
               chat: bool = False, reasoning: bool = False, tools: bool = False) -> Sequence:
        """Queue a sequence (thread-safe). `chat`: parse the reply (reasoning; tool calls if `tools`);
        `reasoning`: the prompt opened a <think> block. Raises RequestError (cannot fit) or QueueFull."""
        sampling.check()
        if not prompt:
            raise RequestError("the prompt is empty", "prompt")
        vocab = self.net.a.vocab
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise RequestError(f"token ids must be in [0, {vocab})", "prompt")
        room = self.net.max_len - len(prompt)
        if room < 1:
            raise RequestError(f"the prompt is {len(prompt)} tokens, the context is {self.net.max_len}",
                               "messages" if chat else "prompt", "context_length_exceeded")
        seq = Sequence(list(prompt), sampling, on_event,
                       Detokenizer(self.tok, self.hidden, sampling.stop, chat, reasoning, tools))
        seq.max_new = min(sampling.max_tokens or room, room)
        with self.lock:
            if len(self.waiting) + len(self.active) >= self.max_batch + self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"{len(self.active)} requests running and {len(self.waiting)} waiting: try again")
            self.waiting.append(seq)
            self.stats["requests"] += 1
            self.lock.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence (thread-safe): its slot is freed at the next step, keeping what its cache holds."""
        with self.lock:
            seq.cancelled = True
            self.lock.notify()

    # --------------------------------------------------------------------------------------------- scheduling

    def _place(self, seq: Sequence) -> None:
        """Give seq a free slot: one that keeps at least half of what it holds as seq's prefix (the longest such
        match), else the least recently used one; then copy a longer prefix from any other slot, busy or not. At
        least the prompt's last token is left to prefill (its logits are needed)."""
        want = seq.prompt[:-1]
        free = [s for s in self.slots if s.seq is None]
        match = {s.index: common_prefix(s.tokens, want) for s in self.slots}
        keep = [s for s in free if 2 * match[s.index] >= len(s.tokens)]
        slot = max(keep, key=lambda s: match[s.index]) if keep else min(free, key=lambda s: s.used)
        n = match[slot.index]
        src = max(self.slots, key=lambda s: match[s.index])
        if match[src.index] > n:
            n = match[src.index]
            self.net.copy_prefix(src.index, slot.index, n)
        slot.tokens = seq.prompt[:n]
        slot.seq, seq.slot = seq, slot.index
        seq.done = seq.cached = n
        self.stats["prompt_tokens"] += len(seq.prompt)
        self.stats["cached_tokens"] += n

    def _admit(self) -> None:
        with self.lock:
            while self.waiting and len(self.active) < self.max_batch:
                seq = self.waiting.popleft()
                if seq.cancelled:
                    self._finish(seq, "cancelled")
                    continue
                self._place(seq)
                self.active.append(seq)

    def _emit(self, seq: Sequence, ev: Event) -> None:
        if seq.on_event is not None:
            seq.on_event(ev)
        else:
            seq.events.append(ev)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, ev: Event | None = None) -> None:
        """End a sequence with its last event (`ev`, or a new one): the text held back, then its slot released
        (the slot's tokens stay cached)."""
        ev = ev or Event()
        if reason not in ("cancelled", "error"):
            seq.text.finish(ev)
            if seq.text.calls and reason == "stop":
                reason = "tool_calls"
        ev.finish_reason, ev.error = reason, error
        with self.lock:
            seq.finish_reason = reason
            if seq.slot is not None:
                slot = self.slots[seq.slot]
                slot.seq, slot.tokens = None, seq.cache_tokens()
                self.clock += 1
                slot.used = self.clock
            if seq in self.active:
                self.active.remove(seq)
            self.stats["cancelled" if reason == "cancelled" else "errors" if reason == "error" else "finished"] += 1
        self._emit(seq, ev)

    def _sampled(self, seq: Sequence, row: torch.Tensor) -> None:
        """Sample seq's next token from its logits row, give out what it adds, and end seq if it should."""
        s = seq.sampling
        token = sample(row, s.temperature, s.top_p, seq.gen)
        now = time.perf_counter()
        seq.t_first = seq.t_first or now
        seq.t_last = now
        seq.tokens.append(token)
        self.stats["generated_tokens"] += 1
        ev = Event(tokens=[token])
        if s.logprobs:
            lp = row.float().log_softmax(-1)
            top = lp.topk(s.top_logprobs) if s.top_logprobs else None
            ev.logprobs.append(TokenLogprob(token, float(lp[token]), [] if top is None else
                                            list(zip(top.indices.tolist(), top.values.tolist()))))
        reason = None
        if token == self.eos:
            reason = "stop"
        else:
            seq.text.push(token, ev)
            if seq.text.stopped:
                reason = "stop"
            elif len(seq.tokens) >= seq.max_new:
                reason = "length"
        if reason:
            self._finish(seq, reason, ev=ev)
        else:
            seq.next = token
            self._emit(seq, ev)

    def _claim(self) -> None:
        """The model's caches are this engine's only while no other engine has stepped on them: one that finds
        another engine used the model since forgets what its free slots held (their tokens may be overwritten)."""
        if _last_engine.get(id(self.net)) is not self:
            for slot in self.slots:
                if slot.seq is None:
                    slot.tokens = []
            _last_engine[id(self.net)] = self

    def step(self) -> bool:
        """One scheduling step (see the module docstring). Returns whether there was anything to do."""
        self._claim()
        self.step_cancelled()
        self._admit()
        if not self.active:
            return False
        pre = next((s for s in self.active if s.done < len(s.prompt)), None)
        if pre is not None:
            # with others decoding, one chunk; else all of it in one call (the model then fetches each layer's
            # routed experts once for the whole prompt, not once per chunk)
            decoding = any(s.next is not None for s in self.active)
            a = pre.done
            b = min(len(pre.prompt), a + self.net.chunk) if decoding else len(pre.prompt)
            t = time.perf_counter()
            logits = self.net.prefill(torch.tensor(pre.prompt[a:b]), a, pre.slot)
            t = time.perf_counter() - t
            self.stats["prefill_s"] += t
            self.stats["prefill_chunk_max_s"] = max(self.stats["prefill_chunk_max_s"], t)
            self.slots[pre.slot].tokens.extend(pre.prompt[a:b])
            pre.done = b
            self.stats["prefill_chunks"] += 1
            if b == len(pre.prompt):
                self._sampled(pre, logits[-1])
        batch = [s for s in self.active if s.next is not None and not s.cancelled]
        if batch:
            t = time.perf_counter()
            logits = self.net.decode(torch.tensor([s.next for s in batch]),
                                     torch.tensor([len(s.prompt) + s.fed for s in batch]),
                                     torch.tensor([s.slot for s in batch]))
            self.stats["decode_s"] += time.perf_counter() - t
            self.stats["decode_steps"] += 1
            self.stats["decode_rows"] += len(batch)
            for seq, row in zip(batch, logits):
                self.slots[seq.slot].tokens.append(seq.next)
                seq.fed += 1
                seq.next = None
                self._sampled(seq, row)
        return True

    # ------------------------------------------------------------------------------------------ two ways to run

    def run_sync(self, seq: Sequence) -> Iterator[Event]:
        """Step the engine in this thread until seq ends, yielding its events. Leaving early (an exception, a
        KeyboardInterrupt, close()) cancels it; the slot keeps what was computed before the interruption."""
        try:
            while True:
                while seq.events:
                    ev = seq.events.popleft()
                    yield ev
                    if ev.finish_reason:
                        return
                self.step()
        finally:
            if not seq.finished:
                seq.cancelled = True
                self.step_cancelled()

    def step_cancelled(self) -> None:
        """End the cancelled sequences, running or waiting."""
        with self.lock:
            for seq in [s for s in self.active if s.cancelled]:
                self._finish(seq, "cancelled")
            for seq in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(seq)
                self._finish(seq, "cancelled")

    def start(self) -> None:
        """Run the scheduler in a background thread (runtime.serve): events go to each sequence's on_event."""
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.closing = True
            self.lock.notify()
        if self.thread:
            self.thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.closing and not self.waiting and not self.active:
                    self.lock.wait()
                if self.closing:
                    return
            try:
                with torch.inference_mode():
                    self.step()
            except Exception as e:                 # a bug or a device failure: fail what runs, keep serving
                message = f"{type(e).__name__}: {' '.join(str(e).split())}"
                with self.lock:
                    for seq in list(self.active):
                        self._finish(seq, "error", message)

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for: byte-level BPE pieces mapped back through GPT-2's byte alphabet; added
        tokens (specials, markup) are their text."""
        piece = self.tok.convert_ids_to_tokens(token)
        if piece is None:
            return b""
        table = _byte_decoder()
        if token in self.added or not all(c in table for c in piece):
            return piece.encode("utf-8")
        return bytes(table[c] for c in piece)

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.stats, active=len(self.active), waiting=len(self.waiting), slots=len(self.slots),
                        max_batch=self.max_batch, cached_slots=sum(1 for s in self.slots if s.tokens and s.seq is None))


_last_engine: dict[int, Engine] = {}        # id(model.net) -> the engine that last stepped on its caches


def _reads(template: str, name: str) -> bool:
    """Whether a Jinja template reads the variable `name`."""
    import jinja2
    import jinja2.meta
    try:
        return name in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateError:
        return name in template


def _with_tool_system_prompt(messages: list[dict], tools: list[dict]) -> list[dict]:
    text = "## Tools\nYou have access to the following tools:\n"
    for t in tools:
        f = t.get("function", t)
        text += (f"\n### {f.get('name', '')}\nDescription: {f.get('description', '')}\n\n"
                 f"Parameters: {json.dumps(f.get('parameters', {}), ensure_ascii=False)}\n")
    text += (f"\nTo call tools, write: {CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}NAME\n```json\nARGUMENTS\n```"
             f"{CALL_END}{CALLS_END} (one call-begin ... call-end per call).")
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": f"{messages[0].get('content') or ''}\n\n{text}"}] + messages[1:]
    return [{"role": "system", "content": text}] + messages


_BYTE_DECODER: dict[str, int] | None = None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the other 68 for chr(256 + i)."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
        chars, n = {}, 0
        for b in range(256):
            if b in keep:
                chars[b] = chr(b)
            else:
                chars[b] = chr(256 + n)
                n += 1
        _BYTE_DECODER = {c: b for b, c in chars.items()}
    return _BYTE_DECODER
