"""An OpenAI-compatible HTTP server over runtime.engine: chat and text completions, streamed (server-sent events) or
not, tools and R1 reasoning, several users at once.

    python -m runtime.serve --model /data/dsv3 --port 8000 --api-key KEY --ctx 32768 --max-batch 4
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (never needs the key),
GET /metrics (Prometheus text: requests, tokens, prefix-cache hits, queue). Binds 127.0.0.1 unless --host says
otherwise; with --api-key every endpoint but /health needs `Authorization: Bearer KEY`.

Requests. Sampling parameters as OpenAI's (temperature and top_p default to the folder's generation_config.json);
max_tokens defaults to the context left, and is cut to it (finish_reason "length").
`usage.prompt_tokens_details.cached_tokens` counts the prompt tokens found in the prefix cache. Chat replies: R1's
reasoning (from <think>, or from the reply's start when the chat template opened the <think>, to </think>) is
`reasoning_content`, the rest `content`, as DeepSeek's API returns them; DeepSeek-V3 tool-call markup becomes
`tool_calls` when the request has tools. `chat_template_kwargs` (an extra body field) goes to the
chat template (DeepSeek-V3.1's `thinking`, for one).

Errors are OpenAI's error body with status 400 (a value this server does not support, such as n > 1; a prompt
longer than the context; text that is not valid UTF-8), 401 (key), 404, 413 (body over --max-body bytes), 429 (every
slot busy and the queue full), 500 (the model failed: the other requests go on). A client that disconnects stops
its generation and frees its slot.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import click
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from runtime.chat import GPU_MEMORY_HELP, _fail, load_model
from runtime.engine import (DEFAULT_MODEL, THINK_OPEN, Engine, Event, QueueFull, RequestError, Sampling,
                            check_text, generation_defaults)

RESERVED_TEMPLATE_ARGS = {"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                          "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                          "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
                          "messages", "bos_token", "eos_token"}
POLL_S = 0.25                      # how often a request waiting on the engine checks that its client is still there


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# ------------------------------------------------------------------------------------------------ request bodies

class Body(BaseModel):
    model_config = ConfigDict(extra="allow")         # fields of OpenAI's API this server does not read are ignored
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    user: str | None = None


class Function(BaseModel):
    name: str
    description: str | None = None
    parameters: dict | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: Function


class ChatBody(Body):
    messages: list[dict]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    chat_template_kwargs: dict | None = None


class CompletionBody(Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


def _unsupported(cond: bool, param: str, message: str) -> None:
    if cond:
        raise OpenAIError(400, message, param=param, code="unsupported_value")


def _common(body: Body, defaults: dict, max_tokens: int | None, logprobs: bool, top: int) -> Sampling:
    _unsupported(body.n != 1, "n", "only n = 1 is supported")
    _unsupported(bool(body.presence_penalty) or bool(body.frequency_penalty), "presence_penalty",
                 "presence and frequency penalties are not supported")
    _unsupported(bool(body.logit_bias), "logit_bias", "logit_bias is not supported")
    if body.temperature is not None and not 0 <= body.temperature <= 2:
        raise OpenAIError(400, "temperature must be between 0 and 2", param="temperature")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return Sampling(max_tokens=max_tokens,
                    temperature=defaults.get("temperature", 1.0) if body.temperature is None else body.temperature,
                    top_p=defaults.get("top_p", 1.0) if body.top_p is None else body.top_p,
                    seed=body.seed, stop=tuple(stop), logprobs=logprobs, top_logprobs=top)


def _text_of(content: Any, where: str) -> str | None:
    """A message's content: a string, None, or OpenAI's list of parts (text parts only)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise OpenAIError(400, f"{where}: only text content parts are supported", param=where)
            parts.append(p["text"])
        return "".join(parts)
    raise OpenAIError(400, f"{where}: content must be a string or a list of text parts", param=where)


