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
from dlmcache.kernels.cache import CompressedCache  # noqa: E402
from dlmcache.kernels.policies import (  # noqa: E402
    D2O,
    EMS,
    GEAR,
    H2O,
    KIVI,
    TOVA,
    AdaKV,
    CAKEBudget,
    CAKEScore,
    D2OBudget,
    KNorm,
    KVCrush,
    LaCache,
    MiKV,
    Pyramid,
    SnapKV,
    StreamingLLM,
)
from offline_models import load_smollm2  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"


def eviction(cls, **kw):
    return lambda frac: {"policy": cls(**kw), "budget": frac}


def kivi_at(frac):
    """KIVI with the bit width whose bytes fit `frac` of a 16-bit cache (codes + fp16 scale/zero per 32)."""
    for bits in (8, 4, 2):
        if (bits + 1) / 16 <= frac:
            return {"quantizer": KIVI(bits=bits, group_size=32, residual=32)}
    return None


def tokens_then_bits(cls, bits, context: int = 1383, **kw):
    """The "more tokens, lower precision" recipe (arXiv 2412.12706): evict with `cls` to the token
    budget that `bits`-bit storage affords, then quantize what is kept with KIVI. The byte count
    includes KIVI's full-precision residual (32 tokens plus, on average, half a group of 32 not yet
    quantized), solved for a `context`-token prompt (the benchmark's mean)."""
    residual = 32 + 16

    def make(frac):
        # 16 bits per fp16 entry, bits + 1 per quantized one (codes, and a 16-bit scale and zero per 32)
        kept = residual + (frac * 16 * context - 16 * residual) / (bits + 1)
        keep = kept / context
        if keep >= 1:
            return None
        return {"policy": cls(**kw), "budget": keep, "quantizer": KIVI(bits=bits, group_size=32, residual=32)}

    return make


def with_allocator(cls, allocator, **kw):
    return lambda frac: {"policy": cls(**kw), "budget": frac, "allocator": allocator}


def mikv_at(frac, low_bits=2):
    """MiKV with the important-token share whose bytes fit `frac`: important tokens 16 bits, the rest
    `low_bits` codes + a 16-bit scale and zero per group of 32 (about low_bits + 1 bits each)."""
    low = (low_bits + 1) / 16
    important = (frac - low) / (1 - low)
    return {"quantizer": MiKV(important=important, low_bits=low_bits)} if important > 0 else None


def gear_at(frac):
    """GEAR 4-bit (the paper's main setting) or 2-bit, whichever fits `frac` with its low-rank and
    outlier overhead (reported as measured bytes)."""
    for bits in (4, 2):
        if (bits + 2) / 16 <= frac:
            return {"quantizer": GEAR(bits=bits)}
    return None


