"""Quantization: kept tokens stored in low-bit codes. KIVI (per-channel keys, per-token values, a
full-precision window of recent tokens), MiKV (important tokens in full precision, the rest at low
bits) and GEAR (quantization + low-rank + sparse outliers). Each builds a per-layer store with
`append`, `read`, `length` and `nbytes_as`; the base class is `base.QuantizationPolicy`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..ops.quantize import BITS, GROUP_SIZES, QuantizedTensor, dequantize_kv, quantize_kv
from ..ops.quantized_attention import quantized_attention
from ..store import DenseKV, KVData
from .base import EvictionPolicy, QuantizationPolicy, ScoreInputs, check_positive
from .eviction import H2O


class KIVIStore(KVData):
    """Quantized entries (keys per channel, values per token; one `QuantizedTensor` each) and a
    full-precision residual of the newest; whenever the residual exceeds `residual` tokens, its oldest
    whole groups are quantized. Attention reads the codes through `ops.quantized_attention`: dequantized
    in registers (Triton) or a chunk at a time (torch), never a full-precision copy of the cache."""

    def __init__(self, policy: KIVI, keys: torch.Tensor, values: torch.Tensor):
        self.policy = policy
        self.k_codes: QuantizedTensor | None = None
        self.v_codes: QuantizedTensor | None = None
        self.k_res, self.v_res = keys[:, :, :0], values[:, :, :0]
        self.append(keys, values)

    @property
    def quantized_length(self) -> int:
        return 0 if self.k_codes is None else self.k_codes.shape[2]

    @property
    def length(self) -> int:
        return self.quantized_length + self.k_res.shape[2]

    def nbytes_as(self, element_bytes: int | None) -> int:
        """Codes and scales as stored; the residual at `element_bytes` per entry (None: its dtype's)."""
        codes = 0 if self.k_codes is None else self.k_codes.nbytes + self.v_codes.nbytes
        return codes + 2 * self.k_res.numel() * (element_bytes or self.k_res.element_size())

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        p = self.policy
        self.k_res = torch.cat([self.k_res, keys], 2)
        self.v_res = torch.cat([self.v_res, values], 2)
        spill = max(0, self.k_res.shape[2] - p.residual)
        spill -= spill % p.group_size
        if spill:
            k = quantize_kv(self.k_res[:, :, :spill], p.bits, p.group_size, "channel")
            value_group = min(p.group_size, self.v_res.shape[3])  # per-token groups cannot exceed the head dim
            v = quantize_kv(self.v_res[:, :, :spill], p.bits, value_group, "token")
            self.k_codes = k if self.k_codes is None else QuantizedTensor.cat([self.k_codes, k])
            self.v_codes = v if self.v_codes is None else QuantizedTensor.cat([self.v_codes, v])
            self.k_res, self.v_res = self.k_res[:, :, spill:], self.v_res[:, :, spill:]

    def zeros(self, n: int) -> torch.Tensor:
        return self.k_res.new_zeros(*self.k_res.shape[:2], n, self.k_res.shape[3])

    def _with(self, k_codes, v_codes, k_res, v_res) -> KIVIStore:
        other = KIVIStore.__new__(KIVIStore)
        other.policy, other.k_codes, other.v_codes, other.k_res, other.v_res = (
            self.policy,
            k_codes,
            v_codes,
            k_res,
            v_res,
        )
        return other

    def select_rows(self, rows):
        codes = (None, None) if self.k_codes is None else (self.k_codes.rows(rows), self.v_codes.rows(rows))
        return self._with(*codes, self.k_res[rows], self.v_res[rows])

    def with_rows(self, rows, other):
        if (self.quantized_length, self.length) != (other.quantized_length, other.length):
            raise ValueError("KIVIStore.with_rows: the rows must split into codes and residual alike")
        codes = (None, None)
        if self.k_codes is not None:
            codes = (self.k_codes.with_rows(rows, other.k_codes), self.v_codes.with_rows(rows, other.v_codes))
        return self._with(
            *codes, self.k_res.index_copy(0, rows, other.k_res), self.v_res.index_copy(0, rows, other.v_res)
        )

    def cat_rows(self, others):
        parts = [self, *others]
        if len({(p.quantized_length, p.length) for p in parts}) != 1:
            raise ValueError("KIVIStore.cat_rows: the rows must split into codes and residual alike")
        codes = (None, None)
        if self.k_codes is not None:
            codes = tuple(_cat_rows([getattr(p, name) for p in parts]) for name in ("k_codes", "v_codes"))
        return self._with(*codes, torch.cat([p.k_res for p in parts]), torch.cat([p.v_res for p in parts]))

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision K/V (a dequantized copy of the codes + the residual): for scoring, not attention."""
        if self.k_codes is None:
            return self.k_res, self.v_res
        dtype = self.k_res.dtype
        keys = torch.cat([dequantize_kv(self.k_codes, dtype), self.k_res], 2)
        return keys, torch.cat([dequantize_kv(self.v_codes, dtype), self.v_res], 2)

    def attend(self, q, key_mask, scale=None, causal: bool = False, backend: str = "auto"):
        if self.k_codes is None:
            return DenseKV(self.k_res, self.v_res).attend(q, key_mask, scale, causal, backend)
        return quantized_attention(
            q, self.k_codes, self.v_codes, self.k_res, self.v_res, key_mask=key_mask, scale=scale, causal=causal,
            return_lse=True, backend=backend,
        )  # fmt: skip


@dataclass
class KIVI(QuantizationPolicy):
    """KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
    arXiv 2402.02750): asymmetric min-max quantization, keys per channel over groups of `group_size`
    tokens, values per token over groups of `group_size` channels, the `residual` most recent tokens
    in full precision. (Values leave the residual in blocks of `group_size` tokens here, like keys,
    rather than one at a time.)"""

    bits: int = 2
    group_size: int = 32
    residual: int = 128
    name = "kivi"

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits={self.bits}: expected one of {BITS}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size}: expected one of {GROUP_SIZES}")
        if self.residual < 0:
            raise ValueError(f"residual={self.residual} must be >= 0")

    def store(self, keys, values, inputs=None):
        return KIVIStore(self, keys, values)


def _cat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Codes of the same layout stacked along the batch."""
    first = parts[0]
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return dataclasses.replace(first, data=cat("data"), scale=cat("scale"), zero=cat("zero"))


