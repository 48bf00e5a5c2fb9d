"""The KV of one generation's canvas: a plain store, written by plans and read by attention.

Per layer, a dense buffer [B, H_kv, L', D] written in place (no per-step concatenation) holds the KV
of canvas positions [base, L). Without compression base = 0: the buffer is the whole canvas. With a
`Compression` of the prompt, base = P: the buffer holds the generation region only, and the prompt's
entries live in a `KVSegment` per layer (`dlmcache.kernels.store`), compressed right after the
forward that computed them, row by row, each row to the budget of its own prompt with its own
queries, so a batch stores exactly what its rows would alone.

The models call `attend(layer_idx, q, k, v, backend)` (the `KVStore` protocol): it writes the fed
positions' fresh KV where the current plan says and returns the fed queries' attention:

- a `Refresh` attends exactly as a cache-free forward does (the same call on the same tensors, so a
  cache that refreshes every step is bit-identical to no cache), then rewrites the rows' KV (and
  compresses their prompt);
- a `Window` / `Scatter` attends over what is stored up to `attend_end` with the fed positions fresh:
  one attention over the buffer, or, with a compressed prompt, attention over the prompt segment and
  over the buffer merged by their log-sum-exps (`ops.merge_attention`; a quantized prompt is read by
  `ops.quantized_attention`, never dequantized whole).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from dlmcache.kernels.compression import Compression, score_inputs
from dlmcache.kernels.ops import attention, dense_attention, merge_attention
from dlmcache.kernels.policies import KIVI, BudgetAllocator, EvictionPolicy, QuantizationPolicy, get_policy
from dlmcache.kernels.policies.budget import Pyramid, Uniform
from dlmcache.kernels.store import DenseKV, KVSegment

from .plans import Plan, Refresh, Scatter

#: What a prompt-compressing policy may read: the prompt's own queries, or the masked positions'.
PROMPT_INPUTS = frozenset({"queries", "all_queries", "mask_queries"})
ALLOCATORS = {"uniform": Uniform, "pyramid": Pyramid}


def prompt_compression(policy=None, budget: float | int = 1.0, allocator=None, quantizer=None) -> Compression | None:
    """The compression of a denoising cache's prompt KV, validated before any decoding (None: none).

    policy: a registry eviction policy by name ("snapkv", "maskkv", ...) or an `EvictionPolicy`;
    budget: the fraction of each row's prompt kept, in (0, 1], or a token count; allocator: "uniform"
    (default), "pyramid" or a non-cascading `BudgetAllocator`; quantizer: "kivi2" / "kivi4" / "kivi8"
    or a `KIVI` (its attention reads the codes: never a full-precision copy). The prompt is static, so
    KIVI's full-precision window of recent tokens does not apply: every kept entry is quantized
    (residual=0). A policy at budget=1.0 without a quantizer keeps everything: that is no compression
    (None), so it equals the uncompressed cache token for token.
    """
    if isinstance(policy, str):
        policy = get_policy(policy)
    if policy is not None:
        if not isinstance(policy, EvictionPolicy):
            raise ValueError(f"policy={policy!r} is not an eviction policy")
        if policy.is_recall:
            raise ValueError(f"policy={policy.name!r} is a recall policy: a denoising cache evicts, it does not recall")
        unknown = set(policy.needs) - PROMPT_INPUTS
        if unknown:
            raise ValueError(
                f"policy={policy.name!r} reads {sorted(unknown)}, which a denoising cache does not capture "
                f"(it offers {sorted(PROMPT_INPUTS)})"
            )
    if isinstance(allocator, str):
        if allocator not in ALLOCATORS:
            raise ValueError(f"allocator={allocator!r}: expected one of {sorted(ALLOCATORS)} or a BudgetAllocator")
        allocator = ALLOCATORS[allocator]()
    if isinstance(allocator, BudgetAllocator) and allocator.cascading:
        raise ValueError(
            f"allocator={allocator.name!r} cascades budgets over layers during a prefill; a denoising cache "
            "compresses each layer's prompt on its own"
        )
    if isinstance(quantizer, str):
        bits = {"kivi2": 2, "kivi4": 4, "kivi8": 8}.get(quantizer)
        if bits is None:
            raise ValueError(f"quantizer={quantizer!r}: expected 'kivi2', 'kivi4', 'kivi8' or a KIVI")
        quantizer = KIVI(bits=bits)
    if quantizer is not None:
        if not isinstance(quantizer, QuantizationPolicy):
            raise TypeError(f"quantizer must be a QuantizationPolicy, got {type(quantizer).__name__}: {quantizer!r}")
        if not isinstance(quantizer, KIVI):
            raise ValueError(
                f"quantizer={quantizer.name!r}: a denoising cache attends over its prompt every step, and only "
                "KIVI's store is read by fused dequantization; the others would dequantize it whole"
            )
        quantizer = dataclasses.replace(quantizer, residual=0)
    if policy is None and quantizer is None:
        if budget != 1.0 or allocator is not None:
            raise ValueError(f"budget={budget!r} / allocator={allocator!r} given without a policy to evict with")
        return None
    if quantizer is None and isinstance(budget, float) and budget == 1.0 and not isinstance(allocator, Pyramid):
        # Keeping every entry in full precision is no compression: the cache runs uncompressed, so it
        # decodes token for token as without the option (DESIGN's invariant), refreshes included.
        return None
    if policy is None and budget != 1.0:
        raise ValueError(f"budget={budget!r} given without a policy to evict with")
    return Compression(policy=policy, budget=budget, allocator=allocator, quantizer=quantizer)


class CanvasStore:
    """KV of a canvas [B, L] with prompt length P (see the module docstring).

    compression: how the prompt's KV is compressed (None: it is not). The current forward is set up
    with `begin(plan, canvas, rows, fed)`; `nbytes` counts every stored byte.
    """

    def __init__(self, model, layout, compression: Compression | None = None):
        b = layout.key_mask.shape[0]
        self.layout = layout
        self.compression = compression
        self.prompt_len = layout.prompt_len
        self.base = self.prompt_len if compression is not None else 0
        self.length = layout.length
        self.num_layers = model.num_layers
        dtype = next(model.parameters()).dtype
        shape = (b, model.num_kv_heads, self.length - self.base, model.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=model.device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=model.device) for _ in range(self.num_layers)]
        self.prompt: list[KVSegment | None] = [None] * self.num_layers
        self.key_mask = layout.key_mask  # [B, L]
        self.padded = not bool(layout.key_mask.all())
        self.plan: Plan | None = None
        self.fresh_values: torch.Tensor | None = None  # the last layer's values of the last forward's fed positions

    @property
    def compressed(self) -> bool:
        return self.compression is not None

    # ------------------------------------------------------------------ the next forward

    def begin(self, plan: Plan, canvas: torch.LongTensor, rows: torch.LongTensor | None, fed: torch.LongTensor | None):
        """The next forward runs `plan` on `rows` of the batch (None: all), feeding canvas positions
        `fed` ([n]; None: the whole canvas) of `canvas` [B, L]."""
        if isinstance(plan, Refresh) and fed is not None:
            raise ValueError("a refresh feeds the whole canvas")
        if not isinstance(plan, Refresh) and plan.attend_end > self.length:
            raise ValueError(f"plan {plan} attends past the canvas (length {self.length})")
        self.plan, self.canvas, self.rows = plan, canvas, rows
        mask = self.key_mask if rows is None else self.key_mask[rows]
        self._mask = mask if self.padded else None  # [R, L]
        if fed is not None:
            stored = fed >= self.base  # positions before the buffer (a compressed prompt's) are not written
            self._slots = fed[stored] - self.base
            self._stored = stored if not bool(stored.all()) else None
            self._write = None
            if isinstance(plan, Scatter) and plan.write is not None and not bool(plan.write.all()):
                self._write = plan.write[:, None, :, None]  # [B, 1, n, 1]
                if self._stored is not None:
                    self._write = self._write[:, :, self._stored]

    def attend(self, layer_idx: int, q, k, v, backend: str = "auto"):
        """Store the fed positions' fresh KV (q, k, v: [R, H, n, D]) and return their attention."""
        if layer_idx == self.num_layers - 1:
            self.fresh_values = v
        if isinstance(self.plan, Refresh):
            out = dense_attention(q, k, v, self._mask, backend)
            self._write_refresh(layer_idx, q, k, v)
            return out
        attend_end = self.plan.attend_end
        self._write_fed(layer_idx, k, v)
        buf_k, buf_v = self._rows(self.k[layer_idx]), self._rows(self.v[layer_idx])
        buf_k, buf_v = buf_k[:, :, : attend_end - self.base], buf_v[:, :, : attend_end - self.base]
        mask = None if self._mask is None else self._mask[:, self.base : attend_end]
        if not self.compressed:
            return dense_attention(q, buf_k, buf_v, mask, backend)
        segment = self.prompt[layer_idx] if self.rows is None else self.prompt[layer_idx].select_rows(self.rows)
        parts = [
            segment.attend(q, backend=backend),
            attention(q, buf_k, buf_v, key_mask=mask, return_lse=True, backend=backend),
        ]
        return merge_attention(parts)[0]

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t[self.rows]

    def _write_fed(self, layer_idx: int, k, v) -> None:
        if self._stored is not None:
            k, v = k[:, :, self._stored], v[:, :, self._stored]
        if self._slots.numel() == 0:
            return
        for buf, new in ((self.k[layer_idx], k), (self.v[layer_idx], v)):
            if self.rows is not None:  # some rows, each writes all it feeds
                buf[self.rows[:, None], :, self._slots[None, :]] = new.transpose(1, 2)
                continue
            if self._write is not None:  # each row keeps what it had where it does not store
                new = torch.where(self._write, new, buf[:, :, self._slots])
            buf.index_copy_(2, self._slots, new)

    def _write_refresh(self, layer_idx: int, q, k, v) -> None:
        """A refresh rewrites the rows' KV; with compression, their prompt part is compressed."""
        rows = self.rows
        for buf, new in ((self.k[layer_idx], k), (self.v[layer_idx], v)):
            if rows is None:
                buf.copy_(new[:, :, self.base :])
            else:
                buf[rows] = new[:, :, self.base :]
        if not self.compressed:
            return
        batch_rows = range(self.key_mask.shape[0]) if rows is None else rows.tolist()
        current = self.prompt[layer_idx]
        width = 1 if current is None or rows is None else current.length
        segment = self._compress_prompt(layer_idx, q, k, v, batch_rows, width)
        if current is None or rows is None:
            self.prompt[layer_idx] = segment
        else:
            current.set_rows(rows, segment)

    # ------------------------------------------------------------------ prompt compression

    def _compress_prompt(self, layer_idx: int, q, k, v, batch_rows, width: int) -> KVSegment:
        """Each row's prompt (without its padding) compressed to its budget with its own queries, then
        assembled into one segment of at least `width` entries (quantized at once, where fillers repeat
        a row's last entry so every row's quantization groups are what they would be alone). q, k, v
        hold the fed rows; `batch_rows` are their indices in the batch."""
        c, p = self.compression, self.prompt_len
        rows = []
        for i, b in enumerate(batch_rows):
            start = p - int(self.key_mask[b, :p].sum())
            masked = self.canvas[b, p:] == self.layout.mask_token_id  # the answer still to write
            fed = (q[i : i + 1, :, start:], k[i : i + 1, :, start:], v[i : i + 1, :, start:])
            rows.append(evict_prompt(c, *fed, p - start, masked, layer_idx, self.num_layers, first=start))
        return pack_prompts(c, rows, width)

    @property
    def nbytes(self) -> int:
        buffers = sum(t.numel() * t.element_size() for t in self.k + self.v)
        return buffers + sum(s.nbytes_as(None) for s in self.prompt if s is not None)


