"""The `dlmcache` command: `dlmcache serve [options]` (see `dlmcache serve --help`)."""

from __future__ import annotations

import argparse
import os
import sys


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    return parse


def _threads(text: str):
    return "auto" if text == "auto" else _positive(int)(text)


def serve_parser(sub) -> None:
    from dlmcache.serve import DEFAULT_CACHE

    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server with continuous batching",
        description="Serve a diffusion LM over OpenAI's /v1/completions and /v1/chat/completions (and /v1/models, "
        "/health, /ready, /metrics). The defaults serve the bundled tiny model, offline, on 127.0.0.1:8000.",
    )
    p.add_argument("--model", default="dlmcache/tiny", help="a local directory, hub id or bundled name")
    p.add_argument("--model-name", default=None, help="the name clients pass as `model` (default: --model)")
    p.add_argument("--cache", default=DEFAULT_CACHE, help="a cache with options, as in run configs")
    p.add_argument("--cache-options", default=None, help="extra cache options k=v,k=v (appended to --cache)")
    p.add_argument("--guide", default=None, help="guided unmasking with this causal LM (path / hub id / bundled)")
    p.add_argument("--threshold", type=float, default=None, help="parallel decoding: commit tokens above it")
    p.add_argument("--max-batch", type=_positive(int), default=16, help="requests decoded at once")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond them (then 429)")
    p.add_argument("--timeout", type=_positive(float), default=600.0, help="per-request timeout, seconds (then 504)")
    p.add_argument("--kv-cache-gb", type=_positive(float), default=None,
                   help="the KV pool's size (default: room for --max-batch requests of the model's longest sequence, "
                   "at most a quarter of the device's memory); requests beyond it wait")  # fmt: skip
    p.add_argument("--threads", type=_threads, default="auto",
                   help="compute threads: a count, or 'auto' (default): per forward, from its FLOPs")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-level", default="info")


def main(argv: list[str] | None = None) -> None:
    # Idle OpenMP threads sleep instead of spinning, so a CPU shared with other jobs slows the server
    # down in proportion instead of collapsing it (docs/results.md). OpenMP reads this when torch
    # loads, hence before any import of torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ap = argparse.ArgumentParser(prog="dlmcache", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    serve_parser(sub)
    args = ap.parse_args(argv)
    if args.command == "serve":
        try:
            import fastapi  # noqa: F401
            import greenlet  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as e:
            sys.exit(f"dlmcache serve needs the serve extra: pip install 'dlmcache[serve]' ({e})")
        from dlmcache.serve import serve

        cache = args.cache
        if args.cache_options:
            cache += ("," if ":" in cache else ":") + args.cache_options
        serve(
            args.model, host=args.host, port=args.port, cache=cache, guide=args.guide, threshold=args.threshold,
            max_batch=args.max_batch, max_queue=args.max_queue, threads=args.threads,
            kv_bytes=None if args.kv_cache_gb is None else int(args.kv_cache_gb * 2**30), timeout=args.timeout,
            dtype=args.dtype, device=args.device, model_name=args.model_name, log_level=args.log_level,
        )  # fmt: skip


if __name__ == "__main__":
    main()
