"""The cache rule of a block diffusion model (SDAR, arXiv 2510.06303; Fast-dLLM v2; LLaDA2.x): its
finished blocks' KV is exact, cached like an autoregressive prefix.

Attention is causal across blocks of absolute positions and bidirectional inside one, so a query in
block b sees only blocks 0..b, and a finished block's KV never changes again: nothing drifts, nothing
refreshes. Per step a row feeds its active attention block, plus, at a block's first step, the
blocks finished since its last forward (at its first forward: everything before, its prompt's
prefill), whose final KV this forward writes; without a cache (`none`) it feeds everything before its
block's end, the release's full recompute. A model with shifted logits also feeds the position
before its feed (it predicts the first token fed).

Fast-dLLM v2's decoding blocks are sub-blocks of its attention block, and `cache="dual"` on it is the
release's sub-block cache (`use_block_cache`): a step whose sub-block's first position is committed
feeds that sub-block alone, attending the rest of its attention block over the KV the pool holds
there; otherwise the whole attention block is fed.
"""

from __future__ import annotations

import numpy as np

from .base import DenoisingCache


class BlockCache(DenoisingCache):
    """What a cache `source` is on a block diffusion model, by its `block_mode`: the exact cache of the
    finished blocks, the full recompute (`none`) or Fast-dLLM v2's sub-block cache (`dual`); with
    `source`'s name and prompt compression."""

    row_state = {
        "recompute": False,  # no cache: every step feeds everything before its block's end
        "sub_block": False,  # Fast-dLLM v2's sub-block cache
        "cached_end": 0,  # positions before it hold final KV
        "refreshed_at": -1,  # the attention block the sub-block cache was last filled in
    }

    def __init__(self, source: DenoisingCache):
        self.source = source
        self.recompute, self.sub_block = source.block_mode == "recompute", source.block_mode == "sub_block"
        self.name, self.compression = source.name, getattr(source, "compression", None)
        self.refresh_prompt = False  # the prefix is never recomputed

    def __repr__(self) -> str:
        return f"BlockCache({self.source!r})"

    def row(self, request) -> dict:
        # (the sub-block cache needs decoding blocks that are sub-blocks of an attention block)
        return {"recompute": self.recompute, "sub_block": self.sub_block and request.attention_block is not None}

    @classmethod
    def refresh(cls, b, rows):
        return np.zeros(len(b.start[rows]), dtype=bool)

    @classmethod
    def feed(cls, b, rows, refresh):
        s, pos = b.state, b.pos
        start, end, length = b.start[rows], b.end[rows], s["length"][rows]
        attn = s["attn_block"][rows]  # the block attended in: the decoding block, or one it is a sub-block of
        attn_start = start // attn * attn
        feed_to = keys_end = np.minimum(attn_start + attn, length)
        cached = ~s["recompute"][rows]
        feed_from = np.where(cached, np.maximum(s["cached_end"][rows] - b.shift, 0), 0)
        sub_block = s["sub_block"][rows]
        if sub_block.any():  # the sub-block alone, unless its first position is masked (or a new block)
            first_masked = s["canvas"][rows][np.arange(len(start)), start] == b.mask_id
            whole = (s["refreshed_at"][rows] != attn_start) | first_masked
            alone = sub_block & cached & ~whole
            # The forward that commits an attention block's first token alone (the autoregressive step)
            # is the release's store forward of the block before: the release fills the sub-block cache
            # at the block's next forward, with that token in place.
            ar_step = s["ar_first"][rows] & (start == attn_start) & first_masked
            fills = sub_block & whole & ~ar_step
            s["refreshed_at"][rows] = np.where(fills, attn_start, s["refreshed_at"][rows])
            feed_from = np.where(alone, start, feed_from)
            feed_to = np.where(alone, np.minimum(end, length), feed_to)
        s["cached_end"][rows] = np.where(cached, attn_start, 0)
        s["full_forwards"][rows] += ~cached
        return (pos >= feed_from[:, None]) & (pos < feed_to[:, None]), keys_end
