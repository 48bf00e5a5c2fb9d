"""dlmcache: fast diffusion language models (LLaDA, Dream) with KV reuse across denoising steps."""

from .cache import CACHES, DenoisingCache, make_cache
from .models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM
from .pipeline import DLMPipeline, DLMPipelineOutput
from .schedulers import DLMScheduler, DreamScheduler, LowConfidenceScheduler, ThresholdScheduler

__version__ = "0.1.0"

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
    "make_cache",
]
