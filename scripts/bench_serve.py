"""Throughput and latency of `dlmcache serve` under N concurrent clients, against one at a time.

    python scripts/bench_serve.py --out results/bench_serve.json          # tiny model, then random 135M
    python scripts/bench_serve.py --models tiny --concurrency 1,4,16,64 --requests 64
    python scripts/bench_serve.py --models tiny-block        # the bundled block diffusion model

For each model a real server process is started on 127.0.0.1 (the random 135M LLaDA-architecture model
is first saved to a temporary directory, served from there), and the same list of requests is sent by
N concurrent streaming clients (N = 1 is one at a time: the baseline). Per N: completion tokens/s,
requests/s, p50 / p99 latency and time to first token (the first streamed text), the speedup over
N = 1, and whether every answer equals the N = 1 answer (the server promises batch invariance); and,
from the server's /metrics, the share of the wall time its engine spent in batched steps ("engine
busy") and the requests each step carried on average.
Writes JSON and a plot next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, args, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "dlmcache.cli", "serve", "--model", model, "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", "256", "--log-level", "warning", *extra]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start")


async def one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed request: its text, latency, time to first text and completion tokens."""
    t0 = time.perf_counter()
    first, text, usage = None, "", None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    first = first or time.perf_counter() - t0
                    text += choice["text"]
    latency = time.perf_counter() - t0
    return {"text": text, "latency": latency, "ttft": first or latency, "tokens": usage["completion_tokens"]}


async def run_level(url: str, bodies: list[dict], concurrency: int) -> dict:
    """The requests by `concurrency` clients, each taking the next request when it is done."""
    results: list[dict | None] = [None] * len(bodies)
    queue = list(enumerate(bodies))
    async with httpx.AsyncClient(timeout=3600) as client:

        async def worker():
            while queue:
                i, body = queue.pop(0)
                results[i] = await one(client, url, body)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)

    def pct(xs, q):
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    return {
        "concurrency": concurrency, "requests": len(bodies), "seconds": wall, "completion_tokens": tokens,
        "tokens_per_second": tokens / wall, "requests_per_second": len(bodies) / wall,
        "latency_p50": pct(lat, 0.5), "latency_p99": pct(lat, 0.99), "ttft_p50": pct(ttft, 0.5),
        "ttft_p99": pct(ttft, 0.99), "texts": [r["text"] for r in results],
    }  # fmt: skip


def engine_counters(url: str) -> dict[str, float]:
    """The server's engine counters from /metrics: batched forwards, the rows they carried, seconds."""
    names = {"dlmcache_batched_forwards_total": "forwards", "dlmcache_forward_rows_total": "rows",
             "dlmcache_forward_seconds_total": "seconds"}  # fmt: skip
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            out[names[name]] = float(value)
    return out


def tiny_requests(n: int, args, served: str = "tiny") -> list[dict]:
    """Held-out problems of the tiny task as chats, sent as their token ids (the completions route
    takes ids as they are, so the model sees exactly what the chat route would give it). The bundled
    models share one tokenizer."""
    from transformers import AutoTokenizer

    from dlmcache import tinytask
    from dlmcache.locations import resolve_path
    from dlmcache.pipeline import chat_template_ids

    tok = AutoTokenizer.from_pretrained(resolve_path("dlmcache/tiny"))
    bodies = []
    for p in tinytask.test_problems(n):
        ids = chat_template_ids(tok, tinytask.messages(p))
        bodies.append({"model": served, "prompt": ids, "max_tokens": args.max_tokens, "stream": True,
                       "stream_options": {"include_usage": True}})  # fmt: skip
    return bodies


def random_requests(n: int, args) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [
        {
            "model": "random-135m",
            "prompt": torch.randint(3, 32000, (args.prompt_len,), generator=g).tolist(),
            "max_tokens": args.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }  # fmt: skip
        for _ in range(n)
    ]


