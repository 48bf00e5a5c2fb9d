"""Tiny random models, hub-layout checkpoints and an independent reference forward for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dlmcache.testing import tiny_dream, tiny_llada, tiny_llama  # noqa: F401 (the tests' models)

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


def write_hub_checkpoint(model, directory: Path, tokenizer=None, n_shards: int = 3) -> Path:
    """Write `model` the way the hub repos are laid out: config.json with the release's fields,
    `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json`, written with
    safetensors directly (not with our own save code)."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    arch = LLADA_HUB_FIELDS if cfg["model_type"] == "llada" else DREAM_HUB_FIELDS
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
    ]
    config = dict(arch, **{k: cfg[k] for k in keys if k in cfg})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
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


def reference_forward(state: dict, config, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None):
    """An independent, deliberately plain forward from the raw state dict (float64): the architecture
    as the papers describe it. Returns logits [B, n, V] with Dream's shift applied."""
    sd = {k: v.double() for k, v in state.items()}
    llada = config.model_type == "llada"
    if llada:
        pre, n_layers, n_heads, n_kv = "model.transformer.", config.n_layers, config.n_heads, config.n_kv_heads
        emb, d, theta, eps = sd[pre + "wte.weight"], config.d_model, config.rope_theta, config.rms_norm_eps
    else:
        pre, n_layers = "model.", config.num_hidden_layers
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
        emb, d, theta, eps = sd[pre + "embed_tokens.weight"], config.hidden_size, config.rope_theta, config.rms_norm_eps
    hd = d // n_heads
    b, n = input_ids.shape
    if key_mask is None:
        key_mask = torch.ones(b, n, dtype=torch.bool)
    pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0).double()

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def rope(x):  # x [B, H, n, hd]; pair dim i with dim i + hd/2
        freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = pos[:, None, :, None] * freqs
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)

    def lin(x, name, bias=False):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if bias else y

    h = emb[input_ids]
    for i in range(n_layers):
        if llada:
            p = f"{pre}blocks.{i}."
            names = dict(
                n1=p + "attn_norm",
                q=p + "q_proj",
                k=p + "k_proj",
                v=p + "v_proj",
                o=p + "attn_out",
                n2=p + "ff_norm",
                gate=p + "ff_proj",
                up=p + "up_proj",
                down=p + "ff_out",
            )
        else:
            p = f"{pre}layers.{i}."
            names = dict(
                n1=p + "input_layernorm",
                q=p + "self_attn.q_proj",
                k=p + "self_attn.k_proj",
                v=p + "self_attn.v_proj",
                o=p + "self_attn.o_proj",
                n2=p + "post_attention_layernorm",
                gate=p + "mlp.gate_proj",
                up=p + "mlp.up_proj",
                down=p + "mlp.down_proj",
            )
        x = rms(h, sd[names["n1"] + ".weight"])
        q = lin(x, names["q"], not llada).view(b, n, n_heads, hd).transpose(1, 2)
        k = lin(x, names["k"], not llada).view(b, n, n_kv, hd).transpose(1, 2)
        v = lin(x, names["v"], not llada).view(b, n, n_kv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(n_heads // n_kv, 1), v.repeat_interleave(n_heads // n_kv, 1)
        scores = (q @ k.transpose(-1, -2)) / hd**0.5
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        h = h + lin(att, names["o"])
        x = rms(h, sd[names["n2"] + ".weight"])
        h = h + lin(F.silu(lin(x, names["gate"])) * lin(x, names["up"]), names["down"])
    if llada:
        logits = lin(rms(h, sd[pre + "ln_f.weight"]), pre + "ff_out")
    else:
        logits = lin(rms(h, sd[pre + "norm.weight"]), "lm_head")
        logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
    return logits
