"""Mixture-of-experts layers: a validated `Router` (which experts each token uses, with what weight)
and the experts' SwiGLU computed grouped by expert (`moe_experts`), with the per-token loop it is
tested against (`moe_experts_reference`).

The grouped path sorts the (token, expert) pairs by expert and runs one GEMM per projection and
active expert over that expert's tokens: the work is E small GEMMs instead of T x k matrix-vector
products, and no Python loop runs over tokens. There is no Triton kernel yet: on CUDA the same
grouping feeds cuBLAS.
"""

from .grouped import moe_experts
from .reference import moe_experts_reference
from .router import Router

__all__ = ["Router", "moe_experts", "moe_experts_reference"]
