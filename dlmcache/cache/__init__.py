"""KV reuse across denoising steps. `make_cache("none" | ...)` builds a strategy by name."""

from __future__ import annotations

from .base import CacheStats, DenoisingCache, Layout, NoCache

CACHES: dict[str, type[DenoisingCache]] = {"none": NoCache}


def make_cache(cache: str | DenoisingCache = "none", **options) -> DenoisingCache:
    """A cache strategy from its name (options go to its constructor) or an instance as is."""
    if isinstance(cache, DenoisingCache):
        if options:
            raise ValueError(f"cache options {sorted(options)} given with a ready cache object {cache!r}")
        return cache
    if not isinstance(cache, str) or cache not in CACHES:
        raise ValueError(f"cache={cache!r}: expected one of {sorted(CACHES)} or a DenoisingCache")
    return CACHES[cache](**options)


__all__ = ["CACHES", "CacheStats", "DenoisingCache", "Layout", "NoCache", "make_cache"]
