"""Does `torch.compile` make the engine's small step cheaper? The question of issue 25's item 2,
measured on the bundled tiny model before building anything.

    python scripts/bench_compile_step.py --out results/bench_compile_step.json

The engine decodes held-out tiny-task chats (64 new tokens, blocks of 32, the server's cache:
FreeCache token mode, suffix window 0) with the model's forward (`hidden_states`: embedding, layers,
final norm) eager, then compiled with `torch.compile(dynamic=True)` (one graph for every fed-token
count; the plan, the commit and the LM head stay eager). After a warm-up that compiles (its seconds
are reported), each request count is decoded eager and compiled in turn, --repeats times: the median
of the per-repeat time ratios, and whether both gave the same tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch._dynamo

from dlmcache import DLMPipeline, tinytask
from dlmcache.cache import make_cache
from dlmcache.engine import BatchedDecoder, Request


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", default="1,8", help="request counts decoded together")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    counts = [int(r) for r in args.requests.split(",")]
    if args.repeats < 1 or args.threads < 1 or min(counts) < 1:
        ap.error("--repeats, --threads and every request count must be at least 1")
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    pipe = DLMPipeline.from_pretrained("dlmcache/tiny")
    pipe.set_progress_bar_config(disable=True)
    cache = make_cache("freecache", freeze="token", suffix_window=0)
    prompts = [pipe.encode_prompts([tinytask.messages(p)])[0] for p in tinytask.test_problems(max(counts))]
    model = pipe.model
    eager = model.hidden_states
    compiled = torch.compile(eager, dynamic=True)

    def decode(n: int, forward) -> tuple[float, dict]:
        model.hidden_states = forward
        decoder = BatchedDecoder(model, pipe.tokenizer.eos_token_id)
        for i, ids in enumerate(prompts[:n]):
            decoder.add(Request(ids, 64, 32, 64, copy.copy(pipe.scheduler), cache, stop_at_eos=True,
                                id=str(i)))  # fmt: skip
        out, start = {}, time.perf_counter()
        while len(decoder):
            out.update({f.request.id: f.sequence for f in decoder.step()})
        return time.perf_counter() - start, out

    start = time.perf_counter()
    for _ in range(2):
        for n in counts:
            decode(n, compiled)
    results = {"args": vars(args) | {"out": str(args.out)}, "warm_up_s": time.perf_counter() - start, "runs": {}}
    print(f"compile warm-up: {results['warm_up_s']:.1f} s")
    for n in counts:
        ratios, same = [], True
        for _ in range(args.repeats):
            t_eager, want = decode(n, eager)
            t_compiled, got = decode(n, compiled)
            ratios.append(t_compiled / t_eager)
            same &= all(torch.equal(want[k], got[k]) for k in want)
        results["runs"][n] = {"compiled_over_eager": statistics.median(ratios), "ratios": ratios, "same_tokens": same}
        print(f"{n} request(s): compiled / eager time {statistics.median(ratios):.3f} "
              f"({', '.join(f'{r:.3f}' for r in ratios)}), same tokens: {same}", flush=True)  # fmt: skip
    model.hidden_states = eager
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
