"""KV reuse across denoising steps: `make_cache("none" | "prefix" | "dual" | "freecache", **options)`."""

from __future__ import annotations

from .base import CacheStats, DenoisingCache, Layout, NoCache
from .freecache import FreeCache
from .plans import Refresh, Scatter, Window
from .reuse import DualCache, KVReuseCache, PrefixCache, refreshes_prompt
from .rules import BlockFreeze, RefreshEvery, RefreshNever, RefreshOnDrift, TokenFreeze
from .store import CanvasStore, prompt_compression

CACHES: dict[str, type[DenoisingCache]] = {
    "none": NoCache,
    "prefix": PrefixCache,
    "dual": DualCache,
    "freecache": FreeCache,
}


def make_cache(cache: str | DenoisingCache = "none", **options) -> DenoisingCache:
    """A cache strategy from its name (options go to its constructor) or an instance as is."""
    if isinstance(cache, DenoisingCache):
        if options:
            raise ValueError(f"cache options {sorted(options)} given with a ready cache object {cache!r}")
        return cache
    if not isinstance(cache, str) or cache not in CACHES:
        raise ValueError(f"cache={cache!r}: expected one of {sorted(CACHES)} or a DenoisingCache")
    try:
        return CACHES[cache](**options)
    except TypeError as e:
        raise ValueError(f"cache={cache!r} does not take options {sorted(options)}: {e}") from None


__all__ = [
    "BlockFreeze",
    "CACHES",
    "CanvasStore",
    "CacheStats",
    "DenoisingCache",
    "DualCache",
    "FreeCache",
    "KVReuseCache",
    "Layout",
    "NoCache",
    "PrefixCache",
    "Refresh",
    "RefreshEvery",
    "RefreshNever",
    "RefreshOnDrift",
    "Scatter",
    "TokenFreeze",
    "Window",
    "make_cache",
    "prompt_compression",
    "refreshes_prompt",
]
