"""Storage that is not quantization: pruning key channels (ThinK) and sharing one store between
adjacent layers (MiniCache). Each builds a per-layer store with `append`, `read`, `length` and
`nbytes_as`, as the quantizers do."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..store import KVData
from .base import QuantizationPolicy, ScoreInputs
from .quant import _bytes, _ResidualStore


class ThinKStore(_ResidualStore):
    def __init__(self, policy: ThinK, keys, values, inputs: ScoreInputs | None):
        super().__init__(keys.shape[2], keys)
        b, h, length, d = keys.shape
        recent = min(policy.recent, length)
        old = keys[:, :, : length - recent]
        if inputs is None or inputs.queries is None:
            raise ValueError("ThinK reads the queries: build the cache with CompressedCache(..., model=model)")
        q = inputs.queries[:, :, -policy.window :].float()
        g = q.shape[1] // h
        q_mag = q.pow(2).mean(2).view(b, h, g, d).mean(2)  # [B, H, D]
        k_mag = old.float().pow(2).mean(2)
        n_keep = d - int(policy.prune * d)
        self.channels = (q_mag * k_mag).topk(n_keep, dim=-1).indices.sort(-1).values  # [B, H, D']
        self.k_old = old.gather(-1, self.channels[:, :, None].expand(-1, -1, old.shape[2], -1))
        self.values = values
        self.k_recent = keys[:, :, length - recent :]
        self.d = d

    def read(self):
        b, h, n_old, _ = self.k_old.shape
        k_old = self.k_old.new_zeros(b, h, n_old, self.d)
        k_old.scatter_(-1, self.channels[:, :, None].expand(-1, -1, n_old, -1), self.k_old)
        return torch.cat([k_old, self.k_recent, self.k_new], 2), torch.cat([self.values, self.v_new], 2)

    def nbytes_as(self, element_bytes):
        kept = (
            _bytes(self.k_old, element_bytes)
            + _bytes(self.k_recent, element_bytes)
            + _bytes(self.values, element_bytes)
        )
        return kept + self.channels.numel() * self.channels.element_size() // 8 + self.new_bytes(element_bytes)


@dataclass
class ThinK(QuantizationPolicy):
    """Query-driven key channel pruning (Xu et al., "ThinK", arXiv 2407.21018): per KV head, channel c
    scores mean_q(q_c^2) * mean_t(k_c^2) over the last `window` queries; the lowest `prune` fraction
    of channels is dropped from the stored keys (memory really shrinks; queries meet zeros there),
    while the `recent` newest tokens keep every channel. Stacks on any eviction policy."""

    prune: float = 0.4
    window: int = 32
    recent: int = 32
    name = "think"
    needs = frozenset({"queries"})

    def __post_init__(self):
        if not 0 <= self.prune < 1:
            raise ValueError(f"prune={self.prune} must be in [0, 1)")

    def store(self, keys, values, inputs=None):
        return ThinKStore(self, keys, values, inputs)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of unit vectors a, b (last dim)."""
    cos = (a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / sin


@dataclass
class MiniCache(QuantizationPolicy):
    """Cross-layer merging (Liu et al., "MiniCache", arXiv 2405.14366): from the middle layer up, each
    odd layer l is merged with layer l - 1: per token both layers keep their vector norms, and share one
    direction SLERP(k_{l-1}/|k_{l-1}|, k_l/|k_l|; t); token pairs whose directions are further apart than
    `retain_angle` (radians) are kept unmerged in both layers. Keys and values alike. The merged layer
    pair stores one direction instead of two vectors (memory close to half for merged tokens)."""

    t: float = 0.5
    retain_angle: float = 0.6
    name = "minicache"
    cross_layer = True

    def store(self, keys, values, inputs=None):
        return PlainStore(keys, values)

    def merge_pair(self, lower, upper) -> tuple[MergedView, MergedView]:
        shared = MergedPair(self, *lower.read_prefix(), *upper.read_prefix())
        return MergedView(shared, 0, lower), MergedView(shared, 1, upper)


class PlainStore(KVData):
    """Full-precision store (the starting point of layers MiniCache has not merged)."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values
        self.k_new, self.v_new = keys[:, :, :0], values[:, :, :0]

    @property
    def length(self):
        return self.keys.shape[2] + self.k_new.shape[2]

    def append(self, keys, values):
        self.k_new = torch.cat([self.k_new, keys], 2)
        self.v_new = torch.cat([self.v_new, values], 2)

    def read_prefix(self):
        return self.keys, self.values

    def read(self):
        return torch.cat([self.keys, self.k_new], 2), torch.cat([self.values, self.v_new], 2)

    def nbytes_as(self, element_bytes):
        n = self.keys.numel() + self.values.numel() + self.k_new.numel() + self.v_new.numel()
        return n * (element_bytes or self.keys.element_size())


class MergedPair:
    """The shared storage of two merged layers: directions, per-layer norms, unmerged tokens."""

    def __init__(self, policy: MiniCache, k0, v0, k1, v1):
        self.parts = []
        for x0, x1 in ((k0, k1), (v0, v1)):
            n0, n1 = x0.float().norm(dim=-1, keepdim=True), x1.float().norm(dim=-1, keepdim=True)
            u0, u1 = x0.float() / n0.clamp_min(1e-9), x1.float() / n1.clamp_min(1e-9)
            angle = torch.acos((u0 * u1).sum(-1).clamp(-1, 1))  # [B, H, L]
            merged = angle <= policy.retain_angle
            direction = slerp(u0, u1, policy.t).to(x0.dtype)
            keep_idx = (~merged).nonzero(as_tuple=True)
            self.parts.append(
                {
                    "dir": direction,
                    "norms": (n0.to(x0.dtype), n1.to(x1.dtype)),
                    "merged": merged,
                    "idx": keep_idx,
                    "raw": (x0[keep_idx], x1[keep_idx]),
                    "dtype": x0.dtype,
                }
            )

    def read(self, which: int, part: int) -> torch.Tensor:
        p = self.parts[part]
        x = p["dir"] * p["norms"][which]
        x[p["idx"]] = p["raw"][which]
        return x

    def nbytes_as(self, element_bytes) -> int:
        total = 0
        for p in self.parts:
            eb = element_bytes or p["dir"].element_size()
            merged = int(p["merged"].sum())
            d = p["dir"].shape[-1]
            total += merged * d * eb + 2 * p["norms"][0].numel() * eb  # shared directions + both norms
            total += 2 * p["raw"][0].numel() * eb + p["merged"].numel() // 8  # unmerged tokens + the bit map
        return total


class MergedView(KVData):
    """One layer's window on a `MergedPair`, plus its own new tokens; the pair's bytes are counted once
    (by the upper layer)."""

    def __init__(self, shared: MergedPair, which: int, previous):
        self.shared, self.which = shared, which
        self.k_new, self.v_new = previous.k_new, previous.v_new
        self.prefix_length = shared.parts[0]["dir"].shape[2]

    @property
    def length(self):
        return self.prefix_length + self.k_new.shape[2]

    def append(self, keys, values):
        self.k_new = torch.cat([self.k_new, keys], 2)
        self.v_new = torch.cat([self.v_new, values], 2)

    def read(self):
        k, v = self.shared.read(self.which, 0), self.shared.read(self.which, 1)
        return torch.cat([k, self.k_new], 2), torch.cat([v, self.v_new], 2)

    def nbytes_as(self, element_bytes):
        new = (self.k_new.numel() + self.v_new.numel()) * (element_bytes or self.k_new.element_size())
        return new + (self.shared.nbytes_as(element_bytes) if self.which == 1 else 0)
