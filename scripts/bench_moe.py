"""The grouped mixture-of-experts path against the per-token loop, in one run.

    python scripts/bench_moe.py --out results/bench_moe.json

One MoE layer's experts (SwiGLU, float32, CPU, --threads) at two shapes:
- OLMoE-1B-7B's (arXiv 2409.02060; LLaDA-MoE's experts are OLMoE-style): hidden 2048, expert
  intermediate 1024, 64 experts, top-8, softmax routing;
- a small one: hidden 512, intermediate 256, 16 experts, top-2.
Random weights and router logits; for each token count, `moe_experts` (grouped by expert: one GEMM
per projection and active expert) and `moe_experts_reference` (token by token, expert by expert)
are timed in turn, --repeats times, and the median of the per-repeat ratios is reported with both
medians in ms and the largest difference between their outputs. The router's own cost (a softmax
and a top-k) is the same for both and is left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from dlmcache.kernels.ops.moe import Router, moe_experts, moe_experts_reference

SHAPES = {"olmoe-1b-7b": (2048, 1024, 64, 8), "small": (512, 256, 16, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,16,64,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.repeats < 1 or args.threads < 1:
        ap.error("--repeats and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    results = {"args": vars(args) | {"out": str(args.out)}, "torch": torch.__version__, "runs": {}}
    print("| shape | tokens | per-token loop ms | grouped ms | loop / grouped | max abs diff |")
    print("|---|---|---|---|---|---|")
    for name, (d, i, e, k) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        w = [torch.randn(shape, generator=g) / shape[-1] ** 0.5 for shape in ((e, i, d), (e, i, d), (e, d, i))]
        router = Router(e, k)
        for n in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(n, d, generator=g)
            weights, experts = router(torch.randn(n, e, generator=g))
            with torch.no_grad():
                want = moe_experts_reference(x, weights, experts, *w)
                diff = float((moe_experts(x, weights, experts, *w) - want).abs().max()) if n else 0.0
                times = {"loop": [], "grouped": []}
                for _ in range(args.repeats):
                    for path, fn in (("loop", moe_experts_reference), ("grouped", moe_experts)):
                        t = time.perf_counter()
                        fn(x, weights, experts, *w)
                        times[path].append(time.perf_counter() - t)
            ratio = statistics.median(a / b for a, b in zip(times["loop"], times["grouped"], strict=True))
            row = {"loop_ms": 1e3 * statistics.median(times["loop"]),
                   "grouped_ms": 1e3 * statistics.median(times["grouped"]), "loop_over_grouped": ratio,
                   "max_abs_diff": diff}  # fmt: skip
            results["runs"][f"{name}/{n}"] = row
            print(f"| {name} | {n} | {row['loop_ms']:.2f} | {row['grouped_ms']:.2f} | {ratio:.1f}x | {diff:.1e} |",
                  flush=True)  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