def _bytes(t: torch.Tensor, element_bytes: int | None) -> int:
    return t.numel() * (element_bytes or t.element_size()) if t.is_floating_point() else t.numel() * t.element_size()


class _ResidualStore(KVData):
    """Shared: a compressed prefix (built once) + new tokens kept in full precision. Attention reads a
    full-precision copy (`KVData.attend`): these stores save memory at rest, not reads."""

    def __init__(self, prefix_length: int, like: torch.Tensor):
        self.prefix_length = prefix_length
        self.k_new = like[:, :, :0]
        self.v_new = like[:, :, :0]

    @property
    def length(self) -> int:
        return self.prefix_length + self.k_new.shape[2]

    def append(self, keys, values) -> None:
        self.k_new = torch.cat([self.k_new, keys], 2)
        self.v_new = torch.cat([self.v_new, values], 2)

    def new_bytes(self, element_bytes) -> int:
        return _bytes(self.k_new, element_bytes) + _bytes(self.v_new, element_bytes)


class MiKVStore(_ResidualStore):
    def __init__(self, policy: MiKV, keys, values, inputs: ScoreInputs | None):
        super().__init__(keys.shape[2], keys)
        b, h, length, d = keys.shape
        n_hi = max(1, int(policy.important * length))
        scores = policy.scorer.ranking(inputs) if inputs is not None and inputs.queries is not None else None
        if scores is None:  # no queries: recency as importance
            scores = torch.arange(length, device=keys.device, dtype=torch.float32).expand(b, h, -1)
        self.important = torch.zeros(b, h, length, dtype=torch.bool, device=keys.device)
        self.important.scatter_(2, scores.topk(n_hi, dim=-1).indices, True)
        # Outlier balancer: scale key channels by b_c = sqrt(max|q_c| / max|k_c|) before quantizing
        # (queries would be divided by b, so q.k is unchanged; here it is undone on read).
        if inputs is not None and inputs.queries is not None and policy.balance:
            g = inputs.queries.shape[1] // h
            qmax = inputs.queries.float().abs().amax(2).view(b, h, g, d).amax(2)
            kmax = keys.float().abs().amax(2)
            self.balance = (qmax / kmax.clamp_min(1e-6)).sqrt().clamp(1e-2, 1e2)[:, :, None]  # [B, H, 1, D]
        else:
            self.balance = torch.ones(b, h, 1, d, device=keys.device)
        kb = keys.float() * self.balance
        group = policy.group_size
        pad = (-length) % group
        kpad = torch.cat([kb, kb[:, :, -1:].expand(-1, -1, pad, -1)], 2) if pad else kb
        vpad = torch.cat([values, values[:, :, -1:].expand(-1, -1, pad, -1)], 2) if pad else values
        self.k_lo = quantize_kv(kpad.to(keys.dtype), policy.low_bits, group, "channel")
        self.v_lo = quantize_kv(vpad, policy.low_bits, min(group, d), "token")
        hi_idx = self.important.nonzero(as_tuple=True)
        self.k_hi = keys[hi_idx]  # [N_hi, D] full precision (the important tokens)
        self.v_hi = values[hi_idx]
        self.hi_idx = hi_idx

    def read(self):
        length = self.prefix_length
        keys = (dequantize_kv(self.k_lo, torch.float32)[:, :, :length] / self.balance).to(self.k_hi.dtype)
        values = dequantize_kv(self.v_lo, self.v_hi.dtype)[:, :, :length]
        keys[self.hi_idx] = self.k_hi
        values[self.hi_idx] = self.v_hi
        return torch.cat([keys, self.k_new], 2), torch.cat([values, self.v_new], 2)

    def nbytes_as(self, element_bytes):
        lo = self.k_lo.nbytes + self.v_lo.nbytes  # low-bit codes for every token (unread for important ones)
        hi = _bytes(self.k_hi, element_bytes) + _bytes(self.v_hi, element_bytes)
        index = self.important.numel() // 8  # one bit per token and head
        return lo + hi + index + self.new_bytes(element_bytes)


