"""Prompt compression for the denoising caches: which prompt KV a cache keeps, and how.

`prompt_compression` validates a cache's options (an eviction policy and budget, a layer allocator, a
KIVI quantizer) before any decoding. The engine compresses a request's prompt after the forward
that computes it (`dlmcache.engine.runner.PromptSegments`): `evict_prompt` evicts one row's prompt
to its budget with its own queries, `pack_prompts` stores the evicted rows as one `KVSegment`
(quantized when the compression quantizes), whose attention is merged with the pool's by
log-sum-exp. Each row keeps what it would alone.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from dlmcache.kernels.compression import Compression, score_inputs
from dlmcache.kernels.policies import KIVI, BudgetAllocator, EvictionPolicy, QuantizationPolicy, get_policy
from dlmcache.kernels.policies.budget import Pyramid, Uniform
from dlmcache.kernels.store import DenseKV, KVSegment

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
