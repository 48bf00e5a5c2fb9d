"""Where a step of the batched engine spends its time, on a bundled model (--threads, default 1).

    python scripts/bench_engine.py --out results/bench_engine.json
    python scripts/bench_engine.py --model dlmcache/tiny-block      # block diffusion
    python scripts/bench_engine.py --cache dual --threshold 0.9       # another rule and scheduler

The default cache is FreeCache's token freezing (`freecache:freeze=token`), the scheduler the model's.

For each batch size of --requests (default 1 and 64), the tiny task's held-out problems decode as
one batch, --repeats times; every step is split into
- model: the forward (layers, attention over the pool, LM head: `BatchedDecoder._forward`);
- plan: `GenerationBatch.plan` (the rules, flattening, the upload of the step's inputs);
- commit: `GenerationBatch.commit` (the schedulers on the device, the one read back, the host
  bookkeeping);
- rest: the step's other work (the attention layout, the pool's blocks, finished rows).
Host time is plan + commit + rest. Per call (one request through `DLMPipeline.__call__`): the time
outside its steps (encoding, the request, the decoder and its pool, the output). Also the
dispatched ops of a step (model and host), host reads per step, and whether every request of a
batch got its tokens alone. Medians over steps (and calls); ratios only within this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from dlmcache import DLMPipeline, ThresholdScheduler, tinytask
from dlmcache.cache import make_cache
from dlmcache.engine import BatchedDecoder
from dlmcache.run_config import RunConfig
from dlmcache.testing import DispatchCount

PARTS = ("model", "plan", "commit", "rest")


class StepTimer:
    """Times the parts of every step of `decoder` (see the module docstring)."""

    def __init__(self, decoder: BatchedDecoder):
        self.decoder, self.steps = decoder, []
        self._now: dict[str, float] = {}
        for owner, name, part in ((decoder.batch, "plan", "plan"), (decoder.batch, "commit", "commit"),
                                  (decoder, "_forward", "model")):  # fmt: skip
            setattr(owner, name, self._timed(getattr(owner, name), part))

    def _timed(self, fn, part):
        def timed(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self._now[part] = self._now.get(part, 0.0) + time.perf_counter() - start

        return timed

    def step(self) -> list:
        self._now = {}
        start = time.perf_counter()
        done = self.decoder.step()
        total = time.perf_counter() - start
        self._now["rest"] = total - sum(self._now.values())
        self._now["total"] = total
        self.steps.append(self._now)
        return done


def decode(pipe, prompts, kw, timer_steps=None) -> dict:
    requests = pipe.make_requests(prompts, **kw)
    decoder = BatchedDecoder.for_requests(pipe.model, pipe.tokenizer.eos_token_id, requests)
    timer = StepTimer(decoder)
    for r in requests:
        decoder.add(r)
    out = {}
    while len(decoder):
        out.update({f.request.id: f.sequence for f in timer.step()})
    if timer_steps is not None:
        timer_steps.extend(timer.steps)
    return out


def medians_ms(steps: list[dict]) -> dict:
    return {k: 1e3 * statistics.median(s[k] for s in steps) for k in (*PARTS, "total")} | {
        "host": 1e3 * statistics.median(s["plan"] + s["commit"] + s["rest"] for s in steps)
    }


def ops_per_step(pipe, prompts, kw, warm: int = 3) -> dict:
    """Dispatched ops of one step after `warm` steps, in all and inside the model's forward."""
    requests = pipe.make_requests(prompts, **kw)
    decoder = BatchedDecoder.for_requests(pipe.model, pipe.tokenizer.eos_token_id, requests)
    for r in requests:
        decoder.add(r)
    for _ in range(warm):
        decoder.step()
    forward, counted = decoder._forward, {}

    def counting(*args):
        with DispatchCount() as count:
            out = forward(*args)
        counted["model"] = count.ops
        return out

    decoder._forward = counting
    reads = decoder.batch.host_reads
    with DispatchCount() as count:
        decoder.step()
    return {"ops": count.ops, "model_ops": counted["model"], "host_ops": count.ops - counted["model"],
            "host_reads": decoder.batch.host_reads - reads}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dlmcache/tiny", help="dlmcache/tiny or dlmcache/tiny-block")
    ap.add_argument("--cache", default="freecache:freeze=token",
                    help="a cache as run configs write it: NAME or NAME:k=v,...")  # fmt: skip
    ap.add_argument("--threshold", type=float, default=None, help="the threshold scheduler (default: the model's own)")
    ap.add_argument("--requests", default="1,64", help="batch sizes, comma-separated")
    ap.add_argument("--calls", type=int, default=16, help="one-request pipeline calls for the per-call time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=None, help="default: the model's (32, or its own block)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    sizes = [int(n) for n in args.requests.split(",")]
    if args.threads < 1 or args.repeats < 1 or args.calls < 1 or min(sizes) < 1:
        ap.error("--threads, --repeats, --calls and every --requests size must be at least 1")
    torch.set_num_threads(args.threads)
    print(f"load average: {os.getloadavg()}", flush=True)
    pipe = DLMPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    config = RunConfig.parse(args.cache)
    kw = dict(max_new_tokens=args.max_new_tokens, block_length=args.block_length, stop_at_eos=True,
              cache=make_cache(config.cache, **config.cache_options))  # fmt: skip
    if args.threshold is not None:
        kw["scheduler"] = ThresholdScheduler(threshold=args.threshold)
    problems = [tinytask.messages(p) for p in tinytask.test_problems(max(max(sizes), args.calls) + 1)]
    result = {"args": vars(args) | {"out": str(args.out)}, "batches": {}}
    with torch.no_grad():
        decode(pipe, problems[:1], kw)  # warm-up
        for size in sizes:
            steps, same = [], True
            for _ in range(args.repeats):
                batch = decode(pipe, problems[1 : size + 1], kw, steps)
            if size > 1:  # every request its tokens alone
                for i in range(min(size, 8)):
                    alone = decode(pipe, problems[1 + i : 2 + i], kw)["0"]
                    same &= torch.equal(alone, batch[str(i)])
            row = {"steps": len(steps) // args.repeats, "ms_per_step": medians_ms(steps), "same_tokens": same,
                   **ops_per_step(pipe, problems[1 : size + 1], kw)}  # fmt: skip
            result["batches"][size] = row
            print(json.dumps({size: row}), flush=True)
        # Per call: a pipeline call of one request, less its steps.
        calls, step_sums = [], []
        for chat in problems[1 : args.calls + 1]:
            timers: list = []
            original = BatchedDecoder.step

            def counted(decoder, timers=timers, original=original):
                start = time.perf_counter()
                out = original(decoder)
                timers.append(time.perf_counter() - start)
                return out

            BatchedDecoder.step = counted
            try:
                start = time.perf_counter()
                pipe(chat, **kw)
                calls.append(time.perf_counter() - start)
            finally:
                BatchedDecoder.step = original
            step_sums.append(sum(timers))
        outside = [c - s for c, s in zip(calls, step_sums, strict=True)]
        result["per_call_ms"] = {"outside_steps": 1e3 * statistics.median(outside),
                                 "call": 1e3 * statistics.median(calls)}  # fmt: skip
    print(json.dumps({k: result[k] for k in ("batches", "per_call_ms")}, indent=1))
    print("\n| requests | host ms / step (plan, commit, rest) | model ms / step | ops (host, model) | reads |")
    print("|---|---|---|---|---|")
    for size, row in result["batches"].items():
        m = row["ms_per_step"]
        print(
            f"| {size} | {m['host']:.3f} ({m['plan']:.3f}, {m['commit']:.3f}, {m['rest']:.3f}) | {m['model']:.2f} | "
            f"{row['ops']} ({row['host_ops']}, {row['model_ops']}) | {row['host_reads']} |"
        )
    print(
        f"\nper call, outside its steps: {result['per_call_ms']['outside_steps']:.2f} ms "
        f"(a call: {result['per_call_ms']['call']:.1f} ms)"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
