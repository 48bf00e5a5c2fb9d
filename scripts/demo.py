"""The main demo: the bundled tiny diffusion LM solves two-step arithmetic problems, offline, on CPU.

    python scripts/demo.py [--n 8] [--cache freecache]

Decodes held-out problems twice, without a cache and with the chosen cache, and prints each problem,
the model's worked solution, whether the final answer is right, and tokens/s of both runs.
"""

from __future__ import annotations

import argparse

import torch

from dlmcache import DLMPipeline, tinytask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dlmcache/tiny")
    ap.add_argument("--n", type=int, default=8, help="problems to solve")
    ap.add_argument("--cache", default="freecache", help="none | prefix | dual | freecache")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)

    pipe = DLMPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    problems = tinytask.test_problems(args.n)
    prompts = [tinytask.messages(p) for p in problems]
    gen = dict(max_new_tokens=args.max_new_tokens, block_length=args.block_length)
    runs = {}
    for cache in ("none", args.cache):
        pipe.set_cache(cache)
        pipe(prompts, **gen)  # warm-up: first-call costs (allocation, kernel selection) are not the cache's
        runs[cache] = pipe(prompts, **gen)

    out = runs[args.cache]
    correct = 0
    for i, (p, text) in enumerate(zip(problems, out.texts, strict=True)):
        ok = tinytask.is_correct(text, p)
        correct += ok
        print(f"[{i + 1}] {p.question}")
        print(f"    model: {text}")
        print(f"    expected {p.answer}: {'correct' if ok else 'wrong'}\n")
    print(f"{correct}/{len(problems)} correct with cache={args.cache!r}")
    for cache, r in runs.items():
        print(
            f"cache={cache!r:12s} {r.stats['tokens_per_second']:7.1f} tokens/s  "
            f"{r.nfe} forwards  {r.stats['fed_tokens']:.0f} tokens fed to the model per sequence"
        )
    speedup = runs[args.cache].stats["tokens_per_second"] / runs["none"].stats["tokens_per_second"]
    print(f"speedup of {args.cache!r} over 'none': {speedup:.2f}x")


if __name__ == "__main__":
    main()
