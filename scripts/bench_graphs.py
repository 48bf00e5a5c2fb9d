"""The engine's step at its own shapes, padded to shape buckets, and replayed as CUDA graphs (issue 25,
item 2): answer tokens/s on a bundled model for one request and a batch, and the check that every
mode decodes the same tokens. One script for the GPU run, when a device is lent:

    python scripts/bench_graphs.py --out "$OUT/bench_graphs.json"             # CUDA: off, buckets, cuda
    python scripts/bench_graphs.py --device cpu --out results/bench_graphs.json  # CPU: off, buckets

Modes: "off" (each step at its own shapes), "buckets" (padded, eager: the padding's cost), "cuda"
(padded, one CUDA graph per bucket, captured on the first pass; the timed passes replay). Each
configuration runs `--repeats` times with the modes interleaved; medians. The server's cache
(FreeCache token mode, suffix window 0, drift refresh), the model's scheduler, 64 new tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dlmcache import DLMPipeline, tinytask
from dlmcache.cache import make_cache
from dlmcache.engine import BatchedDecoder


def decode(pipe, chats, graphs: str, decoder=None):
    """(seconds, answer tokens, sequences) of `chats` decoded together on the engine."""
    cache = make_cache("freecache", freeze="token", suffix_window=0)
    requests = pipe.make_requests(chats, max_new_tokens=64, cache=cache, stop_at_eos=True)
    decoder = decoder or BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id, graphs=graphs)
    if pipe.model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for r in requests:
        decoder.add(r)
    done = {}
    while len(decoder):
        for f in decoder.step():
            done[f.request.id] = f
    if pipe.model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    sequences = [done[r.id].sequence for r in requests]
    eos = pipe.tokenizer.eos_token_id
    tokens = sum(int((s == eos).nonzero()[0]) if bool((s == eos).any()) else len(s) for s in sequences)
    return seconds, tokens, sequences


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dlmcache/tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,8", help="requests decoded together, comma separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    pipe = DLMPipeline.from_pretrained(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    modes = ["off", "buckets"] + (["cuda"] if args.device == "cuda" else [])
    problems = tinytask.test_problems(max(int(b) for b in args.batches.split(",")))
    results = {"model": args.model, "device": args.device, "modes": modes, "batches": {}}
    for batch in (int(b) for b in args.batches.split(",")):
        chats = [tinytask.messages(p) for p in problems[:batch]]
        decoders = {m: BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id, graphs=m) for m in modes}
        reference = decode(pipe, chats, "off")[2]
        same = {}
        for mode in modes:  # a first pass each: warm-up, and for "cuda" the captures
            sequences = decode(pipe, chats, mode, decoders[mode])[2]
            same[mode] = all(torch.equal(a, b) for a, b in zip(sequences, reference, strict=True))
        times = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode in modes:
                seconds, tokens, _ = decode(pipe, chats, mode, decoders[mode])
                times[mode].append(tokens / seconds)
        row = {m: {"answer_tokens_per_s": statistics.median(t), "same_tokens": same[m]} for m, t in times.items()}
        for m in modes:
            row[m]["over_off"] = row[m]["answer_tokens_per_s"] / row["off"]["answer_tokens_per_s"]
        if "cuda" in modes:
            row["cuda"]["graphs_captured"] = len(decoders["cuda"]._graphed.graphs)
        results["batches"][batch] = row
        print(batch, json.dumps(row))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
