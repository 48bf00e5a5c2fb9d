"""The KV store both cache front-ends are built on: `KVSegment`, one layer's cached entries.

A segment holds keys / values for a batch, compact along the sequence ([B, H, S, D]: entry s of row b
and KV head h), and per entry whether it is a real token (`valid`, False for padding, evicted slots
or a ragged head's fillers), where it came from (`origin`: a canvas position for the diffusion-LM
caches, the arrival index for autoregressive ones) and an integer label (`tags`, e.g. a screenshot's
index). Its data is dense (`DenseKV`) or a quantization policy's store (KIVI's packed codes and
full-precision residual, MiKV, GEAR, ...). What a segment does:

- attend: softmax attention of queries over its valid entries, returning the rows' log-sum-exps too,
  so attention over several segments (a compressed prompt and the live canvas of a diffusion LM) is
  merged exactly (`ops.merge_attention`) without concatenating them;
- compact: keep the entries a policy selected (`ops.gather_kv`);
- quantize: store the kept entries with a quantization policy (`ops.quantize_kv` for KIVI, whose
  attention then reads the packed codes: `ops.quantized_attention`, never a dequantized copy);
- append: new entries at the end (decoding, a new turn).

`dlmcache.cache` (denoising caches) and `kernels.cache.CompressedCache` (the transformers adapter)
both keep their compressed KV in segments.
"""

from __future__ import annotations

import copy

import torch

from .ops import attention, gather_kv


class KVData:
    """How a segment's keys / values are held. Subclasses give `length`, `append(k, v)`, `read() ->
    (keys, values)` in full precision and `nbytes_as(element_bytes)`; `attend` defaults to attention
    over `read()` (a full-precision copy), which stores that can attend in their own form override."""

    @property
    def length(self) -> int:
        raise NotImplementedError

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        raise NotImplementedError

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def nbytes_as(self, element_bytes: int | None) -> int:
        raise NotImplementedError

    def zeros(self, n: int) -> torch.Tensor:
        """Zeros [B, H, n, D] in the entries' full-precision dtype (fillers)."""
        keys, _ = self.read()
        return keys.new_zeros(*keys.shape[:2], n, keys.shape[3])

    def select_rows(self, rows: torch.LongTensor) -> KVData:
        """The data of these batch rows (the stores a diffusion-LM cache holds implement it)."""
        raise NotImplementedError(f"{type(self).__name__} cannot select batch rows")

    def with_rows(self, rows: torch.LongTensor, other: KVData) -> KVData:
        """Data whose batch rows `rows` are `other`'s (same kind and length); self is left as it is."""
        raise NotImplementedError(f"{type(self).__name__} cannot replace batch rows")

    def cat_rows(self, others: list[KVData]) -> KVData:
        """Data of self's batch rows followed by `others'` (same kind and length)."""
        raise NotImplementedError(f"{type(self).__name__} cannot stack batch rows")

    @property
    def nbytes(self) -> int:
        return self.nbytes_as(None)

    def attend(self, q, key_mask, scale=None, causal: bool = False, backend: str = "auto"):
        """(output [B, Hq, Lq, D], log-sum-exp [B, Hq, Lq]) of q over the stored entries where
        `key_mask` [B, H, S] is True; causal: the queries are the last Lq entries."""
        keys, values = self.read()
        return attention(
            q, keys, values, key_mask=key_mask, scale=scale, causal=causal, return_lse=True, backend=backend
        )


