"""Why query-window scorers miss the passkey at 25%: the observation window's size.

    python scripts/passkey_window.py

SmolLM2-135M-Instruct, a 1.2k-token filler context with the needle "The pass key is 68142. ..." at
half depth and the question "What is the pass key? The pass key is" (10 tokens) at the end; every
policy keeps 25% of the prompt. Prints what each generates and how many of the needle's 20 tokens
each layer still holds (in any KV head).
"""

from __future__ import annotations

import torch
from dlmcache.kernels import evaluation
from dlmcache.kernels.cache import CompressedCache, cache_argument
from dlmcache.kernels.policies import TOVA, KNorm, SnapKV

from dlmcache.offline import load_smollm2


def main() -> None:
    torch.set_num_threads(1)
    model, tok = load_smollm2()
    key = evaluation.PASSKEY
    ids = evaluation.passkey_prompt(tok, depth=0.5, length=1200)
    toks = tok.convert_ids_to_tokens(ids[0])
    digits = [i for i, t in enumerate(toks) if t.strip("\u0120").isdigit()]
    span = range(digits[0] - 5, digits[-1] + 1)  # "The pass key is 68142. Remember it. 68142"
    print(f"prompt {ids.shape[1]} tokens, needle span {span.start}..{span.stop - 1} ({len(span)} tokens)")
    policies = {
        "SnapKV window 64 (kvpress default)": SnapKV(window=64),
        "SnapKV window 32": SnapKV(window=32),
        "SnapKV window 16": SnapKV(window=16),
        "SnapKV window 8": SnapKV(window=8),
        "TOVA": TOVA(),
        "KNorm": KNorm(),
    }
    for name, policy in policies.items():
        cache = CompressedCache(policy=policy, budget=0.25, model=model)
        out = model.generate(ids, **cache_argument(cache), max_new_tokens=6, do_sample=False)
        cache.detach()
        kept = [sum(bool((layer.origin[0] == p).any()) for p in span) for layer in cache.layers]
        text = tok.decode(out[0, ids.shape[1] :])
        print(
            f"{name:36s} {'PASS' if key in text else 'fail'} {text!r:16s} needle tokens kept, layers 0-5: "
            f"{kept[:6]}, mean over {len(kept)} layers {sum(kept) / len(kept):.1f}"
        )


if __name__ == "__main__":
    main()