def evict_prompt(compression: Compression, q, k, v, prompt_len: int, masked: torch.BoolTensor, layer_idx: int,
                 num_layers: int, first: int = 0) -> KVSegment:  # fmt: skip
    """One row's prompt KV, evicted to its budget for this layer: q / k / v [1, H, n, D] of the row's
    fed positions, its prompt (no padding) first, then its generation region, whose still-masked
    positions are `masked` [n - prompt_len] (a policy reading `mask_queries` scores the prompt by
    them). A single-row dense segment whose `origin` are the prompt's canvas positions (from
    `first`, where its left padding ends)."""
    p, device = prompt_len, k.device
    origin = torch.arange(first, first + p, device=device)[None]
    seg = KVSegment.dense(k[:, :, :p], v[:, :, :p], origin=origin)
    c = compression
    if c.policy is not None:
        extra, reads = {}, c.reads
        if reads & {"queries", "all_queries"}:
            extra["queries"] = q[:, :, :p]
        if "mask_queries" in reads:
            extra["mask_queries"] = q[:, :, p:][:, :, masked]
        keep = c.layer_budget(p, layer_idx, num_layers)
        scale = q.shape[-1] ** -0.5
        c.evict(seg, score_inputs(seg, layer_idx, num_layers, budget=keep, scale=scale, **extra), keep)
    return seg


