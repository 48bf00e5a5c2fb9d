"""Dream (Ye et al., "Dream 7B: Diffusion Large Language Models", arXiv 2508.15487) in plain PyTorch.

A Qwen2.5-style stack (GQA, QKV bias, RoPE theta 1e6, RMSNorm eps 1e-6) with bidirectional attention.
Loads Dream-org/Dream-v0-{Base,Instruct}-7B without `trust_remote_code` (same config fields and
parameter names). Dream is initialised from an autoregressive model and keeps its habit of predicting
the *next* token: the logits of token i come from the hidden state at i-1 ("shifted by one", as in
the reference `diffusion_generate`); this model applies that shift itself.
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .checkpoint import check_activation_and_rope, check_kv_heads_and_ids, check_positive_ints
from .layers import (
    AttentionInputs,
    DLMModelMixin,
    Linear,
    RMSNorm,
    SwiGLUMLP,
    apply_rope,
    attend,
    merge_heads,
    split_heads,
)


class DreamConfig(PretrainedConfig):
    """Dream's `config.json` fields. Defaults are Dream-v0-7B's: hidden 3584, 28 layers,
    28 heads / 4 KV heads, MLP 18944, vocab 152064, RoPE theta 1e6, mask token 151666."""

    model_type = "Dream"
    #: The fields config.json must hold (the rest have Dream-v0-7B's values as defaults).
    architecture_fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")

    def __init__(
        self,
        vocab_size: int = 152064,
        hidden_size: int = 3584,
        intermediate_size: int = 18944,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 28,
        num_key_value_heads: int | None = 4,
        hidden_act: str = "silu",
        max_position_embeddings: int = 131072,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1000000.0,
        rope_scaling: dict | None = None,
        tie_word_embeddings: bool = False,
        mask_token_id: int = 151666,
        pad_token_id: int = 151643,
        bos_token_id: int = 151643,
        eos_token_id: int = 151643,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.mask_token_id = mask_token_id
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )
        check_activation_and_rope("DreamConfig", hidden_act, rope_scaling)
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"DreamConfig: hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}"
            )
        check_kv_heads_and_ids(self, "DreamConfig")


class DreamAttention(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        d, self.n_heads, self.n_kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        head_dim = d // self.n_heads
        self.layer_idx = layer_idx
        self.q_proj = Linear(d, self.n_heads * head_dim, bias=True)
        self.k_proj = Linear(d, self.n_kv_heads * head_dim, bias=True)
        self.v_proj = Linear(d, self.n_kv_heads * head_dim, bias=True)
        self.o_proj = Linear(self.n_heads * head_dim, d, bias=False)

    def forward(self, h, inputs: AttentionInputs):
        q = apply_rope(split_heads(self.q_proj(h), self.n_heads), inputs.cos, inputs.sin)
        k = apply_rope(split_heads(self.k_proj(h), self.n_kv_heads), inputs.cos, inputs.sin)
        v = split_heads(self.v_proj(h), self.n_kv_heads)
        return self.o_proj(merge_heads(attend(q, k, v, self.layer_idx, inputs)))


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DreamAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, inputs: AttentionInputs):
        x = x + self.self_attn(self.input_layernorm(x), inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamBaseModel(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DreamModel(DLMModelMixin, PreTrainedModel):
    """Dream masked diffusion LM; `forward` returns logits already shifted (token i from state i-1)."""

    config_class = DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _supports_sdpa = True
    logit_shift = 1

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def _stack(self):
        return self.model.embed_tokens, self.model.layers, self.model.norm, self.lm_head


class FastDLLMV2Config(DreamConfig):
    """Fast-dLLM v2's `config.json` fields (its `Fast_dLLM_QwenConfig`: Qwen2's, plus `bd_size`, the
    block the model attends in, and `layer_types`). Defaults are Fast_dLLM_v2_7B's base,
    Qwen2.5-7B-Instruct: Dream-v0-7B's sizes (the same base family). Two fields are not in the
    release's config.json and have its generate's defaults: `mask_token_id` (151665) and
    `small_block_size` (8, the sub-block decoded at a time)."""

    model_type = "Fast_dLLM_Qwen"

    def __init__(
        self,
        bd_size: int = 32,
        small_block_size: int = 8,
        layer_types: list[str] | None = None,
        use_sliding_window: bool = False,
        mask_token_id: int = 151665,
        pad_token_id: int = 151643,
        bos_token_id: int = 151643,
        eos_token_id: int = 151645,
        **kwargs,
    ):
        self.bd_size = bd_size
        self.small_block_size = small_block_size
        self.use_sliding_window = use_sliding_window
        super().__init__(mask_token_id=mask_token_id, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, **kwargs)  # fmt: skip
        self.layer_types = ["full_attention"] * self.num_hidden_layers if layer_types is None else list(layer_types)
        where = "FastDLLMV2Config"
        if use_sliding_window or any(t != "full_attention" for t in self.layer_types):
            raise ValueError(f"{where}: sliding-window layers are not supported (layer_types={self.layer_types!r})")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"{where}: layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        check_positive_ints(self, where, ("bd_size", "small_block_size"))
        if bd_size % small_block_size:
            raise ValueError(f"{where}: small_block_size={small_block_size} does not divide bd_size={bd_size}")


class FastDLLMV2ForCausalLM(DreamModel):
    """Fast-dLLM v2 (Wu et al., "Fast-dLLM v2: Efficient Block-Diffusion LLM", arXiv 2509.26328):
    Qwen2.5 turned into a block diffusion model. The layer is Qwen2's (Dream's here: QKV bias, no
    output bias); attention is causal across blocks of `bd_size` absolute positions and bidirectional
    inside one; the logits are shifted by one as Dream's (its "token shift": the state at i-1 predicts
    token i). Decoding (the engine's block rules) goes sub-block by
    sub-block (`small_block_size`) through each attention block, feeding the whole attention block
    each step over the finished blocks' exact cache, and a block's first token is the argmax of the
    previous block's last position, committed alone (the release's autoregressive step)."""

    config_class = FastDLLMV2Config
    block_diffusion = True
    first_token_autoregressive = True

    @property
    def block_size(self) -> int:
        """The sub-block the release decodes at a time (the default block length)."""
        return self.config.small_block_size

    @property
    def attention_block(self) -> int:
        """The block the model attends in (causal across, bidirectional inside)."""
        return self.config.bd_size
