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

from dlmcache.cache.compression import evict_prompt, pack_prompts
from dlmcache.kernels.ops import dense_attention, merge_attention, paged_attention, paged_layout
from dlmcache.kernels.pool import KVPool, PoolFull, bytes_per_token
from dlmcache.kernels.store import KVSegment

from .batch import Finished, GenerationBatch, Request, StepInput
from .graphs import GRAPH_MODES, Buckets, GraphedForward, pad_step


def device_memory(device: torch.device) -> int:
    """Total memory of `device` in bytes (the machine's RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class PromptSegments:
    """The compressed prompts of the running requests: per request and layer, the segment its cache
    keeps for it alone (evicted to its budget with its own queries, then KIVI-coded if it quantizes:
    `dlmcache.cache.compression.evict_prompt` / `pack_prompts`), and per layer
    their stacks over the batch's rows that read them (`KVSegment.stack`), one per kind of storage
    (full precision, or KIVI at one bit width and group), rebuilt only when those rows or their
    segments change."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.segments: dict[int, list[KVSegment | None]] = {}  # id(request) -> per layer
        self._stack: tuple | None = None  # (key, rows [S], per-layer stacked segments)
        self._version = 0

    def put(self, request: Request, layer_idx: int, segment: KVSegment) -> None:
        self.segments.setdefault(id(request), [None] * self.num_layers)[layer_idx] = segment
        self._version += 1

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes_as(None) for each in self.segments.values() for s in each if s is not None)

    def drop(self, request: Request) -> None:
        if self.segments.pop(id(request), None) is not None:
            self._version += 1

    def stacked(self, requests: list[Request], device) -> list[tuple[torch.LongTensor, list[KVSegment]]]:
        """Per kind of storage: (the batch rows with a compressed prompt of that kind [S], per layer the
        stack of their segments); empty when no running request has one yet."""
        rows = [i for i, r in enumerate(requests) if id(r) in self.segments]
        key = (tuple((i, id(requests[i])) for i in rows), self._version)  # (a row's index moves when others leave)
        if self._stack is None or self._stack[0] != key:
            kinds: dict = {}
            for i in rows:
                quantizer = requests[i].rule.compression.quantizer
                kinds.setdefault(None if quantizer is None else (quantizer.bits, quantizer.group_size), []).append(i)
            stacks = []
            for group in kinds.values():
                per_request = [self.segments[id(requests[i])] for i in group]
                layers = [KVSegment.stack([each[layer] for each in per_request]) for layer in range(self.num_layers)]
                stacks.append((torch.tensor(group, device=device), layers))
            self._stack = (key, stacks)
        return self._stack[1]


