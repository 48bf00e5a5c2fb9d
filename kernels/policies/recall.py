"""Recall policies: keep the prompt's KV (optionally prefiltered), and at every decoding step attend only
to the `budget` tokens the current query selects: single tokens (RetrievalAttention), sentences
(SentenceKV), key clusters (ClusterKV) or episodes (EpiCache). The budget is the number of prompt tokens
attended per step; memory is that of the kept tokens (the papers offload them to CPU memory).

A recall policy implements `build(inputs) -> state` at prefill and `recall(state, query, keep)
-> [B, H, S] bool` per decoding step (query [B, Hq, q, D], after RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import EvictionPolicy, ScoreInputs, check_positive


class RecallPolicy(EvictionPolicy):
    """Base: nothing is evicted at prefill (unless `prefilter` is set); `recall` picks per step."""

    is_recall = True
    n_sink: int = 4
    recent: int = 32

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return torch.zeros(inputs.keys.shape[:3], device=inputs.keys.device)

    def build(self, inputs: ScoreInputs) -> dict:
        raise NotImplementedError

    def group_scores(self, state: dict, query: torch.Tensor) -> torch.Tensor:
        """[B, H, S] relevance of every stored prompt token to the query (sum over the query group)."""
        raise NotImplementedError

    def recall(self, state: dict, query: torch.Tensor, keep: int) -> torch.Tensor:
        """Which of the S stored prompt tokens the query attends to: sinks, the `recent` newest, and
        the most relevant others up to `keep` in total. [B, H, S] bool"""
        scores = self.group_scores(state, query).float()
        s = scores.shape[-1]
        pos = torch.arange(s, device=scores.device)
        forced = (pos < self.n_sink) | (pos >= s - self.recent)
        scores = torch.where(forced, float("inf"), scores)
        valid = state.get("valid")
        if valid is not None:
            scores = scores.masked_fill(~valid, float("-inf"))
        top = scores.topk(min(keep, s), dim=-1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)


def _query_by_kv_head(query: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hq, q, D] -> [B, H, D]: the queries of each KV head's group and step, summed."""
    b, hq, q, d = query.shape
    return query.float().view(b, heads, hq // heads, q, d).sum((2, 3))


@dataclass
class RetrievalAttention(RecallPolicy):
    """Exact top-k retrieval (Liu et al., "RetrievalAttention", arXiv 2409.10516, with its approximate
    nearest-neighbour index replaced by exact search): each step attends to the sinks, the recent
    window and the keys with the largest q.k for each KV head's query group."""

    n_sink: int = 4
    recent: int = 32
    name = "retrieval_attention"

    def build(self, inputs):
        return {"keys": inputs.keys, "valid": inputs.head_mask}

    def group_scores(self, state, query):
        q = _query_by_kv_head(query, state["keys"].shape[1])
        return torch.einsum("bhd,bhsd->bhs", q, state["keys"].float())


def _mean_by_group(keys: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean key of each group: keys [B, H, S, D], group [B, H, S] -> [B, H, G, D]."""
    b, h, s, d = keys.shape
    sums = keys.new_zeros(b, h, n_groups, d, dtype=torch.float32).scatter_add_(
        2, group[..., None].expand(-1, -1, -1, d), keys.float()
    )
    counts = keys.new_zeros(b, h, n_groups, dtype=torch.float32).scatter_add_(
        2, group, torch.ones_like(group, dtype=torch.float32)
    )
    return sums / counts.clamp_min(1)[..., None]


def _group_recall_scores(state, query):
    """Every token scores its group's relevance: q . mean key of the group."""
    q = _query_by_kv_head(query, state["centroids"].shape[1])
    group_score = torch.einsum("bhd,bhgd->bhg", q, state["centroids"])
    return group_score.gather(2, state["group"])


@dataclass
class SentenceKV(RecallPolicy):
    """Sentence-level recall (Zhu et al., "SentenceKV", arXiv 2504.00970): the prompt is cut into
    sentences after punctuation tokens (`boundaries`: token ids, e.g. of ". ! ? \\n"), each represented
    by its mean key per head; each step attends to the sinks, the recent window and whole sentences in
    order of mean-key relevance to the query. Needs `token_ids` (CompressedCache(token_ids=...))."""

    boundaries: tuple[int, ...] = ()
    n_sink: int = 32
    recent: int = 32
    name = "sentencekv"
    needs = frozenset({"token_ids"})

    def build(self, inputs):
        if inputs.token_ids is None:
            raise ValueError("SentenceKV needs the prompt's token ids: CompressedCache(..., token_ids=input_ids)")
        ends = torch.isin(inputs.token_ids, torch.tensor(list(self.boundaries), device=inputs.token_ids.device))
        sentence = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], 1).long().cumsum(-1)  # [B, S]
        group = sentence[:, None].expand(-1, inputs.heads, -1).contiguous()
        n = int(sentence.max()) + 1
        return {"group": group, "centroids": _mean_by_group(inputs.keys, group, n), "valid": inputs.head_mask}

    group_scores = staticmethod(_group_recall_scores)


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine k-means over the second-to-last dim of x [..., N, D]: (assignment [..., N], centroids
    [..., k, D] unit-norm). Initialised from k evenly spaced points."""
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    n = unit.shape[-2]
    init = torch.linspace(0, n - 1, k, device=x.device).long()
    cent = unit[..., init, :]
    for _ in range(iters):
        assign = (unit @ cent.transpose(-1, -2)).argmax(-1)
        sums = torch.zeros_like(cent).scatter_add_(-2, assign[..., None].expand_as(unit), unit)
        empty = sums.norm(dim=-1, keepdim=True) == 0
        cent = torch.where(empty, cent, torch.nn.functional.normalize(sums, dim=-1))
    return (unit @ cent.transpose(-1, -2)).argmax(-1), cent


@dataclass
class ClusterKV(RecallPolicy):
    """Semantic-cluster recall (Liu et al., "ClusterKV", arXiv 2412.03213): per KV head, cosine k-means
    over the prompt keys (sinks excluded), one cluster per `tokens_per_cluster` tokens; each step ranks
    clusters by q . centroid and attends to whole clusters, plus sinks and the recent window."""

    tokens_per_cluster: int = 16
    iters: int = 10
    n_sink: int = 16
    recent: int = 32
    name = "clusterkv"

    def __post_init__(self):
        check_positive("tokens_per_cluster", self.tokens_per_cluster)

    def build(self, inputs):
        k = max(1, inputs.length // self.tokens_per_cluster)
        group, _ = spherical_kmeans(inputs.keys, k, self.iters)
        return {"group": group, "centroids": _mean_by_group(inputs.keys, group, k), "valid": inputs.head_mask}

    group_scores = staticmethod(_group_recall_scores)


@dataclass
class EpiCache(RecallPolicy):
    """Episodic recall (Kim et al., "EpiCache", arXiv 2509.17396), adapted to work without an external
    embedder: the prompt is cut into windows of `segment` tokens, embedded by their mean hidden state
    (the layer's attention input), and clustered into `episodes` by cosine k-means; each step routes
    the query to episodes by q . (episode mean key) and attends to whole episodes, plus sinks and the
    recent window. The paper also compresses each episode's cache; here episodes are recalled whole."""

    segment: int = 64
    episodes: int = 4
    n_sink: int = 4
    recent: int = 32
    name = "epicache"
    needs = frozenset({"hidden"})

    def build(self, inputs):
        if inputs.hidden is None:
            raise ValueError("EpiCache reads the hidden states: CompressedCache(..., model=model)")
        b, s, d = inputs.hidden.shape
        n_seg = (s + self.segment - 1) // self.segment
        seg_of = torch.arange(s, device=inputs.hidden.device) // self.segment
        emb = torch.zeros(b, n_seg, d, device=inputs.hidden.device).index_add_(1, seg_of, inputs.hidden.float())
        assign, _ = spherical_kmeans(emb, min(self.episodes, n_seg))  # [B, n_seg]
        episode = assign.gather(1, seg_of.expand(b, -1))  # [B, S]
        group = episode[:, None].expand(-1, inputs.heads, -1).contiguous()
        n = min(self.episodes, n_seg)
        return {"group": group, "centroids": _mean_by_group(inputs.keys, group, n), "valid": inputs.head_mask}

    group_scores = staticmethod(_group_recall_scores)


RECALL = (RetrievalAttention, SentenceKV, ClusterKV, EpiCache)
__all__ = ["RECALL", "ClusterKV", "EpiCache", "RecallPolicy", "RetrievalAttention", "SentenceKV"]
