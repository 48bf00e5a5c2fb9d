"""Shared ops, one directory each: `triton.py` (kernel + launcher), `reference.py` (plain torch), and the
dispatching function in `__init__.py` (Triton on CUDA, the reference on CPU; `backend=` overrides)."""

from .attention import PagedLayout, attention, dense_attention, merge_attention, paged_attention, paged_layout
from .gather import gather_kv
from .matmul import batch_invariant_linear
from .norm import rms_norm
from .quantize import QuantizedTensor, dequantize_kv, quantize_kv
from .quantized_attention import quantized_attention

__all__ = [
    "PagedLayout",
    "QuantizedTensor",
    "attention",
    "batch_invariant_linear",
    "dense_attention",
    "dequantize_kv",
    "gather_kv",
    "merge_attention",
    "paged_attention",
    "paged_layout",
    "quantize_kv",
    "quantized_attention",
    "rms_norm",
]
