"""Group-wise asymmetric KV quantization with packed storage, in plain torch (the kernels' reference).

KIVI (Liu et al., arXiv 2402.02750): keys are quantized per channel (each channel over groups of G
consecutive tokens, since key outliers live in fixed channels) and values per token (each token over
groups of G channels). Min-max quantization: scale = (max - min) / (2^bits - 1), zero = min,
q = clamp(floor((x - zero) / scale + 1/2), 0, 2^bits - 1), x' = q * scale + zero; so |x - x'| <= scale / 2
(plus the rounding of scale and zero to `scale_dtype`). Codes are packed along the head dimension:
8 // bits codes per byte, code j of a byte in bits [j*bits, (j+1)*bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 4, 8)
GROUP_SIZES = (32, 64, 128)
AXES = ("channel", "token")


@dataclass
class QuantizedTensor:
    """Packed codes [B, H, L, D * bits / 8] (uint8) with scale and zero per group:
    [B, H, L / G, D] for axis="channel", [B, H, L, D / G] for axis="token"."""

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    axis: str
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h, length, packed = self.data.shape
        return b, h, length, packed * 8 // self.bits

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero))

    def tokens(self, start: int, end: int) -> QuantizedTensor:
        """The codes of tokens start..end (views; with axis="channel" both ends must be multiples of
        the group size, or `end` the length)."""
        length = self.data.shape[2]
        if self.axis == "token":
            scale, zero = self.scale[:, :, start:end], self.zero[:, :, start:end]
        else:
            g = self.group_size
            if start % g or (end % g and end != length):
                raise ValueError(f"tokens({start}, {end}) must fall on groups of {g} tokens (axis='channel')")
            scale, zero = self.scale[:, :, start // g : -(-end // g)], self.zero[:, :, start // g : -(-end // g)]
        return QuantizedTensor(
            self.data[:, :, start:end], scale, zero, self.bits, self.group_size, self.axis, self.dtype
        )

    def rows(self, rows: torch.LongTensor) -> QuantizedTensor:
        """The codes of these batch rows."""
        return QuantizedTensor(
            self.data[rows], self.scale[rows], self.zero[rows], self.bits, self.group_size, self.axis, self.dtype
        )

    def with_rows(self, rows: torch.LongTensor, other: QuantizedTensor) -> QuantizedTensor:
        """A copy whose batch rows `rows` are `other`'s (same layout and length)."""
        if (other.bits, other.group_size, other.axis, other.data.shape[1:]) != (
            self.bits, self.group_size, self.axis, self.data.shape[1:]
        ):  # fmt: skip
            raise ValueError("QuantizedTensor.with_rows: the rows differ in bits, group size, axis or shape")
        put = lambda t, o: t.index_copy(0, rows, o)  # noqa: E731
        return QuantizedTensor(
            put(self.data, other.data), put(self.scale, other.scale), put(self.zero, other.zero),
            self.bits, self.group_size, self.axis, self.dtype,
        )  # fmt: skip

    @staticmethod
    def cat(parts: list[QuantizedTensor]) -> QuantizedTensor:
        """Parts of one tensor along the tokens (same bits, group and axis; channel-axis parts whole
        groups)."""
        first = parts[0]
        for p in parts[1:]:
            if (p.bits, p.group_size, p.axis) != (first.bits, first.group_size, first.axis):
                raise ValueError("QuantizedTensor.cat: parts differ in bits, group size or axis")
        cat = lambda ts: torch.cat(ts, dim=2)  # noqa: E731
        return QuantizedTensor(
            cat([p.data for p in parts]), cat([p.scale for p in parts]), cat([p.zero for p in parts]),
            first.bits, first.group_size, first.axis, first.dtype,
        )  # fmt: skip


def check_quantize_args(x: torch.Tensor, bits: int, group_size: int, axis: str) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits}: expected one of {BITS}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size}: expected one of {GROUP_SIZES}")
    if axis not in AXES:
        raise ValueError(f"axis={axis!r}: expected one of {AXES}")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating [B, H, L, D] tensor, got {x.dtype} {tuple(x.shape)}")
    length, d = x.shape[2], x.shape[3]
    if d % (8 // bits):
        raise ValueError(f"head dim {d} is not a multiple of {8 // bits} codes per byte")
    grouped = length if axis == "channel" else d
    if grouped % group_size:
        what = "sequence length" if axis == "channel" else "head dim"
        raise ValueError(f"{what} {grouped} is not a multiple of group_size={group_size} (axis={axis!r})")


def quantize_kv(
    x: torch.Tensor, bits: int = 4, group_size: int = 32, axis: str = "token", scale_dtype: torch.dtype = torch.float16
) -> QuantizedTensor:
    """Quantize x [B, H, L, D]; axis="channel" for keys (KIVI), "token" for values."""
    check_quantize_args(x, bits, group_size, axis)
    levels = 2**bits - 1
    grouped, dim = _groups(x.float(), axis, group_size)
    lo, hi = grouped.amin(dim), grouped.amax(dim)
    scale = ((hi - lo) / levels).to(scale_dtype)
    zero = lo.to(scale_dtype)
    s, z = scale.float().unsqueeze(dim), zero.float().unsqueeze(dim)
    codes = torch.floor((grouped - z) / torch.where(s > 0, s, 1.0) + 0.5).clamp(0, levels).to(torch.uint8)
    return QuantizedTensor(pack(codes.view(x.shape), bits), scale, zero, bits, group_size, axis, x.dtype)


def dequantize_kv(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dequantized tensor [B, H, L, D] (in the original dtype unless `dtype` is given)."""
    codes = unpack(qt.data, qt.bits).float()
    grouped, dim = _groups(codes, qt.axis, qt.group_size)
    out = grouped * qt.scale.float().unsqueeze(dim) + qt.zero.float().unsqueeze(dim)
    return out.view(codes.shape).to(dtype or qt.dtype)


def _groups(x: torch.Tensor, axis: str, group_size: int) -> tuple[torch.Tensor, int]:
    """x [B, H, L, D] viewed as its quantization groups, and the dim a group spans (where the scale
    and zero [B, H, L/g, D] or [B, H, L, D/g] broadcast once unsqueezed): axis "channel" groups g
    tokens, [B, H, L/g, g, D]; axis "token" groups g channels, [B, H, L, D/g, g]."""
    b, h, length, d = x.shape
    if axis == "channel":
        return x.view(b, h, length // group_size, group_size, d), 3
    return x.view(b, h, length, d // group_size, group_size), 4


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] -> bytes [..., D * bits / 8]."""
    per = 8 // bits
    c = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack(data: torch.Tensor, bits: int) -> torch.Tensor:
    """bytes [..., P] -> uint8 codes [..., P * 8 / bits]."""
    per = 8 // bits
    shifts = torch.arange(per, device=data.device, dtype=torch.int32) * bits
    if per == 1:
        return data.clone()
    codes = (data[..., None] >> shifts.to(torch.uint8)) & (2**bits - 1)
    return codes.reshape(*data.shape[:-1], data.shape[-1] * per)
