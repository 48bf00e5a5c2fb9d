"""Batch-invariant mode (`model.set_batch_invariant(True)`): what it fixes and what it costs, on the
batched engine. One script for CPU and for the GPU run, when a device is lent:

    python scripts/bench_batch_invariant.py --out results/bench_batch_invariant.json   # CPU
    python scripts/bench_batch_invariant.py --out "$OUT/bench_batch_invariant.json"    # CUDA

Per model (the bundled tiny model; the random 135M LLaDA-architecture model, prompts of random
ids; `--models random-135m-moe` adds the random 135M LLaDA-MoE), with the mode off and on:
- invariance: 4 requests of different lengths decoded together (the last joining after step 2) and
  each alone; the steps whose logits differ in any bit, the largest difference, and whether the
  tokens agree;
- cost: answer tokens/s of 1 and of 8 requests decoded together (FreeCache token mode, 64 new
  tokens, greedy), off and on interleaved, `--repeats` times, medians.

`--chunk-sweep`: the CPU path's price per chunk size instead (how `CHUNK_ROWS` was chosen).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from dlmcache.kernels.ops.matmul import CHUNK_ROWS

from dlmcache import DLMPipeline, LowConfidenceScheduler, tinytask
from dlmcache.cache import make_cache
from dlmcache.testing import engine_logits, llada_135m, llada_moe_135m, synthetic_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from bench_graphs import decode  # noqa: E402  (one timed decode of the engine, shared)


def pipeline(name: str, device: str) -> tuple[DLMPipeline, list]:
    """The pipeline and 8 prompts (chats for the bundled model, random ids for the 135M)."""
    if name.startswith("random-135m"):
        build = {"random-135m": llada_135m, "random-135m-moe": llada_moe_135m}[name]
        pipe = DLMPipeline(model=build(32768, torch.float32, device), tokenizer=synthetic_tokenizer(32768),
                           scheduler=LowConfidenceScheduler())  # fmt: skip
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 32768, (48 + 8 * i,), generator=g).tolist() for i in range(8)]
    else:
        pipe = DLMPipeline.from_pretrained(name, device=device)
        prompts = [tinytask.messages(p) for p in tinytask.test_problems(8)]
    pipe.set_progress_bar_config(disable=True)
    return pipe, prompts


def invariance(pipe, prompts) -> dict:
    """Steps whose logits differ between each of 4 requests alone and all 4 together."""
    schedules = [(32, 16, 32), (16, 16, 16), (32, 8, 16), (16, 8, 8)]

    def make():
        out = []
        for i, (g, b, s) in enumerate(schedules):
            cache = make_cache("freecache", freeze="token", suffix_window=0)
            (r,) = pipe.make_requests([prompts[i]], max_new_tokens=g, block_length=b, steps=s, cache=cache)
            r.id = str(i)
            out.append(r)
        return out

    together = engine_logits(pipe.model, make(), join_at=2)
    steps = differing = 0
    largest = 0.0
    for r in make():
        alone = engine_logits(pipe.model, [r])[r.id]
        for a, b in zip(alone, together[r.id], strict=True):
            steps += 1
            differing += not torch.equal(a, b)
            largest = max(largest, (a.float() - b.float()).abs().max().item())
    return {"steps": steps, "steps_with_different_logits": differing, "largest_difference": largest}


def chunk_sweep(device: str, repeats: int) -> dict:
    """The CPU path's price per chunk size: a plain forward of the random 135M model over M tokens,
    every product in chunks of `rows` rows, over the same forward without the mode (medians)."""
    from dlmcache.models.layers import Linear

    model = llada_135m(32768, torch.float32, device)
    ids = torch.randint(3, 32768, (1, 340), generator=torch.Generator().manual_seed(0)).to(device)

    def seconds(m: int) -> float:
        with torch.no_grad():
            model(ids[:, :m])
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(ids[:, :m])
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    sweep = {}
    for m in (21, 48, 170, 340):
        model.set_batch_invariant(False)
        plain = seconds(m)
        model.set_batch_invariant(True)
        for rows in (16, 32, 64, 128):
            Linear.chunk_rows = rows
            sweep.setdefault(m, {})[rows] = seconds(m) / plain
        Linear.chunk_rows = CHUNK_ROWS
        print("chunk sweep", m, json.dumps(sweep[m]))
    return sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="dlmcache/tiny,random-135m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-sweep", action="store_true", help="only the CPU path's price per chunk size (135M)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.chunk_sweep:
        sweep = chunk_sweep(args.device, 2 * args.repeats + 1)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"device": args.device, "chunk_sweep": sweep}, indent=1))
        return
    results = {"device": args.device, "models": {}}
    for name in args.models.split(","):
        pipe, prompts = pipeline(name, args.device)
        row = {"invariance": {}, "answer_tokens_per_s": {}}
        for mode in (False, True):
            pipe.model.set_batch_invariant(mode)
            row["invariance"]["on" if mode else "off"] = invariance(pipe, prompts)
        for batch in (1, 8):
            times = {"off": [], "on": []}
            for repeat in range(args.repeats + 1):  # the first pass warms up
                for mode in ("off", "on"):
                    pipe.model.set_batch_invariant(mode == "on")
                    seconds, tokens, _ = decode(pipe, prompts[:batch], "off")
                    if repeat:
                        times[mode].append(tokens / seconds)
            off, on = statistics.median(times["off"]), statistics.median(times["on"])
            row["answer_tokens_per_s"][batch] = {"off": off, "on": on, "on_over_off": on / off}
        pipe.model.set_batch_invariant(False)
        results["models"][name] = row
        print(name, json.dumps(row))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
