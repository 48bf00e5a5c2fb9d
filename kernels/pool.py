"""One paged KV pool per layer, shared by every running request (vLLM's PagedAttention layout).

Storage is a flat array of slots per layer, `k[layer]` / `v[layer]`: [num_blocks * block_size, H_kv, D],
cut into fixed-size blocks. A request owns a list of blocks (its block table) from admission to its
end; token position p of that request lives in slot `table[p // block_size] * block_size + p %
block_size`. A step writes every fed token's fresh K/V with one slot-mapped copy per layer and reads
each request's keys back through its slots, whoever else is running.

Admission is by free blocks: `allocate` raises `PoolFull` instead of growing, so a server that checks
`can_allocate` first never runs out of memory mid-step, and `free` returns the blocks at once.

Block 0 is the null block: zeros at first, never handed out. Readers point every padding key at it
(slot 0), so what they read where they mask is always finite (a NaN there would survive a masked
softmax as NaN x 0). Positions whose blocks a request gave back early (a compressed prompt's) map to
slot 0 too, so a write to one of them lands there: the block holds finite values, never read
unmasked. The other blocks are left uninitialised: their memory is only touched, and only resident,
once a request writes it, and a request writes every position it reads before reading it.
"""

from __future__ import annotations

import math

import torch


class PoolFull(RuntimeError):
    """Not enough free blocks for a request (it waits, or its caller answers 429)."""


class KVPool:
    """Per-layer paged K/V storage.

    num_layers, num_kv_heads, head_dim: the model's KV shape; num_blocks: blocks per layer that
    requests can hold (plus the null block 0); block_size: tokens per block. `for_bytes` sizes the
    pool from a byte budget. Slots of freed blocks keep stale values: readers mask keys by position.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        for name, value in (
            ("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
            ("num_blocks", num_blocks), ("block_size", block_size),
        ):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = ((num_blocks + 1) * block_size, num_kv_heads, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        for t in self.k + self.v:
            t[:block_size].zero_()  # the null block
        self._free = list(range(num_blocks, 0, -1))  # a stack: the lowest ids are handed out first
        self._taken: set[int] = set()

    @classmethod
    def for_bytes(cls, budget: int, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int = 16,
                  dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> KVPool:  # fmt: skip
        """The largest pool whose K and V (null block included) fit in `budget` bytes."""
        per_block = bytes_per_token(num_layers, num_kv_heads, head_dim, dtype) * block_size
        if budget < 2 * per_block:
            raise ValueError(f"a KV budget of {budget} bytes does not hold two blocks ({per_block} bytes each)")
        return cls(num_layers, num_kv_heads, head_dim, budget // per_block - 1, block_size, dtype, device)

    # ------------------------------------------------------------------ blocks

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        """Bytes of K and V storage (resident only where written)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def capacity(self) -> int:
        """Token positions the whole pool holds (its null block aside)."""
        return self.num_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def can_allocate(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= len(self._free)

    def allocate(self, tokens: int) -> list[int]:
        """Blocks for `tokens` positions (a request's block table); `PoolFull` when they are not free."""
        need = self.blocks_for(tokens)
        if need > self.num_blocks:
            raise PoolFull(f"{tokens} tokens need {need} blocks; the pool has {self.num_blocks} in all")
        if need > len(self._free):
            raise PoolFull(f"{tokens} tokens need {need} blocks; {len(self._free)} of {self.num_blocks} are free")
        blocks = [self._free.pop() for _ in range(need)]
        self._taken.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Give a request's blocks back (each exactly once)."""
        bad = [b for b in blocks if b not in self._taken]
        if bad or len(set(blocks)) != len(blocks):
            raise ValueError(f"blocks {sorted(bad) or blocks} are not allocated (or repeat)")
        self._taken.difference_update(blocks)
        self._free.extend(reversed(blocks))

    def slots(self, blocks: list[int], length: int) -> torch.LongTensor:
        """The slots of positions [0, length) of a request with block table `blocks`, [length]."""
        if self.blocks_for(length) > len(blocks):
            raise ValueError(f"{len(blocks)} blocks hold fewer than {length} positions")
        table = torch.tensor(blocks, dtype=torch.long)
        pos = torch.arange(length)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.k[0].device)

    # ------------------------------------------------------------------ data

    def write(self, layer: int, slots: torch.LongTensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k / v [T, H_kv, D] at `slots` [T] of `layer` (one copy each)."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V bytes of one token over all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
