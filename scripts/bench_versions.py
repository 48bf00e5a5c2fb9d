"""The default path of two checkouts side by side: the bundled tiny model, one request at a time, as a
new user calls it (issue 25: "tiny model, one request: >= 2x today's tokens/s with the default
settings").

    git worktree add /tmp/old 440d55f          # the code the issue measured
    python scripts/bench_versions.py --trees /tmp/old,. --rounds 3 --out results/bench_versions.json

Each tree runs in a process of its own (`PYTHONPATH=TREE`, so `import dlmcache` is that tree's), the
trees alternating round by round so that the machine's drift hits both. An editable install maps
`dlmcache.kernels` to its own checkout's `kernels/`; a child refuses to run unless both come from its
tree, so an older worktree needs `ln -s ../kernels dlmcache/kernels` (and its `kernels/__init__.py`
from c1aa6ca on, which hands the bare name `kernels` to Hugging Face's package). A child loads
`DLMPipeline.from_pretrained("dlmcache/tiny")` and decodes --n tiny-task problems one at a time with
the call's defaults (its scheduler, blocks of 32, one token per step) and 64 new tokens, per config
(--configs: the cache and scheduler options; "" is the pipeline as it loads). It warms up on one
problem first. Reported per tree and config: the median over rounds of the generated tokens/s
(64 x n / seconds; --threads torch threads, 1 by default), the ratio to the first tree, and whether
both trees gave the same texts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "defaults": {},
    "freecache": {"cache": "freecache"},
    "freecache + threshold 0.9": {"cache": "freecache", "threshold": 0.9},
    # (the window spelled out: token freezing's default suffix window changed with issue 36)
    "token freecache": {"cache": "freecache", "freeze": "token", "suffix_window": None},
    # the step loop of a tree that still has one (`engine=False`, deleted by issue 36), else the default path
    "token freecache, step loop": {"cache": "freecache", "freeze": "token", "suffix_window": None, "loop": True},
}


def child(n: int, names: list[str], threads: int) -> None:
    """Runs in the tree under test: prints one JSON line {config: {seconds, texts}}."""
    import inspect

    import dlmcache.kernels
    import torch

    torch.set_num_threads(threads)

    from dlmcache import DLMPipeline, ThresholdScheduler, tinytask

    tree = Path.cwd().resolve()
    for module in (dlmcache, dlmcache.kernels):  # an editable install maps dlmcache.kernels to its checkout
        if tree not in Path(module.__file__).resolve().parents:
            raise SystemExit(
                f"{module.__name__} is imported from {module.__file__}, not from {tree}: link the tree's kernels/ "
                f"as {tree}/dlmcache/kernels"
            )
    from dlmcache.cache import make_cache

    pipe = DLMPipeline.from_pretrained("dlmcache/tiny")
    pipe.set_progress_bar_config(disable=True)
    chats = [tinytask.messages(p) for p in tinytask.test_problems(n + 1)]
    out = {}
    for name in names:
        options = dict(CONFIGS[name])
        kw = {"max_new_tokens": 64}
        if "cache" in options:
            rule = {k: options[k] for k in ("freeze", "suffix_window") if k in options}
            kw["cache"] = make_cache(options["cache"], **rule)  # (an object: the old call took no names)
        if options.get("loop") and "engine" in inspect.signature(pipe.__call__).parameters:
            kw["engine"] = False
        if "threshold" in options:
            kw["scheduler"] = ThresholdScheduler(threshold=options["threshold"])
        with torch.no_grad():
            pipe(chats[0], **kw)  # warm-up
            t0 = time.perf_counter()
            texts = [pipe(chat, **kw).texts[0] for chat in chats[1:]]
        out[name] = {"seconds": time.perf_counter() - t0, "texts": texts}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", required=True, help="checkouts to compare, comma-separated (the first is the base)")
    ap.add_argument("--configs", default=";".join(CONFIGS), help=f"';'-separated, of {list(CONFIGS)}")
    ap.add_argument("--n", type=int, default=16, help="problems per config")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    names = [c for c in args.configs.split(";") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; expected some of {list(CONFIGS)}")
    if args.n < 1 or args.rounds < 1 or args.threads < 1:
        raise SystemExit(f"--n={args.n}, --rounds={args.rounds} and --threads={args.threads} must be at least 1")
    if args.child:
        return child(args.n, names, args.threads)
    trees = [str(Path(t).resolve()) for t in args.trees.split(",")]
    for tree in trees:
        if not (Path(tree) / "dlmcache" / "__init__.py").is_file():
            raise SystemExit(f"--trees: {tree} holds no dlmcache/ package")
    print(f"uptime: {os.getloadavg()}", flush=True)
    runs = {t: [] for t in trees}
    for r in range(args.rounds):
        for tree in trees:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"--n={args.n}"]
            cmd += [f"--threads={args.threads}"]
            cmd += [f"--configs={';'.join(names)}", "--trees=-"]
            env = {**os.environ, "PYTHONPATH": tree}
            done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{tree}: the child failed:\n{done.stderr[-3000:]}")
            runs[tree].append(json.loads(done.stdout.strip().splitlines()[-1]))
            seconds = {name: round(v["seconds"], 2) for name, v in runs[tree][-1].items()}
            print(f"round {r} {tree}: {seconds}", flush=True)
    tokens = 64 * args.n
    rows = {}
    base = trees[0]
    for name in names:
        for tree in trees:
            tps = [tokens / run[name]["seconds"] for run in runs[tree]]
            ratios = [b[name]["seconds"] / run[name]["seconds"] for b, run in zip(runs[base], runs[tree], strict=True)]
            rows.setdefault(name, {})[tree] = {
                "tokens_per_second_median": statistics.median(tps),
                "tokens_per_second_all": tps,
                "speedup_over_base": statistics.median(ratios),
                "same_texts_as_base": runs[tree][0][name]["texts"] == runs[base][0][name]["texts"],
            }
    print("\n| config | tree | generated tok/s | vs the first tree | same texts |\n|---|---|---|---|---|")
    for name, per_tree in rows.items():
        for tree, r in per_tree.items():
            print(
                f"| {name} | {tree} | {r['tokens_per_second_median']:.1f} | {r['speedup_over_base']:.2f}x | "
                f"{r['same_texts_as_base']} |"
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {"trees": trees, "n": args.n, "rounds": args.rounds, "threads": args.threads, "configs": rows}
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
