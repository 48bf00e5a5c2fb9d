"""LLaDA2.1's joint threshold decoding: mask-to-token unmasking plus token-to-token editing (Bie et
al., "LLaDA2.1: Speeding Up Text Diffusion via Token Editing", arXiv 2602.08676).

The rule, as the release's `generate` states it for one block of a block diffusion model (SGLang's
`JointThreshold` algorithm states the same):

- M2T: every masked position whose greedy token has probability > `threshold` is committed, and at
  least the most confident one;
- T2T: every position of the block that is neither masked at the step's start nor part of the
  prompt is rewritten with its greedy token where that token differs from the one there and its
  probability is > `edit_threshold`;
- once a step starts with no mask left in the block it is a post step: the block ends at the first
  post step that edits nothing, or without a forward when a step would be post step number
  `max_post_steps + 1`.

Both rules read one proposal per position: the greedy token and its probability, or at a
`temperature` a token drawn from softmax(logits / temperature) and its tempered probability (the
release's sampler; here a Gumbel-max draw in float64 from the request's generator, so the same
distribution, not the release's random stream).

A block therefore takes at least one forward more than its masks need: the last one checks that
nothing wants editing. Edits stay inside the active block, whose KV every step recomputes, so the
exact cache of the finished blocks is unaffected. The batched engine runs the block rule; this
scheduler holds its settings and its two vectorised selections.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from .base import (
    DLMScheduler,
    SchedulerMixin,  # noqa: F401  (diffusers finds the loadable base class by name in this module)
    argmax_confidence,
    check_number,
    gumbel_like,
    token_probability,
)
from .threshold import threshold_transfer


class TokenEditingScheduler(DLMScheduler):
    """LLaDA2.1's M2T + T2T rule (module docstring); the defaults are its `generate`'s (threshold
    0.95, edit_threshold 0.9, max_post_steps 16, greedy). Block diffusion models only. A sampling
    scheduler (temperature > 0) draws, so the batched engine runs its rows one by one, each with
    its request's generator."""

    batched_steps = True
    #: The decoding loops run the post-step block rule for schedulers that edit.
    edits = True

    @register_to_config
    def __init__(self, threshold: float = 0.95, edit_threshold: float = 0.9, max_post_steps: int = 16,
                 temperature: float = 0.0):  # fmt: skip
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold={threshold} must be in [0, 1]")
        check_number("edit_threshold", edit_threshold)
        if edit_threshold > 1:
            raise ValueError(f"edit_threshold={edit_threshold} must be in [0, 1]")
        if isinstance(max_post_steps, bool) or not isinstance(max_post_steps, int) or max_post_steps < 0:
            raise ValueError(f"max_post_steps={max_post_steps!r} must be an integer >= 0")
        check_number("temperature", temperature)

    @property
    def batched(self) -> bool:
        return self.config.temperature == 0

    def propose(self, logits: torch.Tensor, generator: torch.Generator | None = None):
        """(x0, confidence) [B, n]: the greedy tokens and their probabilities, or at a temperature a
        draw from softmax(logits / temperature) (Gumbel-max in float64) and its tempered probability."""
        if self.config.temperature == 0:
            return argmax_confidence(logits)
        scaled = logits.to(torch.float64) / self.config.temperature
        x0 = (scaled + gumbel_like(scaled, generator)).argmax(-1)
        return x0, token_probability(scaled, x0)

    def select(self, logits, mask_index, step_index, num_steps, generator, context):
        x0, confidence = self.propose(logits, generator)
        return x0, *threshold_transfer(confidence, mask_index, step_index, num_steps, self.config.threshold)

    def select_edits(self, logits, masked, editable, tokens, step_index, num_steps, generator=None):
        """One step of the rule on block positions [B, n] from one proposal (one draw when sampling):
        (x0, transfer, edited), M2T among the `masked` positions and T2T among the `editable` ones,
        whose tokens are `tokens`."""
        x0, confidence = self.propose(logits, generator)
        _, transfer = threshold_transfer(confidence, masked, step_index, num_steps, self.config.threshold)
        edited = editable & (x0 != tokens) & (confidence > self.config.edit_threshold)
        return x0, transfer & masked, edited


def block_ends(began_empty, edited, empty, post, max_post_steps):
    """The block rule of an editing scheduler (LLaDA2.1's), after a step of rows [R] (host arrays):
    began_empty: the step started with no mask in the block (a post step); edited: it edited a token;
    empty: no mask is left now; post: the post steps taken. Returns (ended, post, hold): the rows whose
    block ended (a post step that edited nothing, or the next step would be post step
    max_post_steps + 1), their post-step counts, and the rows that stay in their block for a post
    step."""
    ended = began_empty & ~edited
    post = np.where(ended, 0, post + empty)
    ended |= post > max_post_steps
    post = np.where(ended, 0, post)
    return ended, post, empty & ~ended