POLICIES = {
    "streaming_llm": eviction(StreamingLLM),
    "knorm": eviction(KNorm),
    "snapkv": eviction(SnapKV),
    "h2o": eviction(H2O),
    "h2o_mean": eviction(H2O, per_key_mean=True),  # kvpress's ObservedAttentionPress rule
    "tova": eviction(TOVA),
    "pyramidkv": with_allocator(SnapKV, Pyramid()),
    "adakv": eviction(AdaKV),
    "cake": with_allocator(CAKEScore, CAKEBudget()),
    "d2o": with_allocator(D2O, D2OBudget()),
    "ems": eviction(EMS),
    "kvcrush": eviction(KVCrush),
    "lacache": eviction(LaCache),
    "kivi": kivi_at,
    "mikv": mikv_at,
    "gear": gear_at,
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


@torch.no_grad()
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


@torch.no_grad()
def attention_errors(settings_by_name: dict, context: int = 512, cont: int = 16) -> dict:
    """Unit-level check: relative error ||o - o_full|| / ||o_full|| of every layer's attention output
    for `cont` continuation tokens after a compressed `context` (random ids) on a random small Llama
    (4 layers, hidden 256, GQA 4/2), averaged over layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(512, (1, context + cont))
    captured = []
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, i, o: captured.append(o[0].float()))
        for layer in model.model.layers
    ]

    def outputs(settings):
        cache = CompressedCache(model=model, **settings)
        model(ids[:, :context], past_key_values=cache)
        captured.clear()
        model(ids[:, context:], past_key_values=cache)
        cache.detach()
        return list(captured)

    full = outputs({})
    errors = {}
    for name, settings in settings_by_name.items():
        got = outputs(settings)
        errors[name] = statistics.mean(((g - f).norm() / f.norm()).item() for g, f in zip(got, full, strict=True))
    for h in hooks:
        h.remove()
    return errors


@torch.no_grad()
def tiny_few_shot_accuracy(settings_by_name: dict, n: int, shots: int = 6) -> dict:
    """The bundled tiny AR model's accuracy on `n` held-out problems with a `shots`-shot chat prompt
    whose KV is compressed (after prefill) by each setting; "full" is the uncompressed cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlmcache import tinytask
    from dlmcache.locations import resolve_path

    path = resolve_path("dlmcache/tiny-guide")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    problems = tinytask.test_problems(n)
    examples = tinytask.make_problems(shots, seed=12345, exclude={p.question for p in problems})
    prompts = [
        tok.apply_chat_template(tinytask.messages(p, examples), add_generation_prompt=True, return_tensors="pt")
        for p in problems
    ]
    prompts = [p["input_ids"] if not torch.is_tensor(p) else p for p in prompts]
    result = {"prompt_tokens": prompts[0].shape[1]}
    for name, settings in ({"full": {}} | settings_by_name).items():
        correct = 0
        for p, ids in zip(problems, prompts, strict=True):
            cache = CompressedCache(model=model, **settings)
            out = model.generate(
                ids, past_key_values=cache, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id
            )
            cache.detach()
            correct += tinytask.is_correct(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True), p)
        result[name] = correct / n
        print(f"tiny AR {shots}-shot, {name}: accuracy {result[name]:.3f}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--tiny-n", type=int, default=100, help="held-out problems for the tiny AR few-shot check")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "results")) / "policies")
    ap.add_argument("--tiny-only", action="store_true", help="only (re)run the tiny few-shot check into the JSON")
    ap.add_argument(
        "--dump-samples", type=Path, help="write the samples' token ids (torch.save) for scripts/kvpress_reference.py"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    json_path = args.out / "bench_policies.json"
    at_25 = {name: POLICIES[name](0.25) for name in args.policies.split(",")}
    at_25 = {k: v for k, v in at_25.items() if v is not None}
    if args.tiny_only:
        result = json.loads(json_path.read_text())
        result["tiny_few_shot_at_25"] = tiny_few_shot_accuracy(at_25, args.tiny_n)
        json_path.write_text(json.dumps(result, indent=1))
        return print_table(result)
    model, tokenizer = load_smollm2(torch.float32)
    samples = load_samples(tokenizer, args.samples)
    if args.dump_samples:
        return torch.save(samples, args.dump_samples)
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
    json_path.write_text(json.dumps(result, indent=1))  # each stage is saved as it finishes

    # Passkey retrieval and decode speed at 25% of the bytes (the full cache first, as the reference).
    result["at_25"] = {}
    decode_ctx = samples[0][0]
    for name in ["full"] + args.policies.split(","):
        settings = {} if name == "full" else POLICIES[name](0.25)
        if settings is None:
            continue
        found = [passkey(model, tokenizer, settings, depth) for depth in PASSKEY_DEPTHS]
        tps = decode_tokens_per_second(model, decode_ctx, settings, args.decode_tokens)
        result["at_25"][name] = {"passkey": found, "decode_tokens_per_second": tps}
        print(f"{name:14s} passkey {found}  decode {tps:.1f} tok/s", flush=True)
    full_tps = result["at_25"]["full"]["decode_tokens_per_second"]
    for row in result["at_25"].values():
        row["decode_speed_vs_full"] = row["decode_tokens_per_second"] / full_tps

    json_path.write_text(json.dumps(result, indent=1))
    result["attention_rel_error_at_25"] = attention_errors(at_25)
    for name, err in result["attention_rel_error_at_25"].items():
        print(f"attention output relative error @25% {name:14s} {err:.3f}", flush=True)
    result["tiny_few_shot_at_25"] = tiny_few_shot_accuracy(at_25, args.tiny_n)

    json_path.write_text(json.dumps(result, indent=1))
    print_table(result)
    plot(result, args.out / "bench_policies.png")


def print_table(result: dict) -> None:
    """The README table: ΔNLL (± s.e.m.) per policy and byte fraction, passkey and decode speed at 25%."""
    print(
        f"\nfull cache {result['full_nll']:.3f} nats/token, no context {result['no_context_nll']:.3f}; "
        f"{result['samples']} samples\n"
    )
    tiny = result["tiny_few_shot_at_25"]
    print(f"tiny AR, {tiny['prompt_tokens']}-token 6-shot prompt, full cache: accuracy {tiny['full']:.2f}\n")
    print(
        "| policy | ΔNLL @50% | ΔNLL @25% | ΔNLL @10% | passkey @25% (3 depths) | decode vs full @25% "
        "| attn. rel. error @25% | tiny AR 6-shot acc. @25% |"
    )
    print("|---|---|---|---|---|---|---|---|")
    cells = {}
    for row in result["rows"]:
        cell = f"{row['delta_nll']:+.3f} ± {row['delta_nll_sem']:.3f}"
        cells.setdefault(row["policy"], {})[row["target_bytes"]] = cell
    for name, by_frac in cells.items():
        extra = result["at_25"].get(name, {})
        pk = "".join("✓" if f else "✗" for f in extra.get("passkey", [])) or "-"
        speed = f"{extra['decode_speed_vs_full']:.2f}x" if extra else "-"
        err = result.get("attention_rel_error_at_25", {}).get(name)
        acc = tiny.get(name)
        print(
            f"| {name} | "
            + " | ".join(by_frac.get(f, "-") for f in FRACTIONS)
            + f" | {pk} | {speed} | {'-' if err is None else f'{err:.3f}'} | {'-' if acc is None else f'{acc:.2f}'} |"
        )


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_policy = {}
    for row in result["rows"]:
        by_policy.setdefault(row["policy"], []).append((row["bytes_fraction"], row["delta_nll"]))
    for name, pts in by_policy.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("KV bytes / full 16-bit cache")
    ax.set_ylabel("ΔNLL (nats/token)")
    ax.set_xscale("log")
    ax.set_title(f"SmolLM2-135M, GSM8K contexts ({result['samples']} samples)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


PASSKEY_DEPTHS = (0.1, 0.5, 0.9)


@torch.no_grad()
def decode_tokens_per_second(model, ctx, settings: dict, n: int) -> float:
    """Greedy decode of `n` tokens after `ctx` with the compressed cache (compression included in the
    prefill, not in the timed decode)."""
    cache = CompressedCache(model=model, **settings)
    out = model(ctx, past_key_values=cache)
    token = out.logits[:, -1:].argmax(-1)
    pos = ctx.shape[1]
    t0 = time.perf_counter()
    for i in range(n):
        position_ids = torch.tensor([[pos + i]])
        out = model(token, past_key_values=cache, position_ids=position_ids)
        token = out.logits[:, -1:].argmax(-1)
    seconds = time.perf_counter() - t0
    cache.detach()
    return n / seconds


if __name__ == "__main__":
    main()
