"""The batched denoising engine: requests as data (`Request`, rows of a `GenerationBatch`), one paged
KV pool (`dlmcache.kernels.pool.KVPool`) and one flattened forward per step (`BatchedDecoder`)."""

from .batch import Finished, GenerationBatch, Request, StepInput
from .runner import BatchedDecoder, PagedStore, PoolFull

__all__ = [
    "BatchedDecoder",
    "Finished",
    "GenerationBatch",
    "PagedStore",
    "PoolFull",
    "Request",
    "StepInput",
]
