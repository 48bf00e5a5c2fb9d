"""Evict, then keep something of the evicted tokens: merge them into kept ones (D2O, EMS) or keep
representatives of their groups (KVCrush)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import EvictionPolicy, ScoreInputs
from .eviction import H2O, SnapKV


def merge_into_nearest(keys, values, index, threshold: float | None, mask=None):
    """Fold every evicted token into its most cosine-similar kept token of the same head when the
    similarity reaches `threshold` (None: the mean of the evicted tokens' best similarities): the kept
    token becomes the weighted mean (1 * kept + sim * merged ones) / (1 + sum sim). Returns the kept
    keys and values [B, H, K, D]."""
    b, h, length, d = keys.shape
    kept_mask = torch.zeros(b, h, length, dtype=torch.bool, device=keys.device)
    kept_mask.scatter_(2, index, True)
    if mask is not None:
        kept_or_pad = kept_mask | ~mask
    else:
        kept_or_pad = kept_mask
    kk = keys.float().gather(2, index[..., None].expand(-1, -1, -1, d))
    kv = values.float().gather(2, index[..., None].expand(-1, -1, -1, d))
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    sim = unit @ torch.nn.functional.normalize(kk, dim=-1).transpose(-1, -2)  # [B, H, L, K]
    best, target = sim.max(-1)  # per token: its nearest kept token
    evicted = ~kept_or_pad
    if threshold is None:
        denom = evicted.sum(-1, keepdim=True).clamp_min(1)
        threshold_t = (best * evicted).sum(-1, keepdim=True) / denom
    else:
        threshold_t = torch.full_like(best[..., :1], threshold)
    merge = evicted & (best >= threshold_t) & (best > 0)
    w = torch.where(merge, best, torch.zeros_like(best))  # [B, H, L]
    weight = torch.ones(b, h, index.shape[2], device=keys.device).scatter_add(2, target, w)
    k_sum = kk.scatter_add(2, target[..., None].expand(-1, -1, -1, d), w[..., None] * keys.float())
    v_sum = kv.scatter_add(2, target[..., None].expand(-1, -1, -1, d), w[..., None] * values.float())
    return (k_sum / weight[..., None]).to(keys.dtype), (v_sum / weight[..., None]).to(values.dtype)


@dataclass
class D2O(EvictionPolicy):
    """Dynamic discriminative operations (Wan et al., "D2O", arXiv 2406.13035): H2O heavy hitters plus
    a recent window are kept, the first `n_protect` tokens protected; each evicted key is merged into
    its most similar kept key (and its value likewise) when the cosine similarity reaches the threshold
    (the mean best similarity of the evicted tokens, D2O's EMA threshold at its first step)."""

    window: int = 8
    n_protect: int = 4
    threshold: float | None = None
    name = "d2o"
    needs = frozenset({"all_queries"})

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        score = H2O().score(inputs).clone()
        score[..., : self.n_protect] = float("inf")
        return score

    def merge(self, inputs: ScoreInputs, index: torch.LongTensor):
        return merge_into_nearest(inputs.keys, inputs.values, index, self.threshold, inputs.head_mask)


@dataclass
class EMS(EvictionPolicy):
    """Evict-then-merge with a global-local score (Li et al., "EMS", arXiv 2412.08521): importance is the
    accumulated attention from all queries (global) plus that of the last `window` queries (local),
    each normalised to sum 1 per head, which corrects H2O's bias toward early tokens. The lowest are
    evicted; the others merge into their nearest kept token above `threshold` cosine similarity (the
    paper's "zero class": below it a token is dropped). (The paper's exact weights were not published;
    these are the plain sum and a fixed threshold.)"""

    window: int = 32
    threshold: float = 0.5
    name = "ems"
    needs = frozenset({"all_queries"})

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        global_ = inputs.attention_received(None).mean(2)
        local = inputs.attention_received(self.window).mean(2)
        norm = lambda x: x / x.sum(-1, keepdim=True).clamp_min(1e-9)  # noqa: E731
        return norm(global_) + norm(local)

    def merge(self, inputs: ScoreInputs, index: torch.LongTensor):
        return merge_into_nearest(inputs.keys, inputs.values, index, self.threshold, inputs.head_mask)


@dataclass
class KVCrush(EvictionPolicy):
    """Representatives of the evicted tokens (Jha et al., "KVCrush", arXiv 2503.00022): a base policy
    keeps (1 - `fraction`) of the budget; every evicted token gets a binary signature over the layer's
    heads (bit h = the token is in the top half of head h's scores), is ranked by its Hamming distance
    to an all-zeros anchor, and `fraction` of the budget is spent on tokens taken at uniform steps
    through that ranking, so each head-behaviour bucket keeps members. Representatives are shared by
    all heads of the layer."""

    base: EvictionPolicy = field(default_factory=SnapKV)
    fraction: float = 0.2
    name = "kvcrush"

    def __post_init__(self):
        if not 0 <= self.fraction < 1:
            raise ValueError(f"fraction={self.fraction} must be in [0, 1)")
        self.needs = self.base.needs
        self.window = self.base.window

    @property
    def query_window(self):
        return self.base.query_window

    def score(self, inputs):
        return self.base.score(inputs)

    def select(self, inputs, keep):
        length = inputs.length
        reps = int(self.fraction * keep)
        if keep >= length or reps == 0:
            return self.base.select(inputs, keep)
        ranking = self.base.ranking(inputs)  # [B, H, L]
        chosen = ranking.topk(keep - reps, dim=-1).indices
        kept = torch.zeros_like(ranking, dtype=torch.bool).scatter_(-1, chosen, True)
        median = ranking.nan_to_num(posinf=1e30, neginf=-1e30).median(-1, keepdim=True).values
        bits = ranking > median  # [B, H, L] top half per head
        distance = bits.sum(1).float()  # Hamming distance to the zero anchor, [B, L]
        evicted_all = ~kept.any(1)
        if inputs.key_mask is not None:
            evicted_all = evicted_all & inputs.head_mask.any(1)
        order = torch.where(evicted_all, distance, float("inf")).argsort(-1)  # evicted first, by distance
        n_evicted = evicted_all.sum(-1, keepdim=True)  # [B, 1]
        steps = (torch.arange(reps, device=ranking.device) * n_evicted / reps).long()  # uniform positions
        reps_idx = order.gather(-1, steps.clamp(max=length - 1))  # [B, reps]
        extra = torch.zeros_like(kept).scatter_(-1, reps_idx[:, None].expand(-1, inputs.heads, -1), True)
        total = kept | extra
        # A head may already hold a representative: fill up with its next best tokens.
        short = keep - total.sum(-1, keepdim=True)
        fill_rank = torch.where(total, float("-inf"), ranking)
        fill = fill_rank.topk(max(1, int(short.max())), dim=-1).indices
        fill_take = torch.arange(fill.shape[-1], device=fill.device) < short
        total = total.scatter(-1, fill, fill_take | total.gather(-1, fill))
        return total.float().topk(keep, dim=-1).indices.sort(-1).values
