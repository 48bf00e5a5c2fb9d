"""`dlmcache serve` against hostile clients (issue 24's reproductions): huge and deeply nested bodies,
connections that never finish their headers or pile up, strangers without a key, values past the
documented maxima, and command lines that must fail before the model loads."""

import asyncio
import os
import signal
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
def guarded(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"{KEY}\n{OTHER}\n")
    args = ("--api-key-file", str(keys), "--max-body-mb", "1", "--max-prompt-chars", "20000",
            "--max-connections", "40", "--header-timeout", "1", "--body-timeout", "2",
            "--kv-cache-gb", "0.002")  # fmt: skip
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


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (reading and dropping what it sends)."""
    sock.settimeout(0.2)
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_a_keep_alive_connection_with_half_a_second_head_is_closed(guarded):
    """Issue 37, case 2: after one whole request, half a second request head held the socket for good."""
    url, _ = guarded
    s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    s.settimeout(10)
    assert s.recv(65536).startswith(b"HTTP/1.1 200")
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: the head never ends
    assert closed_within(s, 4)  # --header-timeout 1 (uvicorn's keep-alive timer stopped at the first byte)
    s.close()


def test_a_body_trickling_a_byte_at_a_time_is_cut(guarded):
    """Issue 37, case 2: a body sent a byte every second held its connection (and request) for good."""
    url, _ = guarded
    s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    s.sendall((head + "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode())
    t = time.time()
    closed = False
    while time.time() - t < 6 and not closed:
        try:
            s.sendall(b" ")
        except OSError:
            closed = True
            break
        closed = closed_within(s, 1)
    assert closed and time.time() - t < 5  # --body-timeout 2
    s.close()


def test_two_authorization_headers_get_400(guarded):
    url, _ = guarded
    headers = [("Authorization", f"Bearer {KEY}"), ("Authorization", "Bearer sk-wrong")]
    r = httpx.post(url + "/v1/chat/completions", json=chat_body(), headers=headers, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "duplicate_authorization"
    r = httpx.get(url + "/v1/models", headers=list(reversed(headers)), timeout=30)
    assert r.status_code == 400


def test_an_integer_of_4301_digits_gets_400_in_openais_body(guarded):
    url, _ = guarded
    body = b'{"model": "dlmcache/tiny", "prompt": "1+1=", "max_tokens": 1' + b"0" * 4300 + b"}"
    r = httpx.post(url + "/v1/completions", content=body, headers={**auth(), "content-type": "application/json"},
                   timeout=30)  # fmt: skip
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_a_request_larger_than_the_whole_kv_pool_gets_400_not_429(guarded):
    """A 429 makes OpenAI's client retry a request that can never fit (--kv-cache-gb 0.002: ~340 tokens)."""
    url, _ = guarded
    r = httpx.post(url + "/v1/chat/completions", json=chat_body(max_tokens=448), headers=auth(), timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "max_tokens" and "KV pool holds" in r.json()["error"]["message"]


def test_long_prompts_cannot_starve_a_short_one(guarded):
    """Issue 37, case 3: 20 concurrent prompts just under --max-prompt-chars made a normal request wait
    behind their tokenizing. Prompts that must be longer than the model takes are refused first, the
    characters held at once are budgeted, and short prompts are tokenized on a thread of their own."""
    url, _ = guarded
    long = {"model": MODEL, "prompt": "7" * 19_999, "max_tokens": 32}

    async def burst():
        async with httpx.AsyncClient(timeout=60, headers=auth()) as c:
            longs = [asyncio.create_task(c.post(url + "/v1/completions", json=long)) for _ in range(20)]
            await asyncio.sleep(0.05)
            t = time.perf_counter()
            short = await c.post(url + "/v1/chat/completions", json=chat_body())
            return short, time.perf_counter() - t, await asyncio.gather(*longs)

    short, seconds, longs = asyncio.run(burst())
    assert short.status_code == 200 and seconds < 5
    for r in longs:  # refused before tokenizing: too long for the model, or past the prompt budget
        assert (r.status_code, r.json()["error"]["param"]) in ((400, "prompt"), (429, None)), r.text


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
        (["--max-body-mb", "nan"], "(0, 1048576]"),
        (["--dtype", "int8"], "invalid choice"),
        (["--threshold", "2"], "[0, 1]"),
        (["--graphs", "cuda"], "'cuda' replays CUDA graphs; --device is 'cpu'"),
        (["--graphs", "tape"], "invalid choice"),
        # issue 37, case 4: these ended in tracebacks
        (["--model", "/nonexistent"], "no such local file"),
        (["--cache", "bogus"], "unknown part 'bogus'"),
        (["--max-body-mb", "1e308"], "(0, 1048576]"),
        (["--kv-cache-gb", "100000"], "GiB of memory"),
        (["--kv-cache-gb", "1e-9"], "--kv-cache-gb"),  # (after the model loads: the pool's block size)
        (["--api-key-file", "/nonexistent"], "--api-key-file"),
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
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("dlmcache serve: error:"), out.stderr  # one line
    assert time.perf_counter() - t < 30


def test_a_key_on_the_command_line_is_warned_about(capsys, tmp_path):
    """Issue 37, case 10: --api-key is readable in the process list; a file or the environment is not."""
    from dlmcache.cli import Parser, api_keys, serve_parser

    parser = Parser(prog="dlmcache")
    serve = serve_parser(parser.add_subparsers())
    assert api_keys(serve, serve.parse_args(["--api-key", "sk-1"])) == ["sk-1"]
    assert "process list" in capsys.readouterr().err
    (tmp_path / "keys").write_text("sk-2\n\nsk-3\n")
    assert api_keys(serve, serve.parse_args(["--api-key-file", str(tmp_path / "keys")])) == ["sk-2", "sk-3"]
    assert capsys.readouterr().err == ""


def test_a_public_host_without_a_key_is_warned_about():
    from dlmcache.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def test_a_connection_flood_past_the_file_limit_leaves_the_server_serving():
    """Issue 37, case 2: under `ulimit -n`, a flood of trickling connections made the accept loop fail
    for want of descriptors, a traceback per attempt, and normal requests time out. The connection cap
    is kept below the file limit, and bodies have a deadline."""
    import resource

    def low_file_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    with server("--body-timeout", "2", preexec_fn=low_file_limit) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        flood = []
        for _ in range(300):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
                s.sendall(head)
                flood.append(s)
            except OSError:
                pass
        time.sleep(3)  # past --body-timeout: the held ones are cut
        r = httpx.post(url + "/v1/chat/completions", json=chat_body(), timeout=30)
        assert r.status_code == 200
        for s in flood:
            s.close()
        proc.terminate()
        proc.wait(60)
        log = proc.stdout.read()
    assert "Traceback" not in log and log.count("Too many open files") <= 1, log[-3000:]
    assert "lowered to" in log  # the cap says it was lowered


def test_a_second_sigterm_during_the_drain_exits_non_zero_without_tracebacks():
    """Issue 37, case 10: the second signal cut the streams, exited 0 and logged CancelledError tracebacks."""
    body = {"model": MODEL, "prompt": "Compute 7+8.", "max_tokens": 384, "block_length": 384, "stream": True}
    with server() as (url, proc):

        async def streams():
            async with httpx.AsyncClient(timeout=60) as c:

                async def one():
                    try:
                        async with c.stream("POST", url + "/v1/completions", json=body) as r:
                            async for _ in r.aiter_bytes():
                                pass
                    except httpx.HTTPError:
                        pass

                tasks = [asyncio.create_task(one()) for _ in range(4)]
                await asyncio.sleep(1.0)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                proc.send_signal(signal.SIGTERM)
                await asyncio.gather(*tasks)

        asyncio.run(streams())
        assert proc.wait(30) == 1
        log = proc.stdout.read()
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    assert "second signal" in log