def save_random_135m(directory: Path) -> str:
    import torch

    from dlmcache import DLMPipeline, LowConfidenceScheduler
    from dlmcache.testing import llada_135m, synthetic_tokenizer

    pipe = DLMPipeline(model=llada_135m(32768, torch.float32, "cpu"), tokenizer=synthetic_tokenizer(32768),
                       scheduler=LowConfidenceScheduler())  # fmt: skip
    pipe.save_pretrained(directory)
    return str(directory)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, levels in results["models"].items():
        xs = [r["concurrency"] for r in levels]
        axes[0].plot(xs, [r["tokens_per_second"] for r in levels], marker="o", label=name)
        axes[1].plot(xs, [r["latency_p50"] for r in levels], marker="o", label=f"{name} p50")
        axes[1].plot(xs, [r["latency_p99"] for r in levels], marker="x", linestyle="--", label=f"{name} p99")
    for ax, label in zip(axes, ("completion tokens/s", "latency, s"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("dlmcache serve, continuous batching (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,random-135m")
    ap.add_argument("--concurrency", default=None, help="default: 1,4,16,64 (tiny), 1,4,8,16 (random-135m)")
    ap.add_argument("--requests", type=int, default=None, help="default: 64 (tiny), 16 (random-135m)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64, help="random-135m: prompt tokens")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", default=None, help="the server's --cache (default: its own)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = {"args": vars(args) | {"out": str(args.out)}, "models": {}}
    extra = ["--cache", args.cache] if args.cache else []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            if name in ("tiny", "tiny-block"):  # the bundled models: the tiny one and its block diffusion twin
                model, served = f"dlmcache/{name}", name
                make = functools.partial(tiny_requests, served=served)
                levels = [int(x) for x in (args.concurrency or "1,4,16,64").split(",")]
                n = args.requests or 64
            else:
                model, served, make = save_random_135m(Path(tmp) / "random-135m"), "random-135m", random_requests
                levels = [int(x) for x in (args.concurrency or "1,4,8,16").split(",")]
                n = args.requests or 16
            proc, url = start_server(model, args, extra + ["--model-name", served])
            try:
                bodies = make(n, args)
                asyncio.run(run_level(url, bodies[:2], 2))  # warm up
                rows = []
                for c in levels:
                    before = engine_counters(url)
                    row = asyncio.run(run_level(url, bodies, c))
                    after = engine_counters(url)
                    # How busy the engine's forwards kept it, and how many requests each carried.
                    delta = {k: after[k] - before[k] for k in after}
                    row["engine_busy"] = delta["seconds"] / row["seconds"]
                    row["rows_per_forward"] = delta["rows"] / max(delta["forwards"], 1)
                    rows.append(row)
                    print(f"{name} x{c}: {row['tokens_per_second']:.1f} tok/s, p50 {row['latency_p50']:.2f} s, "
                          f"p99 {row['latency_p99']:.2f} s, ttft p50 {row['ttft_p50']:.2f} s, engine busy "
                          f"{row['engine_busy']:.0%}, {row['rows_per_forward']:.1f} requests per forward",
                          flush=True)  # fmt: skip
            finally:
                proc.terminate()
                proc.wait(120)
        base = rows[0]
        for row in rows:
            row["speedup"] = row["tokens_per_second"] / base["tokens_per_second"]
            row["p99_over_single_p50"] = row["latency_p99"] / base["latency_p50"]
            row["same_answers_as_one_at_a_time"] = row["texts"] == base["texts"]
        results["models"][name] = rows
        print(f"\n| {name}: clients | tokens/s | speedup | requests/s | p50 s | p99 s | TTFT p50 s | p99 / single |"
              " engine busy | requests per step | same answers |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            same = r["same_answers_as_one_at_a_time"]
            print(f"| {r['concurrency']} | {r['tokens_per_second']:.1f} | {r['speedup']:.2f}x | "
                  f"{r['requests_per_second']:.2f} | {r['latency_p50']:.2f} | {r['latency_p99']:.2f} | "
                  f"{r['ttft_p50']:.2f} | {r['p99_over_single_p50']:.2f} | {r['engine_busy']:.0%} | "
                  f"{r['rows_per_forward']:.1f} | {same} |")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        slim = {**results, "models": {k: [{x: y for x, y in r.items() if x != "texts"} for r in v]
                                      for k, v in results["models"].items()}}  # fmt: skip
        args.out.write_text(json.dumps(slim, indent=1))
        plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
