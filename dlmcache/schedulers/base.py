"""What every unmasking scheduler shares: the step contract, the transfer quota and top-k by row.

A scheduler decides *which* masked positions of the active block to commit at a denoising step and
*what* to write there; it never runs the model. All rules are vectorised over the batch: rows may
commit different numbers of tokens in the same step without a host sync per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput


@dataclass
class StepContext:
    """Where a step happens, for rules that look beyond the logits (the guided scheduler).

    x: the whole canvas [B, L] before this step; targets: canvas positions of the logit rows [m];
    start, end: the active block; prompt_len: P, where generation starts; mask_token_id.
    """

    x: torch.LongTensor
    targets: torch.LongTensor
    start: int
    end: int
    prompt_len: int
    mask_token_id: int


@dataclass
class DLMSchedulerOutput(BaseOutput):
    """prev_sample: the block after this step [B, n]; transfer_index: positions committed now [B, n];
    x0: the predicted token at every position [B, n]; confidence: the score used to rank them."""

    prev_sample: torch.LongTensor
    transfer_index: torch.BoolTensor
    x0: torch.LongTensor
    confidence: torch.Tensor


class DLMScheduler(SchedulerMixin, ConfigMixin):
    """What a scheduler is to the pipeline (the whole contract; the pipeline reads nothing else):

    - `select(logits, mask_index, step_index, num_steps, generator, context)` -> (x0, confidence,
      transfer_index): the rule, implemented by each subclass; `step` wraps it.
    - `begin(prompts, requests, x, prompt_len)`: called once per generation, on the pipeline call's
      own copy of the scheduler, before the first step; per-generation state goes there.
    - `stats`: per-generation counters merged into the output's stats (empty by default).
    - `stops_at_eos`: the rule commits text left to right, so once a row's text up to an EOS is
      committed the pipeline fills the rest of the row with EOS (the default of its `stop_at_eos`).
    """

    config_name = "scheduler_config.json"
    order = 1
    stops_at_eos: bool = False
    #: `select` takes per-row `step_index` / `num_steps` tensors [B] and draws no random numbers for
    #: this configuration, so the batched engine runs every row of the same configuration in one call
    #: (see `batched`).
    batched_steps: bool = False

    @property
    def batched(self) -> bool:
        """Whether `select` may serve rows at different steps, padded to one block width, at once:
        it is row-wise, vectorised over per-row steps, and draws no random numbers (draws depend on
        the shape they are drawn in, so a sampling row runs alone to get what it gets alone)."""
        return self.batched_steps

    def step(
        self,
        logits: torch.Tensor,
        sample: torch.LongTensor,
        mask_index: torch.BoolTensor,
        step_index: int,
        num_steps: int,
        generator: torch.Generator | None = None,
        context: StepContext | None = None,
        return_dict: bool = True,
    ) -> DLMSchedulerOutput | tuple:
        """One denoising step on (a subset of) the active block.

        logits: [B, n, V], logits[:, j] predicts the j-th position handed in (already shifted for
        Dream); sample: those positions' tokens [B, n]; mask_index: which of them are still masked
        [B, n] (every masked position of the block must be among them); step_index / num_steps:
        position in this block's step budget (the last step commits every remaining mask).
        Returns the new tokens and the committed positions.
        """
        if logits.shape[:2] != sample.shape or sample.shape != mask_index.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)}, sample {tuple(sample.shape)} and mask_index "
                f"{tuple(mask_index.shape)} must agree on [batch, block]"
            )
        if not 0 <= step_index < num_steps:
            raise ValueError(f"step_index={step_index} is outside 0..{num_steps - 1}")
        x0, confidence, transfer = self.select(logits, mask_index, step_index, num_steps, generator, context)
        transfer = transfer & mask_index
        prev = torch.where(transfer, x0, sample)
        if not return_dict:
            return prev, transfer, x0, confidence
        return DLMSchedulerOutput(prev_sample=prev, transfer_index=transfer, x0=x0, confidence=confidence)

    def select(self, logits, mask_index, step_index, num_steps, generator, context):
        raise NotImplementedError

    def begin(self, prompts: list[list[int]], chats: list, x: torch.LongTensor, prompt_len: int) -> None:
        """Start of a generation: the prompts (DLM ids and the chats / texts they came from) and the
        canvas. Stateless rules need nothing."""

    @property
    def stats(self) -> dict:
        """Counters of the current generation (e.g. drafts accepted by a guide)."""
        return {}


def check_number(name: str, value, low: float = 0.0, allow_none: bool = False) -> None:
    """A finite real number >= `low` (None too when `allow_none`); NaN and infinities are refused."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"{name}={value!r} must be a finite number >= {low}")


def transfer_quota(mask_index: torch.BoolTensor, step_index: int, num_steps: int) -> torch.LongTensor:
    """Tokens to commit per row now so the block's masks are spread evenly over its steps [B].

    ceil(remaining / steps_left) reproduces LLaDA's `get_num_transfer_tokens` (masks // steps per
    step, the remainder going to the earliest steps) without keeping state: whenever each step commits
    exactly its quota, the remaining count after s steps is base*(S-s) + max(rem-s, 0).
    """
    remaining = mask_index.sum(-1)
    steps_left = num_steps - step_index  # ints, or per-row tensors [B]
    return torch.div(remaining + steps_left - 1, steps_left, rounding_mode="floor")


def select_topk(score: torch.Tensor, k: torch.LongTensor) -> torch.BoolTensor:
    """Mark the k[b] highest scores of each row b [B, n] (rows may ask for different k; ties go to
    the lower index). Positions scored -inf are never chosen."""
    order = score.argsort(dim=-1, descending=True, stable=True)
    ranks = order.argsort(dim=-1)  # (the inverse permutation: each position's place in the order)
    return (ranks < k[:, None]) & (score > float("-inf"))


def gumbel_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard Gumbel noise in float64 with the shape of `x`."""
    u = torch.rand(x.shape, dtype=torch.float64, device=x.device, generator=generator)
    return -torch.log(-torch.log(u.clamp_min(1e-300)))


def argmax_confidence(logits: torch.Tensor) -> tuple[torch.LongTensor, torch.Tensor]:
    """Greedy tokens and their softmax probability, computed in float64 as LLaDA's and Fast-dLLM's
    reference samplers do (in float32, positions whose probabilities differ by ~1e-10 tie, and the
    tie goes to the lower index where the reference picks the truly more confident one)."""
    x0 = logits.argmax(dim=-1)
    return x0, token_probability(logits, x0)


def token_probability(logits: torch.Tensor, tokens: torch.LongTensor) -> torch.Tensor:
    """softmax(logits)[tokens] in float64 ([B, n, V] logits, [B, n] tokens)."""
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    return probs.gather(-1, tokens[..., None]).squeeze(-1)
