"""`dlmcache serve`: an OpenAI-compatible HTTP server over a diffusion LM, with continuous batching.

    from dlmcache.serve import serve
    serve("dlmcache/tiny", cache="freecache", port=8000)            # blocks; Ctrl-C / SIGTERM drains

or from a shell: `dlmcache serve --model dlmcache/tiny --port 8000`. The pieces: `Engine` (continuous
batching, `engine`), `create_app` (the routes, `api`), `load_pipeline` (the model as the CLI loads it).
Needs the `serve` extra (fastapi, uvicorn).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("dlmcache.serve")

__all__ = ["DEFAULT_CACHE", "Engine", "build", "create_app", "load_pipeline", "run", "serve"]

#: The server's default cache: FreeCache with its defaults (token freezing, no suffix window: the
#: fewest tokens per step, what a batch of requests is bound by; docs/results.md).
DEFAULT_CACHE = "freecache"


def __getattr__(name):
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "create_app":
        from .api import create_app

        return create_app
    raise AttributeError(f"module 'dlmcache.serve' has no attribute {name!r}")


def load_pipeline(model: str = "dlmcache/tiny", cache: str = DEFAULT_CACHE, guide: str | None = None,
                  threshold: float | None = None, dtype: str = "float32", device: str = "cpu"):  # fmt: skip
    """A `DLMPipeline` configured for serving: `cache` as a run-config cache string ("freecache",
    "freecache:suffix_window=0", ...), an optional guide (path / hub id / bundled name) and threshold."""
    import torch

    from dlmcache import DLMPipeline
    from dlmcache.run_config import RunConfig

    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype={dtype!r}: expected a torch dtype name such as float32 or bfloat16")
    text = cache + (f"+threshold={threshold}" if threshold is not None else "")
    config = RunConfig.parse(text)
    pipe = DLMPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype), device=device)
    pipe.set_progress_bar_config(disable=True)
    config.apply(pipe)
    if guide is not None:
        pipe.set_guide(guide, torch_dtype=getattr(torch, dtype))
    return pipe


def serve(model: str = "dlmcache/tiny", host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Load the model and serve it until SIGINT / SIGTERM: the first signal drains (running and queued
    requests finish, new ones get 503, /health turns 503), then the process exits; a second signal
    exits at once, with status 1. `options`: those of `build` (the limits and the model's settings)."""
    run(build(model, host, port, **options))


def build(model: str = "dlmcache/tiny", host: str = "127.0.0.1", port: int = 8000, cache: str = DEFAULT_CACHE,
          guide: str | None = None, threshold: float | None = None, max_batch: int = 16, max_queue: int = 64,
          threads: int | str | None = "auto", timeout: float = 600.0, drain_timeout: float = 600.0,
          dtype: str = "float32", device: str = "cpu", model_name: str | None = None,
          log_level: str = "info", kv_bytes: int | None = None, api_keys: list[str] | tuple = (),
          metrics_public: bool = False, max_body_mb: float = 8.0, max_prompt_chars: int = 1_000_000,
          prompt_chars_in_flight: int | None = None, max_connections: int = 1024, header_timeout: float = 10.0,
          body_timeout: float = 30.0, keep_alive_timeout: float = 5.0, graphs: str = "off",
          batch_invariant: bool = False):  # fmt: skip
    """Everything `serve` runs, loaded and checked, not yet listening: raises `ValueError`,
    `OSError` (a checkpoint that is not there) or `RuntimeError` for what cannot be served.
    api_keys: bearer keys clients must present (`guard.ApiKeys`); a non-loopback host without one is
    served with a warning. max_body_mb, max_prompt_chars, prompt_chars_in_flight: request limits checked
    before parsing / tokenizing (`api.PromptBudget`); max_connections (kept below the file limit:
    `guard.connection_cap`), header_timeout, body_timeout, keep_alive_timeout: what one client may hold;
    graphs: the engine's static shapes ("cuda": one CUDA graph per shape bucket); batch_invariant:
    every answer the same bits whatever else is in the batch (`set_batch_invariant`)."""
    import uvicorn

    from .api import create_app
    from .engine import Engine
    from .guard import OncePerBurst, connection_cap, protocol

    if not api_keys and not is_loopback(host):
        log.warning("serving on %s without an API key: anyone who reaches it may use and cancel requests "
                    "(set DLMCACHE_API_KEY or --api-key-file)", host)  # fmt: skip
    pipe = load_pipeline(model, cache, guide, threshold, dtype, device)
    if batch_invariant:
        pipe.model.set_batch_invariant(True)
    try:
        engine = Engine(pipe, max_batch=max_batch, max_queue=max_queue, threads=threads, kv_bytes=kv_bytes,
                        graphs=graphs)  # fmt: skip
    except ValueError as e:
        if kv_bytes is None:
            raise
        raise ValueError(f"kv_bytes={kv_bytes} (--kv-cache-gb): {e}") from None
    app = create_app(engine, model_name or model, timeout=timeout, defaults={"max_prompt_chars": max_prompt_chars},
                     api_keys=api_keys, metrics_public=metrics_public, max_body_bytes=int(max_body_mb * 2**20),
                     prompt_chars_in_flight=prompt_chars_in_flight)  # fmt: skip
    cap = connection_cap(max_connections)
    if cap < max_connections:
        log.warning("--max-connections %d lowered to %d: this process may open %s files (ulimit -n)",
                    max_connections, cap, _file_limit())  # fmt: skip
    logging.getLogger("asyncio").addFilter(OncePerBurst())
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            http=protocol(cap, header_timeout, body_timeout),
                            timeout_keep_alive=keep_alive_timeout)  # fmt: skip
    return DrainingServer(config, engine, drain_timeout)


def run(server) -> None:
    """Serve until the signals say (see `serve`)."""
    server.engine.start()
    try:
        server.run()
    finally:
        server.engine.stop()


def _file_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, but a shutdown signal first drains the engine."""

        def __init__(self, config, engine, drain_timeout: float):
            super().__init__(config)
            self.engine, self.drain_timeout = engine, drain_timeout
            self._drain_started = False

        def handle_exit(self, sig, frame) -> None:
            if self._drain_started:  # a second signal: stop now, cutting what runs, and say so
                log.warning("a second signal during the drain: exiting now, %d request(s) cut",
                            self.engine.running + self.engine.queued)  # fmt: skip
                logging.shutdown()
                os._exit(1)
            self._drain_started = True

            def drain_then_exit():
                self.engine.drain(self.drain_timeout)
                self.should_exit = True

            threading.Thread(target=drain_then_exit, name="dlmcache-drain", daemon=True).start()

    return DrainingServer


def DrainingServer(config, engine, drain_timeout: float):  # noqa: N802 (a class built on first use)
    return _server_class()(config, engine, drain_timeout)
