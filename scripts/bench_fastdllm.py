"""Our default path against Fast-dLLM's own generate loops, on the same random 135M LLaDA weights, in
one run (issue 25's first goal: the default path >= 3x Fast-dLLM's DualCache).

    python scripts/bench_fastdllm.py --fastdllm /path/to/Fast-dLLM/llada --out results/bench_fastdllm.json
    python scripts/bench_fastdllm.py --fastdllm /path/to/Fast-dLLM/llada --tiny-task 100 --threads 1

--fastdllm is NVlabs/Fast-dLLM's `llada/` directory (its `generate.py` and `model/`: the LLaDA
modeling file with `replace_position`); it needs `einops`, which this package does not. Nothing of
it is copied: the script imports it from where it lies and runs it beside ours.

The model is `dlmcache.testing.llada_135m` (d_model 768, 12 layers, SwiGLU 2048, vocab 32768, seed
0); the official model is built from the same config (the hub config.json's fixed fields,
`dlmcache.testing.LLADA_HUB_FIELDS`) and loads our state dict, strict. The setup is the issue's:
a 256-token random prompt, 256 new tokens, blocks of 32, one token per step, greedy, float32.

1. Checks, with our projections on torch's matmul (the official model's): the logits are bit-identical;
   Fast-dLLM's `generate_with_dual_cache` gives the same tokens as our `dual`, and
   `generate_with_prefix_cache` the same as our `prefix` (the same algorithms).
2. Timing, with our model as it loads (`set_linear_backend("auto")`, the package default; no flags):
   Fast-dLLM's DualCache and prefix cache, and our modes (--modes), interleaved, --repeats times;
   medians, and each mode's median per-repeat ratio to Fast-dLLM's DualCache. Each repeat also
   times plain forwards of 1 and of `block_length` tokens, for two floors of a decoder that runs a
   forward per step: one token a step (any rule), and the block's still-masked positions a step
   (what LLaDA's low-confidence rule scores: `(block_length + 1) / 2` on average, time taken as
   linear in the tokens). Fast-dLLM's DualCache time over a floor is the most such a decoder can reach.

--tiny-task N: the bundled tiny model (trained, 1.65M parameters) in Fast-dLLM's modeling file, the
first N held-out tiny-task problems one at a time (64 new tokens, blocks of 32), Fast-dLLM's
`generate_with_dual_cache` with its confidence threshold 0.9 against our modes (--modes; default
TINY_MODES), interleaved problem by problem, --repeats times: ms per problem (median over repeats of
the mean over problems), accuracy, and the speedup over Fast-dLLM. First checks, on torch's matmul,
that its DualCache + threshold gives our `dual+threshold=0.9`'s tokens on the first problems.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from dlmcache.models.layers import Linear
from dlmcache.run_config import RunConfig, split_configs
from dlmcache.testing import LLADA_HUB_FIELDS

sys.path.insert(0, str(Path(__file__).parent))
from bench_dlm import prompt_ids, random_pipeline, run_mode  # noqa: E402  (our side: the bench_dlm pipeline and timing)

#: our modes timed by default: the algorithm Fast-dLLM's DualCache runs, FreeCache as `freecache` names
#: it, and FreeCache's token mode (the README's headline mode: tiny-task accuracy within 1 point of none).
DEFAULT_MODES = ["dual", "freecache", "freecache:suffix_window=0,freeze=token"]


def check_official_directory(directory: Path) -> None:
    if not (directory / "generate.py").is_file() or not (directory / "model" / "modeling_llada.py").is_file():
        raise SystemExit(f"--fastdllm {directory}: expected Fast-dLLM's llada/ (generate.py, model/modeling_llada.py)")


def load_official(directory: Path, ours) -> tuple[torch.nn.Module, object]:
    """Fast-dLLM's LLaDA model with our weights, and its `generate` module."""
    check_official_directory(directory)
    sys.path.insert(0, str(directory))
    generate = importlib.import_module("generate")
    modeling = importlib.import_module("model.modeling_llada")
    config = modeling.LLaDAConfig(**{**LLADA_HUB_FIELDS, **ours.config.to_dict(), "init_device": "cpu"})
    config.use_cache = False  # transformers 5's PretrainedConfig no longer defines it; the 4.x code reads it
    official = modeling.LLaDAModelLM(config).eval()
    official.load_state_dict(ours.state_dict(), strict=True)
    return official, generate


