"""KV compression for vision-language GUI agents: GUI-KV, PrefixKV and a multi-turn screenshot
session over Qwen2-VL / Qwen2.5-VL that reuses and compresses the KV cache across turns."""

from .agent import GUIAgentSession, TurnStats
from .guikv import GUIKV, screenshot_tags
from .prefixkv import PrefixKV, PrefixKVBudget, PrefixKVProfile, PrefixKVScore, calibrate, prefix_keep_counts

__all__ = [
    "GUIKV",
    "GUIAgentSession",
    "PrefixKV",
    "PrefixKVBudget",
    "PrefixKVProfile",
    "PrefixKVScore",
    "TurnStats",
    "calibrate",
    "prefix_keep_counts",
    "screenshot_tags",
]
