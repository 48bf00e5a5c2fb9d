"""The KV-compression methods of a GUI-agent session by name (what the demo and the benchmark offer)."""

from __future__ import annotations

from dlmcache.kernels.policies import SnapKV, StreamingLLM

from .guikv import GUIKV
from .prefixkv import PrefixKV, calibrate

METHODS = ("GUI-KV", "PrefixKV", "SnapKV", "StreamingLLM")


def session_compression(method: str, budget: float, model=None, processor=None, calibration=None) -> dict:
    """`GUIAgentSession` keyword arguments for `method` keeping `budget` of the KV: GUI-KV and the
    generic SnapKV (last 8 queries as its window, as GUI-KV's own) and StreamingLLM take the budget as
    is; PrefixKV is calibrated first on `calibration` (a list of chats with screenshots) with `model`
    and `processor`."""
    if method == "GUI-KV":
        return {"compression": GUIKV(budget=budget)}
    if method == "SnapKV":
        return {"compression": SnapKV(window=8), "budget": budget}
    if method == "StreamingLLM":
        return {"compression": StreamingLLM(), "budget": budget}
    if method == "PrefixKV":
        if model is None or processor is None or not calibration:
            raise ValueError("PrefixKV is calibrated first: pass model, processor and calibration chats")
        return {"compression": PrefixKV(calibrate(model, processor, calibration, budget=budget))}
    raise ValueError(f"unknown method {method!r}: expected one of {METHODS}")
