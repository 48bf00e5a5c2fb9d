"""Accuracy and speed of the bundled tiny model on held-out problems, for several decoding configs.

    python scripts/eval_tiny.py --n 500 --configs none,prefix,dual,freecache,dual+threshold=0.9
    python scripts/eval_tiny.py --configs none,freecache,freecache+guide=dlmcache/tiny-guide
    python scripts/eval_tiny.py --long --n 300 --configs "none;freecache;freecache:policy=maskkv,budget=0.25"
    python scripts/eval_tiny.py --configs "none;freecache+threshold=0.9;dlmcache/tiny-block@freecache+threshold=0.9"

Every config decodes the same problems (the first N of `tinytask.test_problems`) with the same
schedule; the table gives accuracy, answer tokens/s (tokens before EOS, per second of decoding), DLM forwards
per answer token and the speedup over `none`. Writes JSON (with every completion) when --out is given.
A config written `MODEL@CONFIG` runs on that model instead (e.g. the block diffusion model,
`dlmcache/tiny-block`, beside the bundled one in one run); the block length is each model's default
(32; a block diffusion model's own) unless --block-length is given.

--long: the long-prompt task (`tinytask.long_context_problems`: each problem after 0-12 solved
distractors, up to ~580 prompt tokens) on the model trained for it, `dlmcache/tiny-long`; problems are
batched in order of prompt length (less padding; every row decodes as it would alone).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dlmcache import tinytask
from dlmcache.evals.harness import DLMGenerator, Pipelines
from dlmcache.offline import load_guide
from dlmcache.run_config import RunConfig, split_configs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: dlmcache/tiny, or dlmcache/tiny-long with --long")
    ap.add_argument("--long", action="store_true", help="the long-prompt task")
    ap.add_argument("--configs", default="none;prefix;dual;freecache", help="separated by ';' (or ',' if no ';')")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=None, help="default: each model's (32, or its own block)")
    ap.add_argument("--steps", type=int, default=None, help="default: max-new-tokens (one token per step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    args.model = args.model or ("dlmcache/tiny-long" if args.long else "dlmcache/tiny")
    pipelines = Pipelines(args.model)
    if args.long:
        problems = sorted(tinytask.long_context_problems(args.n), key=lambda item: len(item[1]))
    else:
        problems = tinytask.test_problems(args.n)
    results, guides = {}, {}

    def cached_guide(name, options):
        key = (name, tuple(sorted(options.items())))
        if key not in guides:
            guides[key] = load_guide(name, options)
        return guides[key]

    for text in split_configs(args.configs):
        pipe, config = pipelines.split(text)
        cfg = RunConfig.parse(config)
        cfg.apply(pipe, load_guide=cached_guide)
        generate = DLMGenerator(pipe, block_length=args.block_length, steps=args.steps)
        results[text] = tinytask.evaluate(generate, problems, args.batch_size, args.max_new_tokens)
        r = results[text]
        if args.long:
            r["by_distractors"] = by_distractors(problems, r["completions"])
        print(
            f"{text:40s} acc {r['accuracy']:.3f}  tok/s {r['tokens_per_second']:8.1f}  "
            f"fwd/token {r['forwards_per_token']:.3f}  {r.get('by_distractors', '')}",
            flush=True,
        )
    base = results.get("none")
    buckets = list(next(iter(results.values())).get("by_distractors", {}))
    extra = "".join(f" {b} distractors |" for b in buckets)
    print(f"\n| config | accuracy |{extra} tokens/s | forwards / answer token | speedup vs none |")
    print("|---|---|" + "---|" * len(buckets) + "---|---|---|")
    for text, r in results.items():
        speedup = f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x" if base else "-"
        cells = "".join(f" {100 * r['by_distractors'][b]:.1f}% |" for b in buckets)
        print(
            f"| {text} | {100 * r['accuracy']:.1f}% |{cells} {r['tokens_per_second']:.0f} | "
            f"{r['forwards_per_token']:.3f} | {speedup} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=1))


BUCKETS = ((0, 4), (5, 8), (9, 12))


def by_distractors(problems, completions) -> dict[str, float]:
    """Accuracy per range of distractor counts (the prompt's length): a fraction kept of a short
    prompt is a few tokens of the question itself."""
    out = {}
    for lo, hi in BUCKETS:
        hits = [c["correct"] for (_, shots), c in zip(problems, completions, strict=True) if lo <= len(shots) <= hi]
        if hits:
            out[f"{lo}-{hi}"] = sum(hits) / len(hits)
    return out


if __name__ == "__main__":
    main()
