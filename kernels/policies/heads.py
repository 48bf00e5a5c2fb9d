"""Head-wise budgets: heads of one layer keep different numbers of tokens.

Stored per layer as [B, H, K_max, D] with a per-head validity mask, which the attached model's
attention honours (so these policies need `CompressedCache(..., model=model)`); memory is that of
K_max tokens per head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import EvictionPolicy
from .eviction import SnapKV, StreamingLLM


def ragged_topk(scores: torch.Tensor, counts: torch.Tensor) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """Each head h of each row keeps its counts[b, h] best scores: (sorted indices [B, H, K_max],
    kept [B, H, K_max]); entries past a head's count repeat its last index and are not kept."""
    k_max = int(counts.max())
    top = scores.topk(k_max, dim=-1).indices  # best first
    kept = torch.arange(k_max, device=scores.device) < counts[..., None]
    # Sort each head's kept indices; unkept slots sort last (as the largest index) and are masked.
    order_key = torch.where(kept, top, scores.shape[-1] + top)
    order = order_key.argsort(dim=-1)
    index = top.gather(-1, order)
    kept = kept.gather(-1, order)
    last = index.gather(-1, (counts - 1).clamp(min=0)[..., None])
    return torch.where(kept, index, last), kept


class HeadBudgetWrapper(EvictionPolicy):
    """A head-budget policy around a token `scorer`: it scores with the scorer (same needs, query
    window and scores) and only decides how many tokens each head keeps."""

    scorer: EvictionPolicy

    def adopt_scorer(self) -> None:
        self.needs = self.scorer.needs
        self.window = self.scorer.window

    @property
    def query_window(self):
        return self.scorer.query_window

    def score(self, inputs):
        return self.scorer.score(inputs)


@dataclass
class AdaKV(HeadBudgetWrapper):
    """Adaptive head budgets (Feng et al., "Ada-KV", arXiv 2407.11550) around any scorer: the layer's
    H * keep slots go to the best scores across all its heads, each head keeping at least
    `safeguard` * keep of its own (scores normalised per head to sum 1, so heads compare)."""

    scorer: EvictionPolicy = field(default_factory=SnapKV)
    safeguard: float = 0.2
    name = "adakv"

    def __post_init__(self):
        if not 0 <= self.safeguard <= 1:
            raise ValueError(f"safeguard={self.safeguard} must be in [0, 1]")
        self.adopt_scorer()

    def select_ragged(self, inputs, keep):
        scores = self.scorer.ranking(inputs)
        b, h, length = scores.shape
        if keep >= length:
            return super().select_ragged(inputs, keep)
        finite = scores.clamp(min=0).nan_to_num(posinf=0.0)
        norm = finite / finite.sum(-1, keepdim=True).clamp_min(1e-9)
        norm = torch.where(torch.isinf(scores), scores, norm)  # window (+inf) and padding (-inf) stay
        floor = int(self.safeguard * keep)
        guaranteed = norm.topk(floor, dim=-1).indices if floor else None
        pool = norm.clone()
        if guaranteed is not None:
            pool.scatter_(-1, guaranteed, float("-inf"))
        extra = pool.flatten(1).topk(h * (keep - floor), dim=-1).indices  # [B, H*(keep-floor)] over heads
        counts = torch.full((b, h), floor, dtype=torch.long, device=scores.device)
        counts.scatter_add_(1, extra // length, torch.ones_like(extra))
        return ragged_topk(norm, counts.clamp(max=length))


@dataclass
class HeadKV(HeadBudgetWrapper):
    """Head budgets from offline head importance (Fu et al., "Not All Heads Matter", arXiv 2410.19258):
    with per-layer budget B, head h keeps (B - B/beta) + s_h * (B/beta) * H tokens, s the layer's head
    scores normalised to sum 1 (`head_scores`: [num_layers, H_kv] from a retrieval-reasoning
    calibration); tokens inside a head are chosen by `scorer` (SnapKV)."""

    head_scores: torch.Tensor | None = None
    beta: float = 1.5
    scorer: EvictionPolicy = field(default_factory=SnapKV)
    name = "headkv"

    def __post_init__(self):
        if self.beta <= 1:
            raise ValueError(f"beta={self.beta} must be > 1")
        self.adopt_scorer()

    def select_ragged(self, inputs, keep):
        scores = self.scorer.ranking(inputs)
        b, h, length = scores.shape
        if self.head_scores is None:
            weights = torch.full((h,), 1.0 / h)
        else:
            row = torch.as_tensor(self.head_scores, dtype=torch.float32)[inputs.layer_idx]
            weights = row / row.sum()
        pool = keep / self.beta
        counts = (keep - pool + weights * pool * h).round().long().clamp(1, length)
        return ragged_topk(scores, counts.to(scores.device).expand(b, h))


@dataclass
class DuoAttention(EvictionPolicy):
    """Retrieval vs streaming heads (Xiao et al., "DuoAttention", arXiv 2410.10819): heads marked True in
    `head_map` [num_layers, H_kv] (the map DuoAttention's gate optimisation produces) keep every token;
    the others keep `n_sink` sinks and the most recent tokens, as many as leave the layer at its budget
    on average (at least `min_recent`)."""

    head_map: torch.Tensor | None = None
    n_sink: int = 4
    min_recent: int = 0
    name = "duo_attention"

    def score(self, inputs):
        return StreamingLLM(self.n_sink).score(inputs)

    def select_ragged(self, inputs, keep):
        b, h, length = inputs.batch, inputs.heads, inputs.length
        if self.head_map is None:
            retrieval = torch.zeros(h, dtype=torch.bool)
        else:
            retrieval = torch.as_tensor(self.head_map, dtype=torch.bool)[inputs.layer_idx]
        n_ret = int(retrieval.sum())
        stream = (h * keep - n_ret * length) // max(h - n_ret, 1)
        stream = min(length, max(stream, self.n_sink + self.min_recent))
        counts = torch.where(retrieval, length, stream).to(inputs.keys.device).expand(b, h)
        return ragged_topk(StreamingLLM(self.n_sink).ranking(inputs), counts)
