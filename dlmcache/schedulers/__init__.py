"""Unmasking schedulers: which masked positions to commit at each denoising step."""

from .base import DLMScheduler, DLMSchedulerOutput, StepContext, select_topk, transfer_quota
from .dream import DreamScheduler
from .editing import TokenEditingScheduler
from .guided import GuidedScheduler
from .low_confidence import LowConfidenceScheduler
from .threshold import ThresholdScheduler

__all__ = [
    "DLMScheduler",
    "DLMSchedulerOutput",
    "DreamScheduler",
    "GuidedScheduler",
    "LowConfidenceScheduler",
    "StepContext",
    "ThresholdScheduler",
    "TokenEditingScheduler",
    "select_topk",
    "transfer_quota",
]
