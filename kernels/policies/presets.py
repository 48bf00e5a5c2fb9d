"""Compression settings by name at a byte budget: what `CompressedCache(**settings)` needs so the
cache holds about `fraction` of the bytes of a full 16-bit cache of the same context. Eviction
spends the budget on tokens, quantization on bits, combinations on both:

- any eviction policy of the registry ("snapkv", "h2o", ...): that policy with its defaults,
  keeping `fraction` of the tokens;
- "pyramidkv", "cake", "d2o": SnapKV / CAKE / D2O with their papers' layer budgets (PyramidKV's
  decay, CAKE's and D2O's cascades); "h2o_mean": H2O ranking by each key's mean received attention
  (kvpress's ObservedAttention rule);
- "kivi": KIVI at the largest bit width that fits (8, 4 or 2; codes plus a 16-bit scale and zero per
  32 entries); "mikv": MiKV with the share of 16-bit tokens the bytes allow (the rest at 2 bits);
  "gear": GEAR 4-bit, or 2-bit, whichever fits with its low-rank and outlier overhead;
- "POLICY+intB": "more tokens, lower precision" (arXiv 2412.12706): evict with POLICY to the token
  count that B-bit KIVI storage affords, then quantize what is kept.

`at_bytes` returns None where a recipe does not apply (too few bits for the budget, or every token
already fits).
"""

from __future__ import annotations

from . import REGISTRY
from .budget import CAKEBudget, D2OBudget, Pyramid
from .eviction import H2O, CAKEScore, SnapKV
from .merge import D2O
from .quant import GEAR, KIVI, MiKV

_RECIPES = {
    "pyramidkv": lambda frac: {"policy": SnapKV(), "budget": frac, "allocator": Pyramid()},
    "cake": lambda frac: {"policy": CAKEScore(), "budget": frac, "allocator": CAKEBudget()},
    "d2o": lambda frac: {"policy": D2O(), "budget": frac, "allocator": D2OBudget()},
    "h2o_mean": lambda frac: {"policy": H2O(per_key_mean=True), "budget": frac},
}
KIVI_RESIDUAL = 32  # full-precision recent tokens of the KIVI stores these presets build


def names() -> list[str]:
    """The preset names (besides "POLICY+intB" for any eviction policy and bit width)."""
    from . import EVICTION

    return sorted({cls.name for cls in EVICTION} | set(_RECIPES) | {"kivi", "mikv", "gear"})


def at_bytes(name: str, fraction: float, context: int) -> dict | None:
    """`CompressedCache` keyword arguments for preset `name` at `fraction` of a 16-bit cache's bytes
    of a `context`-token prompt (the token / bit split of "POLICY+intB" depends on it through KIVI's
    full-precision residual). None when the method cannot get that small."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
    if not isinstance(context, int) or context < 1:
        raise ValueError(f"context={context!r} must be a positive token count")
    if name in _RECIPES:
        return _RECIPES[name](fraction)
    if name == "kivi":
        return _kivi(fraction)
    if name == "mikv":
        return _mikv(fraction)
    if name == "gear":
        return _gear(fraction)
    policy, plus, bits = name.partition("+int")
    if plus:
        if not bits.isdigit() or int(bits) not in (2, 4, 8):
            raise ValueError(f"preset {name!r}: the bit width after '+int' must be 2, 4 or 8")
        return _tokens_then_bits(_eviction(name, policy), int(bits), fraction, context)
    return {"policy": _eviction(name, policy), "budget": fraction}


def _eviction(name: str, policy: str):
    from . import EVICTION

    if policy in _RECIPES:
        return _RECIPES[policy](1.0)["policy"]
    cls = REGISTRY.get(policy)
    if cls not in EVICTION:
        raise ValueError(f"unknown preset {name!r}: expected one of {names()} or 'POLICY+intB'")
    return cls()


def _kivi(fraction: float) -> dict | None:
    for bits in (8, 4, 2):
        if (bits + 1) / 16 <= fraction:
            return {"quantizer": KIVI(bits=bits, group_size=32, residual=KIVI_RESIDUAL)}
    return None


def _tokens_then_bits(policy, bits: int, fraction: float, context: int) -> dict | None:
    """Evict to the token count whose `bits`-bit storage (plus KIVI's fp16 residual: 32 tokens and, on
    average, half a group of 32 not yet quantized) fills `fraction` of 16 bits per token."""
    residual = KIVI_RESIDUAL + 16
    kept = residual + (fraction * 16 * context - 16 * residual) / (bits + 1)
    keep = kept / context
    if keep >= 1:
        return None
    return {"policy": policy, "budget": keep, "quantizer": KIVI(bits=bits, group_size=32, residual=KIVI_RESIDUAL)}


def _mikv(fraction: float, low_bits: int = 2) -> dict | None:
    low = (low_bits + 1) / 16
    important = (fraction - low) / (1 - low)
    return {"quantizer": MiKV(important=important, low_bits=low_bits)} if important > 0 else None


def _gear(fraction: float) -> dict | None:
    for bits in (4, 2):
        if (bits + 2) / 16 <= fraction:
            return {"quantizer": GEAR(bits=bits)}
    return None
