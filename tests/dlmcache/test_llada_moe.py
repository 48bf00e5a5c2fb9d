"""LLaDA-MoE: the model against an independent float64 forward written from the release's description
(token by token routing, every expert by hand), its routing rules, strict loading and bad configs.
(`scripts/check_official.py --lladamoe` compares it with the release's own modeling code: float32
logits bit for bit, recorded in docs/results.md.)"""

import math

import pytest
import torch
import torch.nn.functional as F

from dlmcache import DLMPipeline
from dlmcache.models import LLaDAMoEConfig
from dlmcache.testing import random_checkpoint, tiny_llada_moe


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, positions, dim, theta):
    """Half-split RoPE over the first `dim` features of x [n, H, D]."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions[:, None].double() * inv  # [n, dim/2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    a, b, rest = x[..., : dim // 2], x[..., dim // 2 : dim], x[..., dim:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], -1)


def swiglu(sd, prefix, x):
    gate, up, down = (sd[f"{prefix}.{n}_proj.weight"] for n in ("gate", "up", "down"))
    return F.silu(x @ gate.T) * (x @ up.T) @ down.T


def reference_logits(model, ids):
    """One sequence ids [n] -> logits [n, V], float64, from the state dict alone."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    n, heads, hd = len(ids), c.num_attention_heads, c.hidden_size // c.num_attention_heads
    rot = int(hd * c.partial_rotary_factor)
    pos = torch.arange(n)
    x = sd["model.embed_tokens.weight"][ids]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        h = rms(x, sd[f"{p}.input_layernorm.weight"], c.rms_norm_eps)
        q, k, v = (h @ sd[f"{p}.self_attn.{n}_proj.weight"].T for n in "qkv")
        q, k, v = (t.view(n, heads, hd) for t in (q, k, v))
        q = rms(q, sd[f"{p}.self_attn.q_norm.weight"], c.rms_norm_eps)
        k = rms(k, sd[f"{p}.self_attn.k_norm.weight"], c.rms_norm_eps)
        q, k = rope(q, pos, rot, c.rope_theta), rope(k, pos, rot, c.rope_theta)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)  # bidirectional: no mask
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, -1)
        x = x + attn @ sd[f"{p}.self_attn.o_proj.weight"].T
        h = rms(x, sd[f"{p}.post_attention_layernorm.weight"], c.rms_norm_eps)
        if c.moe_layer_freq[i] == 0:
            x = x + swiglu(sd, f"{p}.mlp", h)
            continue
        out = torch.zeros_like(h)
        probs = (h @ sd[f"{p}.mlp.gate.weight"].T).float().softmax(-1)  # the release routes in float32
        if c.moe_router_enable_expert_bias:
            probs = probs + sd[f"{p}.mlp.expert_bias"].float()
        probs = probs.double()
        for t in range(n):  # token by token, expert by expert
            weights, experts = probs[t].topk(c.num_experts_per_tok)
            for w, e in zip(weights, experts, strict=True):
                out[t] += w * swiglu(sd, f"{p}.mlp.experts.{int(e)}", h[t])
        if c.shared_expert_intermediate_size is not None:
            out = out + swiglu(sd, f"{p}.shared_expert", h)
        x = x + out
    x = rms(x, sd["model.norm.weight"], c.rms_norm_eps)
    return x @ sd["lm_head.weight"].T


@pytest.mark.parametrize("expert_bias", [False, True])
def test_forward_equals_an_independent_reference(expert_bias):
    model = tiny_llada_moe(dtype=torch.float64, moe_router_enable_expert_bias=expert_bias)
    if expert_bias:  # a bias large enough to change which experts win
        for layer in model.model.layers:
            if hasattr(layer.mlp, "expert_bias"):
                layer.mlp.expert_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    torch.manual_seed(1)
    ids = torch.randint(3, 200, (2, 23))
    with torch.no_grad():
        logits = model(ids).logits
    for b in range(2):
        torch.testing.assert_close(logits[b], reference_logits(model, ids[b]), rtol=1e-10, atol=1e-10)


def test_the_layers_follow_moe_layer_freq():
    model = tiny_llada_moe()
    layers = model.model.layers
    assert [hasattr(layer.mlp, "experts") for layer in layers] == [True, False, True]
    assert [hasattr(layer, "shared_expert") for layer in layers] == [True, False, True]
    # FLOPs count the routed experts a token uses, not all of them
    dense = tiny_llada_moe(num_experts_per_tok=8).flops_per_token
    assert model.flops_per_token < dense


def test_a_checkpoint_missing_an_expert_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = random_checkpoint("LLaDAMoEModelLM", tmp_path / "moe")
    (shard,) = path.glob("*.safetensors")
    state = load_file(shard)
    del state["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(state, shard)
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.2.mlp.experts.5.up_proj.weight'\]"):
        DLMPipeline.from_pretrained(path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(moe_layer_freq=[1, 1]), r"moe_layer_freq=\[1, 1\] must hold 0 \(dense\) or 1 \(experts\) for each"),
        (dict(moe_router_score_function="sigmoid"), "moe_router_score_function='sigmoid'"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok=9 exceeds num_experts=8"),
        (dict(partial_rotary_factor=0.1), "rotates 1 dims"),
        (dict(num_experts=0), "num_experts=0 must be a positive integer"),
    ],
)
def test_bad_configs_are_refused(kwargs, match):
    base = dict(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_experts=8,
                num_experts_per_tok=2, mask_token_id=2, pad_token_id=1, eos_token_id=0)  # fmt: skip
    with pytest.raises(ValueError, match=match):
        LLaDAMoEConfig(**(base | kwargs))
