"""How the pipeline gets the logits it needs at each denoising step.

A `DenoisingCache` owns the model calls of one generation: `prepare` is called once with the canvas
layout, `step_logits` at every denoising step. Strategies differ only in what they recompute;
`NoCache` recomputes the whole sequence every step (the reference the other modes are tested against).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Layout:
    """The canvas of one generation call.

    key_mask: [B, L] True for real tokens (False = left padding); positions: [B, L] absolute
    positions (padding-independent); prompt_len: P, the padded prompt length (the generation region
    is [P, L)); block_length: tokens per block; mask_token_id: what a still-masked position holds.
    """

    key_mask: torch.Tensor
    positions: torch.Tensor
    prompt_len: int
    block_length: int
    mask_token_id: int | None = None

    @property
    def length(self) -> int:
        return self.key_mask.shape[1]

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """The key mask, or None when no row is padded (attention then takes its unmasked fast path)."""
        return None if bool(self.key_mask.all()) else self.key_mask


@dataclass
class CacheStats:
    """Per generation: model forwards, how many of them fed the whole canvas, tokens fed to the model,
    and cached KV positions read instead of recomputed (summed over forwards, per sequence: a forward
    that feeds only some rows of the batch counts for the share of rows it feeds)."""

    forwards: int = 0
    full_forwards: int = 0
    fed_tokens: float = 0
    reused_tokens: float = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


class DenoisingCache:
    """Strategy interface: `prepare` once per generation, then `step_logits` every step."""

    name = "base"

    def __init__(self):
        self.layout: Layout | None = None
        self.stats = CacheStats()
        self.step = 0

    def prepare(self, model, layout: Layout) -> None:
        """Start a generation on `layout` (called once per pipeline call, before the first step)."""
        self.model = model
        self.layout = layout
        self.attention_mask = layout.attention_mask
        self.stats = CacheStats()
        self.step = 0

    def step_logits(self, x: torch.LongTensor, targets: torch.LongTensor, start: int, end: int) -> torch.Tensor:
        """Logits [B, len(targets), V] predicting canvas positions `targets` (sorted, inside the active
        block [start, end)) given the canvas x [B, L]."""
        logits = self._logits(x, targets, start, end)
        self.step += 1
        return logits

    def _logits(self, x, targets, start, end):
        raise NotImplementedError

    def full_forward(self, x: torch.LongTensor, targets: torch.LongTensor, kv=None, rows=None) -> torch.Tensor:
        """The reference computation: feed the whole canvas (writing every position's KV into `kv`
        when given) and keep the logits of `targets`. `rows`: x holds only these rows of the batch."""
        self.stats.forwards += 1
        self.stats.full_forwards += 1
        self.stats.fed_tokens += x.shape[1] * self._share(rows)
        positions, mask = self.layout.positions, self.attention_mask
        if rows is not None:
            positions, mask = positions[rows], None if mask is None else mask[rows]
        return self.model(x, positions=positions, attention_mask=mask, cache=kv, logits_index=targets).logits

    def _share(self, rows) -> float:
        """The share of the batch's rows a forward feeds."""
        return 1 if rows is None else len(rows) / self.layout.key_mask.shape[0]


class NoCache(DenoisingCache):
    """`cache="none"`: the whole sequence every step, exactly like the reference samplers (only the
    logits of still-masked positions are projected through the LM head)."""

    name = "none"

    def _logits(self, x, targets, start, end):
        return self.full_forward(x, targets)
