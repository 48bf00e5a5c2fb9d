"""PrefixKV (Wang et al., "PrefixKV: Adaptive Prefix KV Cache is What Vision Instruction-Following
Models Need for Efficient Generation", arXiv 2412.03409): per-layer KV budgets from one global
search, calibrated offline and looked up at run time.

Importance of token i in layer l: s_{l,i} = sum over prefill queries of the attention it receives,
averaged over heads (as H2O; one ranking shared by all heads of the layer). Sorting s_l in
decreasing order and normalising it to sum 1 gives the cumulative priority P_l(k) of the k most
important tokens. For a threshold p every layer keeps the shortest importance-sorted prefix with
P_l(k) >= p, so every layer keeps the same *fraction of its attention mass* with a different number
of tokens; p is found by bisection so that the layers together keep `budget` of all their tokens.

`calibrate` runs that search on sample prompts and averages each layer's keep ratio into a
`PrefixKVProfile` (saved / loaded as JSON); at run time `PrefixKVBudget` turns the profile into each
layer's token count and `PrefixKVScore` ranks the tokens (the first `n_sink` and the last token are
always kept, as the authors' `start_size` and last token). Budgets are the fraction *kept*
everywhere here (the authors' `--ratio` is the fraction evicted).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from dlmcache.kernels.cache import CompressedCache, cache_argument
from dlmcache.kernels.policies.base import BudgetAllocator, EvictionPolicy, ScoreInputs, check_positive, resolve_budget


def layer_importance(inputs: ScoreInputs) -> torch.Tensor:
    """[B, L] attention each token receives from every prefill query, averaged over all heads."""
    return inputs.attention_received(None).mean((1, 2))


def prefix_keep_counts(importance: list[torch.Tensor], budget: float, protect: int = 1, iters: int = 60) -> list[int]:
    """Tokens each layer keeps: the importance-sorted prefix holding a fraction p of the layer's
    attention mass, with p bisected so that the total is `budget` (fraction kept) of all tokens.
    `importance`: one [L_l] tensor per layer; every layer keeps at least `protect` tokens."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget={budget} must be a fraction kept in (0, 1]")
    cums = []
    for s in importance:
        s = s.double().clamp_min(0).sort(descending=True).values
        total = s.sum()
        cums.append(s.cumsum(0) / total if total > 0 else torch.linspace(0, 1, len(s) + 1, dtype=torch.float64)[1:])
    lengths = [len(c) for c in cums]
    target = budget * sum(lengths)

    def counts(p: float) -> list[int]:
        # shortest prefix with cumulative mass >= p (tolerance for rounding of the cumulative sum)
        return [min(n, max(protect, int((c < p - 1e-12).sum()) + 1)) for c, n in zip(cums, lengths, strict=True)]

    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if sum(counts(mid)) < target:
            lo = mid
        else:
            hi = mid
    keep = counts(hi)
    # rescale to the exact total (the bisection stops within a token per layer of it)
    scale = target / max(sum(keep), 1)
    return [min(n, max(protect, round(k * scale))) for k, n in zip(keep, lengths, strict=True)]


