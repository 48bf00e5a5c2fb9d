"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-Base and -Instruct) in plain PyTorch: LLaDA's full-attention
masked diffusion with OLMoE-style experts (Muennighoff et al., "OLMoE", arXiv 2409.02060).

The layer: bidirectional multi-head attention with an RMSNorm over each head's queries and keys
(`qk_layernorm`), optional clipping of Q/K/V (`clip_qkv`), RoPE over the first `partial_rotary_factor`
of each head; then, per `moe_layer_freq`, a dense SwiGLU or a mixture of SwiGLU experts (plus a shared
expert when `shared_expert_intermediate_size` is set). Routing is the release's rule: softmax over
every expert in float32, plus the per-expert bias when `moe_router_enable_expert_bias` (added to the
probabilities, which are then the weights), the `num_experts_per_tok` largest kept, not renormalized
(the release's block fixes `norm_topk_prob` to False whatever the config says, and does not use
`routed_scaling_factor` or the group fields; neither does this one). The experts run grouped
(`dlmcache.kernels.ops.moe.moe_experts`: one GEMM per active expert over its tokens).

Loads the release's checkpoints without `trust_remote_code`: model_type "llada" (as LLaDA-8B; the
`architectures` name `LLaDAMoEModelLM` tells them apart), its config fields and parameter names
(`mlp.gate`, `mlp.experts.{j}.{gate,up,down}_proj`, `shared_expert.*`). `mask_token_id` is not in
the release's config.json; its default is the tokenizer's `<|mask|>`, 156895.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

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
    merge_heads,
)


