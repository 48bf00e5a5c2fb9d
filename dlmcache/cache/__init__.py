"""The cache strategies the engine runs: `make_cache("none" | "prefix" | "dual" | "freecache", **options)`."""

from __future__ import annotations

from .base import DenoisingCache, NoCache
from .block import BlockCache
from .compression import prompt_compression
from .freecache import FreeCache
from .reuse import DualCache, KVReuseCache, PrefixCache, refreshes_prompt

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
    "BlockCache",
    "CACHES",
    "DenoisingCache",
    "DualCache",
    "FreeCache",
    "KVReuseCache",
    "NoCache",
    "PrefixCache",
    "make_cache",
    "prompt_compression",
    "refreshes_prompt",
]