@dataclass
class PrefixKVProfile:
    """Per-layer keep ratios (fraction of each layer's prompt kept) for one global `budget`."""

    keep_ratios: list[float]
    budget: float
    samples: int = 0
    model: str = ""
    per_sample: list[list[float]] = field(default_factory=list)

    def __post_init__(self):
        if not self.keep_ratios or not all(0 < r <= 1 for r in self.keep_ratios):
            raise ValueError(f"keep_ratios must be non-empty fractions in (0, 1], got {self.keep_ratios!r}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> PrefixKVProfile:
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class PrefixKVBudget(BudgetAllocator):
    """Layer l keeps round(keep_ratios[l] * L) tokens of its L (the profile's budget must be the one
    asked for)."""

    profile: PrefixKVProfile = None
    name = "prefixkv_budget"

    def __post_init__(self):
        if not isinstance(self.profile, PrefixKVProfile):
            raise TypeError(f"profile must be a PrefixKVProfile, got {type(self.profile).__name__}")

    def validate(self, budget) -> None:
        resolve_budget(budget, 1 << 30)
        if not math.isclose(float(budget), self.profile.budget, abs_tol=1e-9):
            raise ValueError(f"budget={budget} but the PrefixKV profile was calibrated for {self.profile.budget}")

    def layer_budget(self, budget, length, layer_idx, num_layers):
        if num_layers != len(self.profile.keep_ratios):
            raise ValueError(f"the profile has {len(self.profile.keep_ratios)} layers, the model {num_layers}")
        return max(1, min(length, round(self.profile.keep_ratios[layer_idx] * length)))


@dataclass
class PrefixKVScore(EvictionPolicy):
    """PrefixKV's per-layer ranking: attention received from every prefill query averaged over all
    heads (one ranking for the layer), the first `n_sink` tokens and the last token always kept."""

    n_sink: int = 1
    window: int = 1
    name = "prefixkv"
    needs = frozenset({"all_queries"})

    def __post_init__(self):
        check_positive("n_sink", self.n_sink, allow_zero=True)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        s = layer_importance(inputs)[:, None].expand(-1, inputs.heads, -1).clone()
        if self.n_sink:
            first = (~inputs.head_mask).sum(-1, keepdim=True) if inputs.key_mask is not None else 0
            pos = torch.arange(inputs.length, device=s.device).expand_as(s)
            s[(pos - first >= 0) & (pos - first < self.n_sink)] = float("inf")
        return s


@dataclass
class PrefixKV:
    """The PrefixKV method: a calibrated profile (per-layer budgets) with its ranking; `budget` is the
    profile's. `cache(model)` builds the `CompressedCache` that applies it."""

    profile: PrefixKVProfile
    n_sink: int = 1

    @property
    def budget(self) -> float:
        return self.profile.budget

    @property
    def policy(self) -> PrefixKVScore:
        return PrefixKVScore(n_sink=self.n_sink)

    @property
    def allocator(self) -> PrefixKVBudget:
        return PrefixKVBudget(self.profile)

    def cache(self, model, **kwargs) -> CompressedCache:
        return CompressedCache(policy=self.policy, budget=self.budget, allocator=self.allocator, model=model, **kwargs)


@torch.no_grad()
def calibrate(model, processor, samples, budget: float, protect: int = 2) -> PrefixKVProfile:
    """Run the global prefix search on each sample's prefill and average the per-layer keep ratios.

    samples: chats for `processor.apply_chat_template` (messages with image / text content), or dicts
    of model inputs (input_ids, attention_mask, pixel_values, ...), one prompt each. `protect`: tokens
    every layer keeps at least (the sinks plus the last token)."""
    resolve_budget(budget, 1 << 30)
    if not isinstance(budget, float):
        raise ValueError(f"budget={budget!r} must be a fraction kept in (0, 1]")
    if not samples:
        raise ValueError("calibrate needs at least one sample")
    per_sample = []
    for sample in samples:
        inputs = (
            sample
            if isinstance(sample, dict)
            else processor.apply_chat_template(
                sample, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
            )
        )
        inputs = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("calibrate takes one prompt per sample (batch size 1)")
        cache = CompressedCache(budget=1.0, capture_queries=True, model=model)
        try:
            model(**inputs, **cache_argument(cache), use_cache=True)
        finally:
            cache.detach()
        importance = []
        for layer in cache.layers:
            inp = ScoreInputs(keys=layer.keys, values=layer.values, queries=cache.queries[layer.layer_idx])
            importance.append(layer_importance(inp)[0])
        counts = prefix_keep_counts(importance, budget, protect=protect)
        per_sample.append([c / len(s) for c, s in zip(counts, importance, strict=True)])
    ratios = torch.tensor(per_sample, dtype=torch.float64).mean(0).tolist()
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return PrefixKVProfile(keep_ratios=ratios, budget=budget, samples=len(samples), model=name, per_sample=per_sample)
