"""Confidence-threshold parallel decoding (Fast-dLLM, Wu et al., arXiv 2505.22618, Sec. 3.3)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config

from .base import (
    DLMScheduler,
    SchedulerMixin,  # noqa: F401  (diffusers finds the loadable base class by name in this module)
    argmax_confidence,
    select_topk,
    transfer_quota,
)


class ThresholdScheduler(DLMScheduler):
    """Commit every masked position of the block whose greedy token has probability > `threshold`,
    and never fewer than the even-split quota ceil(remaining / steps_left) (at least one), taking the
    most confident first. With steps = max_new_tokens (the default) the quota is one token per step:
    exactly Fast-dLLM's rule; fewer steps bound the number of forwards per block.
    """

    batched_steps = True

    @register_to_config
    def __init__(self, threshold: float = 0.9):
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold={threshold} must be in [0, 1]")

    def select(self, logits, mask_index, step_index, num_steps, generator, context):
        return threshold_select(logits, mask_index, step_index, num_steps, self.config.threshold)


def threshold_select(logits, mask_index, step_index, num_steps, threshold: float):
    """The threshold rule's (x0, confidence, transfer_index) (see `ThresholdScheduler`)."""
    x0, confidence = argmax_confidence(logits)
    return x0, *threshold_transfer(confidence, mask_index, step_index, num_steps, threshold)


def threshold_transfer(confidence, mask_index, step_index, num_steps, threshold: float):
    """(confidence of the masked positions, transfer_index): every masked position above
    `threshold`, and never fewer than the step's quota (at least one), the most confident first."""
    confidence = confidence.masked_fill(~mask_index, float("-inf"))
    quota = transfer_quota(mask_index, step_index, num_steps).clamp(min=1)
    k = torch.maximum((confidence > threshold).sum(-1), quota)
    return confidence, select_topk(confidence, k)
