"""Prometheus text exposition (format 0.0.4) of the engine's state and the server's counters."""

from __future__ import annotations

import bisect
import collections
import time

#: Request latency buckets, seconds.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """Counters kept by the HTTP side (requests, latency histogram, completion tokens, row forwards)
    and the engine's own (`EngineStats`), rendered on demand. tokens/s is over the last `window` s."""

    def __init__(self, engine, window: float = 30.0):
        self.engine, self.window = engine, window
        self.requests = self.rejected = self.failed = 0
        self.completion_tokens = 0
        self.row_forwards = 0  # forwards of finished requests, each counted for its own row
        self.latency_counts = [0] * (len(BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def observe(self, seconds: float, completion_tokens: int, stats: dict) -> None:
        """A finished request: its latency, completion tokens and the forwards it took."""
        self.latency_counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1
        self.completion_tokens += completion_tokens
        self.row_forwards += int(stats.get("forwards", 0))
        self._recent.append((time.monotonic(), completion_tokens))

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / self.window

    def render(self) -> str:
        e, s = self.engine, self.engine.stats
        lines = []

        def metric(name: str, kind: str, help_: str, value) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"])

        metric("dlmcache_queue_length", "gauge", "Requests waiting for a slot.", e.queued)
        metric("dlmcache_running_requests", "gauge", "Requests decoding (the running batch).", e.running)
        metric("dlmcache_draining", "gauge", "1 while the server drains for shutdown.", int(e.draining))
        metric("dlmcache_requests_total", "counter", "Requests accepted.", self.requests)
        metric("dlmcache_requests_rejected_total", "counter", "Requests refused with 429 (queue full).", self.rejected)
        metric("dlmcache_requests_failed_total", "counter", "Requests whose decoding failed.", self.failed)
        metric("dlmcache_completion_tokens_total", "counter", "Completion tokens (up to EOS) returned.",
               self.completion_tokens)  # fmt: skip
        rate = f"{self.tokens_per_second():.3f}"
        help_rate = f"Completion tokens per second over the last {self.window:g} s."
        metric("dlmcache_completion_tokens_per_second", "gauge", help_rate, rate)
        per_token = self.row_forwards / self.completion_tokens if self.completion_tokens else 0.0
        metric("dlmcache_forwards_per_token", "gauge", "Model forwards per completion token (per request row).",
               f"{per_token:.4f}")  # fmt: skip
        metric("dlmcache_batched_forwards_total", "counter", "Batched forwards the engine ran.", s.forwards)
        metric("dlmcache_forward_rows_total", "counter", "Request forwards carried by them.", s.forward_rows)
        metric("dlmcache_forward_tokens_total", "counter", "Tokens fed to them (no padding).", s.forward_tokens)
        metric("dlmcache_forward_seconds_total", "counter", "Seconds spent in batched forwards.",
               f"{s.forward_seconds:.6f}")  # fmt: skip
        name = "dlmcache_request_latency_seconds"
        lines += [f"# HELP {name} Request latency, from arrival to the last byte.", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip(BUCKETS + (float("inf"),), self.latency_counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        lines += [f"{name}_sum {self.latency_sum:.6f}", f"{name}_count {self.latency_count}"]
        return "\n".join(lines) + "\n"
