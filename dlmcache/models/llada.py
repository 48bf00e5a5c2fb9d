"""LLaDA (Nie et al., "Large Language Diffusion Models", arXiv 2502.09992) in plain PyTorch.

Loads the hub checkpoints GSAI-ML/LLaDA-8B-{Base,Instruct} without `trust_remote_code`: the config
fields and parameter names are those of the release (`model.transformer.blocks.{i}.q_proj`, ...).
Differences from the reference code: the attention mask is honoured (the reference ignores it, so
left-padded batches were wrong there), positions can be given explicitly, and attention can read a
KV cache (`dlmcache.cache`).
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .checkpoint import check_token_ids
from .layers import (
    AttentionInputs,
    DLMModelMixin,
    Linear,
    RMSNorm,
    apply_rope,
    attend,
    merge_heads,
    split_heads,
    swiglu,
)


class LLaDAConfig(PretrainedConfig):
    """The fields of LLaDA's `config.json` that define the architecture (others are kept as extras).

    Defaults are LLaDA-8B's: d_model 4096, 32 layers, 32 heads (no GQA), SwiGLU hidden 12288,
    vocab 126464, RoPE theta 5e5, mask token 126336.
    """

    model_type = "llada"
    # transformers' standard names for LLaDA's own fields (read and written through to them)
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
    }
    #: The fields config.json must hold (the rest have LLaDA-8B's values as defaults).
    architecture_fields = ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size")

    def __init__(
        self,
        d_model: int = 4096,
        n_layers: int = 32,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        mlp_hidden_size: int = 12288,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        max_sequence_length: int = 4096,
        rope_theta: float = 500000.0,
        rms_norm_eps: float = 1e-5,
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        weight_tying: bool = False,
        activation_type: str = "silu",
        block_type: str = "llama",
        layer_norm_type: str = "rms",
        mask_token_id: int = 126336,
        eos_token_id: int = 126081,
        pad_token_id: int = 126081,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.mlp_hidden_size = mlp_hidden_size
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.weight_tying = weight_tying
        self.activation_type = activation_type
        self.block_type = block_type
        self.layer_norm_type = layer_norm_type
        self.mask_token_id = mask_token_id
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        self._validate()

    def _validate(self) -> None:
        unsupported = {
            "block_type": (self.block_type, "llama"),
            "activation_type": (self.activation_type, "silu"),
            "layer_norm_type": (self.layer_norm_type, "rms"),
            "include_bias": (self.include_bias, False),
            "weight_tying": (self.weight_tying, False),
        }
        for name, (value, expected) in unsupported.items():
            if value != expected:
                raise ValueError(f"LLaDAConfig: {name}={value!r} is not supported (expected {expected!r})")
        if self.d_model % self.n_heads:
            raise ValueError(f"LLaDAConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LLaDAConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        check_token_ids(self, self.padded_vocab_size, "LLaDAConfig")

    @property
    def padded_vocab_size(self) -> int:
        return self.embedding_size or self.vocab_size


class LLaDABlock(nn.Module):
    def __init__(self, config: LLaDAConfig, layer_idx: int):
        super().__init__()
        d, head_dim = config.d_model, config.d_model // config.n_heads
        qkv_bias = config.include_qkv_bias
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = Linear(d, d, bias=qkv_bias)
        self.k_proj = Linear(d, config.n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = Linear(d, config.n_kv_heads * head_dim, bias=qkv_bias)
        self.attn_out = Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = Linear(d, config.mlp_hidden_size, bias=False)  # SwiGLU gate
        self.up_proj = Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = Linear(config.mlp_hidden_size, d, bias=False)

    def forward(self, x, inputs: AttentionInputs):
        h = self.attn_norm(x)
        q = apply_rope(split_heads(self.q_proj(h), self.n_heads), inputs.cos, inputs.sin)
        k = apply_rope(split_heads(self.k_proj(h), self.n_kv_heads), inputs.cos, inputs.sin)
        v = split_heads(self.v_proj(h), self.n_kv_heads)
        x = x + self.attn_out(merge_heads(attend(q, k, v, self.layer_idx, inputs)))
        return x + swiglu(self.ff_norm(x), self.ff_proj, self.up_proj, self.ff_out)


class LLaDATransformer(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.wte = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(config, i) for i in range(config.n_layers))
        self.ln_f = RMSNorm(config.d_model, config.rms_norm_eps)
        self.ff_out = Linear(config.d_model, config.padded_vocab_size, bias=False)


class LLaDABackbone(nn.Module):
    """Holds `transformer` so parameter names read `model.transformer...` as in the checkpoint."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.transformer = LLaDATransformer(config)


class LLaDAModelLM(DLMModelMixin, PreTrainedModel):
    """LLaDA masked diffusion LM: bidirectional attention, logits not shifted (token i from state i)."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True
    logit_shift = 0

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDABackbone(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.transformer.ff_out

    def _stack(self):
        t = self.model.transformer
        return t.wte, t.blocks, t.ln_f, t.ff_out
