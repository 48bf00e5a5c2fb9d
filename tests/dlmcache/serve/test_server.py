"""`dlmcache serve` as a real process on 127.0.0.1, driven by the official `openai` client and raw HTTP."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from dlmcache import DLMPipeline, tinytask

openai = pytest.importorskip("openai")

MODEL = "dlmcache/tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(*args: str, preexec_fn=None):
    """A `dlmcache serve` subprocess on a free port (`preexec_fn`: run in it before it starts); yields
    its base URL and the process."""
    port = free_port()
    cmd = [sys.executable, "-m", "dlmcache.cli", "serve", "--port", str(port), "--threads", "1",
           "--log-level", "warning", *args]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=preexec_fn)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stdout.read()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError("the server did not start in 120 s")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def live():
    with server("--max-batch", "16", "--max-queue", "32") as (url, _):
        yield url


@pytest.fixture(scope="module")
def reference():
    """The pipeline alone, with the server's default cache."""
    from dlmcache.serve import DEFAULT_CACHE, load_pipeline

    pipe = load_pipeline(MODEL, DEFAULT_CACHE)
    assert isinstance(pipe, DLMPipeline)
    return pipe


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_chat_and_completions_equal_the_pipeline_alone(live, reference):
    problem = tinytask.test_problems(1)[0]
    chat = tinytask.messages(problem)
    r = client(live).chat.completions.create(model=MODEL, messages=chat, max_tokens=64)
    want = reference(chat, max_new_tokens=64, block_length=32, stop_at_eos=True)
    assert r.choices[0].message.content == want.texts[0]
    assert tinytask.is_correct(r.choices[0].message.content, problem)
    eos = reference.tokenizer.eos_token_id
    assert r.usage.completion_tokens == want.sequences[0].tolist().index(eos) < 64  # up to EOS, not the canvas
    assert r.choices[0].finish_reason == "stop"

    text = "Compute 3+4."
    r = client(live).completions.create(model=MODEL, prompt=text, max_tokens=32, extra_body={"steps": 16})
    want = reference(text, max_new_tokens=32, block_length=32, steps=16, chat_template=False, stop_at_eos=True)
    assert r.choices[0].text == want.texts[0]
    models = client(live).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_sixteen_concurrent_clients_each_get_their_own_answer(live, reference):
    problems = tinytask.test_problems(16)

    async def ask(c, p):
        r = await c.chat.completions.create(model=MODEL, messages=tinytask.messages(p), max_tokens=64, user=p.question)
        return p, r.choices[0].message.content

    async def main():
        c = openai.AsyncOpenAI(base_url=f"{live}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(ask(c, p) for p in problems))

    answers = asyncio.run(main())
    assert [p for p, _ in answers] == problems
    for p, text in answers:
        want = reference(tinytask.messages(p), max_new_tokens=64, block_length=32, stop_at_eos=True).texts[0]
        assert text == want, p.question


def test_streaming_sends_the_committed_text_in_order(live, reference):
    chat = tinytask.messages(tinytask.test_problems(2)[1])
    stream = client(live).chat.completions.create(
        model=MODEL, messages=chat, max_tokens=64, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    want = reference(chat, max_new_tokens=64, block_length=32, stop_at_eos=True).texts[0]
    assert "".join(deltas) == want and len(deltas) > 2  # several chunks as tokens were committed
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].choices == []
    # Raw SSE ends with [DONE]; stream_every="block" sends fewer, larger chunks.
    body = {"model": MODEL, "prompt": "Compute 1+2.", "max_tokens": 64, "stream": True, "stream_every": "block"}
    with httpx.stream("POST", f"{live}/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "text_completion" for line in lines[:-1])


@pytest.mark.parametrize(
    "route, body, param",
    [
        ("completions", {"model": "other", "prompt": "hi"}, "model"),
        ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 100000}, "max_tokens"),
        ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 64, "steps": 3}, "steps"),
        ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 64, "block_length": 48}, "block_length"),
        ("completions", {"model": MODEL, "prompt": "hi", "block_length": -1}, "block_length"),
        ("completions", {"model": MODEL, "prompt": "hi " * 600}, "prompt"),
        ("completions", {"model": MODEL, "prompt": ""}, "prompt"),
        ("completions", {"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
        ("completions", {"model": MODEL, "prompt": "hi", "n": 2}, "n"),
        ("completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, "temperature"),
        ("completions", {"model": MODEL, "prompt": "hi", "logprobs": 3}, "logprobs"),
        ("completions", {"model": MODEL, "prompt": "hi", "cache": "fastcache"}, "cache"),
        # token editing is block diffusion's; the served model is full attention
        ("completions", {"model": MODEL, "prompt": "hi", "edit_threshold": 0.5}, "edit_threshold"),
        ("completions", {"model": MODEL, "prompt": "hi", "edit_threshold": 1.5}, "edit_threshold"),
        ("completions", {"model": MODEL, "prompt": "hi", "mystery": 1}, "mystery"),
        ("chat/completions", {"model": MODEL, "messages": []}, "messages"),
        ("chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 3}]}, "messages"),
        ("chat/completions", {"model": MODEL, "messages": "hi"}, "messages"),
    ],
)
def test_bad_fields_get_400_naming_the_field(live, route, body, param):
    r = httpx.post(f"{live}/v1/{route}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_the_server_keeps_working_after_bad_requests(live):
    r = httpx.post(f"{live}/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert httpx.get(f"{live}/v1/nothing", timeout=30).status_code == 404
    ok = client(live).completions.create(model=MODEL, prompt="Compute 2+2.", max_tokens=32)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_cancel_by_id_and_by_disconnect_free_the_slot(live):
    body = {"model": MODEL, "prompt": "Compute 5+5.", "max_tokens": 384, "block_length": 384, "stream": True}
    with httpx.stream("POST", f"{live}/v1/completions", json=body, timeout=60) as r:
        request_id = r.headers["x-request-id"]
        assert httpx.delete(f"{live}/v1/requests/{request_id}", timeout=30).json()["cancelled"]
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert "Cancelled" in lines[-2] and lines[-1] == "data: [DONE]"
    assert httpx.delete(f"{live}/v1/requests/{request_id}", timeout=30).status_code == 404
    # A client that goes away mid-stream: its request is cancelled too.
    with httpx.stream("POST", f"{live}/v1/completions", json=body, timeout=60) as r:
        next(r.iter_lines())
    deadline = time.time() + 30
    while time.time() < deadline and "dlmcache_running_requests 0" not in httpx.get(f"{live}/metrics").text:
        time.sleep(0.1)
    metrics = httpx.get(f"{live}/metrics").text
    assert "dlmcache_running_requests 0" in metrics
    for name in ("dlmcache_queue_length", "dlmcache_completion_tokens_per_second", "dlmcache_forwards_per_token",
                 'dlmcache_request_latency_seconds_bucket{le="+Inf"}'):  # fmt: skip
        assert name in metrics


def test_queue_overflow_timeout_and_drain_on_sigterm():
    """One slot, one queue place: the third concurrent request gets 429; a request past --timeout gets
    504; SIGTERM lets the running request finish, answers new ones 503, and the process exits."""
    long = {"model": MODEL, "prompt": "Compute 7+8.", "max_tokens": 384, "block_length": 384}
    with server("--max-batch", "1", "--max-queue", "1", "--timeout", "60") as (url, proc):

        async def burst():
            async with httpx.AsyncClient(timeout=120) as c:
                first = asyncio.create_task(c.post(f"{url}/v1/completions", json=long))
                await asyncio.sleep(0.5)
                second = asyncio.create_task(c.post(f"{url}/v1/completions", json=long))
                await asyncio.sleep(0.5)
                third = await c.post(f"{url}/v1/completions", json=long)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                during = await c.post(f"{url}/v1/completions", json=long)
                health = await c.get(f"{url}/health")
                return third, during, health, await first, await second

        third, during, health, first, second = asyncio.run(burst())
        assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
        assert during.status_code == 503 and health.status_code == 503
        assert first.status_code == 200 and second.status_code == 200  # drained, not dropped
        assert proc.wait(60) == 0
    with server("--timeout", "0.5") as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={**long, "steps": 384}, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        assert httpx.post(f"{url}/v1/completions", json={**long, "max_tokens": 32, "block_length": 32},
                          timeout=60).status_code == 200  # fmt: skip
