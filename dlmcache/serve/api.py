"""The HTTP side: OpenAI routes over an `Engine` (FastAPI; run by uvicorn in `dlmcache.serve.serve`).

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (JSON, or server-sent events with
`stream=true`), `GET /v1/models`, `DELETE /v1/requests/{id}` (cancel; the id is the response's `id`,
in the first streamed chunk too, and the `x-request-id` header), `GET /health` (200 serving, 503
draining), `GET /ready`, `GET /metrics` (Prometheus text).

Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 for an invalid field
(named in `param`; also a request larger than the whole KV pool, and two Authorization headers),
401 without a valid API key (when the server has keys), 404 for an unknown route or request id (or
one made with another key), 413 for a body over the limit, 429 when the queue is full or the prompts
held pass their budget (`PromptBudget`), 503 while draining, 504 past the per-request timeout. A
client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .engine import Cancelled, Draining, Engine, Job, NeverFits, QueueFull
from .guard import ApiKeys, BodyLimit
from .metrics import Metrics
from .requests import ApiError, ParsedRequest, parse, prompt_size

DEFAULTS = {"max_tokens": 64, "block_length": 32, "max_prompt_chars": 1_000_000}
#: Prompts of at most this many characters are tokenized on a thread of their own, so that long ones
#: never delay them.
SHORT_PROMPT = 16_384


class PromptBudget:
    """The characters of the prompts the server holds (being tokenized, queued or decoding), at most
    `limit` in all: a request past it gets 429 before its prompt is tokenized (one request alone is
    always let in)."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self._lock = threading.Lock()

    def take(self, chars: int) -> None:
        with self._lock:
            if self.held and self.held + chars > self.limit:
                raise ApiError(429, f"the server holds prompts of {self.held} characters; {chars} more would pass "
                               f"its budget of {self.limit} (--max-prompt-chars-in-flight)", None,
                               "rate_limit_error")  # fmt: skip
            self.held += chars

    def give(self, chars: int) -> None:
        with self._lock:
            self.held -= chars


