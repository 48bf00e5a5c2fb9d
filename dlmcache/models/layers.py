"""Building blocks shared by the native LLaDA and Dream models.

Both architectures are pre-norm decoder stacks with RMSNorm, rotary position embeddings, SwiGLU MLPs
and *bidirectional* attention; they differ only in weight names, GQA and QKV bias. The pieces here are
functional so each model keeps the module names (and therefore the checkpoint keys) of its hub release.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from dlmcache.kernels.ops import batch_invariant_linear, dense_attention, rms_norm
from dlmcache.kernels.ops.backend import BACKENDS
from dlmcache.kernels.ops.matmul import CHUNK_ROWS, elementwise, fixed_chunks

logger = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (at least), scaled by a learned weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    #: The batch-invariant mode (`set_batch_invariant`): on CUDA a Triton kernel normalises each row in
    #: one program (torch's reduction may split rows when there are few); elsewhere the same torch code.
    batch_invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant and x.is_cuda:
            return rms_norm(x, self.weight, self.eps, backend="triton")
        if x.dtype in FUSED_NORM_DTYPES and x.dtype == self.weight.dtype and not x.is_cuda:
            # one op, the same bits as the reference below in these dtypes on the CPU (tested)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)


#: The dtypes in which torch's fused `F.rms_norm` gives the reference's bits on the CPU (in bfloat16 it
#: multiplies by the weight before rounding to bfloat16; the reference rounds first, as the releases do).
FUSED_NORM_DTYPES = (torch.float32, torch.float64)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the releases write it: normalised in float32 (at least), rounded to x's dtype, then
    scaled by the weight."""
    acc = torch.promote_types(x.dtype, torch.float32)
    h = x.to(acc)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, invariant: bool = False):
    """cos/sin tables for absolute `positions` [B, n] -> two [B, 1, n, head_dim] tensors.

    Angles are computed in float32 (float64 for float64 models) whatever the model dtype, so a key's
    rotation depends only on its absolute position: a cached key stays valid when other positions
    are recomputed around it. `invariant` (the batch-invariant mode): cos and sin through
    `elementwise`, so their bits do not depend on how many positions there are.
    """
    acc = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=acc) / head_dim))
    angles = positions.to(acc)[..., None] * inv_freq  # [B, n, D/2]
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, n, D]
    if invariant:
        return elementwise(torch.cos, angles), elementwise(torch.sin, angles)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [B, H, n, D] by the half-split (GPT-NeoX / Llama) convention, in the tables' precision."""
    h = x.to(cos.dtype)
    x1, x2 = h.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (h * cos + rotated * sin).to(x.dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary: int) -> torch.Tensor:
    """RoPE over the first `rotary` dims of each head of x [B, H, n, D] (tables of that width); the
    other dims pass through."""
    if rotary == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return torch.cat([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], -1)


class KVStore(Protocol):
    """What attention needs from a KV cache (implemented by the engine's `PagedStore`).

    `attend` stores the freshly computed keys/values of the fed tokens (already rotated) for layer
    `layer_idx` where the step says, and returns the fed queries' attention output [B, Hq, n, D] over
    every key the step makes them see (cached and fresh).
    """

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str
    ) -> torch.Tensor: ...


@dataclass
class AttentionInputs:
    """What every layer's attention needs besides its own projections: RoPE tables [B, 1, n, D],
    the key mask of the fed tokens [B, n] (used without a cache), the cache, and the backend:
    the ops' vocabulary (`dlmcache.kernels.ops.backend.BACKENDS`): "torch" (torch SDPA), "triton"
    (`dlmcache.kernels.ops.attention`'s Triton kernel) or "auto" (Triton on CUDA, SDPA elsewhere)."""

    cos: torch.Tensor
    sin: torch.Tensor
    key_mask: torch.Tensor | None
    cache: KVStore | None
    backend: str = "auto"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int, inputs: AttentionInputs):
    """The attention of one layer: through the cache when there is one, else over the fed tokens."""
    if inputs.cache is not None:
        return inputs.cache.attend(layer_idx, q, k, v, inputs.backend)
    return dense_attention(q, k, v, inputs.key_mask, inputs.backend)


