"""Decoding configurations written as short strings, shared by the benchmark and evaluation scripts.

none                               no cache, the pipeline's scheduler
freecache                          FreeCache with its defaults
freecache:suffix_window=0          cache options after a colon (k=v, comma separated)
dual+threshold=0.9                 "+" adds parts: here the threshold scheduler at 0.9
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .cache import CACHES
from .schedulers import DLMScheduler, ThresholdScheduler


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


@dataclass
class RunConfig:
    """One decoding configuration: a cache with options and optionally a scheduler override."""

    name: str
    cache: str = "none"
    cache_options: dict = field(default_factory=dict)
    threshold: float | None = None

    @classmethod
    def parse(cls, text: str) -> RunConfig:
        cfg = cls(name=text)
        for part in text.split("+"):
            head, _, opts = part.partition(":")
            key, _, val = head.partition("=")
            if key in CACHES and not val:
                cfg.cache = key
                for item in filter(None, opts.split(",")):
                    k, eq, v = item.partition("=")
                    if not eq:
                        raise ValueError(f"config {text!r}: cache option {item!r} is not k=v")
                    cfg.cache_options[k] = _value(v)
            elif key == "threshold" and val:
                cfg.threshold = float(val)
            else:
                raise ValueError(
                    f"config {text!r}: unknown part {part!r} (expected a cache {sorted(CACHES)}, "
                    "'CACHE:k=v,...' or 'threshold=T')"
                )
        return cfg

    def scheduler(self, default: DLMScheduler) -> DLMScheduler:
        return default if self.threshold is None else ThresholdScheduler(threshold=self.threshold)

    def apply(self, pipe, default_scheduler: DLMScheduler) -> None:
        """Set the pipeline's cache and scheduler for this configuration."""
        pipe.set_cache(self.cache, **self.cache_options)
        pipe.scheduler = self.scheduler(default_scheduler)