def create_app(engine: Engine, model_name: str, timeout: float = 600.0, defaults: dict | None = None,
               api_keys: list[str] | tuple = (), metrics_public: bool = False,
               max_body_bytes: int = 8 * 2**20, prompt_chars_in_flight: int | None = None) -> FastAPI:  # fmt: skip
    """The FastAPI app serving `engine` under `model_name`; requests past `timeout` seconds get 504.
    api_keys: the accepted bearer keys (none: no authentication); metrics_public: /metrics without a
    key; max_body_bytes: larger bodies get 413 before they are read (`guard`); prompt_chars_in_flight:
    the `PromptBudget` (default: 4 x the longest prompt, `defaults["max_prompt_chars"]`)."""
    app = FastAPI(title="dlmcache", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(ApiKeys, keys=list(api_keys), metrics_public=metrics_public)
    app.state.engine = engine
    pipe = engine.pipe
    tokenizer = pipe.tokenizer
    longest = max((len(t) for t in tokenizer.get_vocab()), default=0)
    defaults = {**DEFAULTS, "longest_token": longest, **(defaults or {})}
    budget = PromptBudget(prompt_chars_in_flight or 4 * defaults["max_prompt_chars"])
    metrics = Metrics(engine)
    live: dict[str, Job] = {}
    # Validation and tokenizing run here, never on the event loop; short prompts on a thread of their
    # own, so that long ones delay only each other.
    parser = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="dlmcache-parse")
    short_parser = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlmcache-parse-short")

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(e.status_code, str(e.detail), None, kind).body(), status_code=e.status_code)

    async def body_of(request: Request):
        try:
            raw = await request.body()
        except ClientDisconnect:  # the client left, or `BodyLimit` cut the body off (its 413 is sent)
            raise ApiError(499, "the client closed the request") from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:  # (also an integer past Python's 4,300 digits)
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply") from None

    @app.get("/health")
    async def health():
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "running": engine.running, "queued": engine.queued}

    @app.get("/ready")
    async def ready():
        ok = not engine.draining and engine.queued < engine.max_queue
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        entry = {"id": model_name, "object": "model", "created": 0, "owned_by": "dlmcache"}
        return {"object": "list", "data": [entry]}

    @app.delete("/v1/requests/{request_id}")
    async def cancel(request_id: str, request: Request):
        job = live.get(request_id)
        if job is None or job.api_key != request.scope.get("state", {}).get("api_key"):  # only its own key
            raise ApiError(404, f"no running or queued request {request_id!r}", "request_id", "not_found_error")
        job.cancel()
        return {"id": request_id, "object": "request.cancelled", "cancelled": True}

    async def generate(request: Request, kind: str):
        body = await body_of(request)
        chars = prompt_size(kind, body)
        budget.take(chars)
        held = {"by_job": False}
        try:
            return await submitted(request, kind, body, chars, held)
        except BaseException:
            if not held["by_job"]:
                budget.give(chars)
            raise

    async def submitted(request: Request, kind: str, body, chars: int, held: dict):
        """`generate` from the parse on; once the job is submitted, its end gives the budget back."""
        lane = short_parser if chars <= SHORT_PROMPT else parser
        loop = asyncio.get_running_loop()
        parsed = await loop.run_in_executor(lane, parse, kind, body, pipe, model_name, defaults)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        events: asyncio.Queue = asyncio.Queue()

        def on_done(result):
            budget.give(chars)
            loop.call_soon_threadsafe(events.put_nowait, ("done", result))

        on_step = None
        if parsed.stream:
            progress = StreamProgress(pipe, parsed)

            def on_step(sequences, commit_step):
                tokens = progress.committed(sequences[0])
                if tokens is not None:
                    loop.call_soon_threadsafe(events.put_nowait, ("tokens", tokens))

        job = Job(parsed.prompt, parsed.options(), on_done, on_step, id=request_id,
                  tokens=parsed.prompt_tokens + parsed.max_tokens,
                  api_key=request.scope.get("state", {}).get("api_key"))  # fmt: skip
        try:
            engine.submit(job)
        except NeverFits as e:  # (not 429: a retry cannot help)
            raise ApiError(400, str(e), "max_tokens") from None
        except QueueFull as e:
            metrics.rejected += 1
            raise ApiError(429, f"the server is busy: {e}", None, "rate_limit_error") from None
        except Draining as e:
            raise ApiError(503, str(e), None, "server_error") from None
        held["by_job"] = True
        live[request_id] = job
        metrics.requests += 1
        started = time.perf_counter()
        headers = {"x-request-id": request_id}
        if parsed.stream:
            body = stream_events(request, job, events, parsed, request_id, kind, started, timeout)
            return StreamingResponse(body, media_type="text/event-stream", headers=headers)
        try:
            result = await wait_result(request, job, events, timeout)
        finally:
            live.pop(request_id, None)
        text, finish, completion_tokens = finish_text(pipe, result.sequences[0], parsed.stop)
        metrics.observe(time.perf_counter() - started, completion_tokens, result.stats)
        usage = usage_of(parsed, completion_tokens)
        return JSONResponse(response_body(kind, request_id, model_name, text, finish, usage), headers=headers)

    async def wait_result(request: Request, job: Job, events: asyncio.Queue, timeout: float):
        """The job's output; cancels it when the client goes away or the timeout passes."""
        deadline = time.perf_counter() + timeout
        while True:
            try:
                kind, result = await asyncio.wait_for(events.get(), 0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    raise ApiError(499, "the client closed the request") from None
                if time.perf_counter() > deadline:
                    job.cancel()
                    raise ApiError(504, f"the request took longer than {timeout:g} s", None, "timeout") from None
                continue
            if kind != "done":
                continue
            if isinstance(result, Cancelled):
                raise ApiError(499, "the request was cancelled", None, "cancelled")
            if isinstance(result, Exception):
                metrics.failed += 1
                raise ApiError(500, f"decoding failed: {type(result).__name__}: {result}", None, "server_error")
            return result

    async def stream_events(request, job, events, parsed: ParsedRequest, request_id, kind, started, timeout):
        """Server-sent events: one chunk per increase of the committed text, a last chunk with the
        finish reason (and usage if asked), then `data: [DONE]`. Leaving early cancels the job."""
        created = int(time.time())
        sent = ""
        decoder = TextDelta(tokenizer)
        deadline = time.perf_counter() + timeout

        def chunk(delta: str | None, finish: str | None = None, first: bool = False) -> str:
            body = chunk_body(kind, request_id, model_name, created, delta, finish, first)
            return "data: " + json.dumps(body) + "\n\n"

        try:
            if kind == "chat":
                yield chunk(None, first=True)
            while True:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    job.cancel()
                    yield "data: " + json.dumps(ApiError(504, "timeout", None, "timeout").body()) + "\n\n"
                    return
                try:
                    what, value = await asyncio.wait_for(events.get(), min(remaining, 1.0))
                except asyncio.TimeoutError:
                    continue
                if what == "tokens":
                    text = decoder.text(value)
                    cut = first_stop(text, parsed.stop)
                    if cut is not None:  # a stop sequence: send up to it and end the request now
                        job.cancel()
                        if text[:cut] != sent:
                            yield chunk(text[len(sent) : cut])
                        yield chunk(None, "stop")
                        metrics.observe(time.perf_counter() - started, len(value), {})
                        break
                    if len(text) > len(sent):
                        yield chunk(text[len(sent) :])
                        sent = text
                    continue
                if isinstance(value, Exception):  # the generation failed or was cancelled
                    err = ApiError(500, f"{type(value).__name__}: {value}", None, "server_error")
                    yield "data: " + json.dumps(err.body()) + "\n\n"
                    break
                text, finish, completion_tokens = finish_text(pipe, value.sequences[0], parsed.stop)
                if text[len(sent) :]:
                    yield chunk(text[len(sent) :])
                yield chunk(None, finish)
                if parsed.include_usage:
                    usage = {"id": request_id, "object": chunk_object(kind), "created": created, "model": model_name,
                             "choices": [], "usage": usage_of(parsed, completion_tokens)}  # fmt: skip
                    yield "data: " + json.dumps(usage) + "\n\n"
                metrics.observe(time.perf_counter() - started, completion_tokens, value.stats)
                break
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects (the generator is closed)
            job.cancel()
            live.pop(request_id, None)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    return app


class StreamProgress:
    """The committed prefix of a request's answer, step by step: tokens up to the first still-masked
    position (or EOS); None when nothing new is committed (or, with stream_every="block", no block
    has been finished since the last report)."""

    def __init__(self, pipe, parsed: ParsedRequest):
        self.mask, self.eos = pipe.mask_token_id, pipe.tokenizer.eos_token_id
        self.block = parsed.block_length if parsed.stream_every == "block" else 1
        self.reported = 0

    def committed(self, sequence) -> list[int] | None:
        row = sequence.tolist()
        end = row.index(self.mask) if self.mask in row else len(row)
        done = self.eos in row[:end] or end == len(row)
        if self.eos in row[:end]:
            end = row.index(self.eos)
        if end <= self.reported or (not done and end // self.block == self.reported // self.block):
            return None
        self.reported = end
        return row[:end]


class TextDelta:
    """Text of a growing token prefix, held back while it ends in an incomplete character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.last = ""

    def text(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return self.last
        self.last = text
        return text


def first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


def finish_text(pipe, sequence, stops: list[str]) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens): the answer up to EOS, cut at the first stop sequence."""
    row = sequence.tolist()
    eos = pipe.tokenizer.eos_token_id
    tokens = row[: row.index(eos)] if eos in row else row
    text = pipe.decode(sequence[None])[0]
    finish = "stop" if eos in row else "length"
    cut = first_stop(text, stops)
    if cut is not None:
        text, finish = text[:cut], "stop"
    return text, finish, len(tokens)


def usage_of(parsed: ParsedRequest, completion_tokens: int) -> dict:
    total = parsed.prompt_tokens + completion_tokens
    return {"prompt_tokens": parsed.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def response_body(kind: str, request_id: str, model: str, text: str, finish: str, usage: dict) -> dict:
    created = int(time.time())
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": None}  # fmt: skip
        return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [choice], "usage": usage}  # fmt: skip
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [choice],
            "usage": usage}  # fmt: skip


def chunk_object(kind: str) -> str:
    return "chat.completion.chunk" if kind == "chat" else "text_completion"


def chunk_body(kind, request_id, model, created, delta, finish, first=False) -> dict:
    if kind == "chat":
        d = {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
        choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
    return {"id": request_id, "object": chunk_object(kind), "created": created, "model": model, "choices": [choice]}