LINEAR_BACKENDS = ("auto", "torch", "onednn")

#: "auto" multiplies by oneDNN-packed weights of at least this many elements (on CPU, in inference):
#: the measured crossover (`scripts/bench_linear.py --sweep`, docs/results.md). From 4M elements
#: (an LM head over a real vocabulary, a 2048-wide model's projections) oneDNN took 0.65-0.87 of
#: torch's time at 4-32 rows; below it, it was slower at 1-4 rows (the few tokens a cached step feeds)
#: and at every row count below 256K elements.
ONEDNN_MIN_WEIGHT = 1 << 22


@functools.cache
def onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes oneDNN's prepacked linear runs in on this CPU (none when torch was built without it)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return ()
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same checkpoint keys) whose weight can be stored prepacked in
    oneDNN's blocked layout, in place of the plain one (no second copy). `backend`:

    - "auto" (default): packed where oneDNN was measured faster, weights of at least
      `ONEDNN_MIN_WEIGHT` elements; "onednn": packed whatever the size; "torch": never.
    - Packing happens at the first forward that can use it: a CPU input of the weight's dtype (float32,
      or bfloat16 where the CPU has it) with no gradient to compute. Any other forward (autograd, other
      dtypes or devices) unpacks the weight and takes torch's `F.linear`.
    - Reading `.weight` from outside gives the plain weight back (unpacking it, into the same
      `Parameter` object; the next inference forward packs it again), exactly: oneDNN's layout is a
      permutation of the same numbers. So do `state_dict()` (a plain copy; the module stays packed),
      `load_state_dict`, `.to()`, copies and pickles. While packed, the plain `Parameter` object is
      empty: a reference to it taken earlier sees its numbers again once the module unpacks. A weight
      shared with another module (tied embeddings) is never packed (`_tied`, set by the model).
    - The product differs from torch's in float32 rounding only.
    """

    backend = "auto"
    _tied = False
    #: The batch-invariant mode (`set_batch_invariant`): every row's product is the same bits whatever
    #: the other rows (`dlmcache.kernels.ops.batch_invariant_linear`: a fixed-tiling Triton kernel on
    #: CUDA, products of a fixed row count through this module's own matmul elsewhere).
    batch_invariant = False
    #: (CPU, batch-invariant mode) the rows of each product
    chunk_rows = CHUNK_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            if x.is_cuda:
                return batch_invariant_linear(x, self.weight, self.bias, backend="triton")
            return fixed_chunks(x, self._product, self.chunk_rows)
        return self._product(x)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        w = self._parameters["weight"]
        if self._onednn(x, w):
            if not w.is_mkldnn:
                w = self._pack()
            return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")
        if w.is_mkldnn:
            w = self._unpack()
        return F.linear(x, w, self.bias)

    def _backend_packs(self, w: torch.Tensor) -> bool:
        """Whether the backend packs this weight (its size and ties; not the input)."""
        backend = self.backend
        return backend != "torch" and not self._tied and (backend == "onednn" or w.numel() >= ONEDNN_MIN_WEIGHT)

    def _onednn(self, x: torch.Tensor, w: torch.Tensor) -> bool:
        if not self._backend_packs(w):
            return False
        if x.device.type != "cpu" or w.device.type != "cpu" or x.dtype != w.dtype or w.dtype not in onednn_dtypes():
            return False
        grad = self._plain.requires_grad if w.is_mkldnn else w.requires_grad
        return not (torch.is_grad_enabled() and (grad or x.requires_grad))

    @property
    def packed(self) -> bool:
        """Whether the weight is stored in oneDNN's layout now."""
        return self._parameters["weight"].is_mkldnn

    def _pack(self) -> torch.Tensor:
        """Store the weight packed. The plain `Parameter` object stays (empty) and gets its numbers back
        on unpacking, so whoever holds it (an optimizer) keeps the module's weight."""
        plain = self._parameters["weight"]
        packed = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(plain.detach()), requires_grad=False)
        plain.data = plain.data.new_empty(0)
        self.__dict__["_plain"] = plain  # not a registered parameter
        self._parameters["weight"] = packed
        return packed

    def _unpack(self) -> torch.Tensor:
        w = self._parameters.get("weight")
        if w is None or not w.is_mkldnn:
            return w
        plain = self.__dict__.pop("_plain")
        plain.data = w.to_dense()
        self._parameters["weight"] = plain
        return plain

    def __getattr__(self, name: str):
        if name == "weight" and "weight" in self.__dict__.get("_parameters", ()):
            return self._unpack()
        return super().__getattr__(name)

    def _apply(self, fn, recurse=True):
        self._unpack()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = destination.get(prefix + "weight")
        if w is not None and w.is_mkldnn:
            destination[prefix + "weight"] = w.to_dense()

    def _load_from_state_dict(self, *args, **kwargs):
        self._unpack()
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()  # a shallow copy; oneDNN's opaque tensors cannot be copied or pickled
        w = state["_parameters"].get("weight")
        if w is not None and w.is_mkldnn:
            plain = nn.Parameter(w.to_dense(), requires_grad=state.pop("_plain").requires_grad)
            state["_parameters"] = {**state["_parameters"], "weight": plain}
        return state


