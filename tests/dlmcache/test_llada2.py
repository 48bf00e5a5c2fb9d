"""LLaDA2 (BailingMoeV2 block diffusion): the model against an independent float64 forward written from
the release's description (fused QKV, q/k norms, half-rotary RoPE, a dense first layer, group-limited
sigmoid routing token by token, shared experts, the block-causal mask), its routing rule, decoding on
the engine against the reference loop, strict loading and bad configs.

The release's modeling file ships on the hub only; its copy in inclusionAI/dInfer imports vLLM's fused
MoE layer and tensor-parallel linears, which do not run on a CPU, so this reference stands in for it
(see the model's module docstring)."""

import math

import pytest
import torch

from dlmcache import DLMPipeline, ThresholdScheduler
from dlmcache.cache import make_cache
from dlmcache.models import LLaDA2MoeConfig
from dlmcache.testing import block_causal_logits, block_causal_mask, decode, random_checkpoint, tiny_llada2
from tests.dlmcache.test_llada_moe import rms, rope, swiglu


@pytest.fixture(scope="module")
def model():
    return tiny_llada2(dtype=torch.float64)


def route_one(scores, bias, n_group, topk_group, top_k, scaling):
    """One token's experts and weights, from scores [E] (sigmoid) and bias [E], as the release states
    the rule: groups scored by their two best biased scores, the best `topk_group` groups kept, the
    `top_k` best biased scores among their experts chosen, weighted by their unbiased scores over
    their sum, times `scaling`."""
    biased = scores + bias
    size = len(scores) // n_group
    group_score = [sorted(biased[g * size : (g + 1) * size].tolist())[-2:] for g in range(n_group)]
    kept = sorted(range(n_group), key=lambda g: -sum(group_score[g]))[:topk_group]
    candidates = [e for g in kept for e in range(g * size, (g + 1) * size)]
    chosen = sorted(candidates, key=lambda e: -float(biased[e]))[:top_k]
    weights = scores[chosen] / scores[chosen].sum() if top_k > 1 else scores[chosen]
    return chosen, weights * scaling


