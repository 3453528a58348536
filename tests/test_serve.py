"""runtime.serve for real: one server process on the tiny model (127.0.0.1, a free port, an API key), driven by the
official `openai` client and raw HTTP; and the reply parser on the real tokenizer's tokens.

The server runs with tests/data/deepseek-v3-chat.jinja (DeepSeek-V3's markup with tool definitions and R1's
<think> opening; for plain conversations it renders exactly what the tiny model's own template does), 4 slots, a
queue of 4 and a 64 KiB body limit. Every request asks for a handful of tokens.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import urllib.error
import urllib.request

import openai
import pytest

from helpers import ROOT, pipeline
from runtime.engine import (CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, TOOL_SEP, Detokenizer, Engine, QueueFull,
                            Sampling, StopStrings, load_model, parse_tool_call)

KEY = "test-key"
TEMPLATE = ROOT / "tests" / "data" / "deepseek-v3-chat.jinja"
PROMPTS = ["What is a page fault?", "Explain TCP slow start.", "How does paging work?", "What is a socket?",
           "Why do caches have lines?", "What does fork return?", "Define a mutex.", "What is DMA?"]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}


def http(url: str, data: bytes | None = None, key: str | None = KEY) -> tuple[int, dict | str]:
    """One raw request (urllib): (status, parsed JSON body or text)."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny"
    pipeline("run", "--out", out)
    return out


def _chat(merged, *args, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runtime.chat", "--model", str(merged), "--temperature", "0",
                             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=stdin,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def chat_cli(merged, tmp_path_factory):
    """`runtime.chat --temperature 0` on PROMPTS[0], and an interactive session fed a line that is not UTF-8, both
    started beside the server (all three mostly import time)."""
    tmp = tmp_path_factory.mktemp("chat")
    lines = tmp / "lines.txt"
    lines.write_bytes(b"caf\xe9 au lait\nHello\n/exit\n")
    unverified = tmp / "unverified"
    shutil.copytree(merged, unverified, ignore=shutil.ignore_patterns(".pipeline"))
    manifest = json.loads((unverified / "manifest.json").read_text())
    (unverified / "manifest.json").write_text(json.dumps(dict(manifest, verified=False)))
    with open(lines, "rb") as typed:
        runs = {"prompt": _chat(merged, "--prompt", PROMPTS[0], "--max-new-tokens", "12"),
                "bad-line": _chat(merged, "--max-new-tokens", "3", stdin=typed),
                "serve-unverified": subprocess.Popen(
                    [sys.executable, "-m", "runtime.serve", "--model", str(unverified), "--port", str(_free_port())],
                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONPATH": str(ROOT)})}
    yield runs
    for p in runs.values():
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.fixture(scope="module")
def server(merged, chat_cli):
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--model", str(merged), "--port", str(port),
                          "--api-key", KEY, "--ctx", "512", "--max-batch", "4", "--max-queue", "4",
                          "--max-body", "65536", "--chat-template", str(TEMPLATE), "--device", "cpu"],
                         cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if p.poll() is not None:
            raise AssertionError(f"server exited {p.returncode}: {p.stderr.read()}")
        try:
            if http(url + "/health", key=None)[0] == 200:
                break
        except OSError:
            time.sleep(0.3)
    else:
        p.kill()
        raise AssertionError("server did not come up in 180 s")
    yield url
    p.terminate()
    try:
        _, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    assert "Traceback" not in err, err


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(merged):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(merged))


def metrics(server) -> dict[str, float]:
    status, text = http(server + "/metrics")
    assert status == 200
    return {k: float(v) for k, v in (line.split() for line in text.splitlines() if not line.startswith("#"))}


def ask(client, prompt: str, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}], **kw)


# -------------------------------------------------------------------------------------------------- end to end

