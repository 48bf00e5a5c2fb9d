"""The two rules a denoising cache is made of, each small and testable on its own.

Freeze rules decide what a cached step feeds (everything else is read from the cache):
- `BlockFreeze`: the active block whole, plus `suffix_window` later positions (all by default), from
  the frozen boundary: a block's KV is final once the block is finished.
- `TokenFreeze`: only the positions whose KV is not final yet: the still-masked ones in the window,
  and each committed token once more after its commit (its KV was computed while it was masked).

Refresh rules decide when a step recomputes instead (a `Refresh` of every row or of some rows):
- `RefreshNever`: only the first forward (FlashDLM's FreeCache);
- `RefreshEvery(k)`: every k steps (k = 1: the cache-free computation, bit for bit);
- `RefreshOnDrift(threshold, probe_tokens, every)`: a row refreshes when the frozen KV it reads has
  drifted (and every row every `every` steps, if given).

Each rule keeps the state of one generation: a cache builds fresh ones in `prepare`.
"""

from __future__ import annotations

import torch

from .plans import Scatter, Window, fed_positions


def window_bounds(end: int, length: int, suffix_window: int | None, beyond_window: str) -> tuple[int, int]:
    """(window_end, attend_end): positions up to window_end are recomputed (the block ending at `end`
    and `suffix_window` more; all when None); positions up to attend_end are attended ("cache": every
    later position's cached KV too, "drop": nothing after the window)."""
    window_end = length if suffix_window is None else min(length, end + suffix_window)
    return window_end, length if beyond_window == "cache" else window_end


class BlockFreeze:
    """Feed the active block (and its suffix window) from the frozen boundary. `delay=True` (ours)
    feeds a finished block once more on the first step of the next block, so the tokens its last
    step committed get KV computed with their final values; `delay=False` freezes the block's KV as
    its last forward left it (FlashDLM's FreeCache, whose last-step tokens keep masked-token KV)."""

    def __init__(self, suffix_window: int | None = None, beyond_window: str = "cache", delay: bool = True):
        self.suffix_window, self.beyond_window, self.delay = suffix_window, beyond_window, delay

    def start(self, layout, shift: int, first: int) -> None:
        """A new generation; positions before `first` (the prompt, when it is stored compressed) are
        never fed."""
        self.layout, self.shift, self.frozen_end = layout, shift, first

    def refreshed(self, canvas: torch.LongTensor, start: int, rows=None) -> None:
        """Every position of `rows` (None: all) was just recomputed at a step of the block starting at
        `start`: for the whole batch, everything before the block is final."""
        if rows is None:
            self.frozen_end = max(self.frozen_end, start)

    def plan(self, canvas: torch.LongTensor, targets: torch.LongTensor, start: int, end: int) -> Window:
        if not self.delay:
            self.frozen_end = max(self.frozen_end, start)
        window_end, attend_end = window_bounds(end, self.layout.length, self.suffix_window, self.beyond_window)
        plan = Window(min(self.frozen_end, start - self.shift), window_end, attend_end)
        # Every position before the active block is final once this forward has run.
        self.frozen_end = max(self.frozen_end, start)
        return plan


class TokenFreeze:
    """Feed every window position whose KV is not final in some row (plus each target's predecessor
    for Dream's shifted logits); each row stores only what it needs, and the committed positions it
    stored become final. The batch feeds the union of its rows' positions, each row writing its own,
    so a batch decodes exactly like its rows one by one."""

    def __init__(self, suffix_window: int | None = None, beyond_window: str = "cache"):
        self.suffix_window, self.beyond_window = suffix_window, beyond_window

    def start(self, layout, shift: int, first: int) -> None:
        self.layout, self.shift, self.first = layout, shift, first
        self.final = None  # [B, L] the KV of this position is final in this row

    def refreshed(self, canvas: torch.LongTensor, start: int, rows=None) -> None:
        """Every position of `rows` (None: all) was just recomputed: the committed ones are final."""
        done = canvas != self.layout.mask_token_id
        done[:, : self.first] = True
        if rows is None:
            self.final = done
        else:
            self.final[rows] = done[rows]

    def plan(self, canvas: torch.LongTensor, targets: torch.LongTensor, start: int, end: int) -> Scatter:
        window_end, attend_end = window_bounds(end, self.layout.length, self.suffix_window, self.beyond_window)
        need = ~self.final
        need[:, window_end:] = False
        masked = canvas[:, targets] == self.layout.mask_token_id  # [B, T]: what each row predicts
        need[:, targets] |= masked
        need[:, targets - self.shift] |= masked
        index = need.any(0).nonzero().flatten()
        self.final |= need & (canvas != self.layout.mask_token_id)
        return Scatter(index, need[:, index], attend_end)


