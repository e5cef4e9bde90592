"""`moe-offload serve` as a client sees it: one real server (the shipped demo model, a free loopback port,
an API key from the environment) shared by every test here, spoken to with the official `openai` client
and, where the wire format itself is the point, with httpx."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from conftest import REPO
import offload
from offload.generate import Sampling
from offload.serve.completion import StopText
from offload.serve.engine import Busy, Engine, Job

KEY = "sk-test-moe-offload"
CONTEXT = 128
MAX_QUEUE = 4
MAX_BODY = 64 << 10
PROMPT = "The for statement"
# One thread everywhere, so that the server and the `generate --json` reference do the same arithmetic.
ENV = os.environ | {"OMP_NUM_THREADS": "1", "MOE_OFFLOAD_API_KEY": KEY}


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT/v1
    proc: subprocess.Popen
    log: Path

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=KEY, max_retries=0, timeout=120, **kwargs)

    def post(self, path: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.root + path, content=data, timeout=120,
                          headers=headers | {"Content-Type": "application/json"}, **kwargs)

    def metrics(self) -> dict[str, float]:
        """Every sample of GET /metrics by its name with labels, e.g. 'moe_offload_requests_total{outcome="stop"}'."""
        text = httpx.get(self.root + "/metrics", timeout=30).text
        return {name: float(value) for name, value in re.findall(r"^(moe_offload_\S+) (\S+)$", text, re.M)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "w") as err:  # a file, not a pipe: a pipe nobody drains would block the server's logging
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "demo", "--port", "0", "--context",
                                 str(CONTEXT), "--max-queue", str(MAX_QUEUE), "--max-body", str(MAX_BODY),
                                 "--threads", "1"], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 180
        while not (found := re.search(r"serving demo at (http://\S+/v1)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        server = Server(found[1], proc, log)
        while httpx.get(server.root + "/health", timeout=30).status_code != 200:  # listening before it is up
            time.sleep(0.2)
        yield server
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # Every bad request above was answered, and none of them, nor any client that left, made a traceback.
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def reference():
    """`moe-offload generate --json` for PROMPT, plain and through the chat template: 12 greedy tokens."""
    def run(*flags):
        out = subprocess.run([sys.executable, "-m", "cli.main", "generate", "demo", PROMPT, "-n", "12", "--json",
                              "--context", str(CONTEXT), *flags], cwd=REPO, env=ENV, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)
    return {"plain": run(), "chat": run("--chat")}


def stream_events(server: Server, path: str, body: dict) -> list[str]:
    """The raw `data:` payloads of a streamed response, in order."""
    with httpx.stream("POST", server.root + path, json=body | {"stream": True}, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize("pieces, stops, sent", [
    (["Hel", "lo wo", "rld"], ["o w"], "Hell"),              # across two pieces
    (["ab", "c", "d"], ["bcd", "cx"], "a"),                  # the earliest of several, spanning three pieces
    (["a<", "<", "x"], ["<<<"], "a<<x"),                     # a start that came to nothing is sent at the end
    (["STOP here"], ["STOP"], ""),                           # at the very start
    (["xaab"], ["aab", "ab"], "x"),                          # overlapping stop strings: the earlier position
    (["one ", "two"], [], "one two"),
])
def test_stop_text_sends_everything_before_the_first_stop_and_nothing_of_it(pieces, stops, sent):
    text = StopText(stops)
    out = [text.push(p) for p in pieces]
    out.append(text.flush())
    assert "".join(out) == sent
    assert text.stopped == any(stop in "".join(pieces) for stop in stops)


def test_closing_the_engine_cancels_the_running_job_and_those_waiting():
    rt = offload.load("demo", context=CONTEXT)
    engine = Engine(rt, max_queue=2)

    async def run():
        jobs = [Job(rt.encode(PROMPT), 100, Sampling()) for _ in range(3)]
        for job in jobs:
            engine.submit(job)
        with pytest.raises(Busy) as busy:  # one running and two waiting: the queue is full
            engine.submit(Job(rt.encode(PROMPT), 1, Sampling()))
        assert busy.value.retry_after >= 1
        assert (await jobs[0].next_event())[0] == "text"  # the first one is generating
        await asyncio.get_running_loop().run_in_executor(None, engine.close)
        ends = []
        for job in jobs:
            while (event := await job.next_event())[0] == "text":
                pass
            ends.append(event[1])
        return ends

    ends = asyncio.run(run())
    assert [end.finish_reason for end in ends] == ["cancelled"] * 3
    assert ends[0].completion_tokens < 100 and ends[1].completion_tokens == ends[2].completion_tokens == 0
    assert rt.closed and not engine.worker.is_alive()


def test_models_lists_the_served_model_on_loopback(server):
    assert server.url.startswith("http://127.0.0.1:")  # no --host given: loopback only
    assert [m.id for m in server.client().models.list().data] == ["demo"]


def test_completion_equals_generate_json(server, reference):
    ref = reference["plain"]
    done = server.client().completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0)
    assert done.choices[0].text == ref["text"]
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (ref["prompt_tokens"], len(ref["tokens"]))
    assert done.usage.total_tokens == ref["prompt_tokens"] + 12
    stats = done.model_extra["moe_offload"]
    assert stats["new_tokens"] == 12 and stats["expert_hits"] + stats["expert_misses"] > 0


def test_chat_streamed_and_not_equal_generate_chat_json(server, reference):
    ref = reference["chat"]
    client = server.client()
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == ref["text"]
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (ref["prompt_tokens"], 12)
    chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == ref["prompt_tokens"]
    # The statistics ride on the chunk that carries the finish reason.
    last = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert last.model_extra["moe_offload"]["new_tokens"] == 12


def test_completion_stream_is_sse_ending_in_done(server, reference):
    events = stream_events(server, "/v1/completions", {"model": "demo", "prompt": PROMPT, "max_tokens": 12,
                                                       "temperature": 0})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference["plain"]["text"]
    assert [c["choices"][0].get("finish_reason") for c in chunks][-1] == "length"


def test_stop_strings_end_the_text_before_them_also_across_tokens(server):
    client = server.client()
    body = dict(model="demo", prompt=PROMPT, max_tokens=16, temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(**body, stream=True)]
    full = "".join(pieces)
    # A stop string that begins inside one streamed piece and ends inside a later one.
    i = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) >= 2 and pieces[i + 1].strip())
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    expected = full[:full.find(stop)]
    done = client.completions.create(**body, stop=[stop, "never appears @@"])
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens < 16
    streamed = list(client.completions.create(**body, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"
    # A stop string that never comes: the whole text, ended by length.
    assert client.completions.create(**body, stop="@@@").choices[0].text == full


def test_two_concurrent_clients_are_served_in_turn_with_their_own_answers(server):
    client = server.client()
    prompts = [PROMPT, "Lists are mutable"]
    alone = [client.completions.create(model="demo", prompt=p, max_tokens=8, temperature=0).choices[0].text
             for p in prompts]
    together = [None, None]

    def ask(i):
        together[i] = client.completions.create(model="demo", prompt=prompts[i], max_tokens=8,
                                                temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone


def test_a_client_that_leaves_mid_stream_frees_the_server(server):
    before = server.metrics()
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.root + "/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    left = time.monotonic()  # the connection is closed here, after the first chunk
    done = server.client().completions.create(model="demo", prompt=PROMPT, max_tokens=1, temperature=0)
    waited = time.monotonic() - left
    assert done.choices[0].finish_reason == "length"
    after = server.metrics()
    assert after['moe_offload_requests_total{outcome="cancelled"}'] == before.get(
        'moe_offload_requests_total{outcome="cancelled"}', 0) + 1
    # The abandoned generation stopped far short of its 100 tokens.
    abandoned = after["moe_offload_completion_tokens_total"] - before["moe_offload_completion_tokens_total"] - 1
    assert abandoned < 50
    # Within a second on an idle machine; the bound is generous for a loaded CI runner.
    assert waited < 10


def test_a_client_that_leaves_a_plain_request_stops_its_generation(server):
    before = server.metrics()
    body = json.dumps({"model": "demo", "prompt": PROMPT, "max_tokens": CONTEXT - 8, "temperature": 0}).encode()
    host, port = server.root.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 60
        while server.metrics()["moe_offload_generating"] == 0:  # leave once it is generating
            assert time.monotonic() < deadline
            time.sleep(0.02)
    done = server.client().completions.create(model="demo", prompt=PROMPT, max_tokens=1, temperature=0)
    assert done.choices[0].finish_reason == "length"
    after = server.metrics()
    cancelled = 'moe_offload_requests_total{outcome="cancelled"}'
    assert after[cancelled] == before.get(cancelled, 0) + 1
    abandoned = after["moe_offload_completion_tokens_total"] - before["moe_offload_completion_tokens_total"] - 1
    assert abandoned < CONTEXT - 8


BAD = [
    ("/v1/chat/completions", {"model": "demo", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
     400, "max_tokens"),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages.0.role"),
    ("/v1/completions", {"model": "demo", "prompt": "word " * 200, "max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, None),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "stop": ""}, 400, "stop"),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "logprobs": 3}, 400, None),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "presence_penalty": 0.5}, 400, None),
    ("/v1/completions", {"model": "demo", "prompt": 5}, 400, "prompt"),
    ("/v1/completions", [PROMPT], 400, None),
    ("/v1/completions", {"model": "demo", "prompt": [PROMPT, PROMPT]}, 400, "prompt"),
    ("/v1/completions", {"model": "demo", "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": PROMPT}, 400, "model"),
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("/v1/nothing/here", {}, 404, None),
    ("/v1/completions", {"model": "demo", "prompt": "x" * (MAX_BODY + 1)}, 413, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{s}-{i}" for i, (_, _, s, _) in enumerate(BAD)])
def test_bad_requests_get_their_status_and_an_openai_error(server, path, body, status, param):
    response = server.post(path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    assert "Traceback" not in response.text and "\n" not in error["message"]


def test_the_openai_client_sees_the_errors_as_its_own_exceptions(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="messages: List should have at least 1 item"):
        client.chat.completions.create(model="demo", messages=[])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_the_api_key_is_required_on_v1_routes(server):
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 1}
    assert server.post("/v1/completions", body, key=None).status_code == 401
    wrong = server.post("/v1/completions", body, key="sk-wrong")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="sk-wrong", max_retries=0).models.list()
    assert server.post("/v1/completions", body).status_code == 200
    assert httpx.get(server.root + "/health", timeout=30).json()["status"] == "ok"  # probes need no key


def test_a_second_chat_turn_reuses_the_first_and_answers_as_a_cold_run(server):
    client = server.client()
    turn = [{"role": "user", "content": PROMPT}]
    first = client.chat.completions.create(model="demo", messages=turn, max_tokens=8, temperature=0)
    history = turn + [{"role": "assistant", "content": first.choices[0].message.content},
                      {"role": "user", "content": "And the while statement?"}]
    warm = client.chat.completions.create(model="demo", messages=history, max_tokens=8, temperature=0)
    reused = warm.usage.prompt_tokens_details.cached_tokens
    assert reused == warm.model_extra["moe_offload"]["prompt_tokens_reused"]
    assert reused >= first.usage.prompt_tokens  # all of the first turn's prompt, at least
    # Token ids that share nothing with the chat (no <s>) leave nothing of it in the cache.
    client.completions.create(model="demo", prompt=[5, 6, 7], max_tokens=1)
    cold = client.chat.completions.create(model="demo", messages=history, max_tokens=8, temperature=0)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert warm.choices[0].message.content == cold.choices[0].message.content


def test_metrics_are_prometheus_text(server):
    client = server.client()
    before = server.metrics()
    done = client.completions.create(model="demo", prompt=PROMPT, max_tokens=3, temperature=0)
    after = server.metrics()
    text = httpx.get(server.root + "/metrics", timeout=30).text
    assert "# TYPE moe_offload_requests_total counter" in text and "# TYPE moe_offload_queue_length gauge" in text
    assert after["moe_offload_completion_tokens_total"] - before["moe_offload_completion_tokens_total"] == 3
    assert after["moe_offload_prompt_tokens_total"] - before["moe_offload_prompt_tokens_total"] == done.usage.prompt_tokens
    stats = done.model_extra["moe_offload"]
    hits = after["moe_offload_expert_hits_total"] - before["moe_offload_expert_hits_total"]
    assert hits == stats["expert_hits"]
    assert after["moe_offload_bytes_h2d_total"] - before["moe_offload_bytes_h2d_total"] == stats["bytes_h2d"]
    assert after["moe_offload_queue_length"] == 0 and 0 <= after["moe_offload_expert_hit_rate"] <= 1


def test_load_loses_no_request_and_memory_does_not_grow(server):
    """50 requests from 8 threads against a queue of 4: every one gets its whole answer or a 503 with
    Retry-After; the server's resident memory after the run is where it was after a warm-up run."""
    prompts = [PROMPT, "Lists are mutable", "A class definition", "The import statement"]
    client = server.client()
    expected = {p: client.completions.create(model="demo", prompt=p, max_tokens=4, temperature=0).choices[0].text
                for p in prompts}
    proc = psutil.Process(server.proc.pid)

    def run(n: int) -> list:
        results = [None] * n
        lock = threading.Lock()
        todo = iter(range(n))

        def worker():
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                body = {"model": "demo", "prompt": prompts[i % 4], "max_tokens": 4, "temperature": 0}
                if i % 2:  # half of them streamed
                    with httpx.stream("POST", server.url + "/completions", json=body | {"stream": True},
                                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
                        if r.status_code != 200:
                            r.read()
                            results[i] = (r.status_code, r.headers.get("retry-after"), None)
                            continue
                        events = [e.removeprefix("data: ") for e in r.iter_lines() if e.startswith("data: ")]
                    assert events[-1] == "[DONE]"
                    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
                    results[i] = (200, None, text)
                else:
                    r = server.post("/v1/completions", body)
                    results[i] = (r.status_code, r.headers.get("retry-after"),
                                  r.json()["choices"][0]["text"] if r.status_code == 200 else r.json()["error"])

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 300
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "the load test ran past its time limit"
        for i, (status, retry_after, text) in enumerate(results):
            if status == 200:
                assert text == expected[prompts[i % 4]]
            else:
                assert status == 503 and int(retry_after) >= 1, (status, text)
        return results

    run(16)  # warm-up: allocator pools and caches reach their working size
    rss = proc.memory_info().rss
    results = run(50)
    assert sum(status == 200 for status, _, _ in results) >= MAX_QUEUE + 1
    grown = proc.memory_info().rss - rss
    assert grown < 32 << 20, f"resident memory grew by {grown / 2**20:.1f} MiB over 50 requests"


def test_stop_with_ctrl_c_shuts_the_server_down_cleanly(tmp_path):
    """A second server on its own port: Ctrl-C (SIGINT) shuts it down and exits as an interrupted command
    does (130, one line), with no traceback."""
    log = tmp_path / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "demo", "--port", "0", "--context", "64"],
                                cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 180
        while "serving demo at" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log.read_text()
        text = log.read_text()
        assert "Application shutdown complete" in text and text.rstrip().endswith("moe-offload: interrupted")
        assert "Traceback" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_port_in_use_is_one_line(server):
    port = server.root.rsplit(":", 1)[1]
    out = subprocess.run([sys.executable, "-m", "cli.main", "serve", "demo", "--port", port], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("moe-offload: error: cannot listen on 127.0.0.1:")
    assert len(out.stderr.strip().splitlines()) == 1
