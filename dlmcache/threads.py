"""How many CPU threads a forward uses, chosen from its work.

A small forward is bound by dispatch, not arithmetic: splitting its matmuls over cores buys little
and costs the other work of the process (a server's event loop, its clients) a core. A large one is
bound by arithmetic and scales with cores. `ThreadPolicy("auto")` gives each forward one thread per
`gflop_per_thread` GFLOP of its work (2 x parameters x fed tokens), between 1 and `max_threads`;
the crossover is measured in docs/results.md (`scripts/bench_serve.py --threads`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

#: GFLOP of a forward per thread it gets under "auto" (measured: docs/results.md, serving threads).
DEFAULT_GFLOP_PER_THREAD = 1.0


@dataclass
class ThreadPolicy:
    """threads: a count (every forward), None (torch's default, left as it is) or "auto" (per forward,
    from its FLOPs); gflop_per_thread and max_threads (default: the cores this process may use) shape
    "auto". The CLI also sets OMP_WAIT_POLICY=PASSIVE before torch starts, so idle OpenMP threads sleep
    instead of spinning."""

    threads: int | str | None = "auto"
    gflop_per_thread: float = DEFAULT_GFLOP_PER_THREAD
    max_threads: int | None = None

    def __post_init__(self):
        t = self.threads
        if t is not None and t != "auto" and (not isinstance(t, int) or isinstance(t, bool) or t < 1):
            raise ValueError(f"threads={t!r} must be None, 'auto' or a positive integer")
        g = self.gflop_per_thread
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0:
            raise ValueError(f"gflop_per_thread={g!r} must be a positive number")
        m = self.max_threads
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
            raise ValueError(f"max_threads={m!r} must be None or a positive integer")

    @property
    def cores(self) -> int:
        if self.max_threads is not None:
            return self.max_threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def for_flops(self, flops: float) -> int | None:
        """The threads of a forward of `flops` (None: leave torch's setting)."""
        if self.threads is None or isinstance(self.threads, int):
            return self.threads
        return max(1, min(self.cores, int(flops / (self.gflop_per_thread * 1e9))))

    def apply(self, flops: float = 0.0) -> None:
        """Set torch's intra-op threads for a forward of `flops`."""
        n = self.for_flops(flops)
        if n is not None and n != torch.get_num_threads():
            torch.set_num_threads(n)
