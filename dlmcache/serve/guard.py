"""What stands in front of the routes: connection limits, a body limit and API keys.

- `GuardedProtocol` (uvicorn's h11 protocol): at most `max_connections` open connections (the next
  is closed on accept, one log line per refusal burst; `connection_cap` keeps the cap below the
  process's file limit), and a deadline for every phase of a connection: its request head, its body,
  and its idle keep-alive; `OncePerBurst` mutes repeated accept errors.
- `BodyLimit` (ASGI): a body larger than `max_bytes` is answered 413 before anything reads it: at
  once from Content-Length, or as soon as a chunked body passes the limit.
- `ApiKeys` (ASGI): with keys configured, every route but /health and /ready (and /metrics, when
  public) needs `Authorization: Bearer <key>`, else 401 with OpenAI's error body; a request with
  two Authorization headers gets 400, keys or not. The key a request
  was made with is in the scope (`scope["state"]["api_key"]`), so only it may cancel that request.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("dlmcache.serve")

OPEN_PATHS = ("/health", "/ready")


def error_body(message: str, type_: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


async def send_json(send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for request bodies over `max_bytes` (see the module docstring)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_body(f"the request body is larger than {self.max_bytes} bytes (--max-body-mb)",
                             "invalid_request_error", "body_too_large")  # fmt: skip
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_json(send, 413, too_big)
        seen, answered = 0, False

        async def counted_receive():
            nonlocal seen, answered
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    answered = True
                    await send_json(send, 413, too_big)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not answered:
                await send(message)

        return await self.app(scope, counted_receive, guarded_send)


class ApiKeys:
    """Bearer-key authentication (see the module docstring); `keys` empty: everything is open."""

    def __init__(self, app, keys: list[str], metrics_public: bool = False):
        self.app, self.keys, self.metrics_public = app, [k.encode() for k in keys], metrics_public

    def key_of(self, scope) -> str | None:
        """The configured key the request presents, or None."""
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        token = token.strip()
        # compare with every key in constant time (no early exit that would time the match)
        matches = [hmac.compare_digest(token, k) for k in self.keys]
        return token.decode() if any(matches) else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if sum(name == b"authorization" for name, _ in scope["headers"]) > 1:  # (which would count?)
            body = error_body("the request has more than one Authorization header", "invalid_request_error",
                              "duplicate_authorization")  # fmt: skip
            return await send_json(send, 400, body)
        if not self.keys:
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path in OPEN_PATHS or (path == "/metrics" and self.metrics_public):
            return await self.app(scope, receive, send)
        key = self.key_of(scope)
        if key is None:
            body = error_body("a valid API key is needed: 'Authorization: Bearer <key>'", "invalid_request_error",
                              "invalid_api_key")  # fmt: skip
            return await send_json(send, 401, body)
        scope.setdefault("state", {})["api_key"] = key
        return await self.app(scope, receive, send)


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with a cap on open connections and a deadline for each phase of a
    connection (class attributes, set by `protocol`):

    - head: `header_timeout` seconds for a whole request head, from the connection's start and again
      from the end of each response (uvicorn's keep-alive timer stops at the first byte, so half a
      second head would hold the socket forever);
    - body: `body_timeout` seconds for the whole body once the head is in (a body trickling a byte at a
      time is cut; the route sees a disconnect);
    - idle keep-alive: uvicorn's `timeout_keep_alive`.
    A connection past a deadline is closed."""

    max_connections = 1024
    header_timeout = 10.0
    body_timeout = 30.0
    _last_refusal = 0.0
    _refused = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = None
        self._phase_cycle = None  # the request whose head began the current body phase
        if len(self.connections) > self.max_connections:
            cls = type(self)
            cls._refused += 1
            now = time.monotonic()
            if now - cls._last_refusal > 10:  # one line per burst, never a traceback per socket
                log.warning("refused %d connection(s): %d open (--max-connections %d)", cls._refused,
                            len(self.connections) - 1, self.max_connections)  # fmt: skip
                cls._last_refusal, cls._refused = now, 0
            transport.abort()
            return
        self._arm(self.header_timeout)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._next_phase()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._next_phase()

    def _next_phase(self) -> None:
        """Re-arm the deadline for the phase the connection is in now."""
        cycle = self.cycle
        if self.transport.is_closing():
            return self._disarm()
        if cycle is None or cycle.response_complete:  # waiting for a (next) request head
            if self._phase_cycle is not cycle or self._deadline is None:
                self._phase_cycle = cycle
                self._arm(self.header_timeout)
        elif cycle is not self._phase_cycle:  # a new request's head is in
            self._phase_cycle = cycle
            if cycle.more_body:
                self._arm(self.body_timeout)
            else:
                self._disarm()
        elif not cycle.more_body:  # its body is in: the request runs under its own timeout
            self._disarm()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def connection_cap(requested: int, reserve: int = 64) -> int:
    """`requested` open connections at most, and fewer than this process may open files
    (`RLIMIT_NOFILE`, less `reserve` for the model's files, logs and the event loop), so that accepting
    a connection never fails for want of a descriptor."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    open_now = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
    return max(1, min(requested, soft - open_now - reserve))


class OncePerBurst(logging.Filter):
    """A log filter passing one record of each message per `seconds` (without its traceback), so a
    flood of failing accepts ("Too many open files") writes a line, not a traceback per socket."""

    def __init__(self, seconds: float = 10.0):
        super().__init__()
        self.seconds, self._last = seconds, {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None:
            return True
        key, now = (record.name, str(record.msg)), time.monotonic()
        if now - self._last.get(key, -self.seconds) < self.seconds:
            return False
        self._last[key] = now
        error = record.exc_info[1]
        record.msg = f"{record.getMessage()}: {type(error).__name__}: {error} (repeats muted for {self.seconds:g} s)"
        record.args, record.exc_info, record.exc_text = (), None, None
        return True


def protocol(max_connections: int, header_timeout: float, body_timeout: float = 30.0) -> type[GuardedProtocol]:
    """A `GuardedProtocol` class with these limits (uvicorn builds one protocol per connection)."""
    limits = {"max_connections": max_connections, "header_timeout": header_timeout, "body_timeout": body_timeout}
    return type("GuardedProtocol", (GuardedProtocol,), limits)