def pack_prompts(compression: Compression, rows: list[KVSegment], width: int = 1) -> KVSegment:
    """Evicted prompt rows as one segment of at least `width` entries, quantized if the compression
    quantizes (see `assemble_rows`)."""
    group = compression.quantizer.group_size if compression.quantizer is not None else 1
    segment = assemble_rows(rows, group, width)
    compression.quantize(segment)
    return segment


def assemble_rows(rows: list[KVSegment], group: int = 1, width: int = 1) -> KVSegment:
    """One segment [B, H, K, D] of single-row dense segments, K the most entries of a row (at least
    `width`) rounded up to `group`; a row's fillers repeat its last entry (invalid), so group-wise
    quantization of a row gives what it would alone."""
    width = max(max(r.length for r in rows), width, 1)
    width = -(-width // group) * group
    keys, values, valid, origin = [], [], [], []
    for r in rows:
        k, v = r.read()
        pad = width - r.length
        if pad:
            k, v = _repeat_last(k, pad), _repeat_last(v, pad)
        keys.append(k)
        values.append(v)
        valid.append(F.pad(r.valid, (0, pad), value=False))
        origin.append(F.pad(r.origin, (0, pad), value=-1))
    data = DenseKV(torch.cat(keys).contiguous(), torch.cat(values).contiguous())
    return KVSegment(data, torch.cat(valid), torch.cat(origin))


def _repeat_last(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [1, H, S, D] followed by n copies of its last entry (zeros when it has none)."""
    filler = x[:, :, -1:].expand(-1, -1, n, -1) if x.shape[2] else x.new_zeros(x.shape[0], x.shape[1], n, x.shape[3])
    return torch.cat([x, filler], 2)
