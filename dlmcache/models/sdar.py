"""SDAR (Cheng et al., "SDAR: A Synergistic Diffusion-AutoRegression Paradigm", arXiv 2510.06303) in
plain PyTorch.

SDAR turns a Qwen3 model into a *block diffusion* model: the sequence is cut into blocks of
`block_length` absolute positions; attention is causal across blocks and bidirectional inside one
(a query in block b sees every key in blocks 0..b). Generation denoises one block at a time, so a
finished block's KV is final and is cached like an autoregressive prefix (the engine's block rules).

The layer is Qwen3's: GQA with an explicit `head_dim`, no QKV bias by default (`attention_bias`), an
RMSNorm over each head's queries and keys (`q_norm`, `k_norm`) before RoPE, SwiGLU, tied embeddings
on the smaller sizes. Loads JetLM/SDAR-*-Chat checkpoints without `trust_remote_code` (the release's
config fields and parameter names). The model itself attends bidirectionally over what it is given;
the block-causal mask is the decoding loop's (as in the release, whose generate builds it).

Two fields are not in the release's config.json and have its defaults: `mask_token_id` (151669, the
tokenizer's `<|MASK|>`, which the release's generate reads from the tokenizer) and `block_size` (4, the
release's default block length).
"""

from __future__ import annotations

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
    apply_rope,
    attend,
    merge_heads,
    split_heads,
)


class SDARConfig(PretrainedConfig):
    """SDAR's `config.json` fields (Qwen3's). Defaults are Qwen3-4B's, SDAR-4B's base: hidden 2560,
    36 layers, 32 heads of 128 over 8 KV heads, MLP 9728, vocab 151936, RoPE theta 1e6, tied
    embeddings; mask token 151669 and block size 4."""

    model_type = "sdar"
    #: The fields config.json must hold (the rest have the defaults above).
    architecture_fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 2560,
        intermediate_size: int = 9728,
        num_hidden_layers: int = 36,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 8,
        head_dim: int | None = 128,
        hidden_act: str = "silu",
        max_position_embeddings: int = 40960,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1000000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        use_sliding_window: bool = False,
        tie_word_embeddings: bool = True,
        mask_token_id: int = 151669,
        block_size: int = 4,
        pad_token_id: int | None = 151643,
        bos_token_id: int | None = 151643,
        eos_token_id: int | list[int] | None = 151645,
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
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
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
        check_activation_and_rope("SDARConfig", hidden_act, rope_scaling)
        if use_sliding_window:
            raise ValueError("SDARConfig: use_sliding_window=True is not supported (SDAR attends every key)")
        check_positive_ints(self, "SDARConfig", ("head_dim", "block_size"))
        if self.head_dim % 2:
            raise ValueError(f"SDARConfig: head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        check_kv_heads_and_ids(self, "SDARConfig")


class SDARAttention(nn.Module):
    """Qwen3's attention: per-head RMSNorm of queries and keys, then RoPE."""

    def __init__(self, config: SDARConfig, layer_idx: int):
        super().__init__()
        d, self.n_heads, self.n_kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        head_dim, bias = config.head_dim, config.attention_bias
        self.layer_idx = layer_idx
        self.q_proj = Linear(d, self.n_heads * head_dim, bias=bias)
        self.k_proj = Linear(d, self.n_kv_heads * head_dim, bias=bias)
        self.v_proj = Linear(d, self.n_kv_heads * head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * head_dim, d, bias=bias)
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)

    def forward(self, h, inputs: AttentionInputs):
        b, n, _ = h.shape
        q = self.q_norm(self.q_proj(h).view(b, n, self.n_heads, -1)).transpose(1, 2)
        k = self.k_norm(self.k_proj(h).view(b, n, self.n_kv_heads, -1)).transpose(1, 2)
        q, k = apply_rope(q, inputs.cos, inputs.sin), apply_rope(k, inputs.cos, inputs.sin)
        v = split_heads(self.v_proj(h), self.n_kv_heads)
        return self.o_proj(merge_heads(attend(q, k, v, self.layer_idx, inputs)))