@dataclass
class MiKV(QuantizationPolicy):
    """Mixed-precision KV ("No Token Left Behind", Yang et al., arXiv 2402.18096): instead of evicting,
    the `important` fraction of tokens (by `scorer`, H2O-style accumulated attention) stays in full
    precision and all the others are kept at `low_bits`, with an outlier balancer on key channels
    (b_c = sqrt(max|q_c| / max|k_c|)) before quantization."""

    important: float = 0.2
    low_bits: int = 2
    group_size: int = 32
    balance: bool = True
    scorer: EvictionPolicy = field(default_factory=H2O)
    name = "mikv"

    def __post_init__(self):
        if not 0 < self.important <= 1:
            raise ValueError(f"important={self.important} must be in (0, 1]")
        if self.low_bits not in BITS:
            raise ValueError(f"low_bits={self.low_bits}: expected one of {BITS}")
        self.needs = self.scorer.needs

    def store(self, keys, values, inputs=None):
        return MiKVStore(self, keys, values, inputs)


def _low_rank(residual: torch.Tensor, rank: int, iters: int = 3):
    """Rank-`rank` factors (A [.., L, r], B [.., r, D]) of residual [.., L, D] by power iteration."""
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(*residual.shape[:-2], residual.shape[-1], rank, generator=g).to(residual)
    for _ in range(iters):
        u = torch.linalg.qr(residual @ v).Q
        v = torch.linalg.qr(residual.transpose(-1, -2) @ u).Q
    a = residual @ v  # [.., L, r]
    return a, v.transpose(-1, -2)


class GEARStore(_ResidualStore):
    def __init__(self, policy: GEAR, keys, values):
        super().__init__(keys.shape[2], keys)
        self.parts = [self._compress(policy, x, axis) for x, axis in ((keys, "channel"), (values, "token"))]

    @staticmethod
    def _compress(policy: GEAR, x: torch.Tensor, axis: str):
        b, h, length, d = x.shape
        xf = x.float()
        # S: the s/2 largest and s/2 smallest entries of every token, kept exactly, replaced by the mean.
        n_out = max(0, int(round(policy.outliers * d / 2)))
        outlier_idx = None
        if n_out:
            outlier_idx = torch.cat([xf.topk(n_out, -1).indices, (-xf).topk(n_out, -1).indices], -1)
            outlier_val = xf.gather(-1, outlier_idx)
            xf = xf.scatter(-1, outlier_idx, xf.mean(-1, keepdim=True).expand_as(outlier_idx))
        group = policy.group_size
        pad = (-length) % group if axis == "channel" else 0
        xq = torch.cat([xf, xf[:, :, -1:].expand(-1, -1, pad, -1)], 2) if pad else xf
        q = quantize_kv(xq.to(x.dtype), policy.bits, group if axis == "channel" else min(group, d), axis)
        deq = dequantize_kv(q, torch.float32)[:, :, :length]
        a, bmat = _low_rank(xf - deq, policy.rank)
        part = {"q": q, "a": a.to(x.dtype), "b": bmat.to(x.dtype), "length": length, "dtype": x.dtype}
        if outlier_idx is not None:
            part["out_idx"] = outlier_idx.to(torch.int16 if d < 2**15 else torch.int32)
            part["out_val"] = outlier_val.to(x.dtype)
        return part

    @staticmethod
    def _read(part) -> torch.Tensor:
        x = dequantize_kv(part["q"], torch.float32)[:, :, : part["length"]]
        x = x + part["a"].float() @ part["b"].float()
        if "out_idx" in part:
            x = x.scatter(-1, part["out_idx"].long(), part["out_val"].float())
        return x.to(part["dtype"])

    def read(self):
        keys, values = (self._read(p) for p in self.parts)
        return torch.cat([keys, self.k_new], 2), torch.cat([values, self.v_new], 2)

    def nbytes_as(self, element_bytes):
        total = self.new_bytes(element_bytes)
        for p in self.parts:
            total += p["q"].nbytes + _bytes(p["a"], element_bytes) + _bytes(p["b"], element_bytes)
            if "out_idx" in p:
                total += p["out_idx"].numel() * p["out_idx"].element_size() + _bytes(p["out_val"], element_bytes)
        return total


@dataclass
class GEAR(QuantizationPolicy):
    """GEAR (Kang et al., arXiv 2403.05527): X ~ D + L + S with D a `bits`-bit group quantization (keys
    per channel, values per token) of X without its outliers, S the `outliers` fraction of extreme
    entries per token kept exactly, and L a rank-`rank` power-iteration approximation of the remaining
    quantization error."""

    bits: int = 2
    group_size: int = 64
    rank: int = 4
    outliers: float = 0.02
    name = "gear"

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits={self.bits}: expected one of {BITS}")
        check_positive("rank", self.rank)
        if not 0 <= self.outliers < 1:
            raise ValueError(f"outliers={self.outliers} must be in [0, 1)")

    def store(self, keys, values, inputs=None):
        return GEARStore(self, keys, values)