def forward_seconds(model, ids, tokens: int, calls: int = 11) -> float:
    """Median time of a plain forward of `tokens` tokens (logits for each)."""
    times = []
    with torch.no_grad():
        for _ in range(calls):
            t0 = time.perf_counter()
            model(ids[:, :tokens])
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def official_run(generate, official, fn: str, ids, args, mask_id: int) -> tuple[float, torch.Tensor, int]:
    """(seconds, generated tokens, forwards) of one of Fast-dLLM's loops (which return the prompt too)."""
    loop = getattr(generate, fn)
    t0 = time.perf_counter()
    x, nfe = loop(
        official, ids, steps=args.max_new_tokens, gen_length=args.max_new_tokens, block_length=args.block_length,
        temperature=0.0, remasking="low_confidence", mask_id=mask_id,
    )  # fmt: skip
    return time.perf_counter() - t0, x[:, ids.shape[1] :], nfe


OFFICIAL = {"fast-dllm dual cache": "generate_with_dual_cache", "fast-dllm prefix cache": "generate_with_prefix_cache"}
SAME_ALGORITHM = {"fast-dllm dual cache": "dual", "fast-dllm prefix cache": "prefix"}


#: our modes of --tiny-task: the same algorithm as Fast-dLLM's, and FreeCache with the threshold
TINY_MODES = ["dual+threshold=0.9", "freecache+threshold=0.9", "freecache:freeze=token,suffix_window=0+threshold=0.9"]