def test_health_models_and_the_key(server, client):
    assert http(server + "/health", key=None) == (200, {"status": "ok"})               # no key needed
    for key in (None, "wrong"):
        status, body = http(server + "/v1/models", key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_greedy_chat_equals_the_chat_command(client, chat_cli):
    r = ask(client, PROMPTS[0], max_tokens=12, temperature=0)
    out, err = chat_cli["prompt"].communicate(timeout=300)
    assert chat_cli["prompt"].returncode == 0, err
    assert r.choices[0].message.content + "\n" == out.decode()
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_chat_command_refuses_a_line_that_is_not_utf8_and_goes_on(chat_cli):
    out, err = chat_cli["bad-line"].communicate(timeout=300)
    lines = err.decode().splitlines()
    assert chat_cli["bad-line"].returncode == 0 and "Traceback" not in err.decode()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "not valid UTF-8" in errors[0], lines
    assert lines.index(errors[0]) < next(i for i, line in enumerate(lines) if "decode: 3 tokens" in line)


def test_serve_refuses_an_unverified_folder_in_one_line(chat_cli):
    p = chat_cli["serve-unverified"]
    _, err = p.communicate(timeout=300)
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in lines[0], lines
    assert "unverified" in lines[0] and "not verified (manifest.json verified: false)" in lines[0]


def test_chat_streamed_equals_not_streamed(client, tok):
    plain = ask(client, PROMPTS[1], max_tokens=10, temperature=0)
    chunks = list(ask(client, PROMPTS[1], max_tokens=10, temperature=0, stream=True,
                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    want = tok.apply_chat_template([{"role": "user", "content": PROMPTS[1]}], tokenize=False,
                                   add_generation_prompt=True)
    assert plain.usage.prompt_tokens == len(tok(want, add_special_tokens=False)["input_ids"])


def test_completions_streamed_and_not(client, tok):
    prompt = "The scheduler picks the next thread"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    s = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text
    ids = tok(prompt)["input_ids"]
    assert r.usage.prompt_tokens == len(ids if ids[0] == 0 else [0] + ids) and r.usage.completion_tokens == 8
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 8 and "".join(lp.tokens) == r.choices[0].text           # tiny BPE: whole characters
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and abs(max(top.values()) - chosen) < 1e-5             # greedy: the best one
    by_ids = client.completions.create(model="tiny", prompt=ids if ids[0] == 0 else [0] + ids, max_tokens=8,
                                       temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text


def test_chat_logprobs(client):
    r = ask(client, PROMPTS[2], max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    assert bytes(b for t in content for b in t.bytes).decode() == r.choices[0].message.content
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and abs(tops[0] - t.logprob) < 1e-5


def test_stop_sequences(client):
    full = ask(client, PROMPTS[3], max_tokens=16, temperature=0).choices[0].message.content
    stop = full[6:9]
    assert stop and full.find(stop) >= 6 - len(stop)
    r = ask(client, PROMPTS[3], max_tokens=16, temperature=0, stop=[stop, "never-there"])
    assert r.choices[0].message.content == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    s = ask(client, PROMPTS[3], max_tokens=16, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in s) == full[:full.find(stop)]


def test_seed_reproducibility(client):
    a, b, c = (ask(client, PROMPTS[4], max_tokens=16, temperature=1.0, seed=s).choices[0].message.content
               for s in (7, 7, 8))
    assert a == b and a != c


def test_concurrent_clients_equal_one_at_a_time(server, client):
    alone = [ask(client, p, max_tokens=8, temperature=0).choices[0].message.content for p in PROMPTS]
    before = metrics(server)
    together: dict[int, str] = {}

    def run(i):
        together[i] = ask(client, PROMPTS[i], max_tokens=8, temperature=0, stream=i % 2 == 0)
        if i % 2 == 0:
            together[i] = "".join(c.choices[0].delta.content or "" for c in together[i])
        else:
            together[i] = together[i].choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [together[i] for i in range(len(PROMPTS))] == alone
    after = metrics(server)
    steps = after["dsv3_decode_steps_total"] - before["dsv3_decode_steps_total"]
    rows = after["dsv3_decode_rows_total"] - before["dsv3_decode_rows_total"]
    assert rows > steps, (rows, steps)                     # sequences were decoded together


def test_second_turn_hits_the_prefix_cache(server, client):
    history = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a TLB?"}]
    first = client.chat.completions.create(model="tiny", messages=history, max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    before = metrics(server)["dsv3_prompt_cached_tokens_total"]
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And a page walk?"}]
    second = client.chat.completions.create(model="tiny", messages=history, max_tokens=6, temperature=0)
    hit = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= hit < second.usage.prompt_tokens
    assert metrics(server)["dsv3_prompt_cached_tokens_total"] - before == hit


def test_disconnect_mid_stream_frees_the_slot(server, client):
    before = metrics(server)
    stream = ask(client, PROMPTS[5], max_tokens=400, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.time() + 30
    while time.time() < deadline:
        m = metrics(server)
        if m["dsv3_requests_cancelled_total"] > before["dsv3_requests_cancelled_total"]:
            break
        time.sleep(0.2)
    assert m["dsv3_requests_running"] == 0 and m["dsv3_requests_waiting"] == 0
    assert m["dsv3_generated_tokens_total"] - before["dsv3_generated_tokens_total"] < 400


def test_bad_requests_are_openai_errors(server, client):
    user = [{"role": "user", "content": "Hi"}]

    def post(data: bytes):
        status, body = http(server + "/v1/chat/completions", data)
        assert set(body) == {"error"} and body["error"]["message"], body
        return status, body["error"]

    for kw, param in (({"n": 2}, "n"), ({"temperature": 3}, "temperature"), ({"tool_choice": "required"},
                                                                              "tool_choice")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=user, max_tokens=2, **kw)
        assert e.value.status_code == 400 and e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError, match="context"):
        ask(client, "word " * 600, max_tokens=2)
    status, err = post(json.dumps({"messages": [{"role": "user", "content": "caf\udc80"}]}).encode())
    assert status == 400 and "surrogate" in err["message"]
    status, err = post(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}')
    assert status == 400 and "UTF-8" in err["message"]
    status, err = post(json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode())
    assert status == 400 and err["param"] == "messages[0]"
    status, err = post(b"{not json")
    assert status == 400
    status, err = post(json.dumps({"messages": user, "pad": "x" * 70000}).encode())
    assert status == 413 and err["code"] == "request_too_large"
    assert ask(client, "Still fine?", max_tokens=2).usage.completion_tokens == 2     # the server goes on


def test_full_queue_answers_429(server, client):
    streams, refused = [], None                 # 4 run, 4 wait, the next is refused (more if some ended early)
    try:
        for i in range(16):
            try:
                streams.append(ask(client, PROMPTS[i % 8] + " " * (i // 8), max_tokens=300, temperature=0,
                                   stream=True))
            except openai.RateLimitError as e:
                refused = e
                break
    finally:
        for s in streams:
            s.close()
    assert refused is not None and refused.status_code == 429 and len(streams) >= 8
    assert refused.body["code"] == "rate_limit_exceeded"
    deadline = time.time() + 30
    while metrics(server)["dsv3_requests_running"] and time.time() < deadline:
        time.sleep(0.2)
    assert metrics(server)["dsv3_requests_running"] == 0
    assert ask(client, "Room again?", max_tokens=2).usage.completion_tokens == 2


def test_tool_call_round_trip_renders_the_markup(client, tok):
    """The client's tool call and the tool's result go back through the chat template as DeepSeek-V3's markup:
    the server's prompt is exactly that text (its token count, and a completion of the same tokens continues it
    the same way)."""
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=6,
                                       temperature=0)
    params = json.dumps(WEATHER["function"]["parameters"])
    want = ("<｜begin▁of▁sentence｜>## Tools\nYou have access to the following tools:\n\n### get_weather\n"
            f"Description: Weather of a city\n\nParameters: {params}\n<｜User｜>Weather in Paris?<｜Assistant｜>"
            f"{CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{{\"city\": \"Paris\"}}\n```{CALL_END}"
            f"{CALLS_END}<｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{{\"temp\": 18}}"
            "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")
    ids = tok(want, add_special_tokens=False)["input_ids"]
    assert r.usage.prompt_tokens == len(ids)
    same = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == same.choices[0].text and not r.choices[0].message.tool_calls


def test_reasoning_content_when_the_template_opens_think(client, tok):
    """With `thinking`, the template opens the reply with <think>: what the model writes (no </think> from this
    tiny model) is reasoning, in its own deltas; the same tokens as a plain completion give the same text."""
    kw = dict(max_tokens=8, temperature=0, extra_body={"chat_template_kwargs": {"thinking": True}})
    r = ask(client, PROMPTS[6], **kw)
    reasoning = r.choices[0].message.model_extra["reasoning_content"]
    ids = tok(f"<｜begin▁of▁sentence｜><｜User｜>{PROMPTS[6]}<｜Assistant｜><think>\n", add_special_tokens=False)
    same = client.completions.create(model="tiny", prompt=ids["input_ids"], max_tokens=8, temperature=0)
    assert "</think>" not in same.choices[0].text and reasoning == same.choices[0].text
    assert not r.choices[0].message.content
    chunks = list(ask(client, PROMPTS[6], stream=True, **kw))
    deltas = [c.choices[0].delta.model_extra or {} for c in chunks if c.choices]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == reasoning
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# ------------------------------------------------------------------------------------ the engine, in this process

@pytest.fixture(scope="module")
def model(merged):
    return load_model(merged, device="cpu", ctx=256, slots=3, chunk=16)


def test_tools_reach_a_template_that_does_not_read_them(model):
    """The tiny model's own template (like DeepSeek-V3's and R1's) never reads `tools`: their definitions go into
    the system prompt. A template that reads them gets them once, as it writes them."""
    user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    text = Engine(model).render(user, [WEATHER])
    head, _, tail = text.partition("<｜User｜>")
    assert head.startswith("<｜begin▁of▁sentence｜>Be brief.\n\n## Tools\n") and "### get_weather\n" in head
    assert f"{CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}NAME\n```json" in head
    assert tail == "Weather in Paris?<｜Assistant｜>"
    own = Engine(model, chat_template=TEMPLATE.read_text()).render(user, [WEATHER])
    assert own.count("### get_weather") == 1 and "To call tools" not in own
    assert Engine(model).render(user) == Engine(model, chat_template=TEMPLATE.read_text()).render(user)


def test_queue_bound_counts_running_and_waiting(model):
    """max_batch running + max_queue waiting, counted at submit time (before the scheduler admits anything); a
    cancelled waiting request leaves the queue at the next step."""
    e = Engine(model, max_batch=2, max_queue=1)
    seqs = [e.submit([0, 3, 100 + i], Sampling(8, 0.0)) for i in range(3)]
    with pytest.raises(QueueFull):
        e.submit([0, 3, 200], Sampling(2, 0.0))
    e.cancel(seqs[2])
    e.step()
    assert seqs[2].finish_reason == "cancelled" and len(e.active) == 2 and not e.waiting
    e.submit([0, 3, 201], Sampling(2, 0.0))
    while e.active or e.waiting:
        e.step()
    assert e.stats["finished"] == 3 and e.stats["cancelled"] == 1 and e.stats["rejected"] == 1


def test_an_engine_forgets_its_cache_when_another_used_the_model(model):
    a, b = Engine(model), Engine(model)
    prompt = [0, 3, 120, 121, 122, 123]
    list(a.run_sync(a.submit(prompt, Sampling(2, 0.0))))
    list(b.run_sync(b.submit([0, 3, 99, 98, 97], Sampling(2, 0.0))))       # writes a slot a thinks it holds
    again = a.submit(prompt, Sampling(2, 0.0))
    list(a.run_sync(again))
    assert again.cached == 0


def test_long_prompt_is_prefilled_a_chunk_per_decode_step(model):
    """A 150-token prompt arriving while another sequence decodes is prefilled 16 tokens a step (the model's
    chunk), and the decoding sequence gets its next token at every step meanwhile; both replies equal their replies
    alone. Then a prompt extending the long one copies its prefix from that slot."""
    long_text = (ROOT / "tests" / "data" / "prose.txt").read_text()[:2000]

    def alone(prompt, n):
        e = Engine(model, max_batch=1)
        seq = e.submit(prompt, Sampling(n, 0.0))
        list(e.run_sync(seq))
        return seq.tokens

    e = Engine(model)
    short = e.encode(e.render([{"role": "user", "content": PROMPTS[0]}]))
    long_ = e.encode_prompt(long_text)[:150]
    want_a, want_b = alone(short, 14), alone(long_, 4)
    e = Engine(model)
    a = e.submit(short, Sampling(14, 0.0))
    while not a.tokens:
        e.step()
    b = e.submit(long_, Sampling(4, 0.0))
    trace = []                                           # per step: (tokens a got, prefill chunks run)
    while not (a.finished and b.finished):
        before = (len(a.tokens), e.stats["prefill_chunks"])
        e.step()
        trace.append((len(a.tokens) - before[0], e.stats["prefill_chunks"] - before[1]))
    assert [c for _, c in trace[:10]] == [1] * 10 and sum(c for _, c in trace) == 10      # ceil(150 / 16)
    assert [t for t, _ in trace[:10]] == [1] * 10
    assert a.tokens == want_a and b.tokens == want_b
    c = e.submit(long_ + [5, 6, 7], Sampling(2, 0.0))
    list(e.run_sync(c))
    assert c.cached == 150                                # copied from b's slot (b's reply differs from 5, 6, 7)


# ------------------------------------------------------------------------------------ the reply parser, offline

def replay(tok, text: str, **kw):
    """`text` as the model would write it (the tokenizer's tokens, one at a time) through the engine's
    Detokenizer: (content, reasoning, tool calls, stopped)."""
    d = Detokenizer(tok, set(tok.all_special_ids), **kw)
    evs = [d.push(t) for t in tok(text, add_special_tokens=False)["input_ids"]] + [d.finish()]
    return ("".join(e.content for e in evs), "".join(e.reasoning for e in evs),
            [c for e in evs for c in e.tool_calls], d.stopped)


def test_parser_reads_tool_calls_the_model_writes(tok):
    calls = (f"{CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{{\"city\": \"Paris\"}}\n```"
             f"{CALL_END}\n{CALL_BEGIN}function{TOOL_SEP}get_time\n```json\n{{}}\n```{CALL_END}{CALLS_END}")
    content, reasoning, got, _ = replay(tok, "Let me check. " + calls, chat=True, tools=True)
    assert content == "Let me check. " and reasoning == ""
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == [
        ("function", "get_weather", {"city": "Paris"}), ("function", "get_time", {})]
    assert len({c["id"] for c in got}) == 2
    v31 = f"{CALLS_BEGIN}{CALL_BEGIN}get_time{TOOL_SEP}{{\"tz\": \"UTC\"}}{CALL_END}{CALLS_END}"   # DeepSeek-V3.1
    assert [c["function"] for c in replay(tok, v31, chat=True, tools=True)[2]] == [
        {"name": "get_time", "arguments": '{"tz": "UTC"}'}]
    # without tools in the request, and for markup cut short, the text is content, whole
    assert replay(tok, "Hi " + calls, chat=True, tools=False)[:3] == ("Hi " + calls, "", [])
    cut = calls[:calls.index("Paris")]
    assert replay(tok, "Hi " + cut, chat=True, tools=True)[:3] == ("Hi " + cut, "", [])


def test_tool_calls_as_the_openai_client_reads_them(tok):
    """A reply with reasoning, text and two tool calls, as the model would write it token by token, through the
    engine's Detokenizer and the server's chunk and message builders, read back by the official client's types."""
    from openai.types.chat import ChatCompletionChunk, ChatCompletionMessage
    from runtime.serve import chat_delta, chat_message
    reply = (f"plan first</think>Let me check. {CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n"
             f"{{\"city\": \"Paris\"}}\n```{CALL_END}{CALL_BEGIN}function{TOOL_SEP}get_time\n```json\n{{}}\n```"
             f"{CALL_END}{CALLS_END}")
    d = Detokenizer(tok, set(tok.all_special_ids), chat=True, reasoning=True, tools=True)
    events = [d.push(t) for t in tok(reply, add_special_tokens=False)["input_ids"]] + [d.finish()]
    sent, text, reasoning, calls = 0, "", "", {}
    for ev in events:
        chunk = ChatCompletionChunk.model_validate({"id": "x", "object": "chat.completion.chunk", "created": 0,
                                                    "model": "m", "choices": [{"index": 0, "delta": chat_delta(
                                                        ev, sent), "finish_reason": None}]})
        sent += len(ev.tool_calls)
        delta = chunk.choices[0].delta
        text += delta.content or ""
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for c in delta.tool_calls or []:                    # as a client accumulates them, by index
            calls.setdefault(c.index, [c.id, c.function.name, ""])[2] += c.function.arguments or ""
    assert (text, reasoning) == ("Let me check. ", "plan first")
    assert [(n, json.loads(a)) for _, n, a in calls.values()] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    message = ChatCompletionMessage.model_validate(chat_message(events))
    assert message.content == "Let me check. " and message.model_extra["reasoning_content"] == "plan first"
    assert [(c.id, c.function.name) for c in message.tool_calls] == [(i, n) for i, n, _ in calls.values()]


def test_parser_splits_reasoning(tok):
    assert replay(tok, "<think>\nsteps here\n</think>\n\nThe answer.", chat=True)[:2] == (
        "\n\nThe answer.", "\nsteps here\n")
    assert replay(tok, "steps</think>answer", chat=True, reasoning=True)[:2] == ("answer", "steps")
    assert replay(tok, "<thinking> is a tag", chat=True)[:2] == ("<thinking> is a tag", "")
    assert replay(tok, "no tags at all", chat=False)[:2] == ("no tags at all", "")


def test_stop_strings_never_leak_a_prefix(tok):
    content, _, _, stopped = replay(tok, "alpha beta gamma delta", stop=("gam", "zzz"))
    assert content == "alpha beta " and stopped
    s = StopStrings(["abc"])
    assert [s.push(x) for x in ("xa", "b", "d", "ab", "c", "tail")] == ["x", "", "abd", "", "", ""] and s.hit


def test_malformed_tool_call_is_none():
    assert parse_tool_call("function get_weather") is None
    assert parse_tool_call(f"function{TOOL_SEP}get_weather\n```json\n{{}}") is None        # no closing fence
    assert parse_tool_call(f"{TOOL_SEP}{{}}") is None                                       # no name
