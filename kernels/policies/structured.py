"""Structured policies: positions chosen by a pattern across layers (LaCache), per-head profiles from
the prompt's own attention (FastGen), layer budgets from attention variance (D2O), and cross-layer
merging of adjacent layers' KV (MiniCache)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import EvictionPolicy, ScoreInputs, check_positive, resolve_budget
from .budget import BudgetAllocator
from .eviction import H2O
from .heads import ragged_topk
from .quant import QuantizationPolicy


@dataclass
class LaCache(EvictionPolicy):
    """Ladder-shaped cache (Shi et al., "LaCache", arXiv 2507.14204): the first `n_sink` tokens and the
    `window` newest stay in every layer; older tokens form units of P = 1 + ceil((L - S) / (S - O))
    positions (S = `span`, O = `overlap`, L = number of layers) and layer l keeps p = min(ceil(S / (S -
    O)), P) positions of each unit at offset (l mod (P - p + 1)), so consecutive layers cover different
    old tokens. Budget left after sinks and window goes to the newest units first."""

    n_sink: int = 4
    window: int = 32
    span: int = 16
    overlap: int = 0
    name = "lacache"

    def __post_init__(self):
        check_positive("span", self.span)
        if not 0 <= self.overlap < self.span:
            raise ValueError(f"overlap={self.overlap} must be in [0, span={self.span})")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        layers = max(inputs.num_layers, 1)
        unit = 1 + max(0, math.ceil((layers - self.span) / (self.span - self.overlap)))
        per_layer = min(math.ceil(self.span / (self.span - self.overlap)), unit)
        offset = inputs.layer_idx % (unit - per_layer + 1)
        pos = torch.arange(inputs.length, device=inputs.keys.device, dtype=torch.float32)
        in_ladder = ((pos.long() % unit) >= offset) & ((pos.long() % unit) < offset + per_layer)
        score = pos + torch.where(in_ladder, float(inputs.length), 0.0)  # ladder rungs first, newest first
        score = torch.where(pos < self.n_sink, float("inf"), score)
        return score.expand(inputs.batch, inputs.heads, -1)


def largest_remainder(shares: torch.Tensor) -> torch.LongTensor:
    """Integers per row summing to round(row sum), each the floor of its share plus one for the
    largest fractional parts."""
    floor = shares.floor()
    missing = (shares.sum(-1, keepdim=True).round() - floor.sum(-1, keepdim=True)).long()
    order = (shares - floor).argsort(-1, descending=True).argsort(-1)
    return (floor + (order < missing).float()).long()


@dataclass
class FastGen(EvictionPolicy):
    """Adaptive per-head profiles (Ge et al., "Model Tells You What to Discard", arXiv 2310.01801): each
    head takes the cheapest of special (+ `special_ids`), + punctuation (`punct_ids`), + frequent
    (heavy hitters, `frequent` of the tokens), + local (`local` newest), full, whose kept tokens hold
    >= `recovery` of the head's prefill attention. The heads' kept counts are then scaled so the layer
    holds H * budget tokens in total (FastGen itself has no budget; the profile sets the shape).
    Needs `token_ids` for the special / punctuation sets."""

    recovery: float = 0.85
    frequent: float = 0.3
    local: float = 0.3
    special_ids: tuple[int, ...] = ()
    punct_ids: tuple[int, ...] = ()
    name = "fastgen"
    needs = frozenset({"all_queries"})

    def score(self, inputs):
        return H2O().score(inputs)

    def _candidate_sets(self, inputs: ScoreInputs, heavy: torch.Tensor) -> list[torch.Tensor]:
        b, h, length = heavy.shape
        device = heavy.device
        pos = torch.arange(length, device=device)
        ids = inputs.token_ids if inputs.token_ids is not None else torch.full((b, length), -1, device=device)
        special = (torch.isin(ids, torch.tensor(self.special_ids, device=device)) | (pos == 0))[:, None].expand(
            b, h, -1
        )
        punct = special | torch.isin(ids, torch.tensor(self.punct_ids, device=device))[:, None]
        top = heavy.topk(max(1, int(self.frequent * length)), dim=-1).indices
        frequent = punct | torch.zeros_like(punct).scatter_(-1, top, True)
        local = frequent | (pos >= length - max(1, int(self.local * length)))
        return [special, punct, frequent, local, torch.ones_like(local)]

    def select_ragged(self, inputs, keep):
        attn = inputs.attention_received(None).mean(2)  # [B, H, L] attention each token receives
        heavy = attn.clone()
        if inputs.key_mask is not None:
            heavy = heavy.masked_fill(~inputs.head_mask, float("-inf"))
        total = attn.sum(-1, keepdim=True).clamp_min(1e-9)
        chosen = torch.ones_like(attn, dtype=torch.bool)  # "full" unless a cheaper profile recovers enough
        done = torch.zeros_like(total, dtype=torch.bool)
        for mask in self._candidate_sets(inputs, heavy):  # cheapest first
            ok = (attn * mask).sum(-1, keepdim=True) / total >= self.recovery
            chosen = torch.where(ok & ~done, mask, chosen)
            done = done | ok
        counts = chosen.sum(-1).float()
        scaled = largest_remainder(counts / counts.sum(-1, keepdim=True).clamp_min(1) * inputs.heads * keep)
        # Inside its profile a head ranks tokens by the attention they receive.
        rank = torch.where(chosen, heavy + 1e6, heavy)
        return ragged_topk(rank, scaled.clamp(1, inputs.length))


@dataclass
class D2OBudget(BudgetAllocator):
    """D2O's layer budgets (Wan et al., arXiv 2406.13035): layers whose attention varies less across the
    sequence keep fewer tokens: ratio_l = clamp(softmax(-v)_l * L * budget, 0.01, 1) with v_l the
    min-max normalised variance of the column sums of the prefill attention; layers 0, 1 and the last
    keep everything, paid for out of the same total (and only when that costs at most half of it), so
    the cache keeps its byte budget. Cascades like CAKE: budgets are shared over the layers seen so far."""

    name = "d2o_budget"
    cascading = True

    def __post_init__(self):
        self.variances: dict[int, float] = {}
        self.num_layers = 0

    def observe(self, inputs: ScoreInputs) -> None:
        cols = inputs.attention_received(None)  # [B, H, G, L]
        var = cols.var(-1)
        var = (var - var.amin()) / (var.amax() - var.amin()).clamp_min(1e-9)
        self.variances[inputs.layer_idx] = var.mean().item()
        self.num_layers = inputs.num_layers

    def cascade_budgets(self, budget, length, layers):
        avg = resolve_budget(budget, length)
        n = self.num_layers
        # The full layers are paid for out of the same total, and only when they take at most half
        # of it (at 10% of 30 layers they would take all of it).
        protected = {0, 1, n - 1} if 3 * length <= 0.5 * n * avg else set()
        avg_rest = (n * avg - len(protected) * length) / max(1, n - len(protected))
        rest = [i for i in layers if i not in protected]
        out = {i: length for i in layers if i in protected}
        if rest:
            v = torch.tensor([self.variances[i] for i in rest], dtype=torch.float64)
            share = torch.softmax(-v, 0) * len(rest) * avg_rest / length
            for i, r in zip(rest, share.clamp(0.01, 1.0).tolist(), strict=True):
                out[i] = max(1, round(r * length))
        return out

    def layer_budget(self, budget, length, layer_idx, num_layers):
        return resolve_budget(budget, length)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of unit vectors a, b (last dim)."""
    cos = (a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / sin


@dataclass
class MiniCache(QuantizationPolicy):
    """Cross-layer merging (Liu et al., "MiniCache", arXiv 2405.14366): from the middle layer up, each
    odd layer l is merged with layer l - 1: per token both layers keep their vector norms, and share one
    direction SLERP(k_{l-1}/|k_{l-1}|, k_l/|k_l|; t); token pairs whose directions are further apart than
    `retain_angle` (radians) are kept unmerged in both layers. Keys and values alike. The merged layer
    pair stores one direction instead of two vectors (memory close to half for merged tokens)."""

    t: float = 0.5
    retain_angle: float = 0.6
    name = "minicache"
    cross_layer = True

    def store(self, keys, values, inputs=None):
        return PlainStore(keys, values)

    def merge_pair(self, lower, upper) -> tuple[MergedView, MergedView]:
        shared = MergedPair(self, *lower.read_prefix(), *upper.read_prefix())
        return MergedView(shared, 0, lower), MergedView(shared, 1, upper)


class PlainStore:
    """Full-precision store (the starting point of layers MiniCache has not merged)."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values
        self.k_new, self.v_new = keys[:, :, :0], values[:, :, :0]

    @property
    def length(self):
        return self.keys.shape[2] + self.k_new.shape[2]

    def append(self, keys, values):
        self.k_new = torch.cat([self.k_new, keys], 2)
        self.v_new = torch.cat([self.v_new, values], 2)

    def read_prefix(self):
        return self.keys, self.values

    def read(self):
        return torch.cat([self.keys, self.k_new], 2), torch.cat([self.values, self.v_new], 2)

    def nbytes_as(self, element_bytes):
        n = self.keys.numel() + self.values.numel() + self.k_new.numel() + self.v_new.numel()
        return n * (element_bytes or self.keys.element_size())


class MergedPair:
    """The shared storage of two merged layers: directions, per-layer norms, unmerged tokens."""

    def __init__(self, policy: MiniCache, k0, v0, k1, v1):
        self.parts = []
        for x0, x1 in ((k0, k1), (v0, v1)):
            n0, n1 = x0.float().norm(dim=-1, keepdim=True), x1.float().norm(dim=-1, keepdim=True)
            u0, u1 = x0.float() / n0.clamp_min(1e-9), x1.float() / n1.clamp_min(1e-9)
            angle = torch.acos((u0 * u1).sum(-1).clamp(-1, 1))  # [B, H, L]
            merged = angle <= policy.retain_angle
            direction = slerp(u0, u1, policy.t).to(x0.dtype)
            keep_idx = (~merged).nonzero(as_tuple=True)
            self.parts.append(
                {
                    "dir": direction,
                    "norms": (n0.to(x0.dtype), n1.to(x1.dtype)),
                    "merged": merged,
                    "idx": keep_idx,
                    "raw": (x0[keep_idx], x1[keep_idx]),
                    "dtype": x0.dtype,
                }
            )

    def read(self, which: int, part: int) -> torch.Tensor:
        p = self.parts[part]
        x = p["dir"] * p["norms"][which]
        x[p["idx"]] = p["raw"][which]
        return x

    def nbytes_as(self, element_bytes) -> int:
        total = 0
        for p in self.parts:
            eb = element_bytes or p["dir"].element_size()
            merged = int(p["merged"].sum())
            d = p["dir"].shape[-1]
            total += merged * d * eb + 2 * p["norms"][0].numel() * eb  # shared directions + both norms
            total += 2 * p["raw"][0].numel() * eb + p["merged"].numel() // 8  # unmerged tokens + the bit map
        return total


class MergedView:
    """One layer's window on a `MergedPair`, plus its own new tokens; the pair's bytes are counted once
    (by the upper layer)."""

    def __init__(self, shared: MergedPair, which: int, previous):
        self.shared, self.which = shared, which
        self.k_new, self.v_new = previous.k_new, previous.v_new
        self.prefix_length = shared.parts[0]["dir"].shape[2]

    @property
    def length(self):
        return self.prefix_length + self.k_new.shape[2]

    def append(self, keys, values):
        self.k_new = torch.cat([self.k_new, keys], 2)
        self.v_new = torch.cat([self.v_new, values], 2)

    def read(self):
        k, v = self.shared.read(self.which, 0), self.shared.read(self.which, 1)
        return torch.cat([k, self.k_new], 2), torch.cat([v, self.v_new], 2)

    def nbytes_as(self, element_bytes):
        new = (self.k_new.numel() + self.v_new.numel()) * (element_bytes or self.k_new.element_size())
        return new + (self.shared.nbytes_as(element_bytes) if self.which == 1 else 0)
