"""quantized_attention: attention reading packed int2/int4/int8 K/V, plus a full-precision recent window."""

from __future__ import annotations

from ..attention import fused_cpu_attention, fused_cpu_available
from ..backend import use_triton
from ..quantize.reference import QuantizedTensor
from .reference import quantized_attention as quantized_attention_reference


def quantized_attention(
    q,
    k_q: QuantizedTensor,
    v_q: QuantizedTensor,
    k_res=None,
    v_res=None,
    *,
    kv_len=None,
    key_mask=None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention of q [B, Hq, Lq, D] over [dequant(k_q); k_res] / [dequant(v_q); v_res]: quantized
    K/V [B, Hkv, Lz, D] (any axis, bits, group) and the most recent R tokens unquantized [B, Hkv, R, D];
    key_mask [B, Lz + R] or [B, Hkv, Lz + R]. The codes are never dequantized whole: in registers
    inside the attention loop on CUDA, a chunk at a time in the torch reference."""
    kw = dict(kv_len=kv_len, key_mask=key_mask, causal=causal, scale=scale, return_lse=return_lse)
    if use_triton(backend, q):
        from .triton import quantized_attention as quantized_attention_triton

        return quantized_attention_triton(q, k_q, v_q, k_res, v_res, **kw)
    if backend == "auto" and fused_cpu_available(q):
        kw["attend"] = fused_cpu_attention
    return quantized_attention_reference(q, k_q, v_q, k_res, v_res, **kw)


__all__ = ["quantized_attention", "quantized_attention_reference"]
