"""A static, preallocated per-layer KV buffer written in place (no per-step concatenation)."""

from __future__ import annotations

import torch


class KVBuffer:
    """Keys and values of every canvas position, per layer: [B, H_kv, L, D], allocated once.

    Before each forward the owner says which positions are fed (`plan`): either the whole canvas
    (a refresh, which rewrites every entry) or a window [start, end). During the forward each layer
    calls `update` (the `KVStore` protocol of the models): the fresh keys/values of the fed tokens,
    already rotated by RoPE at their absolute positions, are written at those positions, and the layer
    attends over positions [0, attend_end) read from the buffer. Keys therefore stay valid wherever
    they were computed; entries outside the fed window are whatever was last written there.

    `select(rows)` makes the next forward a full refresh of some rows of the batch (the model is fed
    those rows only): FreeCache refreshes the rows whose KV drifted in their own forward.
    """

    def __init__(self, model, key_mask: torch.Tensor | None, batch: int, length: int):
        dtype = next(model.parameters()).dtype
        shape = (batch, model.num_kv_heads, length, model.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=model.device) for _ in range(model.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=model.device) for _ in range(model.num_layers)]
        self.key_mask = key_mask  # [B, L] or None (no padding)
        self.length = length
        self.full = True
        self.start, self.end, self.attend_end = 0, length, length
        self.index: torch.LongTensor | None = None  # scattered fed positions (token-level freezing)
        self.rows: torch.LongTensor | None = None  # the rows the next forward feeds (None: all)
        self._mask = None
        # Drift probe (FreeCache's refresh_drift): fed positions [B, n_fed] whose fresh last-layer
        # values are compared with `reference` [B, H, L, D]; `drift` [B] is the largest cosine distance.
        self.probe: torch.Tensor | None = None
        self.reference: torch.Tensor | None = None
        self.drift: torch.Tensor | None = None

    def select(self, rows: torch.LongTensor | None) -> None:
        """The next forward feeds these rows of the batch (sorted; None = all). Call before `plan`."""
        self.rows = rows

    def _key_mask(self, attend_end: int) -> torch.Tensor | None:
        if self.key_mask is None:
            return None
        mask = self.key_mask if self.rows is None else self.key_mask[self.rows]
        return mask[:, :attend_end]

    def plan(self, start: int = 0, end: int | None = None, attend_end: int | None = None) -> None:
        """The next forward feeds positions [start, end) and attends to [0, attend_end)."""
        end = self.length if end is None else end
        attend_end = self.length if attend_end is None else attend_end
        if not 0 <= start < end <= attend_end <= self.length:
            raise ValueError(f"bad window: start={start}, end={end}, attend_end={attend_end}, length={self.length}")
        self.full = start == 0 and end == self.length
        if self.rows is not None and not self.full:
            raise ValueError("a selection of rows can only be refreshed whole")
        self.start, self.end, self.attend_end = start, end, attend_end
        self.index = None
        self._mask = self._key_mask(attend_end)

    def plan_index(self, index: torch.LongTensor, attend_end: int, write: torch.Tensor | None = None) -> None:
        """The next forward feeds the positions `index` (sorted, [n], shared by the batch) and attends
        to [0, attend_end); `write` [B, n] says which rows store the fresh KV of each fed position
        (the others keep what they had, as if that row had not fed it; default: all)."""
        if index.numel() == 0 or int(index[-1]) >= attend_end or attend_end > self.length:
            raise ValueError(f"bad fed positions: {index.tolist()} with attend_end={attend_end}, length={self.length}")
        if self.rows is not None:
            raise ValueError("a selection of rows can only be refreshed whole")
        self.full = False
        self.index, self.attend_end = index, attend_end
        self.write = None if write is None or bool(write.all()) else write[:, None, :, None]
        self._mask = self._key_mask(attend_end)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        if self.rows is not None:  # a refresh of some rows: their KV is rewritten whole
            self.k[layer_idx][self.rows] = k
            self.v[layer_idx][self.rows] = v
            return k, v, self._mask
        if self.index is not None:
            if self.probe is not None and layer_idx == len(self.k) - 1:
                self._measure_drift(v)
            if self.write is not None:
                k = torch.where(self.write, k, self.k[layer_idx][:, :, self.index])
                v = torch.where(self.write, v, self.v[layer_idx][:, :, self.index])
            self.k[layer_idx].index_copy_(2, self.index, k)
            self.v[layer_idx].index_copy_(2, self.index, v)
            return self.k[layer_idx][:, :, : self.attend_end], self.v[layer_idx][:, :, : self.attend_end], self._mask
        self.k[layer_idx][:, :, self.start : self.end] = k
        self.v[layer_idx][:, :, self.start : self.end] = v
        if self.full:
            # A refresh attends exactly like a cache-free forward (same tensors, same kernel path), so
            # a cache that refreshes every step is bit-identical to no cache.
            return k, v, self._mask
        return self.k[layer_idx][:, :, : self.attend_end], self.v[layer_idx][:, :, : self.attend_end], self._mask

    def _measure_drift(self, v: torch.Tensor) -> None:
        """Per row, the largest cosine distance between the fresh last-layer values at the probed
        positions and their reference (0 where nothing is probed). The last layer drifts most
        (Elastic-Cache, arXiv 2510.14973, observation 2)."""
        cos = torch.nn.functional.cosine_similarity(v.float(), self.reference[:, :, self.index].float(), dim=-1)
        self.drift = (1 - cos).amax(1).masked_fill(~self.probe, 0).amax(-1)  # cos: [B, H, n]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
