"""The `dlmcache` command: `dlmcache serve [options]` (see `dlmcache serve --help`)."""

from __future__ import annotations

import argparse
import math
import os
import sys


def _number(kind, ok, rule: str):
    """An argparse type: a finite `kind` for which `ok(value)` holds, else an error saying `rule`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} {rule}")
        return value

    return parse


def _positive(kind):
    return _number(kind, lambda v: v > 0, "must be a finite number > 0")


_at_least_zero = _number(int, lambda v: v >= 0, "must be >= 0")
_port = _number(int, lambda v: 1 <= v <= 65535, "is outside 1..65535")
_threshold = _number(float, lambda v: 0 <= v <= 1, "must be in [0, 1]")


def _threads(text: str):
    return "auto" if text == "auto" else _positive(int)(text)


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (the usage stays with --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
DTYPES = ("float32", "bfloat16", "float16", "float64")


def serve_parser(sub) -> argparse.ArgumentParser:
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
    p.add_argument("--threshold", type=_threshold, default=None, help="parallel decoding: commit tokens above it")
    p.add_argument("--max-batch", type=_positive(int), default=16, help="requests decoded at once")
    p.add_argument("--max-queue", type=_at_least_zero, default=64, help="requests waiting beyond them (then 429)")
    p.add_argument("--timeout", type=_positive(float), default=600.0, help="per-request timeout, seconds (then 504)")
    p.add_argument("--kv-cache-gb", type=_positive(float), default=None,
                   help="the KV pool's size (default: room for --max-batch requests of the model's longest sequence, "
                   "at most a quarter of the device's memory); requests beyond it wait")  # fmt: skip
    p.add_argument("--threads", type=_threads, default="auto",
                   help="compute threads: a count, or 'auto' (default): per forward, from its FLOPs")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (a non-loopback one wants --api-key)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--graphs",
        default="off",
        choices=("off", "buckets", "cuda"),
        help="static step shapes: 'cuda' replays one CUDA graph per shape bucket (GPU only)",
    )
    p.add_argument(
        "--batch-invariant",
        action="store_true",
        help="every answer the same bits whatever else is in the batch (fixed-shape matmuls; slower)",
    )
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    p.add_argument("--api-key-file", default=None,
                   help="a file of keys clients must send as 'Authorization: Bearer <key>', one per line (or the "
                   "DLMCACHE_API_KEY environment variable; default: none)")  # fmt: skip
    p.add_argument("--api-key", action="append", default=None,
                   help="a key on the command line (repeatable), where other local users can read it in the "
                   "process list: prefer --api-key-file or DLMCACHE_API_KEY")  # fmt: skip
    p.add_argument("--metrics-public", action="store_true", help="serve /metrics without a key")
    p.add_argument("--max-body-mb", type=_number(float, lambda v: 0 < v <= 2**20, "must be in (0, 1048576]"),
                   default=8.0, help="larger request bodies get 413")  # fmt: skip
    p.add_argument("--max-prompt-chars", type=_positive(int), default=1_000_000,
                   help="longer prompts get 400 before they are tokenized")  # fmt: skip
    p.add_argument("--max-prompt-chars-in-flight", type=_positive(int), default=None,
                   help="characters of prompts held at once, tokenizing, queued or decoding (default: 4 x "
                   "--max-prompt-chars); past it, 429 before tokenizing")  # fmt: skip
    p.add_argument("--max-connections", type=_positive(int), default=1024,
                   help="open connections at most (kept below the process's file limit, ulimit -n)")  # fmt: skip
    p.add_argument("--header-timeout", type=_positive(float), default=10.0,
                   help="seconds a connection has to send each request head")  # fmt: skip
    p.add_argument("--body-timeout", type=_positive(float), default=30.0,
                   help="seconds a request has to send its whole body")  # fmt: skip
    p.add_argument("--keep-alive-timeout", type=_positive(float), default=5.0,
                   help="seconds an idle keep-alive connection stays open")  # fmt: skip
    return p


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """--device names a device this machine has (before the model loads)."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        parser.error(f"argument --device: {device!r} is not a device name (cpu, cuda, cuda:N)")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        parser.error(f"argument --device: {device!r}, but this machine has no such CUDA device")
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"argument --device: {device!r}: only cpu and cuda are supported")


