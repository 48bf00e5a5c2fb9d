"""KV compression policies: eviction scorers, budget allocators, quantizers, and a registry of all."""

from .base import BudgetAllocator, EvictionPolicy, QuantizationPolicy, ScoreInputs, resolve_budget
from .budget import CAKEBudget, D2OBudget, Pyramid, Uniform
from .eviction import H2O, TOVA, CAKEScore, KNorm, MaskKV, RandomEviction, SnapKV, StreamingLLM
from .heads import AdaKV, DuoAttention, HeadKV, ragged_topk
from .merge import D2O, EMS, KVCrush, merge_into_nearest
from .patterns import FastGen, LaCache
from .quant import GEAR, KIVI, MiKV
from .recall import RECALL, ClusterKV, EpiCache, RecallPolicy, RetrievalAttention, SentenceKV
from .storage import MiniCache, ThinK

EVICTION = (
    StreamingLLM, KNorm, RandomEviction, SnapKV, H2O, TOVA, CAKEScore, MaskKV, D2O, EMS, KVCrush, LaCache, AdaKV,
    HeadKV, DuoAttention, FastGen,
)  # fmt: skip
BUDGETS = (Uniform, Pyramid, CAKEBudget, D2OBudget)
STORAGE = (KIVI, MiKV, GEAR, ThinK, MiniCache)
REGISTRY = {cls.name: cls for cls in EVICTION + RECALL + BUDGETS + STORAGE}


def get_policy(name: str, **kwargs):
    """A policy from the registry by name."""
    if name not in REGISTRY:
        raise ValueError(f"unknown policy {name!r}: expected one of {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)


__all__ = [
    "D2OBudget",
    "FastGen",
    "LaCache",
    "MiniCache",
    "RECALL",
    "ClusterKV",
    "EpiCache",
    "RecallPolicy",
    "RetrievalAttention",
    "SentenceKV",
    "BUDGETS",
    "EVICTION",
    "STORAGE",
    "AdaKV",
    "D2O",
    "GEAR",
    "MiKV",
    "ThinK",
    "DuoAttention",
    "EMS",
    "KVCrush",
    "merge_into_nearest",
    "HeadKV",
    "ragged_topk",
    "H2O",
    "KIVI",
    "REGISTRY",
    "TOVA",
    "BudgetAllocator",
    "CAKEBudget",
    "CAKEScore",
    "EvictionPolicy",
    "KNorm",
    "MaskKV",
    "Pyramid",
    "QuantizationPolicy",
    "RandomEviction",
    "ScoreInputs",
    "SnapKV",
    "StreamingLLM",
    "Uniform",
    "get_policy",
    "resolve_budget",
]
