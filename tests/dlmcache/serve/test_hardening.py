"""`dlmcache serve` against hostile clients (issue 24's reproductions): huge and deeply nested bodies,
connections that never finish their headers or pile up, strangers without a key, values past the
documented maxima, and command lines that must fail before the model loads."""

import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from dlmcache import tinytask
from tests.dlmcache.serve.test_server import MODEL, server

KEY = "sk-test-key-1"
OTHER = "sk-test-key-2"


@pytest.fixture(scope="module")
def guarded():
    args = ("--api-key", KEY, "--api-key", OTHER, "--max-body-mb", "1", "--max-prompt-chars", "20000",
            "--max-connections", "40", "--header-timeout", "1")  # fmt: skip
    with server(*args) as (url, proc):
        yield url, proc


def auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def chat_body(**extra):
    return {"model": MODEL, "messages": tinytask.messages(tinytask.test_problems(1)[0]), "max_tokens": 32, **extra}


def test_strangers_get_401_health_stays_open(guarded):
    url, _ = guarded
    for path, method in (("/v1/models", "GET"), ("/metrics", "GET"), ("/v1/chat/completions", "POST")):
        r = httpx.request(method, url + path, json=chat_body(), timeout=30)
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.request(method, url + path, json=chat_body(), headers=auth("sk-wrong"), timeout=30)
        assert r.status_code == 401
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert httpx.get(url + "/ready", timeout=10).status_code == 200
    assert httpx.get(url + "/metrics", headers=auth(), timeout=10).status_code == 200
    r = httpx.post(url + "/v1/chat/completions", json=chat_body(), headers=auth(OTHER), timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_only_the_creating_key_may_cancel(guarded):
    url, _ = guarded
    body = chat_body(max_tokens=256, stream=True)
    ids = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth(), timeout=60) as r:
        ids.append(r.headers["x-request-id"])
        request_id = ids[0]
        other = httpx.delete(f"{url}/v1/requests/{request_id}", headers=auth(OTHER), timeout=10)
        assert other.status_code == 404
        mine = httpx.delete(f"{url}/v1/requests/{request_id}", headers=auth(), timeout=10)
        assert mine.status_code == 200 and mine.json()["cancelled"]


def test_a_huge_body_gets_413_and_health_stays_fast(guarded):
    url, _ = guarded
    huge = b'{"model": "x", "prompt": "' + b"a" * (3 * 2**20) + b'"}'
    timings = []

    def health():
        t = time.perf_counter()
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        timings.append(time.perf_counter() - t)

    probe = threading.Thread(target=health)
    probe.start()
    r = httpx.post(url + "/v1/completions", content=huge, headers={**auth(), "content-type": "application/json"},
                   timeout=30)  # fmt: skip
    probe.join()
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    assert timings[0] < 5

    # chunked: no Content-Length, refused once the body passes the limit
    def chunks():
        for _ in range(40):
            yield b"a" * 2**16

    r = httpx.post(url + "/v1/completions", content=chunks(), headers=auth(), timeout=30)
    assert r.status_code == 413


def test_a_long_prompt_is_refused_before_tokenizing(guarded):
    url, _ = guarded
    body = {"model": MODEL, "prompt": "1+1=2. " * 5000, "max_tokens": 32}  # 35k characters, under 1 MB
    t = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json=body, headers=auth(), timeout=30)
    assert r.status_code == 400 and "--max-prompt-chars" in r.json()["error"]["message"]
    assert time.perf_counter() - t < 5


def test_deep_nesting_huge_echoes_and_values_past_maxima_get_clear_400s(guarded):
    url, _ = guarded
    deep = b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(url + "/v1/completions", content=deep, headers={**auth(), "content-type": "application/json"},
                   timeout=30)  # fmt: skip
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    r = httpx.post(url + "/v1/chat/completions", json=chat_body(stop=["x"] * 10_000), headers=auth(), timeout=30)
    assert r.status_code == 400 and len(r.json()["error"]["message"]) < 700
    r = httpx.post(url + "/v1/chat/completions", json=chat_body(steps=10**9), headers=auth(), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "steps"


def test_connections_that_never_finish_their_headers_are_closed(guarded):
    url, proc = guarded
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]  # over --max-connections 40
    for s in idle:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never the blank line that ends the head
    time.sleep(2.5)  # past --header-timeout 1
    closed = 0
    for s in idle:
        s.settimeout(2)
        try:
            closed += s.recv(1) == b""
        except (ConnectionResetError, TimeoutError, OSError):
            closed += 1
        s.close()
    assert closed == len(idle)
    # and the server still answers
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    r = httpx.post(url + "/v1/chat/completions", json=chat_body(), headers=auth(), timeout=60)
    assert r.status_code == 200


def test_after_all_of_it_the_log_has_no_traceback(guarded):
    """Runs last against the guarded server (it stops it): every refusal above was a log line at most."""
    url, proc = guarded

    def chunks():
        for _ in range(40):
            yield b"a" * 2**16

    assert httpx.post(url + "/v1/completions", content=chunks(), headers=auth(), timeout=30).status_code == 413
    proc.terminate()
    proc.wait(60)
    log = proc.stdout.read()
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "99999"], "outside 1..65535"),
        (["--log-level", "nope"], "invalid choice"),
        (["--max-queue", "-1"], "must be >= 0"),
        (["--threads", "0"], "> 0"),
        (["--max-body-mb", "nan"], "> 0"),
        (["--dtype", "int8"], "invalid choice"),
        (["--threshold", "2"], "[0, 1]"),
        (["--graphs", "cuda"], "'cuda' replays CUDA graphs; --device is 'cpu'"),
        (["--graphs", "tape"], "invalid choice"),
        pytest.param(["--device", "cuda"], "no such CUDA device",
                     marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")),
    ],
)  # fmt: skip
def test_bad_command_lines_fail_before_the_model_loads(args, message):
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "dlmcache.cli", "serve", *args], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert time.perf_counter() - t < 30


def test_a_public_host_without_a_key_is_warned_about():
    from dlmcache.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
