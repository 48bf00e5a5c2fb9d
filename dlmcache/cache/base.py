"""What a cache rule is: a plug-in of the engine's one decoding loop.

A cache rule says, for every row of the batch at once, when a row refreshes (recomputes its
canvas) and what it feeds at the other steps, reading the KV pool for the rest. The engine
(`dlmcache.engine.GenerationBatch`) keeps every row's state as numpy arrays on the host and calls the
rule of each group of rows once per step; a batch with rows of several rules calls each on its own
rows. A new rule is one subclass (and an entry in `dlmcache.cache.CACHES` for its name): a worked
example in 13 lines is in docs/engine.md ("Cache rules are plug-ins").

The rows' arrays (`b`, a `Rows`): `b.state[name]` ([R] per row, [R, W] per canvas position:
"canvas", "length", "prompt_len", "forwards", and every rule's own `row_state` / `column_state`),
`b.pos` [W] (the canvas positions), `b.start` / `b.end` [R] (each row's active block this step),
`b.mask_id`, `b.shift` (the model's logit shift: Dream predicts token i from position i - 1). `rows`
selects a rule's rows (a slice or an index array). A rule's options that may differ from request
to request live in its `row_state`, written at admission by `row`, never read from `self` while
decoding: the rows of one class run in one call.

`NoCache` recomputes the whole sequence every step: the reference every other rule is tested against.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np


class DenoisingCache:
    """A cache rule (see the module docstring): its `name`, options (validated when it is built,
    before any decoding) and its vectorised plan.

    compression: how the prompt's KV is kept after the forward that computes it (None: in the pool,
    as computed); refresh_prompt: whether a refresh after a row's first forward recomputes its prompt
    too (True), its generation region alone against the prompt's KV (False), or, None, each row by its
    prompt's length (`refreshes_prompt`); refresh_lead: the prompt positions before the one that
    predicts the first answer token that such a refresh of the canvas alone also feeds (the drift
    test's probes). `reads_pool`: False for a rule whose steps never read earlier KV (a lone row of it
    writes none). A row's first forward always recomputes everything."""

    name = "base"
    compression = None
    refresh_prompt: bool | None = True
    refresh_lead = 0
    reads_pool: ClassVar[bool] = True
    #: What this cache is on a block diffusion model (`dlmcache.cache.block.BlockCache`): "cached" (the
    #: exact cache of the finished blocks), "recompute" (`none`: everything before the block's end, every
    #: step) or "sub_block" (`dual`: Fast-dLLM v2's sub-block cache).
    block_mode: ClassVar[str] = "cached"
    #: This rule's state per row ([R]): name -> the value a row starts with (bool, int or float).
    row_state: ClassVar[dict[str, bool | int | float]] = {}
    #: Its state per canvas position ([R, W]): name -> the value a position starts with (None: the
    #: mask token), and its numpy dtype.
    column_state: ClassVar[dict[str, tuple[object, type]]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def row(self, request) -> dict:
        """This request's values of the rule's `row_state` (its options, as numbers)."""
        return {}

    @classmethod
    def refresh(cls, b, rows) -> np.ndarray:
        """Which of `rows` recompute their canvas at this step [n] (bool)."""
        raise NotImplementedError

    @classmethod
    def feed(cls, b, rows, refresh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What `rows` feed at this step if they do not refresh: (the positions [n, W] bool, where the
        keys they attend end [n]); called for every row of the rule (`refresh` [n]: the rows that
        refresh instead, whose state may move too)."""
        raise NotImplementedError

    @classmethod
    def observe(cls, b, rows, values):
        """After the forward: a device tensor [n] read back with the step's results (None: nothing).
        `values` [T, Hkv, D]: the last layer's fresh values of the step's fed tokens (`b.fed_row`,
        `b.fed_col` [T] say whose and where, on the host)."""
        return None

    @classmethod
    def observed(cls, b, rows, result: np.ndarray) -> None:
        """`observe`'s tensor, back on the host [n]."""


class NoCache(DenoisingCache):
    """`cache="none"`: the whole sequence every step, exactly like the reference samplers (only the
    logits of still-masked positions are projected through the LM head)."""

    name = "none"
    reads_pool = False

    block_mode = "recompute"

    @classmethod
    def refresh(cls, b, rows):
        return np.ones(len(b.start[rows]), dtype=bool)

    @classmethod
    def feed(cls, b, rows, refresh):
        return b.in_len[rows], b.state["length"][rows]
