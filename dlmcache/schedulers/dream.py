"""Dream's samplers (Ye et al., arXiv 2508.15487, `generation_utils.diffusion_generate`)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config

from .base import (
    DLMScheduler,
    SchedulerMixin,  # noqa: F401  (diffusers finds the loadable base class by name in this module)
    check_number,
    gumbel_like,
    select_topk,
)

ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def filter_logits(logits: torch.Tensor, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Nucleus then top-k filtering (removed entries set to the dtype's lowest value)."""
    low = torch.finfo(logits.dtype).min
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum > top_p
        drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()  # keep the token that crosses top_p
        drop_sorted[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), low)
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, low)
    return logits


class DreamScheduler(DLMScheduler):
    """Dream's unmasking rules inside a block of `num_steps` steps.

    The noise level follows t_i = linspace(1, eps, num_steps + 1); at step i a row with m masks commits
    int(m * (1 - t_{i+1} / t_i)) of them (all on the last step). Tokens are sampled from the filtered
    softmax (temperature, top_p, top_k; argmax at temperature 0) and ranked by `alg`:
    `origin` - every mask commits independently with probability 1 - t_{i+1}/t_i (random order);
    `maskgit_plus` - top-1 probability; `topk_margin` - top-1 minus top-2 probability;
    `entropy` - negative entropy of the distribution.
    `alg_temp > 0` samples the committed set from softmax(confidence / alg_temp) without replacement
    instead of taking the top ones.

    One deliberate difference from the reference: the count uses each row's own masks (the reference
    averages the mask count over the batch), so a prompt decodes the same alone or in a batch.
    """

    @register_to_config
    def __init__(
        self,
        alg: str = "entropy",
        eps: float = 1e-3,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int | None = None,
        alg_temp: float | None = None,
    ):
        if alg not in ALGORITHMS:
            raise ValueError(f"alg={alg!r}: expected one of {ALGORITHMS}")
        if not 0 < eps < 1:
            raise ValueError(f"eps={eps} must be in (0, 1)")
        check_number("temperature", temperature)
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k={top_k} must be >= 1")
        check_number("alg_temp", alg_temp, allow_none=True)

    @classmethod
    def from_generation_config(cls, generation_config: dict) -> DreamScheduler:
        """The sampler Dream's `diffusion_generate` runs when called with a checkpoint's defaults
        (its generation_config.json): each field as the file gives it; temperature, top_p and top_k
        that are null or missing take transformers' global generation defaults (1.0, 1.0, 50), as the
        official call receives them; eps, alg and alg_temp default to Dream's (1e-3, "origin", None).
        So the released Instruct checkpoint (temperature 0.0, top_k null, alg "origin") decodes with
        top_k=50: top-k changes the confidences (probabilities renormalised over the top 50) even when
        decoding greedily."""

        def given(name, default):
            value = generation_config.get(name)
            return default if value is None else value

        top_p = given("top_p", 1.0)
        return cls(
            alg=given("alg", "origin"),
            eps=given("eps", 1e-3),
            temperature=given("temperature", 1.0),
            top_p=None if top_p >= 1 else top_p,
            top_k=given("top_k", 50),
            alg_temp=generation_config.get("alg_temp"),
        )

    @classmethod
    def diffusion_generate_default(cls) -> DreamScheduler:
        """What the official `model.diffusion_generate(input_ids)` call, with no sampling arguments,
        runs (transformers 4.46.3 code): its settings come from config.json with transformers' global
        generation defaults, and generation_config.json is never read: alg "origin", eps 1e-3,
        temperature 1.0, top_k 50, top_p 1.0 (sampling). `DLMPipeline`'s default for a Dream
        checkpoint reads generation_config.json instead (`from_generation_config`), as the checkpoint's
        authors wrote it: for the released Instruct model that is greedy decoding. Pass
        `scheduler=DreamScheduler.diffusion_generate_default()` to get the official call's behaviour."""
        return cls(alg="origin", eps=1e-3, temperature=1.0, top_p=None, top_k=50)

    def transfer_ratio(self, step_index: int, num_steps: int) -> float:
        """1 - s/t for this step (1 on the last step)."""
        if step_index == num_steps - 1:
            return 1.0
        t = 1 - step_index * (1 - self.config.eps) / num_steps
        s = 1 - (step_index + 1) * (1 - self.config.eps) / num_steps
        return 1 - s / t

    def sample_tokens(self, logits: torch.Tensor, generator: torch.Generator | None):
        """(x0, probs): sampled (or greedy) tokens and the filtered distribution, float32 or wider."""
        cfg = self.config
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if cfg.temperature > 0:
            logits = logits / cfg.temperature
        probs = filter_logits(logits, cfg.top_p, cfg.top_k).softmax(-1)
        if cfg.temperature > 0:
            flat = probs.reshape(-1, probs.shape[-1])
            x0 = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
        else:
            x0 = probs.argmax(-1)
        return x0, probs

    def select(self, logits, mask_index, step_index, num_steps, generator, context):
        cfg = self.config
        ratio = self.transfer_ratio(step_index, num_steps)
        x0, probs = self.sample_tokens(logits, generator)
        if cfg.alg == "origin":
            confidence = torch.rand(mask_index.shape, device=logits.device, generator=generator)
            return x0, confidence, confidence < ratio
        if cfg.alg == "maskgit_plus":
            confidence = probs.gather(-1, x0[..., None]).squeeze(-1)
        elif cfg.alg == "topk_margin":
            top2 = probs.topk(2, dim=-1).values
            confidence = top2[..., 0] - top2[..., 1]
        else:
            confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
        confidence = confidence.masked_fill(~mask_index, float("-inf"))
        k = (mask_index.sum(-1) * ratio).long() if ratio < 1 else mask_index.sum(-1)
        score = confidence
        if cfg.alg_temp:
            # Top-k of Gumbel-perturbed log-weights = k draws without replacement from softmax(conf / alg_temp).
            score = (confidence.double() / cfg.alg_temp + gumbel_like(confidence, generator)).masked_fill(
                ~mask_index, float("-inf")
            )
        return x0, confidence, select_topk(score, k)
