"""`dlmcache serve` as a Ray Serve deployment: each replica loads the model and runs its own `Engine`
behind the same OpenAI routes; Ray Serve's HTTP proxy spreads requests over the replicas.

    from ray import serve
    from dlmcache.serve.ray_serve import ray_app
    serve.run(ray_app("dlmcache/tiny", num_replicas=2), route_prefix="/")   # http://127.0.0.1:8000/v1/...

Needs the `ray` extra (`pip install 'dlmcache[ray]'`). A replica being stopped drains its engine first
(running and queued requests finish).
"""

from __future__ import annotations

from ray import serve

from . import DEFAULT_CACHE, load_pipeline
from .api import create_app
from .engine import Engine


@serve.ingress()
class DLMServeReplica:
    """One replica: a pipeline, its engine and the OpenAI app over them."""

    def __init__(self, model: str, model_name: str, cache: str, max_batch: int, max_queue: int,
                 threads: int | None, timeout: float, dtype: str, device: str):  # fmt: skip
        self.pipe = load_pipeline(model, cache, dtype=dtype, device=device)
        self.engine = Engine(self.pipe, max_batch=max_batch, max_queue=max_queue, threads=threads).start()
        self.model_name, self.timeout = model_name, timeout

    def __serve_build_asgi_app__(self):
        return create_app(self.engine, self.model_name, timeout=self.timeout)

    def check_health(self) -> None:
        if self.engine.draining:
            raise RuntimeError("draining")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.drain(timeout=60)
            engine.stop()


def ray_app(model: str = "dlmcache/tiny", num_replicas: int = 1, num_cpus: float = 1.0, cache: str = DEFAULT_CACHE,
            max_batch: int = 16, max_queue: int = 64, threads: int | None = None, timeout: float = 600.0,
            dtype: str = "float32", device: str = "cpu", model_name: str | None = None):  # fmt: skip
    """A bound Ray Serve application of `num_replicas` replicas, each with `num_cpus` CPUs (and as many
    compute threads unless `threads` says otherwise)."""
    deployment = serve.deployment(
        DLMServeReplica, name="dlmcache", num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=max_batch + max_queue,
    )  # fmt: skip
    threads = threads or max(1, int(num_cpus))
    return deployment.bind(model, model_name or model, cache, max_batch, max_queue, threads, timeout, dtype, device)
