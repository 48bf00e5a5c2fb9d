"""One generation's decoding settings, checked once: what `DLMPipeline`, the engine's requests and
`dlmcache serve` all decode with.

`DecodeSettings.resolve(model, ...)` fills the model's defaults (its block length, one step per
token, its release's EOS stop) and refuses, before any work, what the model cannot decode: a
`SettingsError` (a `ValueError`) that names the field it is about, so a caller can point at it (the
server answers 400 with it as the `param`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from .cache import CACHES, DenoisingCache
from .schedulers import DLMScheduler, GuidedScheduler
from .schedulers.base import check_number


class SettingsError(ValueError):
    """A decoding setting the model cannot take; `field` is its name."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class DecodeSettings:
    """max_new_tokens, in blocks of block_length, in `steps` denoising steps (split evenly over the
    blocks, at most one per token); cfg_scale: classifier-free guidance (0: off); stop_at_eos: fill
    a row after its committed EOS; scheduler / cache: this generation's own copies."""

    max_new_tokens: int
    block_length: int
    steps: int
    cfg_scale: float
    stop_at_eos: bool
    scheduler: DLMScheduler
    cache: DenoisingCache

    @property
    def num_blocks(self) -> int:
        return self.max_new_tokens // self.block_length

    @classmethod
    def resolve(cls, model, scheduler: DLMScheduler, cache: DenoisingCache, max_new_tokens: int = 128,
                block_length: int | None = None, steps: int | None = None, cfg_scale: float = 0.0,
                stop_at_eos: bool | None = None, prompt_len: int | None = None) -> DecodeSettings:  # fmt: skip
        """The settings of a generation on `model` (a native DLM) whose longest prompt has `prompt_len`
        tokens (None: not known yet); `scheduler` and `cache` are copied. Defaults: block_length the
        model's (a block diffusion model's own block, else 32), steps = max_new_tokens, stop_at_eos
        as the scheduler or the model's release does (guided unmasking, block diffusion)."""
        block_diffusion = model.block_diffusion
        if block_length is None:
            block_length = model.block_size if block_diffusion else 32
        for name, value in (("max_new_tokens", max_new_tokens), ("block_length", block_length)):
            _positive(name, value)
        steps = max_new_tokens if steps is None else steps
        _positive("steps", steps)
        if max_new_tokens % block_length:
            raise SettingsError(
                "block_length", f"max_new_tokens={max_new_tokens} is not divisible by block_length={block_length}"
            )
        num_blocks = max_new_tokens // block_length
        if steps % num_blocks:
            raise SettingsError("steps", f"steps={steps} is not divisible by the number of blocks ({num_blocks})")
        if steps > max_new_tokens:  # a block's steps beyond its tokens would commit nothing: refused, not capped
            raise SettingsError("steps", f"steps={steps} is more than max_new_tokens={max_new_tokens} (at most one "
                                         "step per token)")  # fmt: skip
        try:
            check_number("cfg_scale", cfg_scale)
        except ValueError as e:
            raise SettingsError("cfg_scale", str(e)) from None
        limit = model.max_length
        if prompt_len is not None and limit is not None and prompt_len + max_new_tokens > limit:
            raise SettingsError(
                "max_new_tokens", f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = "
                f"{prompt_len + max_new_tokens} exceeds the model's {limit}",
            )  # fmt: skip
        if cfg_scale and block_diffusion:
            raise SettingsError("cfg_scale", f"cfg_scale={cfg_scale!r}: classifier-free guidance is not built for "
                                             "block diffusion")  # fmt: skip
        scheduler, cache = _scheduler(scheduler, model), _cache(cache, model)
        if stop_at_eos is None:  # the reference samplers' default; a block diffusion release stops at EOS
            stop_at_eos = scheduler.stops_at_eos or block_diffusion
        elif not isinstance(stop_at_eos, bool):
            raise SettingsError("stop_at_eos", f"stop_at_eos={stop_at_eos!r} must be None or a bool")
        return cls(max_new_tokens, block_length, steps, float(cfg_scale), stop_at_eos, scheduler, cache)


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SettingsError(name, f"{name}={value!r} must be a positive integer")


def _scheduler(scheduler, model) -> DLMScheduler:
    """This generation's copy of `scheduler`, if `model` decodes with it."""
    if not isinstance(scheduler, DLMScheduler):
        raise TypeError(f"scheduler must be a DLMScheduler, got {type(scheduler).__name__}: {scheduler!r}")
    name = type(model).__name__
    if getattr(scheduler, "edits", False) and not model.block_diffusion:
        raise SettingsError(
            "scheduler", f"scheduler {type(scheduler).__name__} edits the blocks of a block diffusion model "
            f"(LLaDA2.1's rule); {name} is full attention",
        )  # fmt: skip
    if isinstance(scheduler, GuidedScheduler) and model.block_diffusion:
        raise SettingsError("scheduler", f"guided unmasking is not built for block diffusion ({name})")
    return copy.copy(scheduler)


def _cache(cache, model) -> DenoisingCache:
    """This generation's copy of `cache`, if it has a rule and `model` runs it."""
    if not isinstance(cache, DenoisingCache):
        raise TypeError(f"cache must be a DenoisingCache, got {type(cache).__name__}: {cache!r}")
    if type(cache).feed.__func__ is DenoisingCache.feed.__func__:  # (no rule of its own)
        raise SettingsError("cache", f"cache={cache!r}: a {type(cache).__name__} has no rule for the engine (its "
                                     f"`refresh` and `feed`); the package's caches are {sorted(CACHES)}")  # fmt: skip
    if not model.block_diffusion:
        return copy.copy(cache)
    name = type(model).__name__
    compression = getattr(cache, "compression", None)
    if compression is not None and model.attention_block is not None and cache.block_mode == "sub_block":
        raise SettingsError(
            "cache",
            f"cache='dual' on {name} is Fast-dLLM v2's sub-block cache; with a compressed prefix it is not built",
        )
    if compression is not None and "mask_queries" in compression.reads:
        raise SettingsError(
            "cache", f"cache={cache.name!r} with policy={compression.policy.name!r}: it scores the prompt by the "
            f"masked positions' queries, and a block diffusion model ({name}) compresses its prefix with the "
            "prefix's own queries; use a policy that reads the prompt's (snapkv, h2o, knorm, ...)",
        )  # fmt: skip
    return copy.copy(cache)