def reference_logits(model, ids, block):
    """One sequence ids [n] -> logits [n, V] in float64 from the state dict alone, under the
    block-causal mask of blocks of `block`."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    n, heads, kv, hd = len(ids), c.num_attention_heads, c.num_key_value_heads, c.head_dim
    rot = int(hd * c.partial_rotary_factor)
    pos = torch.arange(n)
    allowed = (pos[None] // block) <= (pos[:, None] // block)
    x = sd["model.word_embeddings.weight"][ids]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        h = rms(x, sd[f"{p}.input_layernorm.weight"], c.rms_norm_eps)
        qkv = (h @ sd[f"{p}.attention.query_key_value.weight"].T).view(n, heads + 2 * kv, hd)
        q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv], qkv[:, heads + kv :]
        q = rms(q, sd[f"{p}.attention.query_layernorm.weight"], c.rms_norm_eps)
        k = rms(k, sd[f"{p}.attention.key_layernorm.weight"], c.rms_norm_eps)
        q, k = rope(q, pos, rot, c.rope_theta), rope(k, pos, rot, c.rope_theta)
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        attn = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
        x = x + attn.reshape(n, -1) @ sd[f"{p}.attention.dense.weight"].T + sd[f"{p}.attention.dense.bias"]
        h = rms(x, sd[f"{p}.post_attention_layernorm.weight"], c.rms_norm_eps)
        if i < c.first_k_dense_replace:
            x = x + swiglu(sd, f"{p}.mlp", h)
            continue
        out = swiglu(sd, f"{p}.mlp.shared_experts", h)
        # the release routes in float32 (its gate casts the hidden states and the weight), as does the model
        gate_scores = torch.sigmoid(h.float() @ sd[f"{p}.mlp.gate.weight"].float().T)
        bias = sd[f"{p}.mlp.gate.expert_bias"].float()
        for t in range(n):
            chosen, weights = route_one(gate_scores[t], bias, c.n_group, c.topk_group, c.num_experts_per_tok,
                                        c.routed_scaling_factor)  # fmt: skip
            for e, w in zip(chosen, weights.double(), strict=True):
                out[t] = out[t] + w * swiglu(sd, f"{p}.mlp.experts.{e}", h[t])
        x = x + out
    return rms(x, sd["model.norm.weight"], c.rms_norm_eps) @ sd["lm_head.weight"].T


def test_forward_equals_an_independent_reference(model):
    torch.manual_seed(3)
    ids = torch.randint(3, 200, (2, 14))
    logits = block_causal_logits(model, ids, 4)
    for b in range(2):
        torch.testing.assert_close(logits[b], reference_logits(model, ids[b], 4), rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_the_routing_rule_token_by_token(model):
    """The vectorised routing equals the rule token by token, and the bias moves the choice while the
    weights stay the unbiased scores'."""
    block = model.model.layers[1].mlp
    c = model.config
    x = torch.randn(40, c.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weights, experts = block.route(x)
    scores = torch.sigmoid(x.float() @ block.gate.weight.float().T)  # in float32, as the release routes
    for t in range(len(x)):
        bias = block.gate.expert_bias.float()
        chosen, want = route_one(scores[t], bias, c.n_group, c.topk_group, c.num_experts_per_tok,
                                 c.routed_scaling_factor)  # fmt: skip
        assert experts[t].tolist() == chosen
        torch.testing.assert_close(weights[t], want, rtol=1e-6, atol=1e-7)
    # every token's experts lie in at most topk_group groups, and the weights sum to the scaling factor
    groups = experts // (c.num_experts // c.n_group)
    assert all(len(set(g.tolist())) <= c.topk_group for g in groups)
    torch.testing.assert_close(weights.sum(-1), torch.full((len(x),), 2.5), rtol=1e-6, atol=1e-6)
    saved = block.gate.expert_bias.clone()
    block.gate.expert_bias.zero_()
    unbiased = block.route(x)[1]
    block.gate.expert_bias.copy_(saved)
    assert not torch.equal(unbiased, experts)


def test_a_batch_decodes_each_prompt_as_alone(tmp_path):
    # weights 10x the usual scale, so the random model's predictions differ from position to position
    path = random_checkpoint("LLaDA2MoeModelLM", tmp_path / "llada2", seed=1, initializer_range=0.2)
    pipe = DLMPipeline.from_pretrained(path, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.model.block_diffusion and pipe.default_block_length == 4
    assert isinstance(pipe.scheduler, ThresholdScheduler) and pipe.scheduler.config.threshold == 0.95
    prompts = ["Mia has 3 pens.", "Tom has 10 eggs. He buys 4 more eggs. How many now?", "Hi"]
    kw = dict(max_new_tokens=12, scheduler=ThresholdScheduler(threshold=0.05))  # a few tokens per step
    for cache in ("none", "freecache"):
        pipe.set_cache(cache)
        batch = pipe(prompts, **kw)
        assert batch.stats["block_diffusion"] and batch.nfe < 12 and len(set(batch.sequences.flatten().tolist())) > 6
        for i, prompt in enumerate(prompts):
            alone = pipe(prompt, **kw)
            assert torch.equal(alone.sequences[0], batch.sequences[i]), (cache, i)
    loaded = DLMPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)  # the bias stays float32, as released
    assert loaded.model.model.layers[1].mlp.gate.expert_bias.dtype == torch.float32
    assert loaded.model.model.layers[1].mlp.gate.weight.dtype == torch.bfloat16


def test_the_attention_is_block_causal(model):
    """A later block changes nothing before it (the mask is the decoding loop's, as for SDAR)."""
    ids = torch.arange(10, 22)[None]
    other = ids.clone()
    other[0, 8:] = 5
    valid = torch.ones(1, 12, dtype=torch.bool)
    outs = [block_causal_logits(model, x, 4)[0] for x in (ids, other)]
    assert torch.equal(outs[0][:8], outs[1][:8]) and not torch.equal(outs[0][8:], outs[1][8:])
    assert block_causal_mask(torch.arange(12)[None], 4, valid)[0, 0].sum() == 4


def test_a_checkpoint_missing_an_expert_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = random_checkpoint("LLaDA2MoeModelLM", tmp_path / "llada2")
    missing = "model.layers.2.mlp.experts.5.up_proj.weight"
    for shard in path.glob("*.safetensors"):
        state = load_file(shard)
        if missing in state:
            del state[missing]
            save_file(state, shard)
    with pytest.raises(ValueError, match=rf"missing tensors \['{missing}'\]"):
        DLMPipeline.from_pretrained(path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=12, n_group=8), "must split into n_group=8 groups of at least 2"),
        (dict(num_experts=16, n_group=4, topk_group=5), "topk_group=5 exceeds n_group=4"),
        (dict(num_experts=16, n_group=4, topk_group=1, num_experts_per_tok=5), "exceeds the 1 kept groups' 4"),
        (dict(norm_head=True), "norm_head=True is not supported"),
        (dict(use_sliding_window=True), "use_sliding_window=True"),
        (dict(first_k_dense_replace=-1), "first_k_dense_replace=-1"),
        (dict(partial_rotary_factor=0.1), r"partial_rotary_factor=0.1 rotates 1 dims"),
    ],
)
def test_bad_configs_are_refused(kwargs, match):
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_experts=16, n_group=4,
                topk_group=2, num_experts_per_tok=4, mask_token_id=5, eos_token_id=1, pad_token_id=1)  # fmt: skip
    with pytest.raises(ValueError, match=match):
        LLaDA2MoeConfig(**{**base, **kwargs})


