"""Decoding speed of DLMPipeline per cache mode, as ratios measured in one run.

    python scripts/bench_dlm.py --out results/bench_dlm.json            # random 135M LLaDA, CPU
    python scripts/bench_dlm.py --linear onednn                         # oneDNN's prepacked matmul
    python scripts/bench_dlm.py --model dlmcache/tiny --prompt-len 48 --max-new-tokens 64
    python scripts/bench_dlm.py --device cuda --dtype bfloat16 --model GSAI-ML/LLaDA-8B-Instruct
    python scripts/bench_dlm.py --modes \\
        "none;freecache:suffix_window=0;freecache:suffix_window=0+guide:path=random,top_k=32768,relative=0"

The default model is a random-weight LLaDA-architecture model built from a config (d_model 768,
12 layers, 12 heads, SwiGLU 2048, vocab 32768: 135M parameters) fed random prompt ids. Every mode
decodes the same prompt with the same schedule (default: 256-token prompt, 256 new tokens, blocks of
32, one token per step, greedy). For each mode: median seconds over --repeats (modes interleaved, so
load drift hits them alike), tokens/s, ms per step, forwards, tokens fed, KV-buffer bytes, token
agreement with `none`, speedup over `none`; plus the time of a plain full forward (all logits) per
step, the floor `none` must not exceed. --memory also runs each mode in a fresh process (one step per
block: the same shapes, so the same peak) and reports its peak RSS (CPU) or peak allocated memory (CUDA).

Guided modes name a guide as in `dlmcache.run_config`; `path=random` is a random-weight Llama causal LM
over the same synthetic vocabulary (4 layers, hidden 256: 10M parameters, about 1/13 of the DLM, the
ratio of a 0.5B guide to a 7B DLM). A random guide agrees with nothing, so measure the mechanism's upper
bound with `top_k=VOCAB,relative=0`: every draft passes the rule, the guide still runs every forward.
`path=smollm2` loads SmolLM2-135M-Instruct (see `dlmcache.offline`).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dlmcache import DLMPipeline, LowConfidenceScheduler
from dlmcache.guidance import ARGuide
from dlmcache.models.layers import LINEAR_BACKENDS
from dlmcache.run_config import RunConfig, split_configs
from dlmcache.testing import llada_135m, random_guide, synthetic_tokenizer

DEFAULT_MODES = [
    "none",
    "prefix",
    "dual",
    "freecache",
    "freecache:suffix_window=32",
    "freecache:suffix_window=0",
    "freecache:refresh_every=4",
    "dual+threshold=0.9",
    "freecache:suffix_window=0+threshold=0.9",
    "freecache:suffix_window=0+guide:path=random,top_k=32768,relative=0",
]


def random_pipeline(vocab_size: int, dtype: torch.dtype, device: str) -> DLMPipeline:
    model = llada_135m(vocab_size, dtype, device)
    return DLMPipeline(model=model, tokenizer=synthetic_tokenizer(vocab_size), scheduler=LowConfidenceScheduler())


class GuideLoader:
    """`load_guide` for `RunConfig.apply`: builds each named guide once."""

    def __init__(self, pipe, args):
        self.pipe, self.args, self.models = pipe, args, {}

    def __call__(self, name: str, options: dict) -> ARGuide:
        dtype = getattr(torch, self.args.dtype)
        if name not in self.models:
            if name == "random":
                self.models[name] = (random_guide(self.pipe.tokenizer, dtype, self.args.device), self.pipe.tokenizer)
            elif name == "smollm2":
                from dlmcache.offline import load_smollm2

                model, tok = load_smollm2(dtype)
                self.models[name] = (model.to(self.args.device), tok)
        if name in self.models:
            model, tok = self.models[name]
            return ARGuide(model, tok, **options)
        return ARGuide(name, dtype=dtype, **options)


def build(args) -> tuple[DLMPipeline, torch.Tensor]:
    dtype = getattr(torch, args.dtype)
    if args.model == "random-135m":
        pipe = random_pipeline(32768, dtype, args.device)
    else:
        pipe = DLMPipeline.from_pretrained(args.model, torch_dtype=dtype, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.model.set_linear_backend(args.linear)
    gen = torch.Generator().manual_seed(1)
    vocab = pipe.model.get_input_embeddings().num_embeddings
    ids = torch.randint(3, min(vocab, len(pipe.tokenizer)), (args.batch, args.prompt_len), generator=gen)
    ids[ids == pipe.mask_token_id] = 3
    return pipe, ids


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_mode(pipe, ids, mode: str, args, load_guide):
    RunConfig.parse(mode).apply(pipe, load_guide=load_guide)
    sync(args.device)
    t0 = time.perf_counter()
    out = pipe(ids, max_new_tokens=args.max_new_tokens, block_length=args.block_length, steps=args.steps)
    sync(args.device)
    return time.perf_counter() - t0, out


def plain_forward_seconds(pipe, ids, args) -> float:
    """Median time of one forward of the full canvas with logits for every position."""
    x = torch.cat([ids, torch.full((ids.shape[0], args.max_new_tokens), pipe.mask_token_id)], 1).to(args.device)
    times = []
    with torch.no_grad():
        for _ in range(3):
            sync(args.device)
            t0 = time.perf_counter()
            pipe.model(x)
            sync(args.device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(mode: str, args) -> dict:
    """Peak memory of one generation in a fresh process (MiB): RSS on CPU, allocated on CUDA; and what
    the process held with the model loaded, before decoding."""
    # Peak memory depends on the shapes, not on how many steps run: the child decodes with one step per
    # block (the same canvas, cache buffers and first full forward) to save the time of a full run.
    keep = ("model", "linear", "dtype", "device", "batch", "prompt_len", "max_new_tokens", "block_length", "threads")
    cmd = [sys.executable, __file__, "--child", mode, f"--steps={args.max_new_tokens // args.block_length}"]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in keep and v is not None]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(args) -> None:
    torch.set_num_threads(args.threads)
    pipe, ids = build(args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = current_rss_mib()
    run_mode(pipe, ids, args.child, args, pipe.scheduler, GuideLoader(pipe, args))
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak, "model_loaded_mib": before}))


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-135m")
    ap.add_argument("--modes", default=";".join(DEFAULT_MODES), help="configs separated by ';' (or ',' if no ';')")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--linear", default="torch", choices=LINEAR_BACKENDS, help="the model's matmul (set_linear_backend)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="peak memory per mode, each in a fresh process")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    modes = split_configs(args.modes)
    pipe, ids = build(args)
    load_guide = GuideLoader(pipe, args)

    # Correctness first: FreeCache refreshing every step must be the no-cache reference, bit for bit.
    short = dict(max_new_tokens=2 * args.block_length, block_length=args.block_length)
    pipe.set_cache("none")
    ref = pipe(ids, **short)
    pipe.set_cache("freecache", refresh_every=1)
    exact = torch.equal(pipe(ids, **short).sequences, ref.sequences)
    print(f"check: freecache(refresh_every=1) == none: {exact}", flush=True)
    if not exact:
        raise SystemExit("FreeCache(refresh_every=1) differs from no cache")

    times = {m: [] for m in modes}
    outputs, plain_times = {}, []
    for r in range(args.repeats):
        # The floor `none` must not exceed, timed within every repeat so load drift hits it alike.
        plain_times.append(plain_forward_seconds(pipe, ids, args))
        for mode in modes:
            seconds, out = run_mode(pipe, ids, mode, args, load_guide)
            times[mode].append(seconds)
            outputs[mode] = out
            print(f"repeat {r} {mode:45s} {seconds:8.2f} s  nfe {out.nfe}", flush=True)
    plain = statistics.median(plain_times)
    ref_seq = outputs[modes[0]].sequences
    generated = ids.shape[0] * args.max_new_tokens
    rows = {}
    for mode in modes:
        out, sec = outputs[mode], statistics.median(times[mode])
        rows[mode] = {
            "seconds_median": sec,
            "seconds_all": times[mode],
            "tokens_per_second": generated / sec,
            "ms_per_step": 1000 * sec / out.nfe,
            "nfe": out.nfe,
            "fed_tokens": out.stats["fed_tokens"],
            "full_forwards": out.stats["full_forwards"],
            "drift_refreshes": out.stats.get("drift_refreshes", 0),
            "kv_bytes": out.stats.get("kv_bytes", 0),
            "agreement_with_first_mode": (out.sequences == ref_seq).float().mean().item(),
        }
        if args.memory:
            mem = peak_memory(mode, args)
            rows[mode]["peak_mib"] = mem["peak_mib"]
            rows[mode]["decode_extra_mib"] = mem["peak_mib"] - mem["model_loaded_mib"]
    base = rows[modes[0]]["seconds_median"]
    for mode in modes:
        rows[mode]["speedup"] = base / rows[mode]["seconds_median"]
    print(
        f"\nplain full forward (all logits): {1000 * plain:.1f} ms; x {rows[modes[0]]['nfe']} steps = "
        f"{plain * rows[modes[0]]['nfe']:.1f} s\n"
    )
    mem = " peak MiB (above loaded model) |" if args.memory else ""
    print(f"| mode | seconds | speedup | ms/step | forwards | full + drift refreshes | tokens fed | agreement |{mem}")
    print("|---|---|---|---|---|---|---|---|" + ("---|" if args.memory else ""))
    for mode, r in rows.items():
        extra = f" {r['peak_mib']:.0f} ({r['decode_extra_mib']:+.0f}) |" if args.memory else ""
        print(
            f"| {mode} | {r['seconds_median']:.1f} | {r['speedup']:.2f}x | {r['ms_per_step']:.1f} | {r['nfe']} | "
            f"{r['full_forwards']} + {r['drift_refreshes']} | {r['fed_tokens']:.0f} | "
            f"{100 * r['agreement_with_first_mode']:.0f}% |{extra}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "plain_forward_seconds": plain,
            "exact_check": exact,
        }
        args.out.write_text(json.dumps({"meta": meta, "modes": rows}, indent=1))


if __name__ == "__main__":
    main()
