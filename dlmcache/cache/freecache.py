"""FreeCache (Hu et al., "FlashDLM", arXiv 2505.21467): freeze what is finished, recompute the rest."""

from __future__ import annotations

import torch

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
      refresh_drift: refresh a row's KV when its frozen KV has drifted (None = never; default 0.02,
        see below). Each cached step also feeds, per row, the `probe_tokens` frozen positions closest
        before the window whose tokens were already committed at the row's last refresh, and measures
        the largest cosine distance (over heads and probes) between their fresh last-layer values and
        those of that refresh. Their inputs did not change, like every frozen token's, so their drift
        is the frozen KV's own, measured where the newly committed tokens act most. When it exceeds
        `refresh_drift`, the row's next step is a full recompute. (The drift test follows
        Elastic-Cache, arXiv 2510.14973, which probes the most-attended token and finds drift largest
        in the last layers; the nearest committed tokens stand in for the most-attended one, which
        would need the attention weights.) Rows refresh independently, in a forward of their own,
        so a batch decodes exactly like its rows one by one.
      probe_tokens: frozen positions probed per step and row (default 4).

    Freezing is delayed by one step: a block's last step commits tokens whose KV was computed while
    they were still masked, so the next step feeds the finished block once more (FlashDLM freezes the
    KV of that last forward, keeping those stale entries for the rest of the generation).

    With `refresh_drift=None`, the prompt's KV is that of the first step, computed while the whole
    answer was masked (the FlashDLM algorithm); the drift test exists to refresh it when that matters.
    What each choice costs in accuracy and time is measured in docs/results.md.
    """

    name = "freecache"

    def __init__(
        self,
        suffix_window: int | None = None,
        beyond_window: str = "cache",
        refresh_every: int | None = None,
        freeze: str = "block",
        refresh_drift: float | None = 0.02,
        probe_tokens: int = 4,
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
        if refresh_drift is not None and (isinstance(refresh_drift, bool) or not 0 < refresh_drift < 2):
            raise ValueError(f"refresh_drift={refresh_drift!r} must be None or a cosine distance in (0, 2)")
        if not isinstance(probe_tokens, int) or isinstance(probe_tokens, bool) or probe_tokens < 1:
            raise ValueError(f"probe_tokens={probe_tokens!r} must be a positive integer")
        self.freeze = freeze
        self.refresh_drift = refresh_drift
        self.probe_tokens = probe_tokens
        self.suffix_window = suffix_window
        self.beyond_window = beyond_window
        self.refresh_every = refresh_every

    def __repr__(self) -> str:
        return (
            f"FreeCache(suffix_window={self.suffix_window}, beyond_window={self.beyond_window!r}, "
            f"refresh_every={self.refresh_every}, freeze={self.freeze!r}, refresh_drift={self.refresh_drift})"
        )

    def prepare(self, model, layout) -> None:
        super().prepare(model, layout)
        batch = layout.key_mask.shape[0]
        self.frozen_end = 0  # positions before it hold final KV
        self.final = None  # [B, L] token freezing: the KV of this position is final in this row
        self.stale = torch.zeros(batch, dtype=torch.bool, device=layout.key_mask.device)  # refresh these rows now
        self.refreshed_tokens = None  # [B, L]: each row's canvas at its last refresh
        self.stats.extra["drift_refreshes"] = 0  # row refreshes triggered by the drift test

    def _logits(self, x, targets, start, end):
        logits = super()._logits(x, targets, start, end)
        if self.refresh_drift is None:
            return logits
        refreshing = self.refreshing
        if refreshing.any():  # the reference the drift of the following steps is measured against
            if self.kv.reference is None:
                self.kv.reference, self.refreshed_tokens = torch.empty_like(self.kv.v[-1]), x.clone()
            self.kv.reference[refreshing] = self.kv.v[-1][refreshing]
            self.refreshed_tokens[refreshing] = x[refreshing]
        drift = self.kv.drift if self.kv.drift is not None else torch.zeros(len(x), device=x.device)
        self.stale = (drift > self.refresh_drift) & ~refreshing
        self.kv.probe = self.kv.drift = None
        return logits

    def _plan(self, targets, start, end):
        self.refreshing = torch.zeros_like(self.stale)
        if self.step == 0 or (self.refresh_every and self.step % self.refresh_every == 0):
            plans = Plan(full=True)
            self.refreshing[:] = True
            if self.freeze == "token":
                self.final = self.canvas != self.layout.mask_token_id
        elif self.refresh_drift is None:
            plans = self._cached_plan(targets, start, end)
        else:
            plans = self._drift_plans(targets, start, end)
        # Every token before the active block is final, and this forward computes all of them that
        # are not frozen yet: after it they are.
        self.frozen_end = start
        return plans

    def _drift_plans(self, targets, start, end) -> Plan | list[Plan]:
        """The cached plan with each row's probes added (a row stores its own probes' fresh KV, as any
        fed position's) while the buffer measures the drift; the rows whose KV drifted at the last
        step then refresh in a full forward of their own."""
        stale, device, length = self.stale, self.canvas.device, self.layout.length
        cached = self._cached_plan(targets, start, end)
        self.refreshing = stale.clone()
        self.stats.extra["drift_refreshes"] += int(stale.sum())
        if self.freeze == "token":
            self.final[stale] = self.canvas[stale] != self.layout.mask_token_id
        if stale.all():
            return Plan(full=True)
        fed = cached.index if cached.index is not None else torch.arange(cached.start, cached.end, device=device)
        write = torch.zeros(len(stale), length, dtype=torch.bool, device=device)
        write[:, fed] = True if cached.write is None else cached.write
        # Per row, the last `probe_tokens` positions before its first fed one that were committed at
        # its last refresh.
        first = torch.where(write.any(-1), write.int().argmax(-1), 0)
        ready = (self.refreshed_tokens != self.layout.mask_token_id) & self.layout.key_mask
        ready &= torch.arange(length, device=device) < first[:, None]
        rank = ready.flip(-1).cumsum(-1).flip(-1)  # 1 at the last ready position, 2 before it, ...
        probe = ready & (rank <= self.probe_tokens) & ~stale[:, None]
        write |= probe
        index = write.any(0).nonzero().flatten()
        self.kv.probe = probe[:, index]
        plan = Plan(full=False, attend_end=cached.attend_end, index=index, write=write[:, index])
        if not stale.any():
            return plan
        # The stale rows run the cached plan too (cheaper than splitting the buffer), then their full
        # forward rewrites all of their KV and gives their logits.
        return [plan, Plan(full=True, rows=stale.nonzero().flatten())]

    def _cached_plan(self, targets, start, end) -> Plan:
        length = self.layout.length
        if self.freeze == "token":
            return self._token_plan(targets, end, length)
        window_end, attend_end = self._window(end, length)
        return Plan(full=False, start=min(self.frozen_end, start - self.shift), end=window_end, attend_end=attend_end)

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