class SDARDecoderLayer(nn.Module):
    def __init__(self, config: SDARConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SDARAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = self._mlp(config, layer_idx)

    def _mlp(self, config: SDARConfig, layer_idx: int) -> nn.Module:
        return SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, inputs: AttentionInputs):
        x = x + self.self_attn(self.input_layernorm(x), inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


class SDARBaseModel(nn.Module):
    def __init__(self, config: SDARConfig, layer_class: type[SDARDecoderLayer]):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class SDARForCausalLM(DLMModelMixin, PreTrainedModel):
    """SDAR block diffusion LM. Hidden state i predicts token i (no shift: SDAR's generate reads the
    logits of the block's own positions). `block_diffusion`: decoded by the engine's block rules."""

    config_class = SDARConfig
    base_model_prefix = "model"
    _no_split_modules = ["SDARDecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _supports_sdpa = True
    logit_shift = 0
    block_diffusion = True
    layer_class = SDARDecoderLayer

    def __init__(self, config: SDARConfig):
        super().__init__(config)
        self.model = SDARBaseModel(config, self.layer_class)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def block_size(self) -> int:
        """The block length the checkpoint was trained with (its default for decoding)."""
        return self.config.block_size

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def _stack(self):
        return self.model.embed_tokens, self.model.layers, self.model.norm, self.lm_head


class SDARMoeConfig(SDARConfig):
    """SDAR-30B-A3B's `config.json` fields: SDAR's (Qwen3's) plus Qwen3-MoE's experts. Defaults are
    Qwen3-30B-A3B's: hidden 2048, 48 layers, 32 heads of 128 over 4 KV heads, 128 experts of 768 with 8
    per token (renormalized), every layer sparse."""

    model_type = "sdar_moe"
    architecture_fields = (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "moe_intermediate_size",
        "num_experts", "vocab_size",
    )  # fmt: skip

    def __init__(
        self,
        hidden_size: int = 2048,
        intermediate_size: int = 6144,
        num_hidden_layers: int = 48,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 4,
        tie_word_embeddings: bool = False,
        moe_intermediate_size: int = 768,
        num_experts: int = 128,
        num_experts_per_tok: int = 8,
        norm_topk_prob: bool = True,
        decoder_sparse_step: int = 1,
        mlp_only_layers: list[int] | None = None,
        **kwargs,
    ):
        self.moe_intermediate_size = moe_intermediate_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.decoder_sparse_step = decoder_sparse_step
        self.mlp_only_layers = [] if mlp_only_layers is None else list(mlp_only_layers)
        super().__init__(
            hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
            tie_word_embeddings=tie_word_embeddings, **kwargs,
        )  # fmt: skip
        sizes = ("moe_intermediate_size", "num_experts", "num_experts_per_tok", "decoder_sparse_step")
        check_positive_ints(self, "SDARMoeConfig", sizes)
        if num_experts_per_tok > num_experts:
            raise ValueError(
                f"SDARMoeConfig: num_experts_per_tok={num_experts_per_tok} exceeds num_experts={num_experts}"
            )
        if not isinstance(norm_topk_prob, bool):
            raise ValueError(f"SDARMoeConfig: norm_topk_prob={norm_topk_prob!r} must be a bool")

    def is_sparse(self, layer_idx: int) -> bool:
        """Qwen3-MoE's rule: experts unless the layer is in `mlp_only_layers` or off the sparse step."""
        return layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0


class SDARMoeDecoderLayer(SDARDecoderLayer):
    def _mlp(self, config: SDARMoeConfig, layer_idx: int) -> nn.Module:
        if not config.is_sparse(layer_idx):
            return SwiGLUMLP(config.hidden_size, config.intermediate_size)
        # Qwen3-MoE's routing: softmax over every expert in float32, the top `num_experts_per_tok`,
        # renormalized when `norm_topk_prob`
        router = Router(config.num_experts, config.num_experts_per_tok, norm_topk_prob=config.norm_topk_prob)
        return SparseMoeBlock(config.hidden_size, config.moe_intermediate_size, router)


class SDARMoeForCausalLM(SDARForCausalLM):
    """SDAR's MoE sizes (JetLM/SDAR-30B-A3B-Chat, -Sci): Qwen3-MoE's layer, block diffusion decoding."""

    config_class = SDARMoeConfig
    _no_split_modules = ["SDARMoeDecoderLayer"]
    layer_class = SDARMoeDecoderLayer