class LLaDAMoEConfig(PretrainedConfig):
    """LLaDA-MoE's `config.json` fields. Defaults are LLaDA-MoE-7B-A1B's: hidden 2048, 16 layers of
    16 heads, 64 experts of 1024 with 8 per token, no shared expert, vocab 157184; mask 156895."""

    model_type = "llada"
    #: The fields config.json must hold (the rest have the defaults above).
    architecture_fields = (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "expert_intermediate_size", "num_experts",
        "vocab_size",
    )  # fmt: skip

    def __init__(
        self,
        vocab_size: int = 157184,
        hidden_size: int = 2048,
        dense_intermediate_size: int = 8192,
        expert_intermediate_size: int = 1024,
        shared_expert_intermediate_size: int | None = None,
        num_hidden_layers: int = 16,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 8192,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 50000.0,
        partial_rotary_factor: float = 1.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        clip_qkv: float | None = None,
        num_experts_per_tok: int = 8,
        num_experts: int = 64,
        norm_topk_prob: bool | None = None,
        qk_layernorm: bool = True,
        moe_layer_freq: list[int] | None = None,
        moe_router_enable_expert_bias: bool | None = None,
        moe_router_score_function: str | None = "softmax",
        routed_scaling_factor: float = 1.0,
        mask_token_id: int = 156895,
        pad_token_id: int | None = 156892,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = 156892,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.dense_intermediate_size = dense_intermediate_size
        self.expert_intermediate_size = expert_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.attention_bias = attention_bias
        self.clip_qkv = clip_qkv
        self.num_experts_per_tok = num_experts_per_tok
        self.num_experts = num_experts
        self.norm_topk_prob = norm_topk_prob
        self.qk_layernorm = qk_layernorm
        self.moe_layer_freq = [1] * num_hidden_layers if moe_layer_freq is None else list(moe_layer_freq)
        self.moe_router_enable_expert_bias = bool(moe_router_enable_expert_bias)
        self.moe_router_score_function = moe_router_score_function
        self.routed_scaling_factor = routed_scaling_factor
        self.mask_token_id = mask_token_id
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )
        where = "LLaDAMoEConfig"
        check_activation_and_rope(where, hidden_act, rope_scaling)
        if moe_router_score_function not in (None, "softmax"):
            raise ValueError(
                f"{where}: moe_router_score_function={moe_router_score_function!r}: the release's expert block "
                "scores with a softmax"
            )
        if len(self.moe_layer_freq) != num_hidden_layers or any(f not in (0, 1) for f in self.moe_layer_freq):
            raise ValueError(
                f"{where}: moe_layer_freq={self.moe_layer_freq!r} must hold 0 (dense) or 1 (experts) for each of "
                f"the {num_hidden_layers} layers"
            )
        check_positive_ints(self, where, ("expert_intermediate_size", "num_experts", "num_experts_per_tok"))
        if num_experts_per_tok > num_experts:
            raise ValueError(f"{where}: num_experts_per_tok={num_experts_per_tok} exceeds num_experts={num_experts}")
        if not 0 < partial_rotary_factor <= 1:
            raise ValueError(f"{where}: partial_rotary_factor={partial_rotary_factor!r} must be in (0, 1]")
        if hidden_size % num_attention_heads:
            raise ValueError(f"{where}: hidden_size={hidden_size} is not divisible by {num_attention_heads} heads")
        rotary = int(hidden_size // num_attention_heads * partial_rotary_factor)
        if rotary < 2 or rotary % 2:
            raise ValueError(f"{where}: partial_rotary_factor={partial_rotary_factor} rotates {rotary} dims (odd)")
        check_kv_heads_and_ids(self, where)


class LLaDAMoESparseMoeBlock(SparseMoeBlock):
    """The routed experts with the release's routing (module docstring), its expert bias included."""

    def __init__(self, config: LLaDAMoEConfig):
        router = Router(config.num_experts, config.num_experts_per_tok, scoring="softmax")
        super().__init__(config.hidden_size, config.expert_intermediate_size, router)
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        else:
            self.expert_bias = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.expert_bias is None:
            return super().route(x)
        # The release adds the bias to the probabilities and keeps the biased values as the weights.
        probs = torch.softmax(self.gate(x).float(), -1) + self.expert_bias.float()
        return probs.topk(self.router.top_k, -1)


class LLaDAMoEAttention(nn.Module):
    def __init__(self, config: LLaDAMoEConfig, layer_idx: int):
        super().__init__()
        d, self.n_heads, self.n_kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = d // self.n_heads
        self.rotary = int(self.head_dim * config.partial_rotary_factor)
        self.clip = config.clip_qkv
        self.layer_idx = layer_idx
        bias = config.attention_bias
        self.q_proj = Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(d, d, bias=bias)
        if config.qk_layernorm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, h, inputs: AttentionInputs):
        b, n, _ = h.shape
        q = self.q_proj(h).view(b, n, self.n_heads, self.head_dim)
        k = self.k_proj(h).view(b, n, self.n_kv_heads, self.head_dim)
        v = self.v_proj(h).view(b, n, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = apply_partial_rope(q, inputs.cos, inputs.sin, self.rotary)
        k = apply_partial_rope(k, inputs.cos, inputs.sin, self.rotary)
        return self.o_proj(merge_heads(attend(q, k, v, self.layer_idx, inputs)))


class LLaDAMoEDecoderLayer(nn.Module):
    def __init__(self, config: LLaDAMoEConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LLaDAMoEAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        moe = config.moe_layer_freq[layer_idx] == 1
        if moe:
            self.mlp = LLaDAMoESparseMoeBlock(config)
            if config.shared_expert_intermediate_size is not None:
                self.shared_expert = SwiGLUMLP(config.hidden_size, config.shared_expert_intermediate_size)
        else:
            self.mlp = SwiGLUMLP(config.hidden_size, config.dense_intermediate_size)

    def forward(self, x, inputs: AttentionInputs):
        x = x + self.self_attn(self.input_layernorm(x), inputs)
        h = self.post_attention_layernorm(x)
        out = self.mlp(h)
        if hasattr(self, "shared_expert"):
            out = out + self.shared_expert(h)
        return x + out


class LLaDAMoEBaseModel(nn.Module):
    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LLaDAMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LLaDAMoEModelLM(DLMModelMixin, PreTrainedModel):
    """LLaDA-MoE masked diffusion LM (full attention; hidden state i predicts token i, as LLaDA)."""

    config_class = LLaDAMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDAMoEDecoderLayer"]
    _supports_sdpa = True
    logit_shift = 0

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__(config)
        self.model = LLaDAMoEBaseModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.config.partial_rotary_factor)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def _stack(self):
        return self.model.embed_tokens, self.model.layers, self.model.norm, self.lm_head