class RefreshNever:
    """The first forward computes everything; nothing is ever recomputed."""

    def start(self, batch: int, device) -> None:
        self.step = 0

    def due(self) -> bool | torch.BoolTensor:
        """Whether this step is a refresh: True (every row), False, or the rows [B] that refresh."""
        due = self.step == 0
        self.step += 1
        return due


class RefreshEvery(RefreshNever):
    """A refresh every `k` steps (and at the first)."""

    def __init__(self, k: int):
        self.k = k

    def due(self):
        due = self.step % self.k == 0
        self.step += 1
        return due


class RefreshOnDrift(RefreshNever):
    """Refresh a row when its frozen KV has drifted (after Elastic-Cache's drift test, arXiv
    2510.14973; the design here is ours), and the whole batch every `every` steps if given. Each cached
    step also feeds, per row, the `probe_tokens` cached positions closest before its first fed one
    whose tokens were already committed at the row's last refresh: their inputs did not change, like
    every frozen token's, so how far their fresh last-layer values moved from the values of that
    refresh (the largest cosine distance over heads and probes) is the frozen KV's own drift, measured
    where the newly committed tokens act most. A row whose drift exceeds `threshold` refreshes at the
    next step, in a forward of its own rows."""

    def __init__(self, threshold: float, probe_tokens: int = 4, every: int | None = None):
        self.threshold, self.probe_tokens, self.every = threshold, probe_tokens, every

    def start(self, batch: int, device) -> None:
        super().start(batch, device)
        self.stale = torch.zeros(batch, dtype=torch.bool, device=device)  # refresh these rows now
        self.reference = None  # [B, H, L, D] last-layer values at each row's last refresh
        self.refreshed_tokens = None  # [B, L] each row's canvas at its last refresh
        self.refreshing = torch.zeros(batch, dtype=torch.bool, device=device)
        self.drift = torch.zeros(batch, device=device)
        self.probe = None
        self.drift_refreshes = 0  # row refreshes this rule called for (not counting the first or periodic ones)

    def due(self):
        step = self.step
        self.step += 1
        self.refreshing.zero_()
        self.drift.zero_()
        if step == 0 or (self.every and step % self.every == 0):
            return True
        self.drift_refreshes += int(self.stale.sum())
        return True if bool(self.stale.all()) else self.stale.clone()

    def add_probes(self, plan: Window | Scatter, canvas: torch.LongTensor, layout, stale) -> Scatter:
        """The cached plan with each non-stale row's probes added (a row stores its own probes' fresh
        KV, as any fed position's, unless they lie in a compressed prompt)."""
        length, device = layout.length, canvas.device
        fed = fed_positions(plan, device)
        write = torch.zeros(len(canvas), length, dtype=torch.bool, device=device)
        write[:, fed] = True if not isinstance(plan, Scatter) or plan.write is None else plan.write
        row_first = torch.where(write.any(-1), write.int().argmax(-1), 0)
        ready = (self.refreshed_tokens != layout.mask_token_id) & layout.key_mask
        ready &= torch.arange(length, device=device) < row_first[:, None]
        rank = ready.flip(-1).cumsum(-1).flip(-1)  # 1 at the last ready position, 2 before it, ...
        probe = ready & (rank <= self.probe_tokens) & ~stale[:, None]
        write |= probe
        index = write.any(0).nonzero().flatten()
        self.probe = (index, probe[:, index])
        return Scatter(index, write[:, index], plan.attend_end)

    def observe(self, refresh: bool, rows, fed: torch.LongTensor, values: torch.Tensor, canvas: torch.LongTensor):
        """After each forward: `values` [R, H, n, D] the last layer's fresh values at positions `fed`
        of `rows` (None: all). A refresh records them as the rows' reference; the cached plan's
        probes give each row's drift."""
        if refresh:
            if self.reference is None:
                _, h, _, d = values.shape
                shape = (canvas.shape[0], h, canvas.shape[1], d)
                self.reference, self.refreshed_tokens = values.new_zeros(shape), canvas.clone()
            rows = torch.arange(len(canvas), device=canvas.device) if rows is None else rows
            self.reference[rows[:, None], :, fed[None, :]] = values.transpose(1, 2)
            self.refreshed_tokens[rows] = canvas[rows]
            self.refreshing[rows] = True
        elif self.probe is not None:
            index, probe = self.probe
            cos = torch.nn.functional.cosine_similarity(values.float(), self.reference[:, :, index].float(), dim=-1)
            self.drift = (1 - cos).amax(1).masked_fill(~probe, 0).amax(-1)  # cos: [B, H, n]
            self.probe = None

    def end_step(self) -> None:
        """After the step's forwards: the rows that drifted refresh at the next step."""
        self.stale = (self.drift > self.threshold) & ~self.refreshing
