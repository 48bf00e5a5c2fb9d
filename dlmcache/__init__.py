"""dlmcache: fast diffusion language models (LLaDA, Dream) with KV reuse across denoising steps.

Subpackages: `dlmcache.kernels` (Triton ops with torch references, KV compression policies) and
`dlmcache.vlm` (GUI-KV / PrefixKV for vision-language agents) live in the repository's top-level
`kernels/` and `vlm/` folders. The names below are imported on first use, so `import
dlmcache.kernels` does not load diffusers or the diffusion-LM stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "CACHES": ".cache",
    "DenoisingCache": ".cache",
    "make_cache": ".cache",
    "DreamConfig": ".models",
    "DreamModel": ".models",
    "LLaDAConfig": ".models",
    "LLaDAModelLM": ".models",
    "DLMPipeline": ".pipeline",
    "DLMPipelineOutput": ".pipeline",
    "DLMScheduler": ".schedulers",
    "DreamScheduler": ".schedulers",
    "LowConfidenceScheduler": ".schedulers",
    "ThresholdScheduler": ".schedulers",
    "TokenEditingScheduler": ".schedulers",
}

__all__ = [
    "CACHES",
    "DLMPipeline",
    "DLMPipelineOutput",
    "DLMScheduler",
    "DenoisingCache",
    "DreamConfig",
    "DreamModel",
    "DreamScheduler",
    "LLaDAConfig",
    "LLaDAModelLM",
    "LowConfidenceScheduler",
    "ThresholdScheduler",
    "TokenEditingScheduler",
    "make_cache",
]

if TYPE_CHECKING:
    from .cache import CACHES, DenoisingCache, make_cache
    from .models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM
    from .pipeline import DLMPipeline, DLMPipelineOutput
    from .schedulers import (
        DLMScheduler,
        DreamScheduler,
        LowConfidenceScheduler,
        ThresholdScheduler,
        TokenEditingScheduler,
    )


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dlmcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
