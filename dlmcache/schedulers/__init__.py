"""Unmasking schedulers: which masked positions to commit at each denoising step."""

from .base import DLMScheduler, DLMSchedulerOutput, select_topk, transfer_quota
from .dream import DreamScheduler
from .low_confidence import LowConfidenceScheduler
from .threshold import ThresholdScheduler

__all__ = [
    "DLMScheduler",
    "DLMSchedulerOutput",
    "DreamScheduler",
    "LowConfidenceScheduler",
    "ThresholdScheduler",
    "select_topk",
    "transfer_quota",
]
