"""FreeCache (Hu et al., "FlashDLM", arXiv 2505.21467): freeze what is finished, recompute the rest."""

from __future__ import annotations

from .reuse import KVReuseCache

#: FreeCache's default drift threshold (a cosine distance); see `FreeCache`.
DEFAULT_DRIFT = 0.02
_UNSET = object()


class FreeCache(KVReuseCache):
    """`cache="freecache"`: the prompt's KV is computed once and frozen; a block's KV is frozen once the
    block is finished; each step feeds only the active window: the current block plus `suffix_window`
    later positions (all of them by default). It is two rules: a freeze rule, which says
    what a cached step feeds, and a refresh rule, which says when a step recomputes instead.

    Freeze rule:
      freeze: "block" (default): the active block is fed whole until it is
        finished, and once more on the first step of the next block (its last step committed tokens
        whose KV was computed while they were masked); "token": only the
        positions whose KV is not final yet: the still-masked ones in the window, and each token
        committed since it was last fed, once.
      suffix_window: later (masked) positions recomputed with the block each step; None = all.
      beyond_window: what the model sees of positions after the window: "cache" (their last computed
        KV, as DualCache reuses the suffix) or "drop" (not attended, as the FlashDLM code does).

    Refresh rule:
      refresh_drift (default 0.02): a row recomputes its canvas when the
        frozen KV it reads has drifted by more than this cosine distance, measured each cached step on
        `probe_tokens` (default 4) frozen positions next to the window; None: never.
      refresh_every: also recompute every row every k steps (k = 1: the no-cache reference, bit for
        bit).
    The drift rule is the default because freezing the prompt's KV from the first step (computed while
    the whole answer was masked) costs accuracy on the bundled model that the drift refreshes win back
    at a few extra forwards (measured in docs/results.md).

    flashdlm=True: FlashDLM's FreeCache exactly (block freezing without the delayed step, every later
    position fed, never refreshed); it cannot be combined with the options above.

    Refresh scope (`refresh_prompt`) and prompt compression (`policy`, `budget`, `allocator`,
    `quantizer`): see `KVReuseCache`. Without compression a refresh recomputes the prompt too by
    default while the prompt is no longer than the answer, and the canvas alone when it is longer
    (`refreshes_prompt`: on long prompts the canvas alone is as accurate and a refresh no longer
    costs a forward over the whole prompt; on the short bundled task recomputing the prompt is worth
    1.4-1.8 points: docs/results.md); with `refresh_every` given, always the prompt too, so that
    `refresh_every=1` stays the no-cache reference. `refresh_prompt=True` / `False` fixes the scope
    for every row.
    Every row decides on its own (probes, drift, refresh scope, refreshes in forwards of their own
    rows), so a batch decodes exactly like its rows one by one.
    """

    name = "freecache"

    def __init__(
        self,
        suffix_window: int | None = None,
        beyond_window: str = "cache",
        refresh_every: int | None = None,
        freeze: str = "block",
        refresh_drift=_UNSET,
        probe_tokens: int = 4,
        flashdlm: bool = False,
        **compression,
    ):
        self._periodic = refresh_every is not None  # a periodic refresh is a recompute (k = 1: `none`)
        super().__init__(**compression)
        if suffix_window is not None and (
            not isinstance(suffix_window, int) or isinstance(suffix_window, bool) or suffix_window < 0
        ):
            raise ValueError(f"suffix_window={suffix_window!r} must be None (all) or an integer >= 0")
        if beyond_window not in ("cache", "drop"):
            raise ValueError(f"beyond_window={beyond_window!r}: expected 'cache' or 'drop'")
        if refresh_every is not None and (
            not isinstance(refresh_every, int) or isinstance(refresh_every, bool) or refresh_every < 1
        ):
            raise ValueError(f"refresh_every={refresh_every!r} must be None or an integer >= 1")
        if freeze not in ("block", "token"):
            raise ValueError(f"freeze={freeze!r}: expected 'block' or 'token'")
        if not isinstance(flashdlm, bool):
            raise TypeError(f"flashdlm={flashdlm!r} must be a bool")
        if flashdlm:
            given = {
                "suffix_window": suffix_window is not None, "beyond_window": beyond_window != "cache",
                "refresh_every": refresh_every is not None, "freeze": freeze != "block",
                "refresh_drift": refresh_drift is not _UNSET,
            }  # fmt: skip
            if any(given.values()):
                raise ValueError(
                    f"flashdlm=True is FlashDLM's exact algorithm: drop {[k for k, v in given.items() if v]}"
                )
            refresh_drift = None
        refresh_drift = DEFAULT_DRIFT if refresh_drift is _UNSET else refresh_drift
        if refresh_drift is not None and (
            isinstance(refresh_drift, bool) or not isinstance(refresh_drift, (int, float)) or not 0 < refresh_drift < 2
        ):
            raise ValueError(f"refresh_drift={refresh_drift!r} must be None or a cosine distance in (0, 2)")
        if not isinstance(probe_tokens, int) or isinstance(probe_tokens, bool) or probe_tokens < 1:
            raise ValueError(f"probe_tokens={probe_tokens!r} must be a positive integer")
        self.suffix_window, self.beyond_window, self.freeze = suffix_window, beyond_window, freeze
        self.refresh_every, self.refresh_drift, self.probe_tokens = refresh_every, refresh_drift, probe_tokens
        self.flashdlm = flashdlm

    def __repr__(self) -> str:
        if self.flashdlm:
            return f"FreeCache(flashdlm=True{self._compression_repr()})"
        return (
            f"FreeCache(suffix_window={self.suffix_window}, beyond_window={self.beyond_window!r}, "
            f"refresh_every={self.refresh_every}, freeze={self.freeze!r}, refresh_drift={self.refresh_drift}"
            f"{self._compression_repr()})"
        )

    def default_refresh_prompt(self) -> bool | None:
        # (KVReuseCache.__init__ calls this, before FreeCache's own options are set: hence `_periodic`.)
        if self.compression is not None:
            return False
        return True if self._periodic else None
