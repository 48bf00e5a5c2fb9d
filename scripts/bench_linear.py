"""Which CPU matmul path a forward should take: the candidates side by side, in one run.

    python scripts/bench_linear.py --out results/bench_linear.json
    python scripts/bench_linear.py --models tiny --rows 16,32 --no-compile     # quick
    python scripts/bench_linear.py --sweep --out results/bench_linear_sweep.json  # auto's crossover
    python scripts/bench_linear.py --memory      # the 135M's RSS per backend (no second copy)

For the random 135M LLaDA-architecture model and the bundled tiny model, a plain forward (one row,
no cache, logits for every position) of each of --rows tokens, the median of --repeats after a
warm-up, for each path:

- eager: torch's `F.linear` everywhere (`set_linear_backend("torch")`), float32;
- auto: the default, oneDNN for the weights of at least `ONEDNN_MIN_WEIGHT` elements, torch for the
  smaller ones, float32;
- onednn: the projections and LM head multiply by weights prepacked in oneDNN's blocked layout
  (`set_linear_backend("onednn")`), float32;
- compile / compile_freezing: `torch.compile(model, dynamic=False)` with inductor's defaults, and with
  its `freezing` option (weights folded as constants and prepacked); float32; the first call's
  seconds (compiling) are reported apart;
- eager_bf16 / onednn_bf16: the same in bfloat16, where the CPU runs oneDNN's bf16 natively.

Each repeat times every path on the same input in turn (load drift hits them alike); ratios are over
eager float32 in the same repeat, medians over repeats. Every path's logits are checked against eager
float32 (max abs difference reported). Nothing is changed in the package: this measures.

--sweep: one projection alone, x [rows, in] @ W [out, in]^T, for weights from 128 x 128 to 576 x 32768
(the tiny model's and the 135M's shapes among them, its LM head last): torch's `F.linear` against the prepacked
oneDNN product, interleaved, medians of --repeats; the weight size where oneDNN starts to win is
`ONEDNN_MIN_WEIGHT`, the threshold of "auto".
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from dlmcache import DLMPipeline
from dlmcache.models.layers import ONEDNN_MIN_WEIGHT, Linear, onednn_dtypes
from dlmcache.testing import llada_135m


def build(name: str):
    if name == "135m":
        return llada_135m(32768)
    return DLMPipeline.from_pretrained("dlmcache/tiny").model


def paths(model, compile_: bool) -> dict:
    """name -> (callable on input ids, seconds spent preparing it)."""
    model.set_linear_backend("torch")
    out = {"eager": (model, 0.0)}
    auto = copy.deepcopy(model)
    auto.set_linear_backend("auto")
    out["auto"] = (auto, 0.0)
    onednn = copy.deepcopy(model)
    onednn.set_linear_backend("onednn")
    out["onednn"] = (onednn, 0.0)
    if torch.bfloat16 in onednn_dtypes():
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        out["eager_bf16"] = (bf16, 0.0)
        bf16_onednn = copy.deepcopy(bf16)
        bf16_onednn.set_linear_backend("onednn")
        out["onednn_bf16"] = (bf16_onednn, 0.0)
    if compile_:  # inductor's options apply per compiled model (compiling happens at the first call)
        # every compiled copy shares the model's forward code, and so dynamo's per-code cache: a graph
        # per copy, model and shape must fit, or dynamo quietly falls back to eager
        torch._dynamo.config.recompile_limit = 64
        out["compile"] = (torch.compile(copy.deepcopy(model), dynamic=False), None)
        frozen = torch.compile(copy.deepcopy(model), dynamic=False, options={"freezing": True})
        out["compile_freezing"] = (frozen, None)
    return out


SWEEP_SHAPES = [(128, 128), (128, 512), (256, 256), (512, 512), (576, 576), (576, 1536), (1536, 576),
                (1024, 1024), (2048, 2048), (576, 8192), (4096, 4096), (576, 32768)]  # fmt: skip


def sweep(rows: list[int], repeats: int) -> dict:
    """torch / oneDNN time of one projection per (in, out) weight and row count (see the docstring)."""
    out = {}
    print(f"ONEDNN_MIN_WEIGHT = {ONEDNN_MIN_WEIGHT}")
    print("| weight (in x out) | elements | " + " | ".join(f"oneDNN / torch, {n} rows" for n in rows) + " |")
    print("|---|---|" + "---|" * len(rows))
    for fan_in, fan_out in SWEEP_SHAPES:
        torch.manual_seed(0)
        plain, packed = Linear(fan_in, fan_out, bias=False), Linear(fan_in, fan_out, bias=False)
        plain.backend, packed.backend = "torch", "onednn"
        packed.load_state_dict(plain.state_dict())
        cells = []
        for n in rows:
            x = torch.randn(n, fan_in)
            times = {"torch": [], "onednn": []}
            with torch.no_grad():
                for _ in range(3):
                    plain(x), packed(x)
                for _ in range(repeats):
                    for name, module in (("torch", plain), ("onednn", packed)):
                        t = time.perf_counter()
                        for _ in range(20):
                            module(x)
                        times[name].append(time.perf_counter() - t)
            ratio = statistics.median(a / b for a, b in zip(times["onednn"], times["torch"], strict=True))
            us = 1e6 * statistics.median(times["torch"]) / 20
            out[f"{fan_in}x{fan_out}/{n}"] = {"over_torch": ratio, "us_torch": us}
            cells.append(f"{ratio:.2f}")
        print(f"| {fan_in} x {fan_out} | {fan_in * fan_out} | " + " | ".join(cells) + " |", flush=True)
    return out


MEMORY_PROBE = """
import gc, resource, sys, torch
from dlmcache.testing import llada_135m
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
base = rss()  # the interpreter, torch and dlmcache, before the model
model = llada_135m()
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
model.set_linear_backend(sys.argv[1])
with torch.no_grad():
    model(torch.randint(3, 100, (1, 16)))
