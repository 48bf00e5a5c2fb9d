"""A request's cache strategy as numbers, so that one set of tensor ops plans every request's step.

`CacheRule` is what the vectorised planner (`batch.GenerationBatch.plan`) reads of a
`DenoisingCache`: which freeze rule, its window, and its refresh rule. A block diffusion model has
two rules of its own: its finished blocks' KV is exact, so every cache is a prefix cache of the
finished blocks (CAUSAL), and `none` recomputes the prefix every step (CAUSAL_FULL).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dlmcache.cache import DenoisingCache, DualCache, FreeCache, NoCache, PrefixCache
from dlmcache.kernels.compression import Compression

#: Freeze modes: what a step that does not refresh feeds (the last two: block diffusion's).
NONE, PREFIX, DUAL, BLOCK, TOKEN, CAUSAL, CAUSAL_FULL = range(7)


@dataclass(frozen=True)
class CacheRule:
    """mode: NONE (refresh every step) | PREFIX / DUAL (refresh at every block start; feed the block
    and what follows it / the block alone) | BLOCK / TOKEN (FreeCache's freeze rules) | CAUSAL /
    CAUSAL_FULL (block diffusion: feed the active block and the blocks finished since the row's last
    forward / everything up to the active block's end);
    suffix_window: later positions fed with the block (-1: all); drop_beyond: positions after the
    window are not attended; delay: block freezing's delayed freeze; refresh_every: k (0: never);
    drift: the drift test's threshold (0: off); probe_tokens: its probes per row; canvas_refresh: a
    refresh after the first forward recomputes the generation region only (`refresh_prompt=False`:
    from `probe_tokens` + the logit shift positions before it), reading the prompt's KV from the pool
    (None: each request by its prompt's length, `Request.canvas_refresh`);
    compression: how the prompt's KV is compressed after a forward that computes it (a
    `Compression`; None: it stays in the pool), read from then on as a segment of its own;
    sub_block: block diffusion with `DualCache`, which for a model whose decoding blocks are
    sub-blocks of its attention block (Fast-dLLM v2) is the release's sub-block cache: a step whose
    sub-block's first position is committed feeds the sub-block alone over the stale KV of the rest
    of its attention block."""

    mode: int
    suffix_window: int = -1
    drop_beyond: bool = False
    delay: bool = True
    refresh_every: int = 0
    drift: float = 0.0
    probe_tokens: int = 0
    canvas_refresh: bool | None = False
    compression: Compression | None = None
    sub_block: bool = False
    name: str = ""  # the cache strategy's name ("none", "freecache", ...)


def canvas_refresh(cache) -> bool | None:
    """`CacheRule.canvas_refresh` for a KV-reusing cache: the opposite of its `refresh_prompt`, or None
    (each request by its prompt's length, `refreshes_prompt`) where that is None."""
    return None if cache.refresh_prompt is None else not cache.refresh_prompt


def cache_rule(cache: DenoisingCache, block_causal: bool = False) -> CacheRule | None:
    """The rule of `cache` (for a block diffusion model: `block_causal`), or None when the batched
    engine does not run it (a strategy it does not know)."""
    rule = _rule(cache, block_causal)
    return None if rule is None else dataclasses.replace(rule, name=cache.name)


def _rule(cache: DenoisingCache, block_causal: bool) -> CacheRule | None:
    compression = getattr(cache, "compression", None)
    if block_causal:  # (a compressed prefix: its complete attention blocks, after the first forward)
        return (
            CacheRule(CAUSAL_FULL, compression=compression)
            if type(cache) is NoCache
            else CacheRule(CAUSAL, compression=compression, sub_block=type(cache) is DualCache)
        )
    if type(cache) is NoCache:
        return CacheRule(NONE)
    if type(cache) is PrefixCache:
        return CacheRule(PREFIX, canvas_refresh=canvas_refresh(cache), compression=compression)
    if type(cache) is DualCache:
        return CacheRule(DUAL, canvas_refresh=canvas_refresh(cache), compression=compression)
    if type(cache) is not FreeCache:
        return None
    drift = cache.refresh_drift is not None
    return CacheRule(
        mode=TOKEN if cache.freeze == "token" else BLOCK,
        suffix_window=-1 if cache.suffix_window is None else cache.suffix_window,
        drop_beyond=cache.beyond_window == "drop",
        delay=not cache.flashdlm,
        refresh_every=cache.refresh_every or 0,
        drift=float(cache.refresh_drift) if drift else 0.0,
        probe_tokens=cache.probe_tokens if drift else 0,
        canvas_refresh=canvas_refresh(cache),
        compression=compression,
    )
