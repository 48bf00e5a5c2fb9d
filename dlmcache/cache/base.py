"""What every cache strategy is: a setting of the engine's decoding, by name.

A cache strategy says what each denoising step recomputes and what it reads from the KV pool; the
batched engine (`dlmcache.engine`) is the one loop that runs it, and reads of it only its rule
(`dlmcache.engine.rules.cache_rule`). `NoCache` recomputes the whole sequence every step: the
reference every other strategy is tested against.
"""

from __future__ import annotations


class DenoisingCache:
    """A cache strategy: its `name` and options (validated when it is built, before any decoding)."""

    name = "base"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoCache(DenoisingCache):
    """`cache="none"`: the whole sequence every step, exactly like the reference samplers (only the
    logits of still-masked positions are projected through the LM head)."""

    name = "none"
