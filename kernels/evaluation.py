"""How well a KV compression keeps what a causal LM needs, measured on any transformers model.

- `context_samples`: (context, continuation) token pairs cut from a stream of texts.
- `prefill_kv` + `continuation_nll`: the continuation's NLL per token after the context's KV was
  compressed (one prefill serves every policy: its K/V and queries are captured once and loaded into
  each compressed cache), with the cache's bytes as a 16-bit cache.
- `passkey_prompt` / `passkey`: retrieval of a 5-digit key hidden at a depth of a filler context.
- `decode_tokens_per_second`: greedy decoding speed after a compressed prefill.
- `attention_errors`: relative error of every layer's attention output after a compressed context.

Settings are `CompressedCache` keyword arguments (see `policies.presets.at_bytes`); empty settings
mean the full cache.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .cache import CompressedCache, cache_argument

PASSKEY = "68142"
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_NEEDLE = f"The pass key is {PASSKEY}. Remember it. {PASSKEY} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def context_samples(tokenizer, texts: list[str], n: int, lo: int = 1000, hi: int = 1500) -> list[tuple]:
    """Up to `n` (context [1, L] ids, continuation [1, M] ids): each context concatenates consecutive
    `texts` up to `hi` tokens (kept when at least `lo`), the continuation is the next text."""
    samples, i = [], 0
    while len(samples) < n and i < len(texts) - 1:
        ctx, j = "", i
        while j < len(texts) - 1 and len(tokenizer(ctx + texts[j])["input_ids"]) <= hi:
            ctx += texts[j]
            j += 1
        if len(tokenizer(ctx)["input_ids"]) >= lo:
            cont = tokenizer(texts[j], return_tensors="pt", add_special_tokens=False)["input_ids"]
            samples.append((tokenizer(ctx, return_tensors="pt")["input_ids"], cont))
        i = j + 1
    return samples


@dataclass
class Prefill:
    """One full prefill of a context: the logits of its last position, every layer's K/V and queries,
    the prefill's seconds and the full cache's bytes (16-bit)."""

    last_logits: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    queries: dict[int, torch.Tensor]
    seconds: float
    full_bytes: int


@torch.no_grad()
def prefill_kv(model, context: torch.Tensor) -> Prefill:
    cache = CompressedCache(model=model, capture_queries=True)
    t0 = time.perf_counter()
    last = model(context, **cache_argument(cache)).logits[:, -1:]
    seconds = time.perf_counter() - t0
    cache.detach()
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return Prefill(last, kv, cache.queries, seconds, cache.nbytes_as(2))


@torch.no_grad()
def continuation_nll(model, prefill: Prefill, continuation: torch.Tensor, settings: dict) -> tuple[float, int, float]:
    """(mean NLL per continuation token, cache bytes as a 16-bit cache after compression, seconds the
    compression took) with the context's KV compressed by `settings`."""
    cache = CompressedCache(model=model, **settings)
    t0 = time.perf_counter()
    for i, (k, v) in enumerate(prefill.kv):
        cache.load_prefill(i, k, v, queries=prefill.queries[i])
    seconds = time.perf_counter() - t0
    nbytes = cache.nbytes_as(2)
    out = model(continuation, **cache_argument(cache)).logits
    cache.detach()
    logits = torch.cat([prefill.last_logits, out[:, :-1]], 1).float()
    return torch.nn.functional.cross_entropy(logits[0], continuation[0]).item(), nbytes, seconds


def passkey_prompt(tokenizer, depth: float, length: int = 1200) -> torch.Tensor:
    """[1, L] ids of about `length` tokens of filler with the needle at `depth` (0..1), ending with
    the question "What is the pass key? The pass key is"."""
    n_fill = length // len(tokenizer(_FILLER)["input_ids"])
    parts = [_FILLER] * n_fill
    parts.insert(int(depth * n_fill), _NEEDLE)
    return tokenizer("".join(parts) + PASSKEY_QUESTION, return_tensors="pt")["input_ids"]


@torch.no_grad()
def passkey(model, tokenizer, settings: dict, depth: float, length: int = 1200) -> bool:
    """Whether greedy decoding after the compressed prompt produces the key."""
    ids = passkey_prompt(tokenizer, depth, length)
    cache = CompressedCache(model=model, **settings)
    out = model.generate(ids, **cache_argument(cache), max_new_tokens=6, do_sample=False)
    cache.detach()
    return PASSKEY in tokenizer.decode(out[0, ids.shape[1] :])


@torch.no_grad()
def decode_tokens_per_second(model, context: torch.Tensor, settings: dict, n: int) -> float:
    """Greedy decode of `n` tokens after `context` with the compressed cache (the compression is part
    of the prefill, not of the timed decode)."""
    cache = CompressedCache(model=model, **settings)
    out = model(context, **cache_argument(cache))
    token = out.logits[:, -1:].argmax(-1)
    pos = context.shape[1]
    t0 = time.perf_counter()
    for i in range(n):
        out = model(token, **cache_argument(cache), position_ids=torch.tensor([[pos + i]]))
        token = out.logits[:, -1:].argmax(-1)
    seconds = time.perf_counter() - t0
    cache.detach()
    return n / seconds


@torch.no_grad()
def attention_errors(model, settings_by_name: dict, context: int = 512, continuation: int = 16) -> dict:
    """Per setting, ||o - o_full|| / ||o_full|| of every layer's attention output for `continuation`
    tokens after a compressed `context` of random ids, averaged over layers."""
    torch.manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (1, context + continuation))
    captured = []
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, i, o: captured.append(o[0].float()))
        for layer in model.model.layers
    ]

    def outputs(settings):
        cache = CompressedCache(model=model, **settings)
        model(ids[:, :context], **cache_argument(cache))
        captured.clear()
        model(ids[:, context:], **cache_argument(cache))
        cache.detach()
        return list(captured)

    try:
        full = outputs({})
        errors = {}
        for name, settings in settings_by_name.items():
            got = outputs(settings)
            errors[name] = statistics.mean(((g - f).norm() / f.norm()).item() for g, f in zip(got, full, strict=True))
    finally:
        for h in hooks:
            h.remove()
    return errors