def main(argv: list[str] | None = None) -> None:
    # Idle OpenMP threads sleep instead of spinning, so a CPU shared with other jobs slows the server
    # down in proportion instead of collapsing it (docs/results.md). OpenMP reads this when torch
    # loads, hence before any import of torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ap = Parser(prog="dlmcache", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    serve_p = serve_parser(sub)
    args = ap.parse_args(argv)
    if args.command == "serve":
        serve_command(serve_p, args)


def serve_command(parser: argparse.ArgumentParser, args) -> None:
    """`dlmcache serve`: every invalid invocation ends in one line and status 2, before or after the
    model loads."""
    check_device(parser, args.device)
    if args.graphs == "cuda" and not args.device.startswith("cuda"):
        parser.error(f"argument --graphs: 'cuda' replays CUDA graphs; --device is {args.device!r}")
    keys = api_keys(parser, args)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        sys.exit(f"dlmcache serve needs the serve extra: pip install 'dlmcache[serve]' ({e})")
    from dlmcache.locations import resolve_path
    from dlmcache.run_config import RunConfig
    from dlmcache.serve import build, run

    cache = args.cache
    if args.cache_options:
        cache += ("," if ":" in cache else ":") + args.cache_options
    for name, check in (("--model", lambda: resolve_path(args.model)), ("--cache", lambda: RunConfig.parse(cache))):
        try:
            check()
        except (ValueError, TypeError, OSError) as e:
            parser.error(f"argument {name}: {e}")
    kv_bytes = None
    if args.kv_cache_gb is not None:
        kv_bytes = int(args.kv_cache_gb * 2**30)
        memory = device_memory(args.device)
        if kv_bytes > memory:
            parser.error(f"argument --kv-cache-gb: {args.kv_cache_gb:g} GiB is more than the {memory / 2**30:.1f} GiB "
                         f"of memory {args.device} has")  # fmt: skip
    try:
        server = build(
            args.model, host=args.host, port=args.port, cache=cache, guide=args.guide, threshold=args.threshold,
            max_batch=args.max_batch, max_queue=args.max_queue, threads=args.threads, kv_bytes=kv_bytes,
            timeout=args.timeout, dtype=args.dtype, device=args.device, model_name=args.model_name,
            log_level=args.log_level, api_keys=keys, metrics_public=args.metrics_public,
            max_body_mb=args.max_body_mb, max_prompt_chars=args.max_prompt_chars,
            prompt_chars_in_flight=args.max_prompt_chars_in_flight, max_connections=args.max_connections,
            header_timeout=args.header_timeout, body_timeout=args.body_timeout,
            keep_alive_timeout=args.keep_alive_timeout, graphs=args.graphs, batch_invariant=args.batch_invariant,
        )  # fmt: skip
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        parser.error(one_line(e))
    run(server)


def api_keys(parser: argparse.ArgumentParser, args) -> list[str]:
    """The keys: --api-key-file's lines, --api-key (with a warning), else DLMCACHE_API_KEY."""
    keys = []
    if args.api_key_file is not None:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                keys += [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"argument --api-key-file: {e}")
        if not keys:
            parser.error(f"argument --api-key-file: {args.api_key_file!r} holds no key")
    if args.api_key:
        print("dlmcache serve: warning: --api-key puts the key in the process list, where other local users "
              "can read it; prefer --api-key-file or DLMCACHE_API_KEY", file=sys.stderr)  # fmt: skip
        if any(not k or k != k.strip() for k in args.api_key):
            parser.error("argument --api-key: a key must be non-empty, without surrounding spaces")
        keys += args.api_key
    if not keys and os.environ.get("DLMCACHE_API_KEY"):
        keys = [os.environ["DLMCACHE_API_KEY"].strip()]
    return keys


def device_memory(device: str) -> int:
    """Bytes of memory `device` has (the machine's RAM for the CPU)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def one_line(error: Exception) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


if __name__ == "__main__":
    main()
