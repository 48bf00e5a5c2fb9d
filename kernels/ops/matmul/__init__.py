"""batch_invariant_linear: a projection whose every output row is the same bits whatever else is in
the batch (the engine's batch-invariant mode).

Neither torch's CPU matmul nor cuBLAS promises that: both pick kernels by shape, so a request's
logits move in the last bits when other requests join its forward (measured on CPU in float32:
docs/results.md). Two ways to fixed arithmetic:

- Triton (CUDA; `TRITON_INTERPRET=1` on CPU): one fixed tiling, the reduction never split (`triton.py`).
- torch (CPU): the rows go through `product` in chunks of exactly `CHUNK_ROWS` rows (the last one
  padded with zeros), so every product has the same shape and the matmul library takes the same path
  for each; a row's result does not depend on its place in the chunk (tested).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..backend import use_triton
from .reference import check_linear_inputs
from .reference import linear as linear_reference

#: The rows of every product on the torch path. Each chunk reads the weights once more, and the last
#: one is padded: a forward of the random 135M model (2 threads) took 1.66x / 1.64x its plain time
#: over 21 / 340 tokens with 16-row chunks, 1.18x / 1.28x with 32, 1.69x / 1.22x with 64
#: (`scripts/bench_batch_invariant.py --chunk-sweep`, docs/results.md). 32 holds a cached step's feed
#: for one request (its block's masked positions and drift probes) in one chunk.
CHUNK_ROWS = 32


def fixed_chunks(x: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor], rows: int = CHUNK_ROWS):
    """`product` (a row-wise map [m, K] -> [m, N]) of x [..., K], applied to chunks of exactly `rows`
    rows; returns [..., N]."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows={rows!r} must be a positive int")
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m % rows:
        x2 = torch.cat([x2, x2.new_zeros(rows - m % rows, k)])
    out = torch.cat([product(chunk) for chunk in x2.split(rows)]) if m else product(x2[:0])
    return out[:m].reshape(*lead, out.shape[-1])


def elementwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn (an elementwise op: silu, sigmoid, cos, ...) of x, every element through torch's vectorized
    CPU loop. That loop leaves each thread's last `n mod 2 x lanes` elements to scalar code, whose
    transcendental functions may round otherwise (silu does, measured), so an element's bits would
    depend on the tensor's size. Here x is flattened and padded with zeros to a multiple of
    64 x threads elements: no thread's share has a remainder. CUDA tensors go straight to `fn`."""
    if x.is_cuda:
        return fn(x)
    n, unit = x.numel(), 64 * torch.get_num_threads()
    flat = x.reshape(-1)
    if n % unit:
        flat = torch.cat([flat, flat.new_zeros(unit - n % unit)])
    return fn(flat)[:n].view(x.shape)


def batch_invariant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    product: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N]), each row independent of the others in its bits.
    `product`: the torch path's row-wise product (default `F.linear(·, weight, bias)`; a caller with
    packed weights passes its own)."""
    check_linear_inputs(x, weight, bias)
    if use_triton(backend, x, weight):
        from .triton import linear

        return linear(x, weight, bias)
    return fixed_chunks(x, product or (lambda rows: F.linear(rows, weight, bias)))


__all__ = ["CHUNK_ROWS", "batch_invariant_linear", "elementwise", "fixed_chunks", "linear_reference"]
