"""dlmcache's shared layer: Triton ops with torch references, and KV compression policies.

The import name `kernels` is also that of Hugging Face's `kernels` distribution (used by transformers
for hub kernels). This package is dlmcache's; `IS_DLMCACHE_KERNELS` lets code and tests tell them apart.
"""

from .ops import QuantizedTensor, attention, dequantize_kv, gather_kv, quantize_kv, quantized_attention

IS_DLMCACHE_KERNELS = True

__all__ = [
    "IS_DLMCACHE_KERNELS",
    "QuantizedTensor",
    "attention",
    "dequantize_kv",
    "gather_kv",
    "quantize_kv",
    "quantized_attention",
]