class PagedStore:
    """The `KVStore` of a flattened forward: per layer, store the fed tokens' K/V at their slots and
    attend each request's queries over its own keys (`paged_attention`). Keeps the last layer's fresh
    values (the drift test reads them). With compressed prompts (`step.prompts`, `prompts` the
    decoder's `PromptSegments`, `requests` the batch's rows), the rows that read theirs merge it in,
    and the rows that recompute theirs compress them at every layer."""

    def __init__(self, pool: KVPool, step: StepInput, dtype: torch.dtype, first_slot: int | None = None,
                 prompts: PromptSegments | None = None, requests: list[Request] | None = None,
                 mask_token_id: int | None = None, batch_invariant: bool = False):  # fmt: skip
        self.pool, self.step = pool, step
        self.layout = paged_layout(
            step.key_slots, step.key_valid, step.query_row, step.query_rank, step.max_queries, dtype,
            first_slot=first_slot, every_key=step.every_key, batch_invariant=batch_invariant,
        )  # fmt: skip
        # (batch-invariant: a lone row feeding all its positions attends through the pool as in a batch)
        self.fresh_keys = step.fresh_keys and not batch_invariant
        self.values: torch.Tensor | None = None
        self.prompts, self.requests, self.mask_id = prompts, requests, mask_token_id
        self.stacked = []
        if step.prompts is not None:
            self.stacked = prompts.stacked(requests, step.key_slots.device)

    def attend(self, layer_idx: int, q, k, v, backend: str):
        # q [1, Hq, T, D], k / v [1, Hkv, T, D]: the fed tokens of every request, in a row.
        step = self.step
        if layer_idx == self.pool.num_layers - 1:
            self.values = v[0].transpose(0, 1)
        if step.prompts is not None and step.prompts.compress:
            self._compress(layer_idx, q, k, v)
        if self.fresh_keys:  # one row feeding all its positions: it attends the fresh K/V as they are
            if step.write_kv:
                self.pool.write(layer_idx, step.slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
            return dense_attention(q, k, v, None, backend)
        k, v = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [T, Hkv, D]
        self.pool.write(layer_idx, step.slots, k, v)
        pool, layout = self.pool, self.layout
        if self.stacked:
            return self._attend_with_prompts(layer_idx, q[0].transpose(0, 1), backend)[None].transpose(1, 2)
        if layout.dense:  # no padding: the queries go as rows, [R, Hq, N, D] (for one row, q itself)
            rows, hq = layout.key_slots.shape[0], q.shape[1]
            q_rows = q if rows == 1 else q[0].view(hq, rows, layout.max_queries, -1).transpose(0, 1)
            out = paged_attention(q_rows, pool.k[layer_idx], pool.v[layer_idx], layout, backend=backend)
            return out if rows == 1 else out.transpose(0, 1).reshape(hq, -1, out.shape[-1])[None]
        out = paged_attention(q[0].transpose(0, 1), pool.k[layer_idx], pool.v[layer_idx], layout, backend=backend)
        return out.transpose(0, 1)[None]

    def _attend_with_prompts(self, layer_idx: int, q: torch.Tensor, backend: str) -> torch.Tensor:
        """q [T, Hq, D] -> [T, Hq, D]: the pool's keys (a compressed row's canvas alone), merged by
        log-sum-exp with each merging row's prompt segment (the prompt's part first); one segment
        attention per kind of storage."""
        step, layout = self.step, self.layout
        pool_part = paged_attention(q, self.pool.k[layer_idx], self.pool.v[layer_idx], layout, return_lse=True,
                                    backend=backend)  # fmt: skip
        if layout.batch_invariant:
            return self._merge_by_row(layer_idx, q, pool_part, backend)
        out = pool_part[0]
        for rows, stacks in self.stacked:
            merged, in_stack = self._merge_segment(q, pool_part, rows, stacks[layer_idx], backend)
            merge = (step.prompts.merge & in_stack)[step.prompts.token_row][:, None, None]
            out = torch.where(merge, merged.to(out.dtype), out)
        return out

    def _merge_by_row(self, layer_idx: int, q, pool_part, backend: str) -> torch.Tensor:
        """`_attend_with_prompts`' merge in the batch-invariant mode: each merging request's tokens
        attend its own segment at their own count, and merge with their pool part alone, so nothing
        depends on the other rows (one host read of the rows' token ranges)."""
        prompts = self.step.prompts
        rows, counts = torch.unique_consecutive(prompts.token_row, return_counts=True)
        ends = counts.cumsum(0)
        out = pool_part[0].clone()
        spans = zip(rows.tolist(), (ends - counts).tolist(), ends.tolist(), prompts.merge[rows].tolist(), strict=True)
        for row, start, end, merge in spans:
            segments = self.prompts.segments.get(id(self.requests[row]))
            if not merge or segments is None:
                continue
            seg_out, seg_lse = segments[layer_idx].attend(q[start:end].transpose(0, 1)[None], backend=backend)
            own = (seg_out[0].transpose(0, 1), seg_lse[0].transpose(0, 1))
            merged, _ = merge_attention([own, (pool_part[0][start:end], pool_part[1][start:end])])
            out[start:end] = merged.to(out.dtype)
        return out

    def _merge_segment(self, q, pool_part, rows: torch.LongTensor, segment: KVSegment, backend: str):
        """Every token's pool attention merged with its row's `segment` row (rows [S]: the batch rows it
        stacks), and which batch rows it stacks [R]. The segment's queries are laid out [S, Hq, N, D]
        by row and rank among the row's tokens (a block diffusion row's attention rows share one);
        the other rows' tokens go to a scratch row whose result is not used."""
        prompts, hq, d = self.step.prompts, q.shape[1], q.shape[2]
        n, stacked = prompts.most_tokens, rows.numel()
        at_stack = torch.full((prompts.merge.shape[0],), stacked, device=q.device)
        at_stack[rows] = torch.arange(stacked, device=q.device)
        dest = at_stack[prompts.token_row] * n + prompts.token_rank  # the scratch row: `stacked`
        queries = q.new_zeros((stacked + 1) * n, hq, d).index_copy_(0, dest, q)
        queries = queries[: stacked * n].view(stacked, n, hq, d).transpose(1, 2)
        seg_out, seg_lse = segment.attend(queries, backend=backend)  # [S, Hq, N, D], [S, Hq, N]
        seg_out = torch.cat([seg_out.transpose(1, 2).reshape(-1, hq, d), seg_out.new_zeros(n, hq, d)])
        seg_lse = torch.cat([seg_lse.transpose(1, 2).reshape(-1, hq), seg_lse.new_full((n, hq), float("-inf"))])
        merged, _ = merge_attention([(seg_out[dest], seg_lse[dest]), pool_part])
        return merged, at_stack < stacked

    def _compress(self, layer_idx: int, q, k, v) -> None:
        """The rows that recompute their prompt at this forward (every position fed, in order) keep
        it compressed: evicted with this layer's queries, then packed, as the request alone would."""
        prompts = self.step.prompts
        for row in prompts.compress:
            request = self.requests[row]
            # the compressed positions, then (full attention) the generation region the row feeds too; a
            # block diffusion row's prefix is its prompt's complete attention blocks alone, even when
            # they are the whole prompt
            p = request.compressed_len
            length = p if request.block_causal else request.length
            index = prompts.row_start[row] + torch.arange(length, device=q.device)
            fed = (q[:, :, index], k[:, :, index], v[:, :, index])  # [1, H, length, D]
            masked = prompts.masked[row]
            compression = request.rule.compression
            row_segment = evict_prompt(compression, *fed, p, masked, layer_idx, self.pool.num_layers)
            self.prompts.put(request, layer_idx, pack_prompts(compression, [row_segment]))


class BatchedDecoder:
    """Continuous batching of denoising generations over one model.

    model: a native DLM (`DLMModelMixin`); eos_token_id: the tokenizer's; pool: a `KVPool` (default:
    `kv_bytes` bytes of it, or room for `max_tokens` positions but at most a quarter of the memory of
    the model's device); block_size: the pool's page size; graphs: "off" (each step at its own
    shapes), "buckets" (every step padded to shape buckets, eager: what a captured graph replays,
    on any device) or "cuda" (padded, one CUDA graph per bucket; `dlmcache.engine.graphs`), with
    `buckets` the floors of the padded sizes.
    `add(request)` admits a request (raises `PoolFull` when its KV does not fit now), `step()` runs one
    denoising step of every running request and returns those that finished (their blocks are free
    again), `cancel(ids)` drops requests at once.

    isolate: a step that raises fails only the requests that raise alone (a server's setting; off, the
    error propagates). The batch's host state is restored to before the step, then every request takes
    that step alone: those that raise again finish with the error (`Finished.error`), the others go on
    from their own step. Each step costs a copy of the host state (the rows' arrays) for it.
    """

    def __init__(self, model, eos_token_id: int | None, pool: KVPool | None = None, kv_bytes: int | None = None,
                 max_tokens: int = 8192, block_size: int = 16, graphs: str = "off",
                 buckets: Buckets | None = None, isolate: bool = False):  # fmt: skip
        if graphs not in GRAPH_MODES:
            raise ValueError(f"graphs={graphs!r}: expected one of {GRAPH_MODES}")
        if graphs == "cuda" and any(getattr(m, "reads_host", False) for m in model.modules()):
            raise ValueError(
                "graphs='cuda': the model reads the host in its forward (mixture of experts: the expert counts)"
            )
        self.model = model
        self.isolate = isolate
        self.graphs, self.buckets = graphs, buckets or Buckets()
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
        self.prompts = PromptSegments(model.num_layers)
        self._trimmed: set[int] = set()  # requests that gave their compressed prompt's blocks back
        self.peak_kv_bytes = 0  # the most KV the running requests held after a step (pool blocks + segments)
        self._held_grew = False  # a request joined since the last step (only joins and compressions add bytes)
        self._graphed = GraphedForward(model, self._padded_forward) if graphs == "cuda" else None

    @classmethod
    def for_requests(cls, model, eos_token_id: int | None, requests: list[Request], block_size: int = 16,
                     **options):  # fmt: skip
        """A decoder whose pool holds exactly `requests` (a `DLMPipeline` call's prompts); `options`
        as the constructor's (graphs, buckets)."""
        shape = (model.num_layers, model.num_kv_heads, model.head_dim)
        blocks = sum(-(-r.kv_tokens // block_size) for r in requests)
        dtype = next(model.parameters()).dtype
        pool = KVPool(*shape, num_blocks=max(1, blocks), block_size=block_size, dtype=dtype, device=model.device)
        return cls(model, eos_token_id, pool=pool, **options)

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
        self._held_grew = True

    def cancel(self, ids: set[str]) -> list[Request]:
        """Drop the running requests whose `id` is in `ids`; returns them."""
        rows = [i for i, r in enumerate(self.batch.requests) if r.id in ids]
        return self._remove(rows)

    def _remove(self, rows: list[int]) -> list[Request]:
        removed = self.batch.remove(rows)  # each request once, its unconditional row (CFG) with it
        for r in removed:
            self.pool.free(self.blocks.pop(id(r)))
            self._trimmed.discard(id(r))
            self.prompts.drop(r)
        return removed

    @property
    def batch_invariant(self) -> bool:
        """Whether the model is in batch-invariant mode (`set_batch_invariant`): then every row attends
        at its own shapes, as it would beside others."""
        return getattr(self.model, "batch_invariant", False)

    def _first_slot(self) -> int | None:
        """One running request on consecutive blocks (the usual case alone: the pool hands out the
        lowest free blocks first) reads its keys as a view of the pool: its first slot, else None. Not a
        block diffusion request: its attention rows read the null block where their block ends."""
        if len(self.batch.requests) != 1 or self.batch.block_causal:  # (its keys past a block: unwritten)
            return None
        if self.batch_invariant:  # (it attends as it would in a batch)
            return None
        if self.batch.requests[0].compressed_len:  # its keys may begin after its prompt (the segment's)
            return None
        blocks = self.blocks[id(self.batch.requests[0])]
        consecutive = blocks == list(range(blocks[0], blocks[0] + len(blocks)))
        return blocks[0] * self.pool.block_size if consecutive else None

    @torch.no_grad()
    def step(self) -> list[Finished]:
        """One denoising step of every running request (nothing when none runs)."""
        if not len(self.batch):
            return []
        if not self.isolate:
            return self._step()
        saved = self.batch.save()
        try:
            return self._step()
        except Exception:
            self.batch.restore(saved)
            return self._step_alone()

    def _step_alone(self) -> list[Finished]:
        """`step` for every request on its own (after a step of them all failed): a request whose step
        raises alone finishes with the error, and leaves the batch."""
        finished = []
        requests = {id(r): r for r in self.batch.requests}  # (a request with CFG has two rows)
        for request in requests.values():
            rows = [i for i, r in enumerate(self.batch.requests) if r is not request]
            others = self.batch.detach(rows)
            saved = self.batch.save()
            try:
                finished += self._step()
            except Exception as error:
                self.batch.restore(saved)
                self._remove([0])
                empty = torch.zeros(0, dtype=torch.long)
                finished.append(Finished(request, empty, empty, error=error))
            self.batch.attach(others)
        return finished

    def _step(self) -> list[Finished]:
        step = self.batch.plan()
        if self.graphs != "off" and step.prompts is None:  # (compressed prompts: at their own shapes)
            sizes = self.buckets.sizes(step)
            padded = pad_step(step, sizes)
            if self._graphed is not None:
                logits, values = self._graphed(padded, sizes)
            else:
                logits, values = self._padded_forward(padded)
            logits, values = logits[: step.logit_index.numel()], values[: step.tokens]
        else:
            logits, values = self._forward(step, self._store(step, self._first_slot()))
        self.forwards += 1
        self.fed_tokens += step.tokens
        compressed = step.prompts is not None and bool(step.prompts.compress)
        if compressed:
            self._release_prompts(step.prompts.compress)
        finished = self.batch.commit(logits, values)
        self._remove(self.batch.finished_rows)
        if self._held_grew or compressed:  # (otherwise the bytes held can only have fallen since the last step)
            self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes)
            self._held_grew = False
        return finished

    def _store(self, step: StepInput, first_slot: int | None = None) -> PagedStore:
        return PagedStore(self.pool, step, self.pool.k[0].dtype, first_slot, self.prompts, self.batch.requests,
                          self.model.mask_token_id, self.batch_invariant)  # fmt: skip

    def _forward(self, step: StepInput, store: PagedStore) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logits of the step's logit rows and the last layer's fresh values."""
        hidden = self.model.hidden_states(step.input_ids[None], step.positions[None], cache=store)
        return self.model.get_output_embeddings()(hidden[0, step.logit_index]), store.values

    def _padded_forward(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`_forward` of a step padded to shape buckets (no first-slot view: its keys are gathered)."""
        return self._forward(step, self._store(step))

    def _release_prompts(self, rows: list[int]) -> None:
        """Rows that just compressed their prompt for good (their refreshes recompute the canvas
        alone) give back the pool blocks that hold nothing but prompt positions: their keys are read
        from the segment from now on. Those positions' slots become the null block's, so a later
        write to one of them (a refresh's lead position) lands there, where nothing reads it unmasked.
        (Not for a request with a second, unconditional row, whose slots follow its own.)"""
        size = self.pool.block_size
        for row in rows:
            request = self.batch.requests[row]
            never_again = not request.refreshes_prompt  # (its prompt is not recomputed)
            if not never_again or request.cfg_scale or id(request) in self._trimmed:
                continue
            blocks = self.blocks[id(request)]
            whole = request.compressed_len // size
            if whole:
                self.pool.free(blocks[:whole])
                self.blocks[id(request)] = blocks[whole:]
                self.batch.state["key_slots"][row, : whole * size] = 0
            self._trimmed.add(id(request))

    @property
    def kv_bytes(self) -> int:
        """KV bytes the running requests hold: their pool blocks and their compressed prompts."""
        per_block = bytes_per_token(self.pool.num_layers, self.pool.num_kv_heads, self.pool.head_dim,
                                    self.pool.k[0].dtype) * self.pool.block_size  # fmt: skip
        held = sum(len(blocks) for blocks in self.blocks.values()) * per_block
        return held + self.prompts.nbytes


__all__ = ["BatchedDecoder", "PagedStore", "PoolFull"]