# ---------------------------------------------------------------- LLaDA2.1's token editing


def release_editing_generate(model, prompt, gen_length, block, threshold, edit_threshold, max_post_steps):
    """LLaDA2.1's `generate` written from its rule (greedy, no cache: every forward recomputes the
    sequence up to the block's end under the block-causal mask): blocks of `block` absolute
    positions from the one holding the prompt's end; per block, steps that commit the masks above
    `threshold` (at least the most confident) and rewrite the block's generated tokens whose greedy
    token differs with probability above `edit_threshold`; a step that starts with no mask is a post
    step, and the block ends at one that edits nothing, or before post step `max_post_steps` + 1.
    Returns (the generated ids, the forwards, the edits)."""
    mask = model.mask_token_id
    p = len(prompt)
    total = -(-(p + gen_length) // block) * block
    x = torch.tensor([prompt + [mask] * (total - p)])
    forwards = edits = 0
    for b in range(p // block, total // block):
        start, end = b * block, (b + 1) * block
        post = 0
        while True:
            old = x[0, start:end].clone()
            masked = old == mask
            if not masked.any():
                post += 1
            if post > max_post_steps:
                break
            logits = block_causal_logits(model, x[:, :end], block)[0, start:end]
            forwards += 1
            probs = torch.softmax(logits, -1)
            x0 = probs.argmax(-1)
            p0 = probs.gather(-1, x0[:, None])[:, 0]
            commit = torch.zeros(block, dtype=torch.bool)
            if masked.any():
                confidence = torch.where(masked, p0, -torch.inf)
                commit = confidence > threshold
                if not commit.any():
                    commit[confidence.argmax()] = True
            in_prompt = torch.arange(start, end) < p
            edit = ~masked & ~in_prompt & (p0 > edit_threshold) & (x0 != old)
            edits += int(edit.sum())
            x[0, start:end] = torch.where(commit | edit, x0, old)
            if not masked.any() and not edit.any():
                break
    return x[0, p : p + gen_length], forwards, edits


EDITING = [  # (threshold, edit_threshold, max_post_steps): edits that settle, edits everywhere, few edits
    (0.3, 0.2, 16),
    (0.95, 0.0, 3),
    (0.5, 0.9, 16),
]


@pytest.fixture(scope="module")
def editing_model():
    """A random LLaDA2 whose predictions differ from position to position (weights 10x the usual
    scale) and never predict the mask token (its output row is zero: logit 0 against the others'
    maximum), on which the release's loop would spin (a block whose masks never fill)."""
    model = tiny_llada2(dtype=torch.float64, initializer_range=0.2, seed=2)
    with torch.no_grad():
        model.lm_head.weight[model.mask_token_id] = 0
    return model


@pytest.mark.parametrize("threshold, edit_threshold, max_post_steps", EDITING, ids=["settle", "edit-all", "release"])
@pytest.mark.parametrize(
    "lengths, gen", [((6, 2, 10), 10), ((4, 8), 12), ((5, 1), 11)], ids=["mid-block", "on-edge", "one-in"]
)
def test_token_editing_equals_the_release_generate(editing_model, threshold, edit_threshold, max_post_steps,
                                                   lengths, gen):  # fmt: skip
    """The engine with `TokenEditingScheduler`, cached (the finished blocks' exact KV) and
    recomputed, batched: token for token, forward for forward and edit for edit what the release's
    loop gives each prompt alone (float64). Prompts end mid-block, on a block's edge and one position
    into a block; prompt + gen fills whole blocks (the release decodes the last block to its end)."""
    from dlmcache import TokenEditingScheduler

    model = editing_model
    g = torch.Generator().manual_seed(sum(lengths))
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in lengths]
    scheduler = TokenEditingScheduler(threshold, edit_threshold, max_post_steps)
    want = [release_editing_generate(model, q, gen, 4, threshold, edit_threshold, max_post_steps) for q in prompts]
    if edit_threshold < 0.9:
        assert sum(w[2] for w in want) > 0  # the rule edits here
    for cache in ("freecache", "none"):
        out = decode(model, prompts, gen, 4, gen, scheduler, cache=cache)
        for i, (tokens, forwards, edits) in enumerate(want):
            assert out["sequences"][i].tolist() == tokens.tolist(), (cache, i)
            assert (out["stats"][i]["steps"], out["stats"][i]["edited_tokens"]) == (forwards, edits), (cache, i)


def test_token_editing_on_the_pipeline_and_the_engine(tmp_path):
    """`scheduler="token_editing"` by name; a batch gives each prompt what it gets alone, with edits
    counted; a full-attention model refuses the rule by name."""
    from dlmcache import TokenEditingScheduler

    path = random_checkpoint("LLaDA2MoeModelLM", tmp_path / "llada2", seed=1, initializer_range=0.2)
    pipe = DLMPipeline.from_pretrained(path, torch_dtype=torch.float64, scheduler="token_editing")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, TokenEditingScheduler) and pipe.scheduler.config.edit_threshold == 0.9
    prompts = ["Mia has 3 pens.", "Tom has 10 eggs. He buys 4 more eggs. How many now?", "Hi"]
    kw = dict(max_new_tokens=12, scheduler=TokenEditingScheduler(threshold=0.3, edit_threshold=0.1, max_post_steps=4))
    for cache in ("none", "freecache"):
        batch = pipe(prompts, cache=make_cache(cache), **kw)
        assert batch.stats["edited_tokens"] > 0
        for i, prompt in enumerate(prompts):
            alone = pipe(prompt, cache=make_cache(cache), **kw)
            assert torch.equal(alone.sequences[0], batch.sequences[i]), (cache, i)
    llada = DLMPipeline.from_pretrained(random_checkpoint("LLaDAModelLM", tmp_path / "llada"))
    with pytest.raises(ValueError, match="TokenEditingScheduler.*LLaDAModelLM is full attention"):
        llada("Hi", max_new_tokens=32, scheduler=TokenEditingScheduler())
    with pytest.raises(ValueError, match="max_post_steps=-1"):
        TokenEditingScheduler(max_post_steps=-1)
    with pytest.raises(ValueError, match="edit_threshold=nan"):
        TokenEditingScheduler(edit_threshold=float("nan"))


