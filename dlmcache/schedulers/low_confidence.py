"""LLaDA's sampler (Nie et al., arXiv 2502.09992, Alg. 5 / `generate.py`)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config

from .base import (
    DLMScheduler,
    SchedulerMixin,  # noqa: F401  (diffusers finds the loadable base class by name in this module)
    check_number,
    select_topk,
    token_probability,
    transfer_quota,
)


class LowConfidenceScheduler(DLMScheduler):
    """Commit, per row, the `ceil(remaining / steps_left)` masked positions of the block whose
    predicted token is most confident ("low-confidence remasking") or a random subset ("random").

    Tokens are the argmax of Gumbel-perturbed logits, written as in LLaDA in float64:
    exp(logits) / (-log u)^temperature (plain argmax at temperature 0). Confidence is the softmax
    probability of the chosen token, also in float64 as LLaDA computes it. (LLaDA's classifier-free
    guidance is the pipeline's `cfg_scale`, available with every scheduler.)
    """

    batched_steps = True

    @property
    def batched(self) -> bool:
        return self.config.temperature == 0 and self.config.remasking == "low_confidence"

    @register_to_config
    def __init__(self, remasking: str = "low_confidence", temperature: float = 0.0):
        if remasking not in ("low_confidence", "random"):
            raise ValueError(f"remasking={remasking!r}: expected 'low_confidence' or 'random'")
        check_number("temperature", temperature)

    def select(self, logits, mask_index, step_index, num_steps, generator, context):
        cfg = self.config
        if cfg.temperature > 0:
            u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
            x0 = (logits.to(torch.float64).exp() / (-torch.log(u)) ** cfg.temperature).argmax(-1)
        else:
            x0 = logits.argmax(-1)
        if cfg.remasking == "low_confidence":
            confidence = token_probability(logits, x0)  # float64, as LLaDA's generate.py
        else:
            confidence = torch.rand(mask_index.shape, device=logits.device, generator=generator)
        confidence = confidence.masked_fill(~mask_index, float("-inf"))
        return x0, confidence, select_topk(confidence, transfer_quota(mask_index, step_index, num_steps))
