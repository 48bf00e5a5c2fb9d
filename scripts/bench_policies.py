"""KV-policy quality and cost on a real LM: SmolLM2-135M-Instruct on GSM8K text, offline.

    python scripts/bench_policies.py --samples 30 --out results/policies

Each sample is a context of ~1.0-1.5k tokens made of consecutive GSM8K test question+answer pairs,
followed by the next pair as the continuation. The context is prefilled into a `CompressedCache`
(only the context is compressed), then the continuation is scored in one forward whose positions
continue after the original context; we report the NLL per continuation token and its difference to
the full cache (ΔNLL), for every policy at 50 / 25 / 10 % of the full cache's bytes (bytes counted for a
16-bit cache: eviction spends the budget on tokens, quantization on bits, combinations on both).
Also: passkey retrieval at three depths, prefill overhead and decode tokens/s, the relative error of
the attention outputs on a random Llama, and the bundled tiny AR model's few-shot accuracy with its
prompt compressed. JSON + a PNG plot. The settings come from `dlmcache.kernels.policies.presets`, the
measurements from `dlmcache.kernels.evaluation`; this script parses arguments, runs and reports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
from dlmcache.kernels import evaluation
from dlmcache.kernels.cache import CompressedCache
from dlmcache.kernels.policies import presets

from dlmcache.evals.harness import ARGenerator
from dlmcache.evals.tasks import read_jsonl
from dlmcache.offline import load_smollm2, smollm2_missing
from dlmcache.pipeline import chat_template_ids

POLICIES = [
    "streaming_llm", "knorm", "snapkv", "h2o", "h2o_mean", "tova", "pyramidkv", "adakv", "cake", "d2o", "ems",
    "kvcrush", "lacache", "kivi", "mikv", "gear", "snapkv+int4", "h2o+int4",
]  # fmt: skip
FRACTIONS = (0.5, 0.25, 0.10)
PASSKEY_DEPTHS = (0.1, 0.5, 0.9)


@torch.no_grad()
def tiny_few_shot_accuracy(names: list[str], fraction: float, n: int, shots: int = 6) -> dict:
    """The bundled tiny AR model's accuracy on `n` held-out problems with a `shots`-shot chat prompt
    whose KV is compressed (after prefill) by each preset at `fraction` of the bytes (sized for this
    prompt's length); "full" is the uncompressed cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlmcache import tinytask
    from dlmcache.locations import resolve_path

    path = resolve_path("dlmcache/tiny-guide")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    problems = tinytask.test_problems(n)
    examples = tinytask.make_problems(shots, seed=12345, exclude={p.question for p in problems})
    result = {"prompt_tokens": len(chat_template_ids(tok, tinytask.messages(problems[0], examples)))}
    settings_by_name = {name: presets.at_bytes(name, fraction, result["prompt_tokens"]) for name in names}
    for name, settings in ({"full": {}} | settings_by_name).items():
        if settings is None:
            continue
        generate = ARGenerator(model, tok, cache=lambda s=settings: CompressedCache(model=model, **s))
        scores = tinytask.evaluate(generate, problems, batch_size=1, max_new_tokens=32, shots=examples)
        result[name] = scores["accuracy"]
        print(f"tiny AR {shots}-shot, {name}: accuracy {result[name]:.3f}", flush=True)
    return result


def random_llama():
    """A random small Llama (4 layers, hidden 256, GQA 4/2) for the attention-output errors."""

    from dlmcache.testing import tiny_llama

    return tiny_llama(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, max_position_embeddings=2048
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"preset names: {presets.names()} or POLICY+intB")
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"), help="the folder holding gsm8k_test.jsonl")
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
    names = args.policies.split(",")
    for name in names:  # every name checked before any work
        presets.at_bytes(name, 0.25, 1000)
    if not args.tiny_only and smollm2_missing():
        raise SystemExit(f"bench_policies.py: {smollm2_missing()} (or --tiny-only)")
    if args.tiny_only:
        result = json.loads(json_path.read_text())
        result["tiny_few_shot_at_25"] = tiny_few_shot_accuracy(names, 0.25, args.tiny_n)
        json_path.write_text(json.dumps(result, indent=1))
        return print_table(result)
    model, tokenizer = load_smollm2(torch.float32)
    rows = read_jsonl(args.data_dir / "gsm8k_test.jsonl")
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in rows]
    samples = evaluation.context_samples(tokenizer, texts, args.samples)
    if args.dump_samples:
        return torch.save(samples, args.dump_samples)
    context = round(statistics.mean(c.shape[1] for c, _ in samples))
    print(f"{len(samples)} samples, context {context} tokens", flush=True)

    def settings_at(name: str, frac: float) -> dict | None:
        return presets.at_bytes(name, frac, context)

    prefilled, full, none_ctx, prefill_s = [], [], [], []
    for ctx, cont in samples:
        pre = evaluation.prefill_kv(model, ctx)
        prefilled.append(pre)
        prefill_s.append(pre.seconds)
        full.append(evaluation.continuation_nll(model, pre, cont, {})[0])
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

    for name in names:
        for frac in FRACTIONS:
            settings = settings_at(name, frac)
            if settings is None:
                continue
            deltas, fracs, compress_s = [], [], []
            for (_, cont), pre, base in zip(samples, prefilled, full, strict=True):
                nll, nbytes, sec = evaluation.continuation_nll(model, pre, cont, settings)
                deltas.append(nll - base)
                fracs.append(nbytes / pre.full_bytes)
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
    for name in ["full"] + names:
        settings = {} if name == "full" else settings_at(name, 0.25)
        if settings is None:
            continue
        found = [evaluation.passkey(model, tokenizer, settings, depth) for depth in PASSKEY_DEPTHS]
        tps = evaluation.decode_tokens_per_second(model, decode_ctx, settings, args.decode_tokens)
        result["at_25"][name] = {"passkey": found, "decode_tokens_per_second": tps}
        print(f"{name:14s} passkey {found}  decode {tps:.1f} tok/s", flush=True)
    full_tps = result["at_25"]["full"]["decode_tokens_per_second"]
    for row in result["at_25"].values():
        row["decode_speed_vs_full"] = row["decode_tokens_per_second"] / full_tps

    json_path.write_text(json.dumps(result, indent=1))
    at_25 = {name: settings_at(name, 0.25) for name in names}
    at_25 = {k: v for k, v in at_25.items() if v is not None}
    result["attention_rel_error_at_25"] = evaluation.attention_errors(random_llama(), at_25)
    for name, err in result["attention_rel_error_at_25"].items():
        print(f"attention output relative error @25% {name:14s} {err:.3f}", flush=True)
    result["tiny_few_shot_at_25"] = tiny_few_shot_accuracy(names, 0.25, args.tiny_n)

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


if __name__ == "__main__":
    main()
