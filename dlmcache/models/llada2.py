"""LLaDA2.0 / 2.1 (inclusionAI/LLaDA2.0-mini, -flash, LLaDA2.1-mini; "LLaDA2.0", arXiv 2512.15745) in
plain PyTorch: block diffusion (as SDAR: causal across blocks of `block_size` absolute positions,
bidirectional inside one, decoded by the engine's block rules) over
BailingMoeV2 layers.

The layer, as the release's modeling file describes it (its vLLM-bound copy in inclusionAI/dInfer
`python/dinfer/model/modeling_llada2_moe.py` was read for the facts; no code is taken from it):
- attention: one fused `query_key_value` projection (queries, then keys, then values, per head),
  an RMSNorm over each head's queries and keys (`query_layernorm`, `key_layernorm`; when
  `use_qk_norm`), RoPE over the first `partial_rotary_factor` of each head's dims (the rest pass
  through), GQA, and the output projection `dense` (with a bias when `use_bias`);
- feed-forward: a dense SwiGLU in the first `first_k_dense_replace` layers, then routed SwiGLU
  experts plus `num_shared_experts` shared ones (one SwiGLU of `moe_intermediate_size *
  num_shared_experts`, added to the routed output);
- routing (DeepSeek-V3's rule): sigmoid scores of a float32 gate; the per-expert `expert_bias` is
  added for the choice only; the experts fall into `n_group` groups, each group scored by the sum of
  its two best biased scores, the `topk_group` best groups are kept and the `num_experts_per_tok`
  best experts chosen among them; their unbiased scores, normalized to sum 1 (when more than one is
  chosen), times `routed_scaling_factor`, weigh their outputs. The experts run grouped.

Loads the release's checkpoints without `trust_remote_code`: model_type "llada2_moe", its config
fields and parameter names (`model.word_embeddings`, `attention.query_key_value`, `mlp.gate`,
`mlp.gate.expert_bias`, `mlp.experts.{j}.*`, `mlp.shared_experts.*`). Two fields are not in the
release's config.json and have its generate's defaults: `mask_token_id` (156895, the tokenizer's
`<|mask|>`) and `block_size` (32). The release's sampler commits tokens above a confidence
threshold of 0.95 per step (at least one); that is `ThresholdScheduler(0.95)`, the pipeline's
default for this model. LLaDA2.1's token editing (re-masking committed tokens below an edit
threshold) is not built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from dlmcache.kernels.ops.matmul import elementwise
from dlmcache.kernels.ops.moe import Router

from .checkpoint import check_activation_and_rope, check_kv_heads_and_ids, check_positive_ints
from .layers import (
    AttentionInputs,
    DLMModelMixin,
    Linear,
    RMSNorm,
    SparseMoeBlock,
    SwiGLUMLP,
    apply_partial_rope,
    attend,
    invariant_linear,
    merge_heads,
)


class LLaDA2MoeConfig(PretrainedConfig):
    """LLaDA2's `config.json` fields (the release's `LLaDA2MoeConfig`). The architecture fields must
    be in the file; the rest default as the release's class does, except `num_key_value_heads`
    (default: `num_attention_heads`) and the two decoding fields (module docstring)."""

    model_type = "llada2_moe"
    #: The fields config.json must hold (the rest have the defaults above).
    architecture_fields = (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "moe_intermediate_size",
        "num_experts", "vocab_size", "n_group", "topk_group",
    )  # fmt: skip

    def __init__(
        self,
        vocab_size: int = 157184,
        hidden_size: int = 2048,
        intermediate_size: int = 5120,
        num_hidden_layers: int = 20,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        use_qkv_bias: bool = False,
        use_qk_norm: bool = True,
        use_bias: bool = False,
        norm_head: bool = False,
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 32768,
        rope_theta: float = 600000.0,
        rope_scaling: dict | None = None,
        partial_rotary_factor: float = 0.5,
        num_experts: int = 256,
        num_shared_experts: int | None = 1,
        num_experts_per_tok: int = 8,
        n_group: int = 8,
        topk_group: int = 4,
        routed_scaling_factor: float = 2.5,
        moe_intermediate_size: int = 512,
        first_k_dense_replace: int = 1,
        use_sliding_window: bool = False,
        mask_token_id: int = 156895,
        block_size: int = 32,
        pad_token_id: int | None = 156892,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = 156892,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.hidden_act = hidden_act
        self.use_qkv_bias = use_qkv_bias
        self.use_qk_norm = use_qk_norm
        self.use_bias = use_bias
        self.norm_head = norm_head
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.num_experts = num_experts
        self.num_shared_experts = num_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.moe_intermediate_size = moe_intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        self.use_sliding_window = use_sliding_window
        self.mask_token_id = mask_token_id
        self.block_size = block_size
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )
        where = "LLaDA2MoeConfig"
        check_activation_and_rope(where, hidden_act, rope_scaling)
        if use_sliding_window:
            raise ValueError(f"{where}: use_sliding_window=True is not supported (LLaDA2 attends every key)")
        if norm_head:
            raise ValueError(f"{where}: norm_head=True is not supported (the released checkpoints set it False)")
        check_positive_ints(self, where, ("head_dim", "num_experts", "num_experts_per_tok", "n_group", "topk_group",
                                          "moe_intermediate_size", "block_size"))  # fmt: skip
        dense = first_k_dense_replace
        if isinstance(dense, bool) or not isinstance(dense, int) or dense < 0:
            raise ValueError(f"{where}: first_k_dense_replace={first_k_dense_replace!r} must be an integer >= 0")
        if num_experts % n_group or num_experts // n_group < 2:
            raise ValueError(
                f"{where}: num_experts={num_experts} must split into n_group={n_group} groups of at least 2 "
                "(a group is scored by its two best experts)"
            )
        if topk_group > n_group:
            raise ValueError(f"{where}: topk_group={topk_group} exceeds n_group={n_group}")
        if num_experts_per_tok > topk_group * (num_experts // n_group):
            raise ValueError(
                f"{where}: num_experts_per_tok={num_experts_per_tok} exceeds the {topk_group} kept groups' "
                f"{topk_group * (num_experts // n_group)} experts"
            )
        if not 0 < partial_rotary_factor <= 1:
            raise ValueError(f"{where}: partial_rotary_factor={partial_rotary_factor!r} must be in (0, 1]")
        rotary = int(self.head_dim * partial_rotary_factor)
        if rotary < 2 or rotary % 2:
            raise ValueError(f"{where}: partial_rotary_factor={partial_rotary_factor} rotates {rotary} dims (odd)")
        check_kv_heads_and_ids(self, where)

    def is_sparse(self, layer_idx: int) -> bool:
        """Experts from layer `first_k_dense_replace` on; dense SwiGLU before."""
        return layer_idx >= self.first_k_dense_replace


class LLaDA2SparseMoeBlock(SparseMoeBlock):
    """Routed experts with DeepSeek-V3's group-limited sigmoid routing (module docstring); the gate's
    `expert_bias` buffer is the release's `mlp.gate.expert_bias`, kept in float32. The experts'
    outputs are weighed in float32 and summed in routing order, as the release's `moe_infer` sums
    them (so float32 logits are bit-identical to it)."""

    combine = "slot"

    def __init__(self, config: LLaDA2MoeConfig):
        router = Router(config.num_experts, config.num_experts_per_tok)
        super().__init__(config.hidden_size, config.moe_intermediate_size, router)
        self.gate.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scaling = config.routed_scaling_factor

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch_invariant:
            scores = elementwise(torch.sigmoid, invariant_linear(x.float(), self.gate.weight.float()))
        else:
            scores = torch.sigmoid(F.linear(x.float(), self.gate.weight.float()))  # [T, E]
        biased = scores + self.gate.expert_bias.float()
        t, e = biased.shape
        groups = biased.view(t, self.n_group, e // self.n_group)
        group_scores = groups.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
        kept = group_scores.topk(self.topk_group, dim=-1).indices
        in_kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        allowed = in_kept[:, :, None].expand_as(groups).reshape(t, e)
        experts = biased.masked_fill(~allowed, float("-inf")).topk(self.router.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.router.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, experts


class LLaDA2Attention(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        d, self.n_heads, self.n_kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rotary = int(self.head_dim * config.partial_rotary_factor)
        self.layer_idx = layer_idx
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.query_key_value = Linear(d, qkv_out, bias=config.use_qkv_bias)
        if config.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.dense = Linear(self.n_heads * self.head_dim, d, bias=config.use_bias)

    def forward(self, h, inputs: AttentionInputs):
        b, n, _ = h.shape
        qkv = self.query_key_value(h).view(b, n, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        if hasattr(self, "query_layernorm"):
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = apply_partial_rope(q, inputs.cos, inputs.sin, self.rotary)
        k = apply_partial_rope(k, inputs.cos, inputs.sin, self.rotary)
        return self.dense(merge_heads(attend(q, k, v, self.layer_idx, inputs)))


class LLaDA2DecoderLayer(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = LLaDA2Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_sparse(layer_idx):
            self.mlp = LLaDA2SparseMoeBlock(config)
            if config.num_shared_experts:
                shared = config.moe_intermediate_size * config.num_shared_experts
                self.mlp.shared_experts = SwiGLUMLP(config.hidden_size, shared)
        else:
            self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, inputs: AttentionInputs):
        x = x + self.attention(self.input_layernorm(x), inputs)
        h = self.post_attention_layernorm(x)
        out = self.mlp(h)
        shared = getattr(self.mlp, "shared_experts", None)
        return x + (out if shared is None else out + shared(h))


class LLaDA2BaseModel(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LLaDA2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LLaDA2MoeModelLM(DLMModelMixin, PreTrainedModel):
    """LLaDA2 block diffusion LM over BailingMoeV2 layers. Hidden state i predicts token i (no shift).
    `block_diffusion`: decoded block by block, the finished blocks' KV cached exactly."""

    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDA2DecoderLayer"]
    _keep_in_fp32_modules = ["expert_bias"]
    _supports_sdpa = True
    logit_shift = 0
    block_diffusion = True

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.model = LLaDA2BaseModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.config.partial_rotary_factor)

    @property
    def block_size(self) -> int:
        """The block length the release decodes with (its default for decoding)."""
        return self.config.block_size

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.word_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def _stack(self):
        return self.model.word_embeddings, self.model.layers, self.model.norm, self.lm_head