#: (CPU, batch-invariant mode) the rows of each expert's products: an expert gets few of a step's
#: tokens (T * k / E on average), so its chunks are smaller than a projection's.
EXPERT_CHUNK_ROWS = 8


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, rows: int = EXPERT_CHUNK_ROWS) -> torch.Tensor:
    """x @ weight.T with every row's bits independent of the other rows: the Triton kernel on CUDA,
    products of exactly `rows` rows elsewhere (the batch-invariant mode's product for weights that are
    not a `Linear`'s: the experts', LLaDA2's float32 gate)."""
    if x.is_cuda:
        return batch_invariant_linear(x, weight, backend="triton")
    return fixed_chunks(x, lambda chunk: F.linear(chunk, weight), rows)


def invariant_silu(x: torch.Tensor) -> torch.Tensor:
    """silu with every element's bits independent of the tensor's size (the batch-invariant mode's)."""
    return elementwise(F.silu, x)


def swiglu(x: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    act = invariant_silu if getattr(gate, "batch_invariant", False) else F.silu
    return down(act(gate(x)) * up(x))


class SwiGLUMLP(nn.Module):
    """A SwiGLU MLP with the Qwen / OLMoE parameter names (`gate_proj`, `up_proj`, `down_proj`): Dream's,
    SDAR's and LLaDA-MoE's dense MLP, each expert and the shared expert of the MoE models."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


class SparseMoeBlock(nn.Module):
    """Routed SwiGLU experts: `gate` scores them, `router` (a `dlmcache.kernels.ops.moe.Router`)
    chooses each token's and weighs them, and the chosen ones run grouped by expert
    (`dlmcache.kernels.ops.moe.moe_experts`). Parameter names are the hub's (`gate`, `experts.{j}.*`).
    Subclasses with another routing rule override `route`."""

    #: The order a token's weighted expert outputs are summed in (`moe_experts`' `combine`).
    combine = "expert"
    #: The batch-invariant mode (`set_batch_invariant`): the experts' products (and a gate computed
    #: outside a `Linear`) through `invariant_linear`; the combine is per token either way.
    batch_invariant = False
    #: Its forward reads the tokens per expert on the host, so no CUDA graph can capture it.
    reads_host = True

    def __init__(self, hidden: int, intermediate: int, router):
        super().__init__()
        self.gate = Linear(hidden, router.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUMLP(hidden, intermediate) for _ in range(router.num_experts))
        self.router = router

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] float32, experts [T, k]) for tokens x [T, d]."""
        return self.router(self.gate(x))

    @property
    def idle_parameters(self) -> int:
        """The expert parameters a token does not multiply: those of the experts it is not routed to."""
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return (self.router.num_experts - self.router.top_k) * per_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dlmcache.kernels.ops.moe import moe_experts

        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.route(x)
        gate = [m.gate_proj.weight for m in self.experts]
        up = [m.up_proj.weight for m in self.experts]
        down = [m.down_proj.weight for m in self.experts]
        invariant = self.batch_invariant
        return moe_experts(x, weights, experts, gate, up, down, check=False, combine=self.combine,
                           linear=invariant_linear if invariant else None,
                           activation=invariant_silu if invariant else None).view(shape)  # fmt: skip


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, n, H*D] -> [B, H, n, D]."""
    b, n, _ = x.shape
    return x.view(b, n, n_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, n, D] -> [B, n, H*D]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def default_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Positions that ignore left padding: the first real token of every row is position 0."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class DLMModelOutput(ModelOutput):
    """logits [B, n_out, V]: position j predicts the token at the j-th requested position."""

    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


class DLMModelMixin:
    """The forward pass and interface shared by every native diffusion LM (pipeline and caches use it).

    Subclasses set `logit_shift` (0: hidden state i predicts token i, as LLaDA; 1: hidden state i-1
    predicts token i, as Dream) and implement `_stack()` -> (embedding, layers, final norm, lm head);
    their configs answer to transformers' standard names (`hidden_size`, `num_hidden_layers`,
    `num_attention_heads`, `num_key_value_heads`) and hold `mask_token_id` and `rope_theta`.
    """

    logit_shift: int = 0
    #: True for block diffusion models (attention causal across blocks, bidirectional inside one)
    block_diffusion: bool = False
    #: a block diffusion model whose decoding commits each attention block's first token alone, as the
    #: argmax of the previous position (Fast-dLLM v2's autoregressive step)
    first_token_autoregressive: bool = False
    #: a block diffusion model's fixed attention block (None: the decoding block length)
    attention_block: int | None = None
    attention_backend: str = "auto"
    #: every row's logits the same bits whatever the batch (`set_batch_invariant`)
    batch_invariant: bool = False
    #: a `dlmcache.threads.ThreadPolicy` that sets torch's threads before each forward (None: leave them)
    thread_policy = None

    @property
    def max_length(self) -> int | None:
        """The longest sequence the config allows (LLaDA's `max_sequence_length`, Dream's
        `max_position_embeddings`), or None when it sets none."""
        config = self.config
        return getattr(config, "max_sequence_length", None) or getattr(config, "max_position_embeddings", None)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """The dims of each head RoPE rotates (all of them, unless a model rotates a part)."""
        return self.head_dim

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @functools.cached_property
    def flops_per_token(self) -> int:
        """2 x the parameters a fed token multiplies (the embedding table is read, not multiplied, and
        of a mixture of experts only the experts a token is routed to)."""
        embed = self.get_input_embeddings().weight.numel()
        idle = sum(m.idle_parameters for m in self.modules() if isinstance(m, SparseMoeBlock))
        return 2 * (sum(p.numel() for p in self.parameters()) - embed - idle)

    @property
    def rope_theta(self) -> float:
        return self.config.rope_theta

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, verify: bool = True, **kwargs):
        """transformers' `from_pretrained`, strict: before any weight is allocated, config.json and
        the safetensors headers must describe exactly this architecture, with values in range (see
        `checkpoint`); once loaded, every weight must be finite (`verify=False` skips that pass)."""
        from ..locations import json_object
        from .checkpoint import (
            check_config_fields,
            check_config_values,
            check_counts,
            check_finite,
            check_raw_sizes,
            check_tensors,
            local_checkpoint,
            read_tensor_headers,
        )

        directory = local_checkpoint(pretrained_model_name_or_path, kwargs.pop("subfolder", None))
        where = str(directory / "config.json")
        raw = json_object(directory / "config.json")
        check_config_fields(cls.config_class, raw, str(directory))
        check_raw_sizes(raw, where)
        headers = read_tensor_headers(directory)
        try:  # (a config class's own checks name the field; the file is named here)
            config = kwargs.get("config") or cls.config_class.from_pretrained(directory)
            check_config_values(config, where)
            check_counts(config, headers, where)
            check_tensors(cls, config, directory, headers)
        except (ValueError, TypeError) as e:
            if str(directory) in str(e):
                raise
            raise ValueError(f"{where}: {e}") from None
        model = super().from_pretrained(directory, *args, **kwargs)
        if verify:
            check_finite(model, str(directory))
        return model

    def set_attention_backend(self, backend: str) -> None:
        """ "auto" (the Triton kernel on CUDA, torch SDPA elsewhere), "torch" (SDPA) or "triton" (the
        kernel; under TRITON_INTERPRET=1 on CPU too)."""
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r}: expected one of {BACKENDS}")
        self.attention_backend = backend

    def set_batch_invariant(self, enabled: bool = True) -> None:
        """Batch-invariant mode: a request's logits are the same bits whether it runs alone or beside
        others in the batched engine (`dlmcache.engine.BatchedDecoder`), in any dtype. Off (the
        default), they may differ in the last bits (float32 logits by up to 1.6e-5 on the bundled
        tiny model, docs/results.md), because the matmul libraries pick their kernels by the batch's
        shape; tokens mostly agree, but a near tie can flip, and from there the two decodes part.

        What it changes (docs/engine.md, "Batch invariance"):
        - the projections: on CUDA a Triton matmul with one fixed tiling and no split reduction; on CPU
          products of exactly `dlmcache.kernels.ops.matmul.CHUNK_ROWS` (32) rows (the last padded);
        - RMSNorm: on CUDA a Triton kernel, one program per row (on CPU torch's norm is already
          per row);
        - the engine's attention: on CUDA its Triton kernel (which reads every row on its own); on CPU
          row by row, each over its own keys, and never through the one-request shortcuts;
        - mixture-of-experts layers: each expert's products the same way (`invariant_linear`, in
          chunks of `EXPERT_CHUNK_ROWS` rows on CPU), and LLaDA2's float32 gate;
        - on CPU, silu, sigmoid and RoPE's cos / sin through `dlmcache.kernels.ops.matmul.elementwise`
          (torch computes a tensor's last few elements with scalar code, which rounds silu otherwise).

        With compressed prompts, each request attends its own segment alone.
        """
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled={enabled!r} must be a bool")
        for module in self.modules():
            if isinstance(module, (Linear, RMSNorm, SparseMoeBlock)):
                module.batch_invariant = enabled
        self.batch_invariant = enabled

    def set_linear_backend(self, backend: str) -> None:
        """Which matmul the model's projections and LM head use on CPU (see `Linear`):

        - "auto" (default): oneDNN with weights prepacked in its blocked layout for the matmuls where
          it is measured faster than torch's (weights of at least `ONEDNN_MIN_WEIGHT` elements), torch
          for the small ones, where the call overhead dominates (docs/results.md, `bench_linear`);
        - "onednn": every projection prepacked; "torch": none (every weight plain; what the official
          code computes, bit for bit).

        The packed weight replaces the plain one (no second copy; `Linear` gives it back to whatever
        reads it). Results differ from torch's in float32 rounding only; GPUs and other dtypes take
        torch's path. A torch build without oneDNN runs "auto" as "torch" ("onednn" raises).
        """
        if backend not in LINEAR_BACKENDS:
            raise ValueError(f"linear backend {backend!r}: expected one of {LINEAR_BACKENDS}")
        if backend == "onednn" and not onednn_dtypes():
            raise RuntimeError("linear backend 'onednn': this torch build has no oneDNN (mkldnn) linear")
        self._mark_tied()
        for module in self.modules():
            if isinstance(module, Linear):
                module.backend = backend
                if backend == "torch":
                    module._unpack()

    def _mark_tied(self) -> None:
        """Mark the projections whose weight another module shares (never packed)."""
        seen: dict[int, int] = {}
        for _, p in self.named_parameters(remove_duplicate=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
        for module in self.modules():
            if isinstance(module, Linear):
                module._tied = seen[id(module._parameters["weight"])] > 1

    def _log_linear_paths(self, device: torch.device) -> None:
        self.__dict__["_paths_logged"] = True
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        dtype = next(self.parameters()).dtype
        if not linears or device.type != "cpu" or dtype not in onednn_dtypes():
            logger.info("projections: torch's matmul (%s, %s)", device.type, dtype)
            return
        onednn = sum(m._backend_packs(m._parameters["weight"]) for m in linears)
        logger.info(
            "projections: %d of %d on oneDNN's prepacked matmul, the rest on torch's (linear backend %r, "
            "auto's threshold %d elements)", onednn, len(linears), linears[0].backend, ONEDNN_MIN_WEIGHT,
        )  # fmt: skip

    def linear_paths(self) -> dict[str, int]:
        """How many projections hold oneDNN-packed weights now ("onednn") and how many plain ("torch")."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        packed = sum(m.packed for m in linears)
        return {"onednn": packed, "torch": len(linears) - packed}

    def _stack(self) -> tuple[nn.Embedding, nn.ModuleList, nn.Module, nn.Linear]:
        raise NotImplementedError

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVStore | None = None,
    ) -> torch.Tensor:
        """The final-norm hidden states [B, n, d] of the fed tokens (arguments as in `forward`)."""
        embed, layers, norm, _ = self._stack()
        if "_paths_logged" not in self.__dict__:  # the first forward (set_linear_backend may have run)
            self._mark_tied()
            self._log_linear_paths(input_ids.device)
        if self.thread_policy is not None:
            self.thread_policy.apply(self.flops_per_token * input_ids.numel())
        key_mask = None if attention_mask is None else attention_mask.bool()
        if positions is None:
            if key_mask is not None and key_mask.dim() == 3:
                raise ValueError("a per-token attention_mask [B, n, n] needs explicit positions")
            positions = default_positions(input_ids, attention_mask)
        x = embed(input_ids)
        cos, sin = rope_cos_sin(positions, self.rotary_dim, self.rope_theta, x.dtype, self.batch_invariant)
        inputs = AttentionInputs(cos, sin, key_mask, cache, self.attention_backend)
        for layer in layers:
            x = layer(x, inputs)
        return norm(x)

    def logit_rows(self, logits_index: torch.Tensor) -> torch.Tensor:
        """Which fed positions' hidden states predict the tokens at fed indices `logits_index`: the
        same ones (LLaDA), or each one's predecessor (Dream; fed index 0 predicts from itself)."""
        return (logits_index - self.logit_shift).clamp(min=0)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVStore | None = None,
        logits_index: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> DLMModelOutput:
        """input_ids [B, n] -> logits [B, n_out, V], where logits[:, j] predicts the token at fed index
        `logits_index[j]` (every fed index when None).

        positions: absolute positions [B, n] (default: counted from the first non-padding token).
        attention_mask: [B, n], 1 for real tokens, 0 for padding, or [B, n, n] bool, the keys each fed
        token attends (block diffusion's block-causal mask; then `positions` must be given); used
        without a `cache` (a cache carries its own key mask over the whole sequence).
        With `logit_shift == 1` the prediction for fed token j comes from hidden state j-1, so the
        caller feeds each target's predecessor right before it; fed token 0 then predicts from itself,
        as Dream's reference does for the very first position.
        """
        x = self.hidden_states(input_ids, positions, attention_mask, cache)
        if logits_index is None:
            logits_index = torch.arange(input_ids.shape[1], device=input_ids.device)
        logits = self._stack()[3](x[:, self.logit_rows(logits_index)])
        return DLMModelOutput(logits=logits, hidden_states=x if output_hidden_states else None)