def test_sampled_token_editing_draws_from_the_tempered_distribution():
    """At a temperature the proposal is a draw from softmax(logits / T) with its tempered probability
    (the release's sampler's distribution), and one draw serves M2T and T2T; greedy at T = 0."""
    from dlmcache import TokenEditingScheduler

    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]]).expand(1, 20000, 4)
    sampled = TokenEditingScheduler(temperature=0.7)
    assert not sampled.batched and TokenEditingScheduler().batched
    x0, confidence = sampled.propose(logits, torch.Generator().manual_seed(0))
    want = torch.softmax(logits[0, 0].double() / 0.7, -1)
    freq = torch.bincount(x0[0], minlength=4).double() / x0.numel()
    torch.testing.assert_close(freq, want, atol=0.01, rtol=0)
    torch.testing.assert_close(confidence[0], want[x0[0]])
    # one proposal: a committed position and a masked one of the same logits get the same token
    tokens = torch.tensor([[3, 2]])
    masked = torch.tensor([[False, True]])
    two = logits[:, :2]
    x0, transfer, edited = TokenEditingScheduler(threshold=0.0, edit_threshold=0.0).select_edits(
        two, masked, ~masked, tokens, 0, 4
    )
    assert x0.tolist() == [[0, 0]] and transfer.tolist() == [[False, True]] and edited.tolist() == [[True, False]]
