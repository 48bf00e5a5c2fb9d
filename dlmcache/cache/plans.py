"""What one forward of a denoising step computes: three small plan types.

- `Refresh`: recompute the canvas (every row, or some `rows` in a forward of their own), attending
  exactly as a cache-free forward does; with a compressed prompt, `prompt=False` recomputes only the
  generation region against the compressed prompt instead of the whole prompt.
- `Window`: feed positions [start, end) and attend to [0, attend_end), the rest read from the cache.
- `Scatter`: feed the sorted positions `index` (the union of the rows' needs), each row storing the
  fresh KV only where `write` says (so a batch decodes like its rows one by one).

A freeze rule (`rules.BlockFreeze`, `rules.TokenFreeze`) makes the cached steps' plans; a refresh rule
(`rules.RefreshEvery`, `rules.RefreshOnDrift`, ...) decides when a `Refresh` replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Refresh:
    rows: torch.LongTensor | None = None  # None: every row
    prompt: bool | None = True  # recompute (and re-compress) the prompt too; None: each row's own scope


@dataclass(frozen=True)
class Window:
    start: int
    end: int
    attend_end: int

    def __post_init__(self):
        if not 0 <= self.start < self.end <= self.attend_end:
            raise ValueError(f"bad window: start={self.start}, end={self.end}, attend_end={self.attend_end}")


@dataclass(frozen=True)
class Scatter:
    index: torch.LongTensor  # [n] sorted canvas positions, shared by the batch
    write: torch.BoolTensor | None  # [B, n] which rows store each position's fresh KV (None: all)
    attend_end: int

    def __post_init__(self):
        index = self.index
        if (
            index.dim() != 1
            or index.numel() == 0
            or int(index[-1]) >= self.attend_end
            or bool((index.diff() <= 0).any())
        ):
            raise ValueError(
                f"bad fed positions: {index.tolist()} (sorted, non-empty, below attend_end={self.attend_end})"
            )


Plan = Refresh | Window | Scatter


def fed_positions(plan: Window | Scatter, device) -> torch.LongTensor:
    """The canvas positions a cached plan feeds, [n]."""
    if isinstance(plan, Scatter):
        return plan.index
    return torch.arange(plan.start, plan.end, device=device)