class DenseKV(KVData):
    """Full-precision keys / values [B, H, S, D]."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    def append(self, keys, values) -> None:
        self.keys = torch.cat([self.keys, keys], 2)
        self.values = torch.cat([self.values, values], 2)

    def read(self):
        return self.keys, self.values

    def nbytes_as(self, element_bytes: int | None) -> int:
        return 2 * self.keys.numel() * (element_bytes or self.keys.element_size())

    def select_rows(self, rows):
        return DenseKV(self.keys[rows], self.values[rows])

    def with_rows(self, rows, other):
        return DenseKV(self.keys.index_copy(0, rows, other.keys), self.values.index_copy(0, rows, other.values))

    def cat_rows(self, others):
        parts = [self, *others]
        return DenseKV(torch.cat([p.keys for p in parts]), torch.cat([p.values for p in parts]))

    def attend(self, q, key_mask, scale=None, causal: bool = False, backend: str = "auto"):
        return attention(
            q, self.keys, self.values, key_mask=key_mask, scale=scale, causal=causal, return_lse=True, backend=backend
        )


class KVSegment:
    """One layer's cached entries: `data` (a `KVData`), valid [B, H, S] bool, origin [B, H, S] long,
    tags [B, H, S] long (-1: no label)."""

    def __init__(self, data: KVData, valid: torch.Tensor, origin: torch.Tensor, tags: torch.Tensor | None = None):
        b, h, s = valid.shape
        if data.length != s or origin.shape != valid.shape or (tags is not None and tags.shape != valid.shape):
            raise ValueError(
                f"a segment's data ({data.length} entries), valid {tuple(valid.shape)}, origin {tuple(origin.shape)}"
                f" and tags {None if tags is None else tuple(tags.shape)} must agree on [B, H, S]"
            )
        self.data, self.valid, self.origin = data, valid, origin
        self.tags = tags if tags is not None else torch.full_like(origin, -1)

    @classmethod
    def dense(cls, keys, values, valid=None, origin=None, tags=None) -> KVSegment:
        """A segment of keys / values [B, H, S, D]; valid defaults to all, origin to 0..S-1; a [B, S]
        valid, origin or tags is shared by the heads."""
        b, h, s, _ = keys.shape

        def per_head(x, default):
            x = default if x is None else x
            return x[:, None].expand(b, h, s) if x.dim() == 2 else x

        valid = per_head(valid, torch.ones(b, s, dtype=torch.bool, device=keys.device))
        origin = per_head(origin, torch.arange(s, device=keys.device).expand(b, s))
        tags = None if tags is None else per_head(tags, None)
        return cls(DenseKV(keys, values), valid, origin, tags)

    @property
    def length(self) -> int:
        return self.valid.shape[2]

    def snapshot(self) -> KVSegment:
        """A copy that later appends, compactions and quantization of this segment leave as it is
        (they replace tensors, never write into them, so the tensors are shared)."""
        other = copy.copy(self)
        other.data = copy.copy(self.data)
        return other

    @property
    def is_dense(self) -> bool:
        return isinstance(self.data, DenseKV)

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values in full precision (a copy when the data is quantized)."""
        return self.data.read()

    def attend(self, q, scale=None, causal: bool = False, key_mask=None, backend: str = "auto"):
        """(output, log-sum-exp) of q [B, Hq, Lq, D] over the valid entries (and `key_mask`, [B, H, S],
        if given: e.g. a recall policy's choice for this step)."""
        mask = self.valid if key_mask is None else self.valid & key_mask
        return self.data.attend(q, mask, scale=scale, causal=causal, backend=backend)

    def select_rows(self, rows: torch.LongTensor) -> KVSegment:
        """A segment of these batch rows (sharing nothing that later changes to this one touch)."""
        return KVSegment(self.data.select_rows(rows), self.valid[rows], self.origin[rows], self.tags[rows])

    @staticmethod
    def stack(segments: list[KVSegment]) -> KVSegment:
        """One segment of every segment's batch rows, in order; the shorter ones are first extended
        by invalid entries (`pad`) to the longest. The data must be of one kind (dense, or KIVI codes
        of whole groups)."""
        width = max(s.length for s in segments)
        parts = []
        for s in segments:
            if s.length < width:
                s = s.snapshot()
                s.pad(width - s.length)
            parts.append(s)
        first = parts[0]
        data = first.data.cat_rows([p.data for p in parts[1:]])
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return KVSegment(data, cat("valid"), cat("origin"), cat("tags"))

    def set_rows(self, rows: torch.LongTensor, other: KVSegment) -> None:
        """Replace batch rows `rows` by `other`'s [len(rows), H, S', D]; the shorter of the two is first
        extended by invalid entries so both hold the same number of entries."""
        if other.length > self.length:
            self.pad(other.length - self.length)
        elif other.length < self.length:
            other = other.snapshot()
            other.pad(self.length - other.length)
        self.data = self.data.with_rows(rows, other.data)
        self.valid = self.valid.index_copy(0, rows, other.valid)
        self.origin = self.origin.index_copy(0, rows, other.origin)
        self.tags = self.tags.index_copy(0, rows, other.tags)

    def pad(self, n: int) -> None:
        """`n` invalid entries at the end (zeros, origin -1)."""
        zeros = self.data.zeros(n)
        none = torch.zeros(zeros.shape[:3], dtype=torch.bool, device=zeros.device)
        self.append(zeros, zeros, valid=none, origin=torch.full_like(none, -1, dtype=torch.long))

    def append(self, keys, values, valid=None, origin=None, tags=None) -> None:
        """New entries [B, H, n, D] at the end (valid by default; origin / tags [B, H, n] or [B, n])."""
        b, h, n, _ = keys.shape

        def per_head(x, default):
            x = default if x is None else x
            return x[:, None].expand(b, h, n) if x.dim() == 2 else x

        self.data.append(keys, values)
        self.valid = torch.cat([self.valid, per_head(valid, torch.ones(b, n, dtype=torch.bool, device=keys.device))], 2)
        start = int(self.origin.max()) + 1 if self.origin.numel() else 0
        arrived = torch.arange(start, start + n, device=keys.device).expand(b, n)
        self.origin = torch.cat([self.origin, per_head(origin, arrived)], 2)
        self.tags = torch.cat([self.tags, per_head(tags, torch.full((b, n), -1, device=keys.device))], 2)

    def gather(self, index: torch.LongTensor, kept: torch.BoolTensor | None = None, merged=None) -> None:
        """Keep the entries `index` [B, H, K] (in that order), `kept` [B, H, K] marking the real ones
        among them (ragged selections pad with fillers); `merged`: keys / values to store instead of the
        gathered ones (policies that fold evicted entries into the kept). Needs dense data."""
        if not self.is_dense:
            raise ValueError("a quantized segment cannot be compacted: evict first, then quantize")
        keys, values = self.data.read()
        new_keys, new_values = merged if merged is not None else gather_kv(keys, values, index)
        self.data = DenseKV(new_keys.contiguous(), new_values.contiguous())
        kept = torch.ones_like(index, dtype=torch.bool) if kept is None else kept
        self.valid = self.valid.gather(2, index) & kept
        self.origin = self.origin.gather(2, index)
        self.tags = self.tags.gather(2, index)

    def keep(self, mask: torch.BoolTensor) -> None:
        """Drop the entries where `mask` [B, H, S] is False, keeping order; the segment shrinks to the
        most entries any (row, head) keeps, the others padded with invalid fillers."""
        count = int(mask.sum(-1).max()) if mask.numel() else 0
        s = self.length
        order = mask.float() * (2 * s) - torch.arange(s, device=mask.device)  # kept first, in order
        index = order.topk(count, dim=-1).indices.sort(-1).values
        self.gather(index, mask.gather(2, index))

    def store_with(self, quantizer, inputs=None) -> None:
        """Hand the entries to `quantizer` (a `QuantizationPolicy`) to hold from now on."""
        keys, values = self.data.read()
        self.data = quantizer.store(keys, values, inputs)

    def nbytes_as(self, element_bytes: int | None = None) -> int:
        """Bytes of the data (codes, scales and full-precision entries, the latter counted at
        `element_bytes` each when given)."""
        return self.data.nbytes_as(element_bytes)
