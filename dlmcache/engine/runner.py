"""The runner: one flattened forward for every running request, over one paged KV pool.

`BatchedDecoder` owns a `KVPool` and a `GenerationBatch`. Each `step()` asks the batch for its
`StepInput`, runs the model once on all fed tokens ([1, T]: the projections, MLPs and LM head see
every request's tokens as rows of one matrix), and per layer `PagedStore` writes the fresh K/V with
one slot-mapped copy and runs one `paged_attention` call for all requests; then the batch commits.
No request calls the model itself.
"""

from __future__ import annotations

import os

import torch

from dlmcache.kernels.ops import dense_attention, paged_attention, paged_layout
from dlmcache.kernels.pool import KVPool, PoolFull, bytes_per_token

from .batch import Finished, GenerationBatch, Request, StepInput


def device_memory(device: torch.device) -> int:
    """Total memory of `device` in bytes (the machine's RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class PagedStore:
    """The `KVStore` of a flattened forward: per layer, store the fed tokens' K/V at their slots and
    attend each request's queries over its own keys (`paged_attention`). Keeps the last layer's fresh
    values (the drift test reads them)."""

    def __init__(self, pool: KVPool, step: StepInput, dtype: torch.dtype, first_slot: int | None = None):
        self.pool, self.step = pool, step
        self.layout = paged_layout(
            step.key_slots, step.key_valid, step.query_row, step.query_rank, step.max_queries, dtype,
            first_slot=first_slot, every_key=step.every_key,
        )  # fmt: skip
        self.values: torch.Tensor | None = None

    def attend(self, layer_idx: int, q, k, v, backend: str):
        # q [1, Hq, T, D], k / v [1, Hkv, T, D]: the fed tokens of every request, in a row.
        step = self.step
        if layer_idx == self.pool.num_layers - 1:
            self.values = v[0].transpose(0, 1)
        if step.fresh_keys:  # one row feeding all its positions: it attends the fresh K/V as they are
            if step.write_kv:
                self.pool.write(layer_idx, step.slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
            return dense_attention(q, k, v, None, backend)
        k, v = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [T, Hkv, D]
        self.pool.write(layer_idx, step.slots, k, v)
        pool, layout = self.pool, self.layout
        if layout.dense:  # no padding: the queries go as rows, [R, Hq, N, D] (for one row, q itself)
            rows, hq = layout.key_slots.shape[0], q.shape[1]
            q_rows = q if rows == 1 else q[0].view(hq, rows, layout.max_queries, -1).transpose(0, 1)
            out = paged_attention(q_rows, pool.k[layer_idx], pool.v[layer_idx], layout, backend=backend)
            return out if rows == 1 else out.transpose(0, 1).reshape(hq, -1, out.shape[-1])[None]
        out = paged_attention(q[0].transpose(0, 1), pool.k[layer_idx], pool.v[layer_idx], layout, backend=backend)
        return out.transpose(0, 1)[None]


class BatchedDecoder:
    """Continuous batching of denoising generations over one model.

    model: a native DLM (`DLMModelMixin`); eos_token_id: the tokenizer's; pool: a `KVPool` (default:
    `kv_bytes` bytes of it, or room for `max_tokens` positions but at most a quarter of the memory of
    the model's device); block_size: the pool's page size.
    `add(request)` admits a request (raises `PoolFull` when its KV does not fit now), `step()` runs one
    denoising step of every running request and returns those that finished (their blocks are free
    again), `cancel(ids)` drops requests at once.
    """

    def __init__(self, model, eos_token_id: int | None, pool: KVPool | None = None, kv_bytes: int | None = None,
                 max_tokens: int = 8192, block_size: int = 16):  # fmt: skip
        self.model = model
        dtype = next(model.parameters()).dtype
        if pool is None:
            shape = (model.num_layers, model.num_kv_heads, model.head_dim)
            if kv_bytes is not None:
                pool = KVPool.for_bytes(kv_bytes, *shape, block_size=block_size, dtype=dtype, device=model.device)
            else:
                per_token = bytes_per_token(*shape, dtype)
                tokens = min(max_tokens, device_memory(model.device) // 4 // per_token)
                blocks = max(1, tokens // block_size)
                pool = KVPool(*shape, num_blocks=blocks, block_size=block_size, dtype=dtype, device=model.device)
        self.pool = pool
        self.batch = GenerationBatch(
            model.mask_token_id, eos_token_id, model.logit_shift, model.num_kv_heads, model.head_dim, dtype,
            model.device,
        )  # fmt: skip
        self.blocks: dict[int, list[int]] = {}  # id(request in the batch) -> its pool blocks
        self.forwards = 0
        self.fed_tokens = 0

    @classmethod
    def for_requests(cls, model, eos_token_id: int | None, requests: list[Request], block_size: int = 16):
        """A decoder whose pool holds exactly `requests` (a `DLMPipeline` call's prompts)."""
        shape = (model.num_layers, model.num_kv_heads, model.head_dim)
        blocks = sum(-(-r.kv_tokens // block_size) for r in requests)
        dtype = next(model.parameters()).dtype
        pool = KVPool(*shape, num_blocks=max(1, blocks), block_size=block_size, dtype=dtype, device=model.device)
        return cls(model, eos_token_id, pool=pool)

    def __len__(self) -> int:
        return len(self.batch)

    def fits(self, request: Request) -> bool:
        """Whether the pool could ever hold `request` (when empty)."""
        return request.kv_tokens <= self.pool.capacity

    def can_add(self, request: Request) -> bool:
        return self.pool.can_allocate(request.kv_tokens)

    def add(self, request: Request) -> None:
        blocks = self.pool.allocate(request.kv_tokens)
        try:
            self.batch.add(request, self.pool.slots(blocks, request.kv_tokens))
        except Exception:
            self.pool.free(blocks)
            raise
        self.blocks[id(self.batch.requests[-1])] = blocks

    def cancel(self, ids: set[str]) -> list[Request]:
        """Drop the running requests whose `id` is in `ids`; returns them."""
        rows = [i for i, r in enumerate(self.batch.requests) if r.id in ids]
        return self._remove(rows)

    def _remove(self, rows: list[int]) -> list[Request]:
        removed = self.batch.remove(rows)  # each request once, its unconditional row (CFG) with it
        for r in removed:
            self.pool.free(self.blocks.pop(id(r)))
        return removed

    def _first_slot(self) -> int | None:
        """One running request on consecutive blocks (the usual case alone: the pool hands out the
        lowest free blocks first) reads its keys as a view of the pool: its first slot, else None. Not a
        block diffusion request: its attention rows read the null block where their block ends."""
        if len(self.batch.requests) != 1 or self.batch.block_causal:  # (its keys past a block: unwritten)
            return None
        blocks = self.blocks[id(self.batch.requests[0])]
        consecutive = blocks == list(range(blocks[0], blocks[0] + len(blocks)))
        return blocks[0] * self.pool.block_size if consecutive else None

    @torch.no_grad()
    def step(self) -> list[Finished]:
        """One denoising step of every running request (nothing when none runs)."""
        if not len(self.batch):
            return []
        step = self.batch.plan()
        store = PagedStore(self.pool, step, self.pool.k[0].dtype, self._first_slot())
        model = self.model
        hidden = model.hidden_states(step.input_ids[None], step.positions[None], cache=store)
        logits = model.get_output_embeddings()(hidden[0, step.logit_index])
        self.forwards += 1
        self.fed_tokens += step.tokens
        finished = self.batch.commit(logits, store.values)
        self._remove(self.batch.finished_rows)
        return finished


__all__ = ["BatchedDecoder", "PagedStore", "PoolFull"]