gc.collect()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(sys.argv[1], model.linear_paths()["onednn"], round(rss()), round(peak), round(base), round(weights))
"""


def memory() -> dict:
    """The 135M's resident memory after a forward, per linear backend, each in a fresh process: RSS and
    peak RSS, and the peak above the process before the model was built, against the weights' bytes."""
    import subprocess
    import sys

    out = {}
    print(
        "| backend | packed projections | RSS after a forward, MiB | peak RSS, MiB | before the model, MiB "
        "| peak above that / weights |\n|---|---|---|---|---|---|"
    )
    for backend in ("torch", "auto", "onednn"):
        line = subprocess.run([sys.executable, "-c", MEMORY_PROBE, backend], capture_output=True, text=True, check=True)
        name, packed, rss, peak, base, weights = line.stdout.split()
        ratio = (int(peak) - int(base)) / int(weights)
        out[backend] = {"packed": int(packed), "rss_mib": int(rss), "peak_mib": int(peak), "base_mib": int(base),
                        "weights_mib": int(weights), "peak_above_base_over_weights": ratio}  # fmt: skip
        print(f"| {name} | {packed} | {rss} | {peak} | {base} | {ratio:.3f} ({weights} MiB of weights) |", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="135m,tiny")
    ap.add_argument("--rows", default="16,32,256")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="one projection per weight shape: auto's crossover")
    ap.add_argument("--memory", action="store_true", help="the 135M's RSS per linear backend")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: must be at least 1")
    torch.set_num_threads(args.threads)
    results = {"args": vars(args) | {"out": str(args.out)}, "torch": torch.__version__, "runs": {}}
    if args.sweep or args.memory:
        if args.sweep:
            results["sweep"] = sweep([int(r) for r in args.rows.split(",")], args.repeats)
        if args.memory:
            results["memory"] = memory()
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
        return
    for name in args.models.split(","):
        model = build(name).eval()
        vocab = model.get_input_embeddings().num_embeddings
        candidates = paths(model, not args.no_compile)
        for n in (int(r) for r in args.rows.split(",")):
            ids = torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(n))
            ms, first, error = {p: [] for p in candidates}, {}, {}
            with torch.no_grad():
                want = model(ids).logits.float()
                for p, (fn, _) in candidates.items():  # warm-up (compiles the compiled paths for this shape)
                    t = time.perf_counter()
                    got = fn(ids).logits.float()
                    first[p] = time.perf_counter() - t
                    error[p] = float((got - want).abs().max())
                    fn(ids)
                for _ in range(args.repeats):
                    for p, (fn, _) in candidates.items():
                        t = time.perf_counter()
                        fn(ids)
                        ms[p].append(1e3 * (time.perf_counter() - t))
            ratios = {p: statistics.median(a / b for a, b in zip(ms[p], ms["eager"], strict=True)) for p in ms}
            row = {p: {"ms": statistics.median(ms[p]), "over_eager": ratios[p], "first_call_s": first[p],
                       "max_abs_diff": error[p]} for p in ms}  # fmt: skip
            results["runs"][f"{name}/{n}"] = row
            print(f"\n{name}, {n} tokens")
            print("| path | ms per forward | time / eager | first call s | max abs diff vs eager fp32 |")
            print("|---|---|---|---|---|")
            for p, r in row.items():
                print(f"| {p} | {r['ms']:.2f} | {r['over_eager']:.3f} | {r['first_call_s']:.2f} | "
                      f"{r['max_abs_diff']:.2e} |", flush=True)  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
