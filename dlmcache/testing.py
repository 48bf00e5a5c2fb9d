"""Random-weight models built from configs, for tests and benchmarks (one place for all of them).

No diffusion-LM weights can be downloaded on the machines this package is developed on, so tests
and CPU benchmarks run the real architectures with random weights:

- `tiny_llada` / `tiny_dream` / `tiny_llama`: a few hundred thousand parameters over a given
  tokenizer's vocabulary, for tests (the bundled tokenizer by default).
- `llada_135m`: d_model 768, 12 layers, 12 heads, SwiGLU 2048, vocab 32768 (135M parameters), the
  model of the decoding-speed benchmarks, with `synthetic_tokenizer` so random ids decode offline;
  `dream_135m`: the same size in Dream's architecture.
- `random_checkpoint(architecture, path, **config)`: a small random checkpoint of any architecture
  the package loads (`dlmcache.models.ARCHITECTURES`), written in its hub layout (`write_checkpoint`:
  config.json with the release's field names, safetensors shards, the tokenizer).
- `random_guide`: a 10M-parameter Llama causal LM over a tokenizer's vocabulary (about 1/13 of
  `llada_135m`, the ratio of a 0.5B guide to a 7B DLM).

The tiny random vision-language models live in `dlmcache.vlm.tiny` (the VLM side imports nothing of
the diffusion-LM stack).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from .models import (
    ARCHITECTURES,
    DreamConfig,
    DreamModel,
    FastDLLMV2Config,
    FastDLLMV2ForCausalLM,
    LLaDA2MoeConfig,
    LLaDA2MoeModelLM,
    LLaDAConfig,
    LLaDAModelLM,
    LLaDAMoEConfig,
    LLaDAMoEModelLM,
    SDARConfig,
    SDARForCausalLM,
    SDARMoeForCausalLM,
)


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer over "t0".."tN" (specials: 0 EOS, 1 pad, 2 mask) so random ids decode."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>", "<|mdm_mask|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", mask_token="<|mdm_mask|>"
    )


#: The special ids of `synthetic_tokenizer` (EOS 0, pad 1, mask 2), in both families' field names.
SYNTHETIC_IDS = {"eos_token_id": 0, "pad_token_id": 1, "mask_token_id": 2}


def _seeded(model_class, config, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """`model_class(config)` with random weights from `seed`, in `dtype` on `device`, in eval mode."""
    torch.manual_seed(seed)
    return model_class(config).to(dtype=dtype, device=device).eval()


def _random_qk_norms(model):
    """Random per-head q/k norm weights (in [0.5, 1.5]), so a test exercises that path; returns model."""
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "q_norm"):
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


def llada_135m(vocab_size: int = 32768, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LLaDAModelLM:
    """The benchmarks' LLaDA-architecture model (seed 0; mask id 2, EOS 0, pad 1 as in
    `synthetic_tokenizer`)."""
    config = LLaDAConfig(d_model=768, n_layers=12, n_heads=12, mlp_hidden_size=2048, vocab_size=vocab_size,
                         embedding_size=vocab_size, max_sequence_length=16384, rope_theta=500000.0,
                         **SYNTHETIC_IDS)  # fmt: skip
    return _seeded(LLaDAModelLM, config, dtype, device)


def dream_135m(vocab_size: int = 32768, dtype: torch.dtype = torch.float32, device: str = "cpu") -> DreamModel:
    """`llada_135m`'s size in Dream's architecture (hidden 768, 12 layers, 12 heads over 2 KV heads:
    Dream-7B's grouped-query attention at this scale, QKV biases, SwiGLU 2048, vocab 32768; seed 0;
    the same special ids, BOS = EOS)."""
    config = DreamConfig(vocab_size=vocab_size, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=16384,
                         rope_theta=500000.0, bos_token_id=0, **SYNTHETIC_IDS)  # fmt: skip
    return _seeded(DreamModel, config, dtype, device)


def fast_dllm_v2_135m(vocab_size: int = 32768, dtype: torch.dtype = torch.float32,
                      device: str = "cpu") -> FastDLLMV2ForCausalLM:  # fmt: skip
    """`dream_135m`'s layers in Fast-dLLM v2's architecture: attention blocks of 32, sub-blocks of 8."""
    config = FastDLLMV2Config(vocab_size=vocab_size, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                              num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=16384,
                              rope_theta=500000.0, bos_token_id=0, **SYNTHETIC_IDS)  # fmt: skip
    return _seeded(FastDLLMV2ForCausalLM, config, dtype, device)


def random_guide(tokenizer, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A random-weight Llama causal LM over `tokenizer`'s vocabulary (4 layers, hidden 256)."""
    model = tiny_llama(
        seed=1,
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_key_value_heads=4,
        max_position_embeddings=16384,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.to(dtype=dtype, device=device)


def bundled_tokenizer():
    from transformers import AutoTokenizer

    from .locations import resolve_path

    return AutoTokenizer.from_pretrained(resolve_path("dlmcache/tiny"))


def tiny_llama(seed: int = 0, **overrides):
    """A random 3-layer GQA Llama (transformers) for the KV-policy tests: vocab 200, hidden 128, 4 / 2
    heads; no EOS, so generate runs to max_new_tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = dict(
        vocab_size=200,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(LlamaConfig(**(config | overrides))).eval()


def tiny_llada(tokenizer=None, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LLaDAModelLM:
    """A random 2-layer LLaDA (d 64, 4 heads) over `tokenizer`'s vocabulary and special ids."""
    tokenizer = tokenizer or bundled_tokenizer()
    kw = dict(
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,
        mlp_hidden_size=96,
        vocab_size=len(tokenizer),
        embedding_size=len(tokenizer),
        rope_theta=10000.0,
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_sequence_length=512,
    )
    kw.update(overrides)
    return _seeded(LLaDAModelLM, LLaDAConfig(**kw), dtype, seed=seed)


def tiny_dream(tokenizer=None, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> DreamModel:
    """A random 2-layer Dream (d 64, GQA 4 / 2, random QKV biases) over `tokenizer`'s vocabulary."""
    tokenizer = tokenizer or bundled_tokenizer()
    kw = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        max_position_embeddings=512,
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    kw.update(overrides)
    return _random_qkv_biases(_seeded(DreamModel, DreamConfig(**kw), dtype, seed=seed))


def _random_qkv_biases(model):
    """Random Q/K/V biases (the init zeroes them), so a test exercises that path; returns model."""
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    return model


def tiny_sdar(tokenizer=None, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> SDARForCausalLM:
    """A random 2-layer SDAR (Qwen3 layer: hidden 64, 4 heads of 24 over 2 KV heads, so head_dim is not
    hidden / heads; per-head q/k norms with random weights; block size 4) over `tokenizer`'s vocabulary.
    Untied (a tied random model predicts the mask token at masked positions: pass
    `tie_word_embeddings=True` for the tied layout of SDAR-1.7B / 4B)."""
    return _tiny_sdar(SDARForCausalLM, tokenizer, seed, dtype, overrides)


def _tiny_sdar(model_class, tokenizer, seed: int, dtype: torch.dtype, overrides: dict):
    tokenizer = tokenizer or bundled_tokenizer()
    kw = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        block_size=4,
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    kw.update(overrides)
    return _random_qk_norms(_seeded(model_class, model_class.config_class(**kw), dtype, seed=seed))


def tiny_llada_moe(tokenizer=None, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LLaDAMoEModelLM:
    """A random 3-layer LLaDA-MoE (hidden 64, 4 heads with q/k norms, RoPE over half of each head;
    layers 0 and 2 with 8 experts of 32, 2 per token, and a shared expert; layer 1 dense) over
    `tokenizer`'s vocabulary."""
    tokenizer = tokenizer or bundled_tokenizer()
    kw = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        dense_intermediate_size=96,
        expert_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_layer_freq=[1, 0, 1],
        partial_rotary_factor=0.5,
        rope_theta=10000.0,
        max_position_embeddings=512,
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kw.update(overrides)
    return _random_qk_norms(_seeded(LLaDAMoEModelLM, LLaDAMoEConfig(**kw), dtype, seed=seed))


def llada_moe_135m(vocab_size: int = 32768, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LLaDAMoEModelLM:
    """`llada_135m`'s width and depth in LLaDA-MoE's architecture (hidden 768, 12 layers of 12 heads
    with q/k norms, 16 experts of 256 with 4 per token in every layer: 192M parameters, of which a
    token multiplies 82M, LM head included; vocab 32768; seed 0; the synthetic tokenizer's ids)."""
    config = LLaDAMoEConfig(vocab_size=vocab_size, hidden_size=768, expert_intermediate_size=256, num_experts=16,
                            num_experts_per_tok=4, num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=16384, rope_theta=500000.0, **SYNTHETIC_IDS)  # fmt: skip
    return _seeded(LLaDAMoEModelLM, config, dtype, device)


def tiny_fast_dllm_v2(tokenizer=None, seed: int = 0, dtype: torch.dtype = torch.float32,
                      **overrides) -> FastDLLMV2ForCausalLM:  # fmt: skip
    """`tiny_dream`'s layers in Fast-dLLM v2's architecture: attention blocks of 8 (`bd_size`), decoded
    in sub-blocks of 4 (`small_block_size`)."""
    tokenizer = tokenizer or bundled_tokenizer()
    kw = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512, bd_size=8, small_block_size=4,
        mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    kw.update(overrides)
    return _random_qkv_biases(_seeded(FastDLLMV2ForCausalLM, FastDLLMV2Config(**kw), dtype, seed=seed))


def tiny_llada2(tokenizer=None, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LLaDA2MoeModelLM:
    """A random 3-layer LLaDA2 (hidden 64, 4 heads of 16 over 2 KV heads with q/k norms, RoPE over half
    of each head; layer 0 dense, layers 1-2 with 16 experts of 32 in 4 groups, 2 groups and 4 experts
    per token, a shared expert; random expert biases and an output bias) over `tokenizer`'s
    vocabulary; blocks of 4."""
    tokenizer = tokenizer or bundled_tokenizer()
    kw = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, num_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
        use_bias=True, partial_rotary_factor=0.5, rope_theta=10000.0, max_position_embeddings=512, block_size=4,
        mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    kw.update(overrides)
    model = _seeded(LLaDA2MoeModelLM, LLaDA2MoeConfig(**kw), dtype, seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.attention
            if hasattr(attention, "query_layernorm"):
                attention.query_layernorm.weight.uniform_(0.5, 1.5)
                attention.key_layernorm.weight.uniform_(0.5, 1.5)
            if attention.dense.bias is not None:
                attention.dense.bias.normal_(0, 0.1)
            if hasattr(layer.mlp, "router"):  # a bias that moves the choice of experts
                layer.mlp.gate.expert_bias.normal_(0, 0.2)
    return model


def tiny_sdar_moe(tokenizer=None, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> SDARMoeForCausalLM:
    """`tiny_sdar` with Qwen3-MoE's layers: 8 experts of 32, 2 per token, renormalized; layer 1 dense
    (`mlp_only_layers`)."""
    kw = dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1])
    return _tiny_sdar(SDARMoeForCausalLM, tokenizer, seed, dtype, kw | overrides)


def sdar_135m(vocab_size: int = 32768, dtype: torch.dtype = torch.float32, device: str = "cpu") -> SDARForCausalLM:
    """`llada_135m`'s size in SDAR's architecture (hidden 768, 12 layers, 12 heads of 64 over 2 KV
    heads, SwiGLU 2048, vocab 32768, untied; block size 4; seed 0; the synthetic tokenizer's ids)."""
    config = SDARConfig(vocab_size=vocab_size, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=12, num_key_value_heads=2, head_dim=64, max_position_embeddings=16384,
                        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=0, **SYNTHETIC_IDS)  # fmt: skip
    return _seeded(SDARForCausalLM, config, dtype, device)


def llada2_135m(vocab_size: int = 32768, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LLaDA2MoeModelLM:
    """`llada_135m`'s width and depth in LLaDA2's architecture (hidden 768, 12 layers of 12 heads of 64
    over 4 KV heads with q/k norms and half-rotary RoPE; layer 0 a dense SwiGLU of 2048, then 32 experts
    of 256 in 8 groups, 4 groups and 4 experts per token, one shared expert; block size 32; seed 0;
    the synthetic tokenizer's ids)."""
    config = LLaDA2MoeConfig(vocab_size=vocab_size, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=4, moe_intermediate_size=256, num_experts=32,
                             num_experts_per_tok=4, n_group=8, topk_group=4, num_shared_experts=1,
                             first_k_dense_replace=1, max_position_embeddings=16384, **SYNTHETIC_IDS)  # fmt: skip
    return _seeded(LLaDA2MoeModelLM, config, dtype, device)


# config.json as the hub repos write it (extra fields included), for checkpoints written by hand.
LLADA_HUB_FIELDS = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModel": "modeling_llada.LLaDAModelLM",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "embedding_dropout": 0.0,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "model_type": "llada",
    "multi_query_attention": None,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rope": True,
    "rope_full_precision": True,
    "scale_logits": False,
    "transformers_version": "4.46.3",
    "use_cache": False,
    "weight_tying": False,
}
DREAM_HUB_FIELDS = {
    "architectures": ["DreamModel"],
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_window_layers": 28,
    "model_type": "Dream",
    "rope_scaling": None,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2",
    "use_cache": False,
    "use_sliding_window": False,
}


SDAR_HUB_FIELDS = {
    "architectures": ["SDARForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_sdar.SDARConfig",
        "AutoModel": "modeling_sdar.SDARModel",
        "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
    },
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_window_layers": 36,
    "model_type": "sdar",
    "rope_scaling": None,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.52.4",
    "use_cache": True,
    "use_sliding_window": False,
}


FAST_DLLM_V2_HUB_FIELDS = {
    "architectures": ["Fast_dLLM_QwenForCausalLM"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration.Fast_dLLM_QwenConfig",
        "AutoModel": "modeling.Fast_dLLM_QwenModel",
        "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM",
    },
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_window_layers": 28,
    "model_type": "Fast_dLLM_Qwen",
    "rope_scaling": None,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.53.1",
    "use_cache": True,
    "use_sliding_window": False,
}

LLADA2_HUB_FIELDS = {
    "architectures": ["LLaDA2MoeModelLM"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
        "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
        "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
    },
    "embedding_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_window_layers": 28,
    "model_type": "llada2_moe",
    "norm_head": False,
    "output_dropout": 0.0,
    "output_router_logits": False,
    "rope_scaling": None,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.52.3",
    "use_cache": False,
    "use_sliding_window": False,
}

LLADA_MOE_HUB_FIELDS = {
    "architectures": ["LLaDAMoEModelLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_lladamoe.LLaDAConfig",
        "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
        "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM",
    },
    "clip_qkv": None,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "model_type": "llada",
    "moe_router_enable_expert_bias": False,
    "moe_router_score_function": "softmax",
    "norm_topk_prob": False,
    "output_router_logits": False,
    "qk_layernorm": True,
    "rope_scaling": None,
    "routed_scaling_factor": 1,
    "router_aux_loss_coef": 0.01,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2",
    "use_cache": False,
}


SDAR_MOE_HUB_FIELDS = dict(
    SDAR_HUB_FIELDS,
    architectures=["SDARMoeForCausalLM"],
    auto_map={
        "AutoConfig": "configuration_sdar_moe.SDARMoeConfig",
        "AutoModel": "modeling_sdar_moe.SDARMoeModel",
        "AutoModelForCausalLM": "modeling_sdar_moe.SDARMoeForCausalLM",
    },
    model_type="sdar_moe",
    output_router_logits=False,
    router_aux_loss_coef=0.001,
    tie_word_embeddings=False,
)


def block_causal_mask(cols: torch.LongTensor, block_length: int, valid: torch.BoolTensor) -> torch.BoolTensor:
    """[R, n, L]: the query at column cols[r, q] may attend key column j < L when j's block is not after
    the query's and j is a real position of the row (`valid` [R, L])."""
    key_block = torch.arange(valid.shape[1], device=valid.device) // block_length
    return (key_block[None, None, :] <= (cols // block_length)[:, :, None]) & valid[:, None, :]


@torch.no_grad()
def block_causal_logits(model, ids: torch.Tensor, block: int) -> torch.Tensor:
    """Logits [B, n, V] of a block-causal `model` over ids [B, n] (blocks of `block` absolute
    positions), in one forward from position 0 under the block-causal mask: what the releases' full
    recompute gives (tests and `scripts/check_official.py` compare against it)."""
    b, n = ids.shape
    positions = torch.arange(n, device=ids.device).expand(b, -1)
    mask = block_causal_mask(positions, block, torch.ones(b, n, dtype=torch.bool, device=ids.device))
    return model(ids, positions=positions, attention_mask=mask).logits


def write_checkpoint(model, directory: str | Path, tokenizer=None, n_shards: int = 3) -> Path:
    """Write `model` the way the hub repos are laid out: config.json with the release's fields,
    `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json`, written with
    safetensors directly (not with our own save code)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    arch = HUB_FIELDS[ARCHITECTURE_OF[type(model)]]
    keys = [
        "d_model",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "mlp_hidden_size",
        "vocab_size",
        "embedding_size",
        "max_sequence_length",
        "rope_theta",
        "rms_norm_eps",
        "mask_token_id",
        "eos_token_id",
        "pad_token_id",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "bos_token_id",
        "head_dim",
        "block_size",
        "dense_intermediate_size",
        "expert_intermediate_size",
        "shared_expert_intermediate_size",
        "num_experts",
        "num_experts_per_tok",
        "moe_layer_freq",
        "partial_rotary_factor",
        "qk_layernorm",
        "moe_router_enable_expert_bias",
        "moe_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
        "use_qkv_bias",
        "use_qk_norm",
        "use_bias",
        "num_shared_experts",
        "n_group",
        "topk_group",
        "routed_scaling_factor",
        "first_k_dense_replace",
        "bd_size",
        "small_block_size",
        "layer_types",
    ]
    if "tie_word_embeddings" in arch:
        keys.append("tie_word_embeddings")
    config = dict(arch, **{k: cfg[k] for k in keys if k in cfg})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):  # a tied head is not stored (as the hub's tied releases)
        for key in getattr(type(model), "_tied_weights_keys", None) or {}:
            state.pop(key, None)
    names = sorted(state)
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k] for k in names[i::n_shards]}
        save_file(part, str(directory / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    index = {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
        "weight_map": weight_map,
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


HUB_FIELDS = {
    "LLaDAModelLM": LLADA_HUB_FIELDS,
    "DreamModel": DREAM_HUB_FIELDS,
    "LLaDAMoEModelLM": LLADA_MOE_HUB_FIELDS,
    "SDARForCausalLM": SDAR_HUB_FIELDS,
    "SDARMoeForCausalLM": SDAR_MOE_HUB_FIELDS,
    "LLaDA2MoeModelLM": LLADA2_HUB_FIELDS,
    "Fast_dLLM_QwenForCausalLM": FAST_DLLM_V2_HUB_FIELDS,
}
ARCHITECTURE_OF = {cls: name for name, cls in ARCHITECTURES.items()}
TINY_BUILDERS = {
    "LLaDAModelLM": tiny_llada,
    "DreamModel": tiny_dream,
    "LLaDAMoEModelLM": tiny_llada_moe,
    "SDARForCausalLM": tiny_sdar,
    "SDARMoeForCausalLM": tiny_sdar_moe,
    "LLaDA2MoeModelLM": tiny_llada2,
    "Fast_dLLM_QwenForCausalLM": tiny_fast_dllm_v2,
}


def random_checkpoint(
    architecture: str, path: str | Path, tokenizer=None, seed: int = 0, n_shards: int = 1, **config
) -> Path:
    """Write a small random checkpoint of `architecture` (a name of `dlmcache.models.ARCHITECTURES`)
    in the hub layout at `path`: config.json with the release's field names, safetensors shards with
    their index, and `tokenizer`'s files (the bundled tokenizer by default), so that
    `DLMPipeline.from_pretrained(path)` loads it. `config` overrides the tiny defaults (field names
    of the architecture's config class)."""
    if architecture not in TINY_BUILDERS:
        raise ValueError(f"architecture={architecture!r}: expected one of {sorted(TINY_BUILDERS)}")
    tokenizer = tokenizer or bundled_tokenizer()
    model = TINY_BUILDERS[architecture](tokenizer, seed=seed, **config)
    return write_checkpoint(model, path, tokenizer, n_shards=n_shards)


class DispatchCount(TorchDispatchMode):
    """Counts the ATen ops dispatched inside `with DispatchCount() as count:` (`count.ops`): the
    engine's ops-per-step test and benchmark."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def engine_logits(model, requests, join_at: int | None = None, **options) -> dict[str, list[torch.Tensor]]:
    """Each request's logits (its logit rows, in order) at each of its steps on a fresh
    `BatchedDecoder` over `model` (`options`: the decoder's, e.g. graphs): all of `requests`
    together, the last one joining after step `join_at` (None: all from the start). What the
    batch-invariance test and benchmark compare with each request alone. Checks that every pool
    block is free at the end."""
    from .engine import BatchedDecoder

    decoder = BatchedDecoder.for_requests(model, None, requests, **options)
    seen: dict[str, list[torch.Tensor]] = {r.id: [] for r in requests}
    commit = decoder.batch.commit

    def recording(logits, values):
        rows = decoder.batch._step["target_row"]
        for i, request in enumerate(decoder.batch.requests):
            seen[request.id].append(logits[torch.from_numpy(rows == i)].clone())
        return commit(logits, values)

    decoder.batch.commit = recording
    first = requests[:-1] if join_at is not None else requests
    for r in first:
        decoder.add(r)
    waiting, step = list(requests[len(first) :]), 0
    while len(decoder) or waiting:
        if waiting and step == join_at:
            decoder.add(waiting.pop())
        decoder.step()
        step += 1
    if decoder.pool.free_blocks != decoder.pool.num_blocks:
        raise AssertionError(f"{decoder.pool.num_blocks - decoder.pool.free_blocks} pool blocks still held")
    return seen


@torch.no_grad()
def decode(model, prompts: list[list[int]], max_new_tokens: int, block_length: int, steps_per_block: int, scheduler,
           cache="freecache", eos_token_id: int | None = None, stop_at_eos: bool = False,
           generator: torch.Generator | None = None, **cache_options) -> dict:  # fmt: skip
    """Decode `prompts` (id lists) with a bare `model` on the batched engine, all in one batch: what the
    tests and `scripts/check_official.py` compare with the releases' own loops. `steps_per_block`: the
    most forwards a block takes; `cache`: a name (with `cache_options`) or a `DenoisingCache`; a block
    diffusion model decodes in its own attention blocks, with its autoregressive first token where it
    has one. Returns {"sequences": [B, G], "commit_step": [B, G], "nfe": the batch's forwards, "stats":
    each request's counters}."""
    import copy

    from .cache import BlockCache, make_cache
    from .engine import Request

    if max_new_tokens < block_length:
        raise ValueError(f"max_new_tokens={max_new_tokens} is shorter than block_length={block_length}")
    rule = make_cache(cache, **cache_options)
    rule = BlockCache(rule) if model.block_diffusion else rule
    settings = dict(stop_at_eos=stop_at_eos, generator=generator)
    if model.block_diffusion:
        settings.update(attention_block=model.attention_block, first_token_ar=model.first_token_autoregressive)
    steps = steps_per_block * (max_new_tokens // block_length)
    requests = [Request(list(p), max_new_tokens, block_length, steps, copy.copy(scheduler), rule, id=str(i), **settings)
                for i, p in enumerate(prompts)]  # fmt: skip
    done, forwards = run_requests(model, eos_token_id, requests)
    ordered = [done[str(i)] for i in range(len(prompts))]
    return {
        "sequences": torch.stack([f.sequence for f in ordered]),
        "commit_step": torch.stack([f.commit_step for f in ordered]),
        "nfe": forwards,
        "stats": [f.stats for f in ordered],
    }


@torch.no_grad()
def run_requests(model, eos_token_id: int | None, requests: list) -> tuple[dict, int]:
    """Decode the engine's `requests` in one `BatchedDecoder` whose pool holds exactly them, all added
    at once: ({request id: `Finished`}, the forwards taken). A failed request raises its error; the
    pool must be empty at the end."""
    from .engine import BatchedDecoder

    decoder = BatchedDecoder.for_requests(model, eos_token_id, requests)
    for request in requests:
        decoder.add(request)
    done = {}
    while len(decoder):
        for finished in decoder.step():
            if finished.error is not None:
                raise finished.error
            done[finished.request.id] = finished
    if decoder.pool.free_blocks != decoder.pool.num_blocks:
        raise AssertionError(f"{decoder.pool.num_blocks - decoder.pool.free_blocks} pool blocks still held")
    return done, decoder.forwards
