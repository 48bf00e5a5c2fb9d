"""Fast-dLLM v2 (block diffusion over Qwen2.5 with the token shift): the engine against an
independent implementation of the release's generate, batches against requests alone, loading and
bad configs. The release's modeling file and generate ship on the hub only
(Efficient-Large-Model/Fast_dLLM_v2_7B); the loop below is written from its description."""

import math

import pytest
import torch
import torch.nn.functional as F

from dlmcache import DLMPipeline, LowConfidenceScheduler, ThresholdScheduler
from dlmcache.cache import BlockCache, make_cache
from dlmcache.models import FastDLLMV2Config
from dlmcache.testing import decode, random_checkpoint, run_requests, tiny_fast_dllm_v2


@pytest.fixture(scope="module")
def model():
    # weights 10x the usual scale: confident enough that a threshold commits several tokens a step
    return tiny_fast_dllm_v2(dtype=torch.float64, initializer_range=0.2)


class BlockKV:
    """The release's prefix cache: per layer the K/V of the stored blocks; a forward attends the cache
    and its own tokens under the block-causal mask, and stores its K/V only when told to."""

    def __init__(self, block):
        self.block, self.k, self.v = block, {}, {}
        self.block_k, self.block_v = {}, {}  # the sub-block cache: the current block's K/V per layer

    def run(self, model, ids, start, store, block_cache=None):
        """The model's output at each fed position (the raw logits: this model's `forward` applies the
        token shift itself, so index j + 1 asks for position j's). block_cache: "fill" keeps the fed
        block's K/V as the sub-block cache; an int j writes the fed sub-block's K/V at offset j of it
        and attends the cache's whole block (the other sub-blocks' K/V as last written)."""
        self.start, self.store, self.block_cache = start, store, block_cache
        positions = torch.arange(start, start + len(ids))[None]
        raw = torch.arange(1, len(ids) + 1)
        with torch.no_grad():
            return model(torch.tensor(ids)[None], positions=positions, cache=self, logits_index=raw).logits[0]

    def attend(self, layer_idx, q, k, v, backend):
        if self.block_cache == "fill":
            self.block_k[layer_idx], self.block_v[layer_idx] = k.clone(), v.clone()
        elif self.block_cache is not None:
            j = self.block_cache
            self.block_k[layer_idx][:, :, j : j + k.shape[2]] = k
            self.block_v[layer_idx][:, :, j : j + v.shape[2]] = v
            k, v = self.block_k[layer_idx], self.block_v[layer_idx]
        keys = k if layer_idx not in self.k else torch.cat([self.k[layer_idx], k], 2)
        values = v if layer_idx not in self.v else torch.cat([self.v[layer_idx], v], 2)
        if self.store:
            self.k[layer_idx], self.v[layer_idx] = keys, values
        q_pos = torch.arange(self.start, self.start + q.shape[2])
        allowed = (torch.arange(keys.shape[2])[None] // self.block) <= (q_pos[:, None] // self.block)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[None, None], enable_gqa=True)


def release_generate(model, prompt, gen_length, block, small_block, threshold, use_block_cache=False):
    """Fast-dLLM v2's generate, greedy, written from its description: the prompt's complete blocks are
    prefilled and stored (when the prompt fills them exactly, the next token is the argmax of the
    last position: autoregressive); then each block, padded with masks to its end, is decoded one
    sub-block at a time, each step a forward of the whole block over the cache, with the token shift
    (the logits of block position j come from position j - 1) and every masked sub-block position
    above the threshold committed, the most confident at least; a finished block is forwarded once
    more to store its KV, and the argmax of its last position is the next block's first token.

    use_block_cache (the release's sub-block cache): a step whose sub-block's first position is
    committed, after the block's first forward, feeds that sub-block alone (token shift inside it)
    over the prefix and the block's K/V as last written; otherwise the whole block is fed and its K/V
    kept."""
    mask_id = model.mask_token_id
    x = list(prompt)
    kv = BlockKV(block)
    full = len(x) // block * block
    if full:
        logits = kv.run(model, x[:full], 0, store=True)
        if len(x) == full:
            x.append(int(logits[-1].argmax()))  # (the model's own logits at the last position: no shift)
    while len(x) < len(prompt) + gen_length:
        start = len(x) // block * block
        cur = x[start:] + [mask_id] * (start + block - len(x))
        filled = False  # the sub-block cache holds this block
        for sub in range(0, block, small_block):
            while True:
                masked = torch.tensor([t == mask_id for t in cur[sub : sub + small_block]])
                if not masked.any():
                    break
                if use_block_cache and filled and cur[sub] != mask_id:
                    logits = kv.run(model, cur[sub : sub + small_block], start + sub, store=False, block_cache=sub)
                    logits = torch.cat([logits[:1], logits[:-1]])  # the token shift inside the sub-block
                else:
                    logits = kv.run(model, cur, start, store=False, block_cache="fill" if use_block_cache else None)
                    logits = torch.cat([logits[:1], logits[:-1]])[sub : sub + small_block]  # the token shift
                    filled = True
                probs = logits.softmax(-1)
                confidence, x0 = probs.max(-1)
                confidence = torch.where(masked, confidence, -math.inf)
                commit = confidence > threshold
                commit[confidence.argmax()] = True
                for j in torch.nonzero(commit & masked).flatten().tolist():
                    cur[sub + j] = int(x0[j])
        logits = kv.run(model, cur, start, store=True)
        x = x[:start] + cur + [int(logits[-1].argmax())]
    return x[len(prompt) : len(prompt) + gen_length]


@pytest.mark.parametrize("prompt_len", [8, 11, 16, 5])  # ends on a block's edge, inside a block, on a sub-block
@pytest.mark.parametrize("cached", [True, False, "sub_block"])
def test_equals_the_release_loop(model, prompt_len, cached):
    prompt = list(range(10, 10 + prompt_len))
    gen = 24 - prompt_len % 8 if prompt_len % 8 else 16  # ends on a block's edge, as the release's last block
    threshold = 0.05
    sub_block = cached == "sub_block"
    expected = release_generate(model, prompt, gen, 8, 4, threshold, use_block_cache=sub_block)
    cache = "dual" if sub_block else "freecache" if cached else "none"
    out = decode(model, [prompt], gen, 4, 4, ThresholdScheduler(threshold=threshold), cache=cache)
    assert out["sequences"][0].tolist() == expected
    assert out["nfe"] < gen  # several tokens in some steps


ATTENTION_BLOCK = 32
SWEEP_PROMPTS = [1, 4, 8, 13, 16, 24, 31, 32, 33, 40, 47, 48, 56, 63, 64]  # 1 to 2 attention blocks
SWEEP = [
    (sub, threshold, SWEEP_PROMPTS[(3 * i + j) % len(SWEEP_PROMPTS)], dtype)
    for i, (sub, threshold) in enumerate((s, t) for s in (4, 8, 16) for t in (0.5, 0.7, 0.9, 0.95))
    for j in range(3)
    for dtype in (torch.float32, torch.float64)
]


@pytest.fixture(scope="module")
def sweep_models():
    """Per sub-block size and dtype: a random Fast-dLLM v2 with attention blocks of 32 (weights at 10x
    the usual scale: thresholds from 0.5 to 0.95 commit one token or several) that never predicts the
    mask token (its output row is zero), on which the release's loop would spin."""
    built = {}

    def get(sub, dtype):
        if (sub, dtype) not in built:
            model = tiny_fast_dllm_v2(dtype=dtype, initializer_range=0.2, bd_size=ATTENTION_BLOCK, small_block_size=sub)
            with torch.no_grad():
                model.lm_head.weight[model.mask_token_id] = 0
            built[sub, dtype] = model
        return built[sub, dtype]

    return get


@pytest.mark.parametrize("sub, threshold, prompt_len, dtype", SWEEP,
                         ids=[f"sub{s}-t{t}-p{p}-{str(d)[6:]}" for s, t, p, d in SWEEP])  # fmt: skip
def test_the_sub_block_cache_is_the_releases_in_every_setting(sweep_models, sub, threshold, prompt_len, dtype):
    """`cache="dual"` on Fast-dLLM v2 against the release's generate with `use_block_cache=True`
    (`release_generate`), 72 settings: prompts of 1 to 2 attention blocks (exact multiples of the
    attention block and of the sub-block among them), thresholds 0.5 to 0.95, sub-blocks of 4, 8 and
    16, float32 and float64; the answer runs to the end of the attention block after the prompt's, as
    the release decodes."""
    model = sweep_models(sub, dtype)
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(10, 250, (prompt_len,), generator=g).tolist()
    gen = (prompt_len // ATTENTION_BLOCK + 2) * ATTENTION_BLOCK - prompt_len  # (at least one sub-block)
    want = release_generate(model, prompt, gen, ATTENTION_BLOCK, sub, threshold, use_block_cache=True)
    out = decode(model, [prompt], gen, sub, sub, ThresholdScheduler(threshold=threshold), cache="dual")
    assert out["sequences"][0].tolist() == want


def test_a_prompt_of_exactly_one_attention_block():
    """The release prefills only a prompt longer than one attention block (`input_ids.shape[1] >
    block_size`): a prompt of exactly one block is neither prefilled nor fed, and its answer is decoded
    as if there were no prompt (positions from 0). Here such a prompt is what a prompt of two blocks
    is to the release: prefilled, its next token the argmax of its last position. So ours equals the
    release's loop with that prefill, and differs from the release's own answer, the one to no prompt."""
    model = tiny_fast_dllm_v2(dtype=torch.float64, initializer_range=0.2, bd_size=ATTENTION_BLOCK, small_block_size=8)
    with torch.no_grad():
        model.lm_head.weight[model.mask_token_id] = 0
    prompt = torch.randint(10, 250, (ATTENTION_BLOCK,), generator=torch.Generator().manual_seed(0)).tolist()
    for cache, block_cache in (("dual", True), ("freecache", False)):
        out = decode(model, [prompt], 32, 8, 8, ThresholdScheduler(threshold=0.7), cache=cache)[
            "sequences"][0].tolist()  # fmt: skip
        assert out == release_generate(model, prompt, 32, ATTENTION_BLOCK, 8, 0.7, use_block_cache=block_cache)
        assert out != release_generate(model, [], 32, ATTENTION_BLOCK, 8, 0.7, use_block_cache=block_cache)


def test_the_sub_block_cache_is_the_releases_approximation():
    """use_block_cache feeds fewer tokens and changes the tokens (the other sub-blocks' KV is stale),
    and a batch of mixed prompt lengths equals each prompt alone: a row aligned left of its sub-block
    does not overwrite the stale KV it attends. Eight sub-blocks of 4 in blocks of 32, so the cache
    has stale KV to read."""
    model = tiny_fast_dllm_v2(dtype=torch.float64, initializer_range=0.2, bd_size=32)
    prompts = [list(range(10, 10 + n)) for n in (40, 37, 5)]
    gens = [24, 27, 27]  # each ends on a block's edge
    scheduler = ThresholdScheduler(threshold=0.05)
    fed, fed_exact, changed = 0, 0, 0
    for prompt, gen in zip(prompts, gens, strict=True):
        want = release_generate(model, prompt, gen, 32, 4, 0.05, use_block_cache=True)
        out = decode(model, [prompt], gen, 4, gen, scheduler, cache="dual")
        exact = decode(model, [prompt], gen, 4, gen, scheduler, cache="freecache")
        assert out["sequences"][0].tolist() == want
        fed, fed_exact = fed + out["stats"][0]["fed_tokens"], fed_exact + exact["stats"][0]["fed_tokens"]
        changed += out["sequences"][0].tolist() != exact["sequences"][0].tolist()
    assert fed < 0.9 * fed_exact and changed >= 2
    batch = decode(model, [p[:37] for p in prompts], 27, 4, 27, scheduler, cache="dual")
    for i, prompt in enumerate(prompts):
        alone = decode(model, [prompt[:37]], 27, 4, 27, scheduler, cache="dual")
        assert torch.equal(batch["sequences"][i], alone["sequences"][0]), i


def test_a_batch_gives_each_request_what_it_gets_alone(tmp_path):
    path = random_checkpoint("Fast_dLLM_QwenForCausalLM", tmp_path / "v2", seed=1, initializer_range=0.2)
    pipe = DLMPipeline.from_pretrained(path, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.default_block_length == 4 and pipe.model.attention_block == 8 and pipe.model.logit_shift == 1
    assert isinstance(pipe.scheduler, ThresholdScheduler) and pipe.scheduler.config.threshold == 0.9
    prompts = ["Mia has 3 pens.", "Tom has 10 eggs. He buys 4 more eggs. How many now?", "Hi", "Compute 45+38-27."]
    sequences = {}
    for cache in ("none", "freecache", "dual"):  # dual: the release's sub-block cache
        pipe.set_cache(cache)
        for scheduler in (ThresholdScheduler(threshold=0.05), LowConfidenceScheduler()):
            kw = dict(max_new_tokens=16, scheduler=scheduler)
            batch = pipe(prompts, **kw)
            assert batch.stats["block_diffusion"] and len(set(batch.sequences.flatten().tolist())) > 6
            for i, prompt in enumerate(prompts):
                alone = pipe(prompt, **kw)
                assert torch.equal(alone.sequences[0], batch.sequences[i]), (cache, type(scheduler).__name__, i)
                assert torch.equal(alone.commit_step[0], batch.commit_step[i].to(alone.commit_step.device))
            sequences[cache, type(scheduler).__name__] = batch.sequences
    assert torch.equal(sequences["none", "ThresholdScheduler"], sequences["freecache", "ThresholdScheduler"])
    assert not torch.equal(sequences["dual", "ThresholdScheduler"], sequences["freecache", "ThresholdScheduler"])
    with pytest.raises(ValueError, match="sub-block cache; with a compressed prefix it is not built"):
        pipe(prompts[0], max_new_tokens=16, cache=make_cache("dual", policy="snapkv", budget=0.5))


def test_an_attention_blocks_first_token_is_committed_alone(model):
    """The autoregressive step: the step that opens an attention block commits its first position and
    nothing else, even where the threshold would take more."""
    prompt = list(range(10, 18))  # one complete block: the next one opens at position 8
    out = decode(model, [prompt], 8, 4, 4, ThresholdScheduler(threshold=0.0))
    steps = out["commit_step"][0].tolist()
    assert steps[0] == 0 and 0 not in steps[1:]  # position 8 alone at the first step
    assert steps[1:4] == [1, 1, 1] and steps[4:] == [2, 2, 2, 2]  # then whole sub-blocks at threshold 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bd_size=32, small_block_size=12), "small_block_size=12 does not divide bd_size=32"),
        (dict(layer_types=["full_attention", "sliding_attention"], num_hidden_layers=2), "sliding-window layers"),
        (dict(use_sliding_window=True), "sliding-window layers"),
        (dict(layer_types=["full_attention"], num_hidden_layers=2), "layer_types has 1 entries for 2 layers"),
    ],
)
def test_bad_configs_are_refused(kwargs, match):
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, mask_token_id=5, eos_token_id=1,
                pad_token_id=1, bos_token_id=1)  # fmt: skip
    with pytest.raises(ValueError, match=match):
        FastDLLMV2Config(**{**base, **kwargs})


def test_shifted_logits_without_the_autoregressive_step(model):
    """Without the autoregressive step an attention block's first position may stay masked past the
    block's first step; its logits come from the position before, which each step feeds again (its
    KV is final): the cached rule gives the tokens of recomputing everything before the block's end."""
    from dlmcache.engine import Request

    prompts = [list(range(10, 18)), list(range(20, 31)), [40, 41, 42]]
    out = {}
    for mode in ("freecache", "none"):
        # one token a step, the most confident first: not always the first
        rule = BlockCache(make_cache(mode))
        requests = [Request(p, 16, 4, 16, LowConfidenceScheduler(), rule, attention_block=8, id=str(i))
                    for i, p in enumerate(prompts)]  # fmt: skip
        out[mode], _ = run_requests(model, None, requests)
    assert any(int(out["freecache"][str(i)].commit_step[0]) > 0 for i in range(3))  # a block's first position waited
    for i in range(len(prompts)):
        assert torch.equal(out["freecache"][str(i)].sequence, out["none"][str(i)].sequence), i
