"""What stands in front of the routes: connection limits, a body limit and API keys.

- `GuardedProtocol` (uvicorn's h11 protocol): at most `max_connections` open connections (the next
  is closed on accept, one log line per refusal burst), and a connection that has not sent a whole
  request head within `header_timeout` seconds is closed (uvicorn's own keep-alive timeout only
  starts after a first response, so a client that never finishes its headers would hold its socket
  forever).
- `BodyLimit` (ASGI): a body larger than `max_bytes` is answered 413 before anything reads it: at
  once from Content-Length, or as soon as a chunked body passes the limit.
- `ApiKeys` (ASGI): with keys configured, every route but /health and /ready (and /metrics, when
  public) needs `Authorization: Bearer <key>`, else 401 with OpenAI's error body. The key a request
  was made with is in the scope (`scope["state"]["api_key"]`), so only it may cancel that request.
"""

from __future__ import annotations

import hmac
import json
import logging
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
        if scope["type"] != "http" or not self.keys:
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
    """uvicorn's h11 protocol with a cap on open connections and a deadline for the request head
    (class attributes, set by `protocol`)."""

    max_connections = 1024
    header_timeout = 10.0
    _last_refusal = 0.0
    _refused = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
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
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None:
            self._cancel_head_deadline()

    def connection_lost(self, exc) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _cancel_head_deadline(self) -> None:
        deadline = getattr(self, "_head_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._head_deadline = None


def protocol(max_connections: int, header_timeout: float) -> type[GuardedProtocol]:
    """A `GuardedProtocol` class with these limits (uvicorn builds one protocol per connection)."""
    return type("GuardedProtocol", (GuardedProtocol,), {"max_connections": max_connections,
                                                         "header_timeout": header_timeout})  # fmt: skip
