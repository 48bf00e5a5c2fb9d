"""How the pipeline gets the active block's logits at each denoising step.

A `DenoisingCache` owns the model calls of one generation: `prepare` is called once with the canvas
layout, `block_logits` at every step. The strategies differ only in what they recompute per step;
`NoCache` recomputes the whole sequence (the reference every other mode is tested against).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Layout:
    """The canvas of one generation call.

    key_mask: [B, L] True for real tokens (False = left padding); positions: [B, L] absolute
    positions (padding-independent); prompt_len: P, the padded prompt length (generation region is
    [P, L)); block_length: tokens per block.
    """

    key_mask: torch.Tensor
    positions: torch.Tensor
    prompt_len: int
    block_length: int

    @property
    def length(self) -> int:
        return self.key_mask.shape[1]


@dataclass
class CacheStats:
    """Counts per generation: forwards, tokens fed to the model, and KV positions read from the cache."""

    forwards: int = 0
    full_forwards: int = 0
    fed_tokens: int = 0
    reused_tokens: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


class DenoisingCache:
    """Strategy interface. Subclasses implement `block_logits`."""

    name = "base"

    def __init__(self):
        self.layout: Layout | None = None
        self.stats = CacheStats()

    def prepare(self, model, layout: Layout) -> None:
        """Start a generation on `layout` (called once per pipeline call, before the first step)."""
        self.model = model
        self.layout = layout
        self.stats = CacheStats()

    def block_logits(self, x: torch.LongTensor, start: int, end: int, step_in_block: int) -> torch.Tensor:
        """Logits [B, end - start, V] predicting canvas positions start..end-1 given the canvas x [B, L]."""
        raise NotImplementedError

    def full_forward_logits(self, x: torch.LongTensor, start: int, end: int, cache=None) -> torch.Tensor:
        """The reference computation: feed the whole canvas, keep the logits of [start, end)."""
        lay = self.layout
        self.stats.forwards += 1
        self.stats.full_forwards += 1
        self.stats.fed_tokens += x.numel()
        index = torch.arange(start, end, device=x.device)
        return self.model(
            x, positions=lay.positions, attention_mask=lay.key_mask, cache=cache, logits_index=index
        ).logits


class NoCache(DenoisingCache):
    """`cache="none"`: the whole sequence every step, exactly like the reference samplers."""

    name = "none"

    def block_logits(self, x, start, end, step_in_block):
        return self.full_forward_logits(x, start, end)
