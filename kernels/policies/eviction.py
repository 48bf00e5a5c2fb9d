"""Eviction scorers: `score(inputs) -> [B, H_kv, L]`, higher = keep."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import EvictionPolicy, ScoreInputs, check_pooling, check_positive, pool1d


@dataclass
class StreamingLLM(EvictionPolicy):
    """Attention sinks + a recent window (Xiao et al., "Efficient Streaming Language Models with
    Attention Sinks", arXiv 2309.17453): keep the first `n_sink` tokens and the most recent ones."""

    n_sink: int = 4
    name = "streaming_llm"

    def __post_init__(self):
        check_positive("n_sink", self.n_sink, allow_zero=True)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        pos = torch.arange(inputs.length, device=inputs.keys.device, dtype=torch.float32)
        rel = pos.expand(inputs.batch, inputs.heads, -1)
        if inputs.key_mask is not None:  # count sinks from each row's first real token (left padding)
            rel = rel - (~inputs.head_mask).sum(-1, keepdim=True)
        return torch.where(rel < self.n_sink, float(inputs.length) + 1, rel)


@dataclass
class KNorm(EvictionPolicy):
    """Keep the keys with the *lowest* L2 norm (Devoto et al., "A Simple and Effective L2 Norm-Based
    Strategy for KV Cache Compression", arXiv 2406.11430)."""

    name = "knorm"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1)


@dataclass
class RandomEviction(EvictionPolicy):
    """Uniformly random scores: the baseline every scorer must beat."""

    seed: int = 0
    name = "random"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(self.seed + inputs.layer_idx)
        return torch.rand(inputs.keys.shape[:3], generator=g).to(inputs.keys.device)


@dataclass
class SnapKV(EvictionPolicy):
    """Attention of an observation window (Li et al., "SnapKV: LLM Knows What You are Looking for
    Before Generation", arXiv 2404.14469): the last `window` queries' attention summed over them,
    averaged over each KV head's query group, smoothed by `pooling` with `kernel`; the window is kept."""

    window: int = 64
    kernel: int = 5
    pooling: str = "avg"
    name = "snapkv"
    needs = frozenset({"queries"})

    def __post_init__(self):
        check_positive("window", self.window)
        check_pooling(self.kernel, self.pooling)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        attn = inputs.window_attention(self.window)  # [B, H, G, W, L]
        mask = inputs.head_mask
        return pool1d(attn.sum(3).mean(2), self.kernel, self.pooling, mask)


@dataclass
class H2O(EvictionPolicy):
    """Heavy hitters (Zhang et al., "H2O: Heavy-Hitter Oracle", arXiv 2306.14048): attention accumulated
    over every prefill query, averaged over each KV head's query group, plus the `window` most recent
    tokens (0 by default, as NVIDIA kvpress's observed-attention press).

    per_key_mean: divide each key's accumulated attention by the number of prefill queries that see
    it (L - j for key j), as kvpress's `ObservedAttentionPress` does, instead of ranking by the sum
    (the paper's rule, which favours early keys: more queries see them)."""

    window: int = 0
    per_key_mean: bool = False
    name = "h2o"
    needs = frozenset({"all_queries"})

    def __post_init__(self):
        check_positive("window", self.window, allow_zero=True)
        if not isinstance(self.per_key_mean, bool):
            raise TypeError(f"per_key_mean={self.per_key_mean!r} must be a bool")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        received = inputs.attention_received(None).mean(2)  # [B, H_kv, L], mean over the query group
        if self.per_key_mean:
            seen_by = torch.arange(inputs.length, 0, -1, device=received.device, dtype=received.dtype)
            return received / seen_by
        return received / inputs.length


@dataclass
class TOVA(EvictionPolicy):
    """Token omission via attention (Oren et al., "Transformers are Multi-State RNNs", arXiv
    2401.06104): the last query's attention averaged over all heads of the layer; one ranking shared
    by every head. The last token itself is kept."""

    window: int = 1
    name = "tova"
    needs = frozenset({"queries"})

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        attn = inputs.window_attention(1)[..., -1, :]  # [B, H, G, L]
        return attn.mean((1, 2))[:, None].expand(-1, inputs.heads, -1)


@dataclass
class CAKEScore(EvictionPolicy):
    """Token score = mean + gamma * variance (over the last `window` queries) of the attention a token
    receives, averaged over each KV head's query group, avg-pooled with `kernel`; the window is kept."""

    window: int = 32
    gamma: float = 200.0
    kernel: int = 5
    name = "cake"
    needs = frozenset({"queries"})

    def __post_init__(self):
        check_positive("window", self.window)
        check_positive("gamma", self.gamma, allow_zero=True)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        attn = inputs.window_attention(self.window)  # [B, H, G, W, L]
        indicator = attn.mean(3) + self.gamma * attn.var(3, unbiased=False)
        return pool1d(indicator.mean(2), self.kernel, "avg", inputs.head_mask)


@dataclass
class MaskKV(EvictionPolicy):
    """The attention a diffusion LM's still-masked answer positions pay each prompt token (after MaskKV,
    github jianuo-huang/MaskKV: in a DLM the masked answer is the question that looks at the prompt,
    present from the first step): every masked position's softmax over the prompt, summed over those
    positions, averaged over each KV head's query group, smoothed by `pooling` with `kernel` as SnapKV
    smooths; per KV head. Only a diffusion-LM cache (`dlmcache.cache`) can supply the queries.

    window: the last prompt tokens always kept (the end of the question and the chat template's turn
    header, which sit just before the answer), as SnapKV keeps its observation window; counted in the
    budget. 16 by default, chosen on the long-prompt task (`scripts/eval_tiny.py --long`; measured in
    docs/results.md)."""

    window: int = 16
    kernel: int = 5
    pooling: str = "avg"
    name = "maskkv"
    needs = frozenset({"mask_queries"})

    def __post_init__(self):
        check_positive("window", self.window, allow_zero=True)
        check_pooling(self.kernel, self.pooling)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        attn = inputs.mask_attention()  # [B, H, G, M, L]
        return pool1d(attn.sum(3).mean(2), self.kernel, self.pooling, inputs.head_mask)
