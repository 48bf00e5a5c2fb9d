"""Decoding speed of DLMPipeline per cache mode, as ratios measured in one run.

    python scripts/bench_dlm.py --out results/bench_dlm.json            # random 135M LLaDA, CPU
    python scripts/bench_dlm.py --linear onednn                         # oneDNN's prepacked matmul
    python scripts/bench_dlm.py --model dlmcache/tiny --prompt-len 48 --max-new-tokens 64
    python scripts/bench_dlm.py --device cuda --dtype bfloat16 --model GSAI-ML/LLaDA-8B-Instruct
    python scripts/bench_dlm.py --modes \\
        "none;freecache:suffix_window=0;freecache:suffix_window=0+guide:path=random,top_k=32768,relative=0"
    python scripts/bench_dlm.py --long --memory --out results/bench_long.json   # long prompts, compressed

The default model is a random-weight LLaDA-architecture model built from a config (d_model 768,
12 layers, 12 heads, SwiGLU 2048, vocab 32768: 135M parameters) fed random prompt ids;
`--model random-135m-dream` / `random-135m-sdar` / `random-135m-moe` / `random-135m-llada2` /
`random-135m-fastdllm-v2` is the same width and depth in Dream's / SDAR's / LLaDA-MoE's / LLaDA2's /
Fast-dLLM v2's architecture (`dlmcache.testing.dream_135m`, `sdar_135m`, `llada_moe_135m`,
`llada2_135m`, `fast_dllm_v2_135m`; SDAR with `--block-length 4`, its own; LLaDA2 with its 32;
Fast-dLLM v2 with its sub-blocks of 8 in attention blocks of 32). Every mode
decodes the same prompt with the same schedule (default: 256-token prompt, 256 new tokens, blocks of
32, one token per step, greedy). For each mode: median seconds over --repeats (modes interleaved, so
load drift hits them alike), tokens/s, ms per step, forwards, tokens fed, KV-buffer bytes, token
agreement with `none`, speedup over `none`; plus the time of a plain full forward (all logits) per
step, the floor `none` must not exceed. --memory also runs each mode in a fresh process (one step per
block: the same shapes, so the same peak) and reports its peak RSS (CPU) or peak allocated memory (CUDA).

--long measures long prompts (--prompt-lens, default 1024,4096,8192) for FreeCache's token mode
uncompressed and with its prompt KV compressed (--modes, default LONG_MODES); `none` would take hours
there, so speedups are over the first mode. Per mode it also reports the first step alone (the
prefill: the full forward and the compression) and the median step (a cached step), and writes a
plot next to the JSON.

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
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dlmcache import DLMPipeline, DreamScheduler, LowConfidenceScheduler
from dlmcache.guidance import ARGuide
from dlmcache.models.layers import LINEAR_BACKENDS
from dlmcache.run_config import RunConfig, split_configs
from dlmcache.testing import (
    dream_135m,
    fast_dllm_v2_135m,
    llada2_135m,
    llada_135m,
    llada_moe_135m,
    random_guide,
    sdar_135m,
    synthetic_tokenizer,
)

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

TOKEN_MODE = "freecache:suffix_window=0,freeze=token"
LONG_MODES = [
    TOKEN_MODE,
    TOKEN_MODE + ",policy=maskkv,budget=0.25",
    TOKEN_MODE + ",policy=maskkv,budget=0.1",
    TOKEN_MODE + ",policy=maskkv,budget=0.25,quantizer=kivi4",
]


#: --model names of the random 135M models, by family.
RANDOM_MODELS = {
    "random-135m": "llada",
    "random-135m-dream": "dream",
    "random-135m-sdar": "sdar",
    "random-135m-moe": "llada-moe",
    "random-135m-llada2": "llada2",
    "random-135m-fastdllm-v2": "fast-dllm-v2",
}


def random_pipeline(vocab_size: int, dtype: torch.dtype, device: str, family: str = "llada") -> DLMPipeline:
    """The random 135M model of a family with its own greedy sampler (LLaDA's low-confidence
    remasking; Dream's maskgit_plus at temperature 0; SDAR: low-confidence remasking in its blocks)."""
    if family == "dream":
        model, scheduler = dream_135m(vocab_size, dtype, device), DreamScheduler(alg="maskgit_plus", temperature=0.0)
    elif family == "sdar":
        model, scheduler = sdar_135m(vocab_size, dtype, device), LowConfidenceScheduler()
    elif family == "llada-moe":
        model, scheduler = llada_moe_135m(vocab_size, dtype, device), LowConfidenceScheduler()
    elif family == "llada2":
        model, scheduler = llada2_135m(vocab_size, dtype, device), LowConfidenceScheduler()
    elif family == "fast-dllm-v2":
        model, scheduler = fast_dllm_v2_135m(vocab_size, dtype, device), LowConfidenceScheduler()
    else:
        model, scheduler = llada_135m(vocab_size, dtype, device), LowConfidenceScheduler()
    return DLMPipeline(model=model, tokenizer=synthetic_tokenizer(vocab_size), scheduler=scheduler)


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
                from dlmcache.offline import load_smollm2, smollm2_missing

                if smollm2_missing():
                    raise SystemExit(f"bench_dlm.py: {smollm2_missing()}")
                model, tok = load_smollm2(dtype)
                self.models[name] = (model.to(self.args.device), tok)
        if name in self.models:
            model, tok = self.models[name]
            return ARGuide(model, tok, **options)
        return ARGuide(name, dtype=dtype, **options)


def build(args) -> tuple[DLMPipeline, torch.Tensor]:
    dtype = getattr(torch, args.dtype)
    if args.model in RANDOM_MODELS:
        pipe = random_pipeline(32768, dtype, args.device, RANDOM_MODELS[args.model])
    else:
        pipe = DLMPipeline.from_pretrained(args.model, torch_dtype=dtype, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.model.set_linear_backend(args.linear)
    return pipe, prompt_ids(pipe, args.batch, args.prompt_len)


def prompt_ids(pipe, batch: int, length: int) -> torch.Tensor:
    """Random prompt ids [batch, length] (never the mask id), the same for every mode."""
    gen = torch.Generator().manual_seed(1)
    vocab = pipe.model.get_input_embeddings().num_embeddings
    ids = torch.randint(3, min(vocab, len(pipe.tokenizer)), (batch, length), generator=gen)
    ids[ids == pipe.mask_token_id] = 3
    return ids


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_mode(pipe, ids, mode: str, args, load_guide):
    """(seconds, output) of one generation; `output.step_seconds` lists each step's duration."""
    RunConfig.parse(mode).apply(pipe, load_guide=load_guide)
    marks = []

    def mark(pipe, step, state):
        sync(args.device)
        marks.append(time.perf_counter())

    sync(args.device)
    t0 = time.perf_counter()
    out = pipe(
        ids, max_new_tokens=args.max_new_tokens, block_length=args.block_length, steps=args.steps,
        callback_on_step_end=mark,
    )  # fmt: skip
    sync(args.device)
    seconds = time.perf_counter() - t0
    out.step_seconds = [b - a for a, b in zip([t0] + marks[:-1], marks, strict=True)]
    return seconds, out


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
        before = reset_peak_rss()
    run_mode(pipe, ids, args.child, args, GuideLoader(pipe, args))
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = status_mib("VmHWM")
    print(json.dumps({"peak_mib": peak, "model_loaded_mib": before}))


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> float:
    """Reset the process's peak RSS to its current RSS (Linux: writing 5 to clear_refs), so the peak
    read later is that of decoding, not of building the model; returns the current RSS (MiB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak then includes the model's construction
    return status_mib("VmRSS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-135m", help=f"{', '.join(RANDOM_MODELS)} or a path / hub id")
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
    ap.add_argument("--long", action="store_true", help="long prompts (--prompt-lens), FreeCache compressed or not")
    ap.add_argument("--prompt-lens", type=lambda t: [int(x) for x in t.split(",")], default=[1024, 4096, 8192])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    if args.long and args.modes == ";".join(DEFAULT_MODES):
        args.modes = ";".join(LONG_MODES)
    modes = split_configs(args.modes)
    pipe, ids = build(args)
    load_guide = GuideLoader(pipe, args)

    # Correctness first: FreeCache refreshing every step must be the no-cache reference, bit for bit
    # (on at most 256 prompt tokens: `none` at a long prompt would take long).
    short = dict(max_new_tokens=2 * args.block_length, block_length=args.block_length)
    check_ids = ids[:, -256:]
    pipe.set_cache("none")
    ref = pipe(check_ids, **short)
    pipe.set_cache("freecache", refresh_every=1)
    exact = torch.equal(pipe(check_ids, **short).sequences, ref.sequences)
    print(f"check: freecache(refresh_every=1) == none: {exact}", flush=True)
    if not exact:
        raise SystemExit("FreeCache(refresh_every=1) differs from no cache")

    meta = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "exact_check": exact,
    }
    if not args.long:
        rows, meta["plain_forward_seconds"] = bench(pipe, ids, modes, args, load_guide)
        results = {"meta": meta, "modes": rows}
    else:
        results = {"meta": meta, "prompt_lens": {}}
        for length in args.prompt_lens:
            print(f"\n## prompt of {length} tokens", flush=True)
            args.prompt_len = length
            rows, plain = bench(pipe, prompt_ids(pipe, args.batch, length), modes, args, load_guide)
            results["prompt_lens"][length] = {"modes": rows, "plain_forward_seconds": plain}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        if args.long:
            plot_long(results, args.out.with_suffix(".png"))


def bench(pipe, ids, modes, args, load_guide) -> tuple[dict, float]:
    """Every mode on `ids`, --repeats times interleaved: a row per mode, and the plain forward's time."""
    times = {m: [] for m in modes}
    outputs, step_times, plain_times = {}, {m: [] for m in modes}, []
    for r in range(args.repeats):
        # The floor `none` must not exceed, timed within every repeat so load drift hits it alike.
        plain_times.append(plain_forward_seconds(pipe, ids, args))
        for mode in modes:
            seconds, out = run_mode(pipe, ids, mode, args, load_guide)
            times[mode].append(seconds)
            step_times[mode].append(out.step_seconds)
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
            "first_step_seconds": statistics.median(steps[0] for steps in step_times[mode]),
            "median_step_ms": 1000 * statistics.median(statistics.median(steps[1:]) for steps in step_times[mode]),
            "nfe": out.nfe,
            "fed_tokens": out.stats["fed_tokens"],
            "full_forwards": out.stats["full_forwards"],
            "drift_refreshes": out.stats.get("drift_refreshes", 0),
            "canvas_refreshes": out.stats.get("canvas_refreshes", 0),
            "kv_bytes": out.stats.get("kv_bytes", 0),
            "agreement_with_first_mode": (out.sequences == ref_seq).float().mean().item(),
        }
        if args.memory:
            mem = peak_memory(mode, args)
            rows[mode]["peak_mib"] = mem["peak_mib"]
            rows[mode]["decode_extra_mib"] = mem["peak_mib"] - mem["model_loaded_mib"]
    base = rows[modes[0]]
    for mode in modes:
        rows[mode]["speedup"] = base["seconds_median"] / rows[mode]["seconds_median"]
        rows[mode]["step_speedup"] = base["median_step_ms"] / rows[mode]["median_step_ms"]
        rows[mode]["kv_ratio"] = rows[mode]["kv_bytes"] / base["kv_bytes"] if base["kv_bytes"] else float("nan")
    print(
        f"\nplain full forward (all logits): {1000 * plain:.1f} ms; x {rows[modes[0]]['nfe']} steps = "
        f"{plain * rows[modes[0]]['nfe']:.1f} s\n"
    )
    mem = " peak MiB (above loaded model) |" if args.memory else ""
    print(
        "| mode | seconds | speedup | first step s | median step ms | step speedup | full + drift (canvas) refreshes"
        f" | tokens fed | KV MiB | KV ratio | agreement |{mem}"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.memory else ""))
    for mode, r in rows.items():
        extra = f" {r['peak_mib']:.0f} ({r['decode_extra_mib']:+.0f}) |" if args.memory else ""
        print(
            f"| {mode} | {r['seconds_median']:.1f} | {r['speedup']:.2f}x | {r['first_step_seconds']:.2f} | "
            f"{r['median_step_ms']:.1f} | {r['step_speedup']:.2f}x | {r['full_forwards']} + {r['drift_refreshes']} "
            f"({r['canvas_refreshes']:g}) | {r['fed_tokens']:.0f} | {r['kv_bytes'] / 2**20:.1f} | "
            f"{r['kv_ratio']:.3f} | {100 * r['agreement_with_first_mode']:.0f}% |{extra}"
        )
    return rows, plain


def plot_long(results: dict, path: Path) -> None:
    """Seconds, median step and KV bytes per prompt length, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(results["prompt_lens"], key=int)
    modes = list(results["prompt_lens"][lengths[0]]["modes"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("seconds_median", "end to end, s"), ("median_step_ms", "cached step, ms"), ("kv_bytes", "KV MiB"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for mode in modes:
            ys = [results["prompt_lens"][n]["modes"][mode][key] for n in lengths]
            ys = [y / 2**20 for y in ys] if key == "kv_bytes" else ys
            ax.plot(
                [int(n) for n in lengths],
                ys,
                marker="o",
                label=mode.removeprefix(TOKEN_MODE).lstrip(",") or "uncompressed",
            )
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(title)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("FreeCache token mode, prompt KV compressed or not (random 135M LLaDA, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
