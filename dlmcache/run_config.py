"""Decoding configurations written as short strings, shared by the benchmark and evaluation scripts.

none                               no cache, the pipeline's scheduler
freecache                          FreeCache with its defaults
freecache:suffix_window=0          cache options after a colon (k=v, comma separated)
dual+threshold=0.9                 "+" adds parts: here the threshold scheduler at 0.9
freecache+edit_threshold=0.9       LLaDA2.1's token editing (block diffusion; threshold 0.95 unless given)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .cache import CACHES, make_cache
from .schedulers import ThresholdScheduler, TokenEditingScheduler


def split_configs(text: str) -> list[str]:
    """A list of configs written as one string: separated by ';', or by ',' when there is no ';'
    (options inside a config are comma separated, so lists with options need ';')."""
    return [c.strip() for c in text.split(";" if ";" in text else ",") if c.strip()]


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def _options(text: str, opts: str) -> dict:
    out = {}
    for item in filter(None, opts.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"config {text!r}: option {item!r} is not k=v")
        out[k] = _value(v)
    return out


@dataclass
class RunConfig:
    """One decoding configuration: a cache with options and optionally a scheduler override."""

    name: str
    cache: str = "none"
    cache_options: dict = field(default_factory=dict)
    threshold: float | None = None
    edit_threshold: float | None = None
    guide: str | None = None
    guide_options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> RunConfig:
        cfg = cls(name=text)
        for part in text.split("+"):
            head, _, opts = part.partition(":")
            key, _, val = head.partition("=")
            if key in CACHES and not val:
                cfg.cache = key
                cfg.cache_options = _options(text, opts)
            elif key == "threshold" and val:
                cfg.threshold = float(val)
            elif key == "edit_threshold" and val:
                cfg.edit_threshold = float(val)
            elif key == "guide" and val and not opts:
                cfg.guide = val
            elif key == "guide" and not val and opts:
                cfg.guide_options = _options(text, opts)
                cfg.guide = cfg.guide_options.pop("path", None)
                if cfg.guide is None:
                    raise ValueError(f"config {text!r}: guide options need path=...")
            else:
                raise ValueError(
                    f"config {text!r}: unknown part {part!r} (expected a cache {sorted(CACHES)}, "
                    "'CACHE:k=v,...', 'threshold=T', 'edit_threshold=E', 'guide=PATH' or "
                    "'guide:path=PATH,k=v,...')"
                )
        return cfg

    def validate(self) -> None:
        """Build what can be built without a model (the cache, the threshold scheduler) and check the
        guide's options, so a bad option fails before any decoding."""
        from .guidance import check_guide_options

        make_cache(self.cache, **self.cache_options)
        self.scheduler()
        check_guide_options(**self.guide_options)

    def scheduler(self):
        """The scheduler this configuration asks for, or None for the pipeline's own: the threshold
        rule, or with `edit_threshold` LLaDA2.1's token editing (at `threshold`, else its 0.95)."""
        if self.edit_threshold is not None:
            kw = {} if self.threshold is None else {"threshold": self.threshold}
            return TokenEditingScheduler(edit_threshold=self.edit_threshold, **kw)
        return None if self.threshold is None else ThresholdScheduler(threshold=self.threshold)

    def apply(self, pipe, load_guide=None) -> None:
        """Set the pipeline's cache, scheduler and guide for this configuration (the pipeline's own
        scheduler unless a threshold or an edit threshold is given; no guide unless one is).
        `load_guide(name, options)` may turn special guide names into `ARGuide`s (scripts use it for
        cached loading)."""
        pipe.set_cache(self.cache, **self.cache_options)
        pipe.set_scheduler(self.scheduler())
        if self.guide is None:
            pipe.set_guide(None)
        elif load_guide is not None:
            pipe.set_guide(load_guide(self.guide, self.guide_options))
        else:
            pipe.set_guide(self.guide, **self.guide_options)