def tiny_task(args, official_directory: Path) -> None:
    """The --tiny-task comparison (see the module docstring)."""
    from dlmcache import DLMPipeline, tinytask

    pipe = DLMPipeline.from_pretrained("dlmcache/tiny")
    pipe.set_progress_bar_config(disable=True)
    backend = next(m.backend for m in pipe.model.modules() if isinstance(m, Linear))
    official, generate = load_official(official_directory, pipe.model)
    problems = tinytask.test_problems(args.tiny_task)
    prompts = [torch.tensor([pipe.encode_prompts(tinytask.messages(p))[0]]) for p in problems]
    kw = dict(max_new_tokens=64, block_length=32)
    modes = split_configs(args.modes) if args.modes else TINY_MODES

    def theirs(ids):
        x, _ = generate.generate_with_dual_cache(official, ids, steps=64, gen_length=64, block_length=32,
                                                 temperature=0.0, remasking="low_confidence",
                                                 mask_id=pipe.mask_token_id, threshold=0.9)  # fmt: skip
        return x[:, ids.shape[1] :]

    def ours(ids, mode):
        RunConfig.parse(mode).apply(pipe)
        return pipe(ids, **kw).sequences

    pipe.model.set_linear_backend("torch")  # 1. the check: the same algorithm gives the same tokens
    with torch.no_grad():
        same = all(torch.equal(theirs(ids), ours(ids, "dual+threshold=0.9")) for ids in prompts[:8])
    print(f"check: Fast-dLLM's DualCache + threshold 0.9 == our dual+threshold=0.9 on 8 problems: {same}", flush=True)
    if not same:
        raise SystemExit("bench_fastdllm.py: Fast-dLLM's DualCache + threshold and ours differ; not timing")
    pipe.model.set_linear_backend(backend)
    print(f"uptime: {os.getloadavg()}; threads {torch.get_num_threads()}", flush=True)
    names = ["fast-dllm dual cache + threshold 0.9", *modes]
    seconds = {n: [0.0] * args.repeats for n in names}
    correct = dict.fromkeys(names, 0)
    with torch.no_grad():
        ours(prompts[0], modes[0]), theirs(prompts[0])  # warm-up
        for r in range(args.repeats):
            for problem, ids in zip(problems, prompts, strict=True):
                for name in names:
                    start = time.perf_counter()
                    out = theirs(ids) if name == names[0] else ours(ids, name)
                    seconds[name][r] += time.perf_counter() - start
                    if r == 0:
                        correct[name] += tinytask.is_correct(pipe.decode(out)[0], problem)
    base = [t / len(problems) for t in seconds[names[0]]]
    rows = {}
    for name in names:
        per = [t / len(problems) for t in seconds[name]]
        rows[name] = {"ms_per_problem": 1e3 * statistics.median(per), "accuracy": correct[name] / len(problems),
                      "speedup": statistics.median(b / t for b, t in zip(base, per, strict=True))}  # fmt: skip
    print(f"\n{len(problems)} tiny-task problems one at a time, {args.repeats} repeats interleaved, medians")
    print("| implementation, mode | ms / problem | accuracy | vs Fast-dLLM DualCache + threshold |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['ms_per_problem']:.1f} | {r['accuracy']:.1%} | {r['speedup']:.2f}x |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "load": os.getloadavg(),
            "our_linear_backend": backend,
        }
        args.out.write_text(json.dumps({"meta": meta, "check_same_tokens": same, "modes": rows}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fastdllm", type=Path, required=True, help="Fast-dLLM's llada/ directory")
    ap.add_argument("--modes", default=None, help="our configs, separated by ';' (default: DEFAULT_MODES, TINY_MODES)")
    ap.add_argument("--tiny-task", type=int, default=0, help="N: the bundled tiny model on N tiny-task problems")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-prefix", action="store_true", help="skip Fast-dLLM's prefix cache (check and timing)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    for name in ("prompt_len", "max_new_tokens", "block_length", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)}: must be at least 1")
    if args.max_new_tokens % args.block_length:
        raise SystemExit(
            f"--max-new-tokens={args.max_new_tokens} is not a multiple of --block-length={args.block_length}"
        )
    check_official_directory(args.fastdllm)  # (before building anything)
    torch.set_num_threads(args.threads)
    if args.tiny_task:
        return tiny_task(args, args.fastdllm)
    args.modes = args.modes or ";".join(DEFAULT_MODES)
    run_args = SimpleNamespace(device="cpu", max_new_tokens=args.max_new_tokens, block_length=args.block_length,
                               steps=None)  # fmt: skip

    pipe = random_pipeline(32768, torch.float32, "cpu")
    pipe.set_progress_bar_config(disable=True)
    backend = next(m.backend for m in pipe.model.modules() if isinstance(m, Linear))  # as loaded
    official, generate = load_official(args.fastdllm, pipe.model)  # (nothing is packed before a forward)
    mask_id = pipe.mask_token_id
    ids = prompt_ids(pipe, 1, args.prompt_len)  # bench_dlm's prompt
    official_modes = [m for m in OFFICIAL if not (args.no_prefix and "prefix" in m)]

    # 1. The checks, on torch's matmul (bit-identical logits, so the same tokens are expected).
    pipe.model.set_linear_backend("torch")
    with torch.no_grad():
        probe = ids[:, :64]
        logits_equal = torch.equal(pipe.model(probe).logits, official(probe).logits)
    checks = {"logits_bit_identical": logits_equal}
    print(f"check: float32 logits bit-identical to Fast-dLLM's model: {logits_equal}", flush=True)
    for name in official_modes:
        _, theirs, nfe = official_run(generate, official, OFFICIAL[name], ids, args, mask_id)
        _, out = run_mode(pipe, ids, SAME_ALGORITHM[name], run_args, None)
        same = torch.equal(theirs, out.sequences)
        checks[f"{name} == our {SAME_ALGORITHM[name]}"] = {"same_tokens": same, "their_nfe": nfe, "our_nfe": out.nfe}
        print(f"check: {name} == our {SAME_ALGORITHM[name]}: {same} (forwards {nfe} / {out.nfe})", flush=True)
    if not all(v if isinstance(v, bool) else v["same_tokens"] for v in checks.values()):
        raise SystemExit("bench_fastdllm.py: our model or loop differs from Fast-dLLM's; not timing")

    # 2. Timing, our model on the package default matmul.
    pipe.model.set_linear_backend(backend)
    print(f"\nuptime: {os.getloadavg()}; our matmul backend: {backend}", flush=True)
    warm = SimpleNamespace(**{**vars(run_args), "max_new_tokens": args.block_length})
    run_mode(pipe, ids[:, :16], "none", warm, None)
    paths = pipe.model.linear_paths()  # after a forward: which projections the backend packed
    print(f"our projections: {paths}", flush=True)
    modes = official_modes + split_configs(args.modes)
    times = {m: [] for m in modes}
    floor_times = {1: [], args.block_length: []}
    for r in range(args.repeats):
        for tokens, samples in floor_times.items():
            samples.append(forward_seconds(pipe.model, ids, tokens))
        for mode in modes:
            if mode in OFFICIAL:
                seconds, *_ = official_run(generate, official, OFFICIAL[mode], ids, args, mask_id)
            else:
                seconds, _ = run_mode(pipe, ids, mode, run_args, None)
            times[mode].append(seconds)
            print(f"repeat {r} {mode:45s} {seconds:8.2f} s", flush=True)
    base = "fast-dllm dual cache"
    # Floors for a decoder that runs a forward per step: one token each (any rule), or the rule's own
    # work: LLaDA's low-confidence remasking scores every still-masked position of the block, so a
    # block of b steps feeds b, b - 1, ..., 1 of them, (b + 1) / 2 on average (a forward's time taken
    # as linear in its tokens between the 1- and b-token forwards timed here).
    t1, tb = (statistics.median(floor_times[k]) for k in (1, args.block_length))
    floors = {
        "one token a step": args.max_new_tokens * t1,
        "the block's masked positions a step": args.max_new_tokens * (t1 + tb) / 2,
    }
    ceilings = {name: statistics.median(times[base]) / floor for name, floor in floors.items()}
    print(f"\nforward of 1 token: {1000 * t1:.1f} ms, of {args.block_length}: {1000 * tb:.1f} ms")
    for name, floor in floors.items():
        print(f"floor, {name}: {floor:.1f} s, at most {ceilings[name]:.2f}x Fast-dLLM's DualCache")
    rows = {}
    for mode in modes:
        ratios = [b / s for b, s in zip(times[base], times[mode], strict=True)]
        rows[mode] = {"seconds_median": statistics.median(times[mode]), "seconds_all": times[mode],
                      "tokens_per_second": args.max_new_tokens / statistics.median(times[mode]),
                      "speedup_over_fastdllm_dual": statistics.median(ratios)}  # fmt: skip
    print("\n| implementation, mode | seconds | answer tok/s | vs Fast-dLLM DualCache |\n|---|---|---|---|")
    for mode, r in rows.items():
        speedup = r["speedup_over_fastdllm_dual"]
        print(f"| {mode} | {r['seconds_median']:.1f} | {r['tokens_per_second']:.1f} | {speedup:.2f}x |")
    if args.out:
        meta = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                "our_linear_backend": backend, "our_linear_paths": paths,
                "forward_seconds": {k: statistics.median(v) for k, v in floor_times.items()},
                "floor_seconds": floors, "ceiling_over_fastdllm_dual": ceilings}  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "checks": checks, "modes": rows}, indent=1))


if __name__ == "__main__":
    main()
