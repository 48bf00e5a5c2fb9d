"""dlmcache's shared layer (`dlmcache.kernels`): Triton ops with torch references, and KV compression
policies used by both the diffusion-LM caches and the VLM/AR side.

The repository keeps this folder at the top level as `kernels/`, but it installs as `dlmcache.kernels`:
the bare name `kernels` belongs to Hugging Face's distribution (used by transformers).
"""

from .ops import QuantizedTensor, attention, dequantize_kv, gather_kv, quantize_kv, quantized_attention

__all__ = ["QuantizedTensor", "attention", "dequantize_kv", "gather_kv", "quantize_kv", "quantized_attention"]
