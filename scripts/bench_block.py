"""Block diffusion against full-attention masked diffusion at equal size, in one run.

    python scripts/bench_block.py --out results/bench_block.json
    python scripts/bench_block.py --prompt-len 256 --max-new-tokens 256 --repeats 3

Random 135M models of two architectures with the same width, depth, heads and vocabulary
(`dlmcache.testing.llada_135m`, `sdar_135m`) decode the same random prompt to the same length, one
token per step (greedy low-confidence remasking), runs interleaved so load drift hits all alike:

- LLaDA, full attention: no cache, and FreeCache (its default, and token freeze with no suffix);
- SDAR, block diffusion (block 4): no cache (every step recomputes positions up to the block's end),
  and its exact prefix cache.

Reported: median seconds, tokens/s, ms per step, tokens fed, and the ratio to LLaDA's FreeCache.
Random weights are never confident, so parallel (threshold) decoding commits one token per step on
both; the comparison is the cost of a step at equal steps. The JSON also holds the weight bytes a
forward reads and the FLOPs of each mode's median step, the arithmetic behind the ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from dlmcache import DLMPipeline, LowConfidenceScheduler
from dlmcache.cache import make_cache
from dlmcache.testing import llada_135m, sdar_135m, synthetic_tokenizer

MODES = {
    "llada none": ("llada", "none", {}),
    "llada freecache": ("llada", "freecache", {}),
    "llada freecache token": ("llada", "freecache", {"freeze": "token", "suffix_window": 0}),
    "sdar none": ("sdar", "none", {}),
    "sdar block cache": ("sdar", "freecache", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--llada-block", type=int, default=32)
    ap.add_argument("--sdar-block", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES), help=f"a subset of {list(MODES)}")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"bench_block.py: unknown modes {unknown}; expected some of {list(MODES)}")

    vocab = 32768
    tokenizer = synthetic_tokenizer(vocab)
    pipes = {
        "llada": DLMPipeline(model=llada_135m(vocab), tokenizer=tokenizer, scheduler=LowConfidenceScheduler()),
        "sdar": DLMPipeline(model=sdar_135m(vocab), tokenizer=tokenizer, scheduler=LowConfidenceScheduler()),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (1, args.prompt_len), generator=gen)
    blocks = {"llada": args.llada_block, "sdar": args.sdar_block}

    def run(mode: str):
        family, cache, options = MODES[mode]
        marks = []
        t0 = time.perf_counter()
        out = pipes[family](
            ids, max_new_tokens=args.max_new_tokens, block_length=blocks[family], cache=make_cache(cache, **options),
            callback_on_step_end=lambda *_: marks.append(time.perf_counter()),
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        steps = [b - a for a, b in zip([t0] + marks[:-1], marks, strict=True)]
        return seconds, statistics.median(steps[1:]), out

    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    times = {m: [] for m in modes}
    step_ms = {m: [] for m in modes}
    outputs = {}
    for r in range(args.repeats):
        for mode in modes:
            seconds, step, out = run(mode)
            times[mode].append(seconds)
            step_ms[mode].append(1000 * step)
            outputs[mode] = out
            print(f"repeat {r} {mode:24s} {seconds:7.2f} s  nfe {out.nfe}", flush=True)

    reference = next(m for m in ("llada freecache", *modes) if m in modes)
    rows = {}
    for mode in modes:
        family = MODES[mode][0]
        model = pipes[family].model
        out, sec = outputs[mode], statistics.median(times[mode])
        fed_per_step = out.stats["fed_tokens"] / out.nfe
        rows[mode] = {
            "seconds_median": sec,
            "seconds_all": times[mode],
            "tokens_per_second": args.max_new_tokens / sec,
            "median_step_ms": statistics.median(step_ms[mode]),
            "nfe": out.nfe,
            "fed_tokens": out.stats["fed_tokens"],
            "fed_tokens_per_step": fed_per_step,
            "weight_mib_per_forward": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
            "gflops_per_step": model.flops_per_token * fed_per_step / 1e9,
        }
    for mode in modes:
        rows[mode]["vs_" + reference.replace(" ", "_")] = (
            rows[reference]["seconds_median"] / rows[mode]["seconds_median"]
        )
    same = None  # checked when both SDAR modes ran (not a mode compared with itself)
    if {"sdar none", "sdar block cache"} <= set(outputs):
        same = torch.equal(outputs["sdar none"].sequences, outputs["sdar block cache"].sequences)

    print(f"\n| mode | seconds | tokens/s | vs {reference} | median step ms | tokens fed / step | GFLOP / step |")
    print("|---|---|---|---|---|---|---|")
    for mode, row in rows.items():
        ratio = row["vs_" + reference.replace(" ", "_")]
        print(
            f"| {mode} | {row['seconds_median']:.1f} | {row['tokens_per_second']:.1f} | {ratio:.2f}x | "
            f"{row['median_step_ms']:.1f} | {row['fed_tokens_per_step']:.1f} | {row['gflops_per_step']:.2f} |"
        )
    print(f"sdar: cached tokens == recomputed tokens: {same}")
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {
            "commit": commit, "load_before": load, "threads": args.threads, "cpu": platform.processor(),
            "torch": torch.__version__, "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
            "llada_block": args.llada_block, "sdar_block": args.sdar_block, "repeats": args.repeats,
            "sdar_cached_equals_recomputed": same,
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
