"""FreeCache (Hu et al., "FlashDLM", arXiv 2505.21467): freeze what is finished, recompute the rest."""

from __future__ import annotations

from .reuse import KVReuseCache, Plan


class FreeCache(KVReuseCache):
    """`cache="freecache"`: the prompt's KV is computed once and frozen; a block's KV is frozen once the
    block is finished; each step feeds only the active window: the current block plus `suffix_window`
    later positions (all of them by default).

    Options:
      suffix_window: later (masked) positions recomputed with the block each step; None = all.
      beyond_window: what the model sees of positions after the window: "cache" (their last computed
        KV, as DualCache reuses the suffix) or "drop" (not attended, as the FlashDLM code does).
      refresh_every: a full forward every k steps (None = only the first step). k=1 is the no-cache
        reference, bit for bit.
      freeze: "block" (default): the active block is fed whole until it is finished; "token": only the
        positions whose KV is not final yet are fed: the still-masked ones in the window, and the
        tokens committed since they were last fed (their KV was computed while they were masked),
        once; a token's KV freezes after one forward with its final value. The batch feeds the union
        of its rows' positions, but each row stores only its own, so a batch decodes exactly like its
        rows one by one.

    Freezing is delayed by one step: a block's last step commits tokens whose KV was computed while
    they were still masked, so the next step feeds the finished block once more (FlashDLM freezes the
    KV of that last forward, keeping those stale entries for the rest of the generation).
    """

    name = "freecache"

    def __init__(
        self,
        suffix_window: int | None = None,
        beyond_window: str = "cache",
        refresh_every: int | None = None,
        freeze: str = "block",
    ):
        super().__init__()
        if suffix_window is not None and (not isinstance(suffix_window, int) or suffix_window < 0):
            raise ValueError(f"suffix_window={suffix_window!r} must be None (all) or an integer >= 0")
        if beyond_window not in ("cache", "drop"):
            raise ValueError(f"beyond_window={beyond_window!r}: expected 'cache' or 'drop'")
        if refresh_every is not None and (not isinstance(refresh_every, int) or refresh_every < 1):
            raise ValueError(f"refresh_every={refresh_every!r} must be None or an integer >= 1")
        if freeze not in ("block", "token"):
            raise ValueError(f"freeze={freeze!r}: expected 'block' or 'token'")
        self.freeze = freeze
        self.suffix_window = suffix_window
        self.beyond_window = beyond_window
        self.refresh_every = refresh_every

    def __repr__(self) -> str:
        return (
            f"FreeCache(suffix_window={self.suffix_window}, beyond_window={self.beyond_window!r}, "
            f"refresh_every={self.refresh_every}, freeze={self.freeze!r})"
        )

    def prepare(self, model, layout) -> None:
        super().prepare(model, layout)
        self.frozen_end = 0  # positions before it hold final KV
        self.final = None  # [B, L] token freezing: the KV of this position is final in this row

    def _plan(self, targets, start, end):
        length = self.layout.length
        if self.step == 0 or (self.refresh_every and self.step % self.refresh_every == 0):
            plan = Plan(full=True)
            if self.freeze == "token":
                self.final = self.canvas != self.layout.mask_token_id
        elif self.freeze == "token":
            plan = self._token_plan(targets, end, length)
        else:
            window_end, attend_end = self._window(end, length)
            plan = Plan(
                full=False, start=min(self.frozen_end, start - self.shift), end=window_end, attend_end=attend_end
            )
        # Every token before the active block is final, and this forward computes all of them that
        # are not frozen yet: after it they are.
        self.frozen_end = start
        return plan

    def _window(self, end: int, length: int) -> tuple[int, int]:
        """(window_end, attend_end): positions up to window_end are recomputed (the block ending at
        `end` and `suffix_window` more); up to attend_end are attended."""
        window_end = length if self.suffix_window is None else min(length, end + self.suffix_window)
        return window_end, length if self.beyond_window == "cache" else window_end

    def _token_plan(self, targets, end: int, length: int) -> Plan:
        """Feed every position in the window whose KV is not final in some row (plus each target's
        predecessor for Dream's shifted logits); each row stores only what it needs, and the committed
        positions it stored become final."""
        window_end, attend_end = self._window(end, length)
        need = ~self.final
        need[:, window_end:] = False
        masked = self.canvas[:, targets] == self.layout.mask_token_id  # [B, T]: what each row predicts
        need[:, targets] |= masked
        need[:, targets - self.shift] |= masked
        index = need.any(0).nonzero().flatten()
        write = need[:, index]
        self.final |= need & (self.canvas != self.layout.mask_token_id)
        return Plan(full=False, attend_end=attend_end, index=index, write=write)