def chat_messages(raw: list[dict]) -> list[dict]:
    """OpenAI messages -> what chat templates read (role, content; tool_calls and tool_call_id where given)."""
    if not raw:
        raise OpenAIError(400, "messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise OpenAIError(400, f"{where}: role must be system, user, assistant or tool", param=where)
        msg = {"role": "system" if role == "developer" else role, "content": _text_of(m.get("content"), where)}
        if msg["content"] is None and not (role == "assistant" and m.get("tool_calls")):
            msg["content"] = ""
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    raise OpenAIError(400, f"{where}: each tool call needs a function with a name", param=where)
                args = f.get("arguments", "{}")
                calls.append({"id": c.get("id"), "type": c.get("type", "function"),
                              "function": {"name": f["name"], "arguments": args if isinstance(args, str)
                                           else json.dumps(args, ensure_ascii=False)}})
            msg["tool_calls"] = calls
        if role == "tool" and m.get("tool_call_id") is not None:
            msg["tool_call_id"] = m["tool_call_id"]
        if msg["content"] is not None:
            check_text(msg["content"], f"{where}.content")
        out.append(msg)
    return out


# ------------------------------------------------------------------------------------------------ the responses

def usage(seq) -> dict:
    n = len(seq.tokens)
    return {"prompt_tokens": len(seq.prompt), "completion_tokens": n, "total_tokens": len(seq.prompt) + n,
            "prompt_tokens_details": {"cached_tokens": seq.cached}}


class Server:
    def __init__(self, engine: Engine, name: str, api_key: str | None = None, max_body: int = 8 << 20,
                 defaults: dict | None = None):
        self.engine, self.name, self.api_key, self.max_body = engine, name, api_key, max_body
        self.defaults = defaults or {}
        self.created = int(time.time())
        self.app = self._app()

    # ------------------------------------------------------------------------------------------------- plumbing

    def _app(self) -> FastAPI:
        app = FastAPI(title="dsv3-hybrid", docs_url=None, redoc_url=None, openapi_url=None)

        @app.middleware("http")
        async def guard(request: Request, call_next):
            if self.api_key is not None and request.url.path != "/health":
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                    return OpenAIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                       "authentication_error", code="invalid_api_key").response()
            return await call_next(request)

        @app.exception_handler(OpenAIError)
        async def openai_error(request: Request, e: OpenAIError):
            return e.response()

        @app.exception_handler(RequestError)
        async def request_error(request: Request, e: RequestError):
            return OpenAIError(400, str(e), param=e.param, code=e.code).response()

        @app.exception_handler(404)
        async def not_found(request: Request, e):
            return OpenAIError(404, f"no such endpoint: {request.method} {request.url.path}",
                               code="not_found").response()

        @app.exception_handler(405)
        async def wrong_method(request: Request, e):
            return OpenAIError(405, f"{request.method} is not allowed on {request.url.path}").response()

        @app.exception_handler(Exception)
        async def crashed(request: Request, e: Exception):
            return OpenAIError(500, f"internal error: {type(e).__name__}: {' '.join(str(e).split())}",
                               "server_error").response()

        app.get("/health")(self.health)
        app.get("/metrics")(self.metrics)
        app.get("/v1/models")(self.models)
        app.post("/v1/chat/completions")(self.chat)
        app.post("/v1/completions")(self.completions)
        return app

    async def _body(self, request: Request, kind: type[BaseModel]):
        """The request body, read up to max_body bytes (413 past it), parsed and validated (400)."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise OpenAIError(413, f"request body of {length} bytes is over the limit of {self.max_body} "
                                   "(--max-body)", code="request_too_large")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > self.max_body:
                raise OpenAIError(413, f"request body is over the limit of {self.max_body} bytes (--max-body)",
                                  code="request_too_large")
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise OpenAIError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
        try:
            return kind.model_validate_json(text)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err.get("loc", ())) or None
            raise OpenAIError(400, f"{param + ': ' if param else ''}{err.get('msg', 'invalid request')}",
                              param=param) from None

    def _submit(self, prompt: list[int], sampling: Sampling, **kw):
        """Queue a sequence whose events arrive on an asyncio queue of this loop."""
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        try:
            seq = self.engine.submit(prompt, sampling, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev), **kw)
        except RequestError as e:
            raise OpenAIError(400, str(e), param=e.param, code=e.code) from None
        except QueueFull as e:
            raise OpenAIError(429, f"server busy: {e}", "rate_limit_error", code="rate_limit_exceeded") from None
        seq.rid, seq.created = uuid.uuid4().hex, int(time.time())      # the response's id and timestamp
        return seq, q

    async def _events(self, request: Request, seq, q: asyncio.Queue):
        """seq's events until its last; a client gone away cancels it (checked every POLL_S)."""
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                yield ev
                if ev.finish_reason:
                    return
        finally:
            if not seq.finished:
                self.engine.cancel(seq)

    @staticmethod
    def _sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def _stream(self, request: Request, seq, q, chunks, include_usage: bool, final, kind: str):
        async def body():
            finished = None
            try:
                async for ev in self._events(request, seq, q):
                    if ev.error:
                        yield self._sse({"error": {"message": f"generation failed: {ev.error}",
                                                   "type": "server_error", "param": None, "code": None}})
                        return
                    for c in chunks(ev):
                        yield self._sse(c)
                    finished = ev.finish_reason
            finally:                              # closed early (the client went away): stop generating
                if not seq.finished:
                    self.engine.cancel(seq)
            if finished is None:
                return
            yield self._sse(final(finished))
            if include_usage:
                yield self._sse(dict(self._head(seq, kind), choices=[], usage=usage(seq)))
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _collect(self, request: Request, seq, q) -> list[Event]:
        events = [ev async for ev in self._events(request, seq, q)]
        if not events or not events[-1].finish_reason:
            raise OpenAIError(499, "client closed the request")
        if events[-1].error:
            raise OpenAIError(500, f"generation failed: {events[-1].error}", "server_error")
        return events

    def _head(self, seq, kind: str) -> dict:
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-{seq.rid}", "object": kind, "created": seq.created, "model": self.name}

    def _token_logprob(self, t: int, lp: float) -> dict:
        b = self.engine.token_bytes(t)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

    def _chat_logprobs(self, lps) -> list[dict]:
        return [dict(self._token_logprob(x.token, x.logprob),
                     top_logprobs=[self._token_logprob(t, lp) for t, lp in x.top]) for x in lps]

    # ------------------------------------------------------------------------------------------------ endpoints

    async def health(self):
        return {"status": "ok"}

    async def models(self):
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "dsv3-hybrid", "max_model_len": self.engine.net.max_len}]}

    async def metrics(self):
        s = self.engine.snapshot()
        rows = [("requests_total", "counter", "requests queued", s["requests"]),
                ("requests_rejected_total", "counter", "requests refused with 429", s["rejected"]),
                ("requests_finished_total", "counter", "requests that ran to their end", s["finished"]),
                ("requests_cancelled_total", "counter", "requests whose client went away", s["cancelled"]),
                ("requests_failed_total", "counter", "requests the model failed", s["errors"]),
                ("prompt_tokens_total", "counter", "prompt tokens admitted", s["prompt_tokens"]),
                ("prompt_cached_tokens_total", "counter", "prompt tokens found in the prefix cache",
                 s["cached_tokens"]),
                ("generated_tokens_total", "counter", "tokens generated", s["generated_tokens"]),
                ("prefill_chunks_total", "counter", "prefill passes", s["prefill_chunks"]),
                ("decode_steps_total", "counter", "batched decode steps", s["decode_steps"]),
                ("decode_rows_total", "counter", "sequences over all decode steps", s["decode_rows"]),
                ("prefill_seconds_total", "counter", "time in the model's prefill passes", s["prefill_s"]),
                ("decode_seconds_total", "counter", "time in the model's decode steps", s["decode_s"]),
                ("prefill_chunk_seconds_max", "gauge", "the longest prefill pass so far", s["prefill_chunk_max_s"]),
                ("requests_running", "gauge", "sequences holding a slot", s["active"]),
                ("requests_waiting", "gauge", "sequences queued for a slot", s["waiting"]),
                ("slots", "gauge", "KV-cache slots", s["slots"]),
                ("slots_cached", "gauge", "free slots holding a reusable prefix", s["cached_slots"])]
        text = "".join(f"# HELP dsv3_{n} {h}\n# TYPE dsv3_{n} {t}\ndsv3_{n} {v}\n" for n, t, h, v in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def chat(self, request: Request) -> Response:
        body: ChatBody = await self._body(request, ChatBody)
        _unsupported(body.response_format not in (None, {"type": "text"}), "response_format",
                     "only response_format {\"type\": \"text\"} is supported")
        choice = body.tool_choice
        _unsupported(choice not in (None, "auto", "none"), "tool_choice",
                     "tool_choice must be \"auto\" or \"none\" (forcing a call is not supported)")
        if body.logprobs is False and body.top_logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        sampling = _common(body, self.defaults, body.max_completion_tokens or body.max_tokens, body.logprobs,
                           body.top_logprobs or 0)
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        messages = chat_messages(body.messages)
        kwargs = body.chat_template_kwargs or {}
        bad = sorted(k for k in kwargs if k in RESERVED_TEMPLATE_ARGS or not str(k).isidentifier())
        if bad:
            raise OpenAIError(400, f"chat_template_kwargs may not set {', '.join(bad)}", param="chat_template_kwargs")
        try:
            text = self.engine.render(messages, tools, **kwargs)
            prompt = self.engine.encode(text)
        except RequestError as e:
            raise OpenAIError(400, str(e), param=e.param, code=e.code) from None
        seq, q = self._submit(prompt, sampling, chat=True, reasoning=text.rstrip().endswith(THINK_OPEN),
                              tools=bool(tools) and choice != "none")
        calls = []

        def deltas(ev: Event) -> list[dict]:
            out = []
            delta = chat_delta(ev, len(calls))
            calls.extend(ev.tool_calls)
            lps = {"content": self._chat_logprobs(ev.logprobs)} if body.logprobs and ev.logprobs else None
            if delta or lps:
                out.append(dict(self._head(seq, "chat.completion.chunk"), choices=[
                    {"index": 0, "delta": delta, "logprobs": lps, "finish_reason": None}], **usage_null))
            return out

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            usage_null = {"usage": None} if include_usage else {}

            def final(reason):
                return dict(self._head(seq, "chat.completion.chunk"), choices=[
                    {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}], **usage_null)

            first = dict(self._head(seq, "chat.completion.chunk"), choices=[
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
                **usage_null)
            pending = [first]                      # the role chunk goes out with the first event

            def chunks(ev: Event) -> list[dict]:
                out = pending + deltas(ev)
                pending.clear()
                return out
            return self._stream(request, seq, q, chunks, include_usage, final, "chat.completion.chunk")

        events = await self._collect(request, seq, q)
        lps = {"content": self._chat_logprobs([x for ev in events for x in ev.logprobs])} if body.logprobs else None
        return JSONResponse(dict(self._head(seq, "chat.completion"), choices=[
            {"index": 0, "message": chat_message(events), "logprobs": lps,
             "finish_reason": events[-1].finish_reason}], usage=usage(seq),
            system_fingerprint=f"dsv3-hybrid-{self.name}"))

    async def completions(self, request: Request) -> Response:
        body: CompletionBody = await self._body(request, CompletionBody)
        _unsupported(body.echo, "echo", "echo is not supported")
        _unsupported(body.best_of not in (None, 1), "best_of", "only best_of = 1 is supported")
        _unsupported(bool(body.suffix), "suffix", "suffix is not supported")
        if body.logprobs is not None and not 0 <= body.logprobs <= 5:
            raise OpenAIError(400, "logprobs must be between 0 and 5", param="logprobs")
        sampling = _common(body, self.defaults, body.max_tokens, body.logprobs is not None, body.logprobs or 0)
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            _unsupported(len(p) != 1, "prompt", "one prompt per request")
            p = p[0]
        try:
            prompt = self.engine.encode_prompt(p) if isinstance(p, str) else list(p)
        except RequestError as e:
            raise OpenAIError(400, str(e), param="prompt") from None
        seq, q = self._submit(prompt, sampling)
        offset = [0]

        def logprobs(ev_list) -> dict | None:
            if body.logprobs is None:
                return None
            out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for x in (x for ev in ev_list for x in ev.logprobs):
                tok = self._token_logprob(x.token, x.logprob)["token"]
                out["tokens"].append(tok)
                out["token_logprobs"].append(x.logprob)
                out["top_logprobs"].append({self._token_logprob(t, lp)["token"]: lp for t, lp in x.top})
                out["text_offset"].append(offset[0])
                offset[0] += len(tok)
            return out

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            usage_null = {"usage": None} if include_usage else {}

            def chunks(ev: Event) -> list[dict]:
                if not ev.content and not ev.logprobs:
                    return []
                return [dict(self._head(seq, "text_completion"), choices=[
                    {"index": 0, "text": ev.content, "logprobs": logprobs([ev]), "finish_reason": None}],
                    **usage_null)]

            def final(reason):
                return dict(self._head(seq, "text_completion"), choices=[
                    {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}], **usage_null)
            return self._stream(request, seq, q, chunks, include_usage, final, "text_completion")

        events = await self._collect(request, seq, q)
        return JSONResponse(dict(self._head(seq, "text_completion"), choices=[
            {"index": 0, "text": "".join(ev.content for ev in events), "logprobs": logprobs(events),
             "finish_reason": events[-1].finish_reason}], usage=usage(seq)))


def chat_delta(ev: Event, calls_before: int) -> dict:
    """A streamed chat chunk's delta for one engine event: reasoning, content, and the tool calls it completed
    (numbered on from the `calls_before` already sent)."""
    delta: dict = {}
    if ev.reasoning:
        delta["reasoning_content"] = ev.reasoning
    if ev.content:
        delta["content"] = ev.content
    if ev.tool_calls:
        delta["tool_calls"] = [dict(c, index=calls_before + i) for i, c in enumerate(ev.tool_calls)]
    return delta


def chat_message(events: list[Event]) -> dict:
    """The whole reply as one chat message: content (None when the reply is only tool calls), reasoning_content,
    tool_calls."""
    content = "".join(ev.content for ev in events)
    reasoning = "".join(ev.reasoning for ev in events)
    calls = [c for ev in events for c in ev.tool_calls]
    message: dict = {"role": "assistant", "content": content if content or not calls else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return message


# ------------------------------------------------------------------------------------------------------------- CLI

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "folder", type=click.Path(path_type=Path), default=DEFAULT_MODEL, show_default=True,
              help="A merged model folder (docs/FORMAT.md).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", default=None, help="Require `Authorization: Bearer KEY` (all but /health).")
@click.option("--ctx", type=click.IntRange(min=2), default=4096, show_default=True,
              help="Context length of each sequence (tokens).")
@click.option("--max-batch", type=click.IntRange(min=1), default=4, show_default=True,
              help="Sequences decoded together; also the KV-cache slots (prefix cache).")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests waiting for a slot before 429.")
@click.option("--chunk", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Prefill tokens per pass, interleaved with the others' decode steps.")
@click.option("--max-body", type=click.IntRange(min=1024), default=8 << 20, show_default=True,
              help="Largest request body (bytes).")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A Jinja chat template file to use instead of the tokenizer's.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--act-terms", type=click.IntRange(1, 2), default=2, show_default=True,
              help="GPU FP8 linears: activations in 1 or 2 e4m3 terms.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: physical cores).")
@click.option("--gpu-memory", type=click.FloatRange(min=0), default=None, help=GPU_MEMORY_HELP)
@click.option("--allow-unverified", is_flag=True, help="Serve a folder whose manifest.json says verified: false.")
def main(folder, host, port, api_key, ctx, max_batch, max_queue, chunk, max_body, chat_template, device, act_terms,
         threads, gpu_memory, allow_unverified):
    """Serve a merged DeepSeek-V3 model over an OpenAI-compatible HTTP API."""
    import uvicorn
    try:
        template = chat_template.read_text(encoding="utf-8") if chat_template else None
    except (OSError, UnicodeDecodeError) as e:
        _fail(chat_template, f"cannot read the chat template ({e})")
    model = load_model(folder, device, threads, ctx, allow_unverified, act_terms, slots=max_batch, chunk=chunk,
                       gpu_memory=gpu_memory)
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, chat_template=template)
    server = Server(engine, Path(folder).name, api_key, max_body, generation_defaults(folder))
    engine.start()
    config = uvicorn.Config(server.app, host=host, port=port, log_level="warning", access_log=False)
    userver = uvicorn.Server(config)
    click.echo(f"serving {folder} on http://{host}:{port}/v1 ({max_batch} slots of {ctx} tokens"
               f"{', API key required' if api_key else ''})", err=True)
    try:
        userver.run()
    finally:
        engine.stop()
    if not userver.started:
        sys.exit(2)


if __name__ == "__main__":
    main()
