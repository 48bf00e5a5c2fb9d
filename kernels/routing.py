"""Routing a transformers model's attention through a `CompressedCache`: one attention implementation
per base ("dlmcache_sdpa", "dlmcache_eager"), attaching / detaching a model, and capturing the
attention inputs (hidden states) a policy reads.

While a model is attached, a forward that runs on an attached cache gets, per layer: attention with a
mask built from what that layer stores (layers and heads may keep different tokens; a recall policy's
choice of this step), or the segment's own attention when its entries are quantized (fused
dequantization); the queries the policy reads, handed over after the layer's attention (compression
then runs). Every other forward of the model goes through unchanged.
"""

from __future__ import annotations

import contextvars
import sys
import weakref

import torch

# the cache whose layer just returned keys / values to an attention module (set by `update`)
ACTIVE: contextvars.ContextVar = contextvars.ContextVar("dlmcache_active_cache", default=None)
# model -> [its own attention implementation, number of caches attached to it]
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attach(cache, model, capture_hidden: bool):
    """Switch `model` to the routed attention (counting attachments) and, if asked, capture each
    decoder layer's attention input into `cache.hidden`; returns the finalizer that undoes it."""
    own = own_implementation(model)
    name = register_attention(own)
    handles = []
    if capture_hidden:
        owner = weakref.ref(cache)
        for module in model.modules():
            if hasattr(module, "layer_idx") and hasattr(module, "q_proj"):
                handles.append(module.register_forward_pre_hook(_capture_hidden(owner), with_kwargs=True))
    entry = _ATTACHED.setdefault(model, [own, 0])
    entry[1] += 1
    model.set_attn_implementation(name)
    # Detach when asked, or when the cache is collected; the finalizer holds no reference to it.
    return weakref.finalize(cache, _release, weakref.ref(model), handles)


def own_implementation(model) -> str:
    if model in _ATTACHED:
        return _ATTACHED[model][0]
    base = model.config._attn_implementation or "sdpa"
    return base[len("dlmcache_") :] if base.startswith("dlmcache_") else base


def _release(model_ref, handles) -> None:
    for h in handles:
        h.remove()
    model = model_ref()
    if model is None or model not in _ATTACHED:
        return
    entry = _ATTACHED[model]
    entry[1] -= 1
    if entry[1] == 0:
        del _ATTACHED[model]
        model.set_attn_implementation(entry[0])


def _capture_hidden(owner_ref):
    def hook(module, args, kwargs):
        cache = owner_ref()
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if cache is not None and hidden is not None and hidden.shape[1] > 1:
            cache.hidden[module.layer_idx] = hidden.detach()

    return hook


def layer_mask(valid: torch.Tensor, q_len: int, query_heads: int) -> torch.Tensor:
    """[B, Hq, q, S] for a compressed layer: stored entries by their per-head validity [B, H, S], the q
    new tokens (the last ones) causally; each KV head's mask is shared by its query heads."""
    stored = valid.shape[2]
    causal = torch.ones(q_len, stored, dtype=torch.bool, device=valid.device).tril(stored - q_len)
    mask = valid[:, :, None, :] & causal
    return mask.repeat_interleave(query_heads // valid.shape[1], dim=1)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one eager attention takes."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def register_attention(base: str) -> str:
    """Register "dlmcache_<base>" (attention + mask interfaces) once; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base not in ("sdpa", "eager"):
        raise ValueError(f"CompressedCache supports models running 'sdpa' or 'eager' attention, not {base!r}")
    name = f"dlmcache_{base}"
    if name in ALL_ATTENTION_FUNCTIONS:
        return name

    def attention(module, query, key, value, attention_mask, **kwargs):
        cache = ACTIVE.get()
        ACTIVE.set(None)
        layer = None
        layer_idx = getattr(module, "layer_idx", None)  # None: e.g. a VLM's vision tower
        if cache is not None and layer_idx is not None and layer_idx < len(cache.layers):
            layer = cache.layers[layer_idx]
            if layer.returned is not key:  # this forward does not run on our cache
                layer = None
        scale = kwargs.get("scaling")
        if layer is not None and layer.returned_stored and not layer.segment.is_dense:
            # quantized entries: the store attends in its own form (KIVI: fused dequantization)
            selected = layer.recall_selection(query)
            out, _ = layer.segment.attend(query, scale=scale, causal=query.shape[2] > 1, key_mask=selected)
            out = out.transpose(1, 2).contiguous()
        else:
            if layer is not None and layer.returned_stored:
                allowed = layer_mask(layer.segment.valid, query.shape[2], query.shape[1])
                selected = layer.recall_selection(query)
                if selected is not None:
                    groups = query.shape[1] // selected.shape[1]
                    allowed = allowed & selected.repeat_interleave(groups, dim=1)[:, :, None, :]
                attention_mask = allowed if base == "sdpa" else _additive(allowed, query.dtype)
            if base == "sdpa":
                fn = ALL_ATTENTION_FUNCTIONS["sdpa"]
            else:
                fn = sys.modules[type(module).__module__].eager_attention_forward
            out, _ = fn(module, query, key, value, attention_mask, **kwargs)
        if layer is not None:
            cache.after_attention(layer, query.detach(), scale)
        return out, None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name
