"""Where the time of one cached denoising step goes on this machine: the floor under `bench_dlm.py`.

    python scripts/step_floor.py                 # the 135M random LLaDA of bench_dlm.py, fp32, CPU
    python scripts/step_floor.py --dtype bfloat16

For the benchmark's model it times, as medians of --repeats calls: reading the transformer's weights
once (a sum over a tensor of the same size: the memory-bandwidth floor), the same weights' matmuls
at 8 / 16 / 32 rows (what a cached step feeds), the LM head over 16 rows (the masked positions of a
half-finished block), and one real cached forward feeding 16 tokens that attend to the whole canvas,
with and without those 16 logits: each with torch's matmul (MKL) and with oneDNN's prepacked one
(`set_linear_backend("onednn")`). Ratios between these lines are what to read; absolute times move
with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dlmcache.cache import CanvasStore, Layout, Refresh, Window
from dlmcache.testing import llada_135m


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--canvas", type=int, default=512, help="prompt + new tokens")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = llada_135m(32768, dtype, "cpu")
    embed, layers, _, head = model._stack()
    linears = [m for m in layers.modules() if isinstance(m, torch.nn.Linear)]
    n_params = sum(m.weight.numel() for m in linears)
    flat = torch.ones(n_params, dtype=dtype)
    rows = {"read the layers' weights once (bandwidth floor)": {"torch": median_ms(lambda: flat.sum(), args.repeats)}}

    x = torch.randint(3, 32768, (1, args.canvas))
    positions = torch.arange(args.canvas)[None]
    mid = args.canvas // 2
    layout = Layout(torch.ones(1, args.canvas, dtype=torch.bool), positions, prompt_len=mid, block_length=16)
    kv = CanvasStore(model, layout)

    def refresh():
        kv.begin(Refresh(), x, None, None)

    def cached(n_logits: int):
        kv.begin(Window(mid, mid + 16, args.canvas), x, None, torch.arange(mid, mid + 16))
        fed = slice(mid, mid + 16)
        model(x[:, fed], positions=positions[:, fed], cache=kv, logits_index=torch.arange(n_logits))

    for backend in ("torch", "onednn"):
        model.set_linear_backend(backend)
        for m in (8, 16, 32):
            xs = {w: torch.randn(m, w.in_features, dtype=dtype) for w in linears}
            rows.setdefault(f"the layers' matmuls at {m} rows", {})[backend] = median_ms(
                lambda xs=xs: [w(x) for w, x in xs.items()], args.repeats
            )
        h = torch.randn(16, head.in_features, dtype=dtype)
        rows.setdefault("LM head over 16 rows", {})[backend] = median_ms(lambda h=h: head(h), args.repeats)
        refresh()
        model(x, positions=positions, cache=kv)
        rows.setdefault("cached forward, 16 fed tokens, 16 logits", {})[backend] = median_ms(
            lambda: cached(16), args.repeats
        )
        rows.setdefault("cached forward, 16 fed tokens, no logits", {})[backend] = median_ms(
            lambda: cached(0), args.repeats
        )
        rows.setdefault(f"full forward, {args.canvas} tokens, 16 logits", {})[backend] = median_ms(
            lambda: (refresh(), model(x, positions=positions, cache=kv, logits_index=torch.arange(16))), 3
        )

    print(f"{n_params / 1e6:.1f}M weights in the layers ({n_params * flat.element_size() / 2**20:.0f} MiB), {dtype}")
    print("| what | ms, torch matmul | ms, oneDNN prepacked |\n|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms['torch']:.1f} | " + (f"{ms['onednn']:.1f} |" if "onednn" in ms else "|"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"dtype": args.dtype, "threads": args.threads, "ms": rows}, indent=1))


if __name__ == "__main__":
    main()
