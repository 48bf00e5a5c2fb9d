"""Block diffusion (SDAR) on the engine: the finished blocks' exact cache against recomputing
everything and against an independent implementation of the release's generate loop; batches
against prompts alone; the model's layout."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dlmcache import DLMPipeline
from dlmcache.cache import BlockCache, make_cache
from dlmcache.engine import BatchedDecoder, Request
from dlmcache.schedulers import LowConfidenceScheduler, ThresholdScheduler, TokenEditingScheduler
from dlmcache.testing import block_causal_logits, block_causal_mask, decode, random_checkpoint, tiny_sdar
from tests.helpers import step_costs


@pytest.fixture(scope="module")
def model():
    return tiny_sdar(dtype=torch.float64)


class ConcatKV:
    """The release's cache as its generate uses it: past K/V concatenated, each forward attends past +
    fed keys under an explicit [n, past + n] mask, and keeps its K/V only when told to."""

    def __init__(self):
        self.k, self.v = {}, {}

    def run(self, model, ids, start, mask, store):
        self.mask, self.store = mask, store
        positions = torch.arange(start, start + len(ids))[None]
        return model(torch.tensor(ids)[None], positions=positions, cache=self).logits[0]

    def attend(self, layer_idx, q, k, v, backend):
        keys = k if layer_idx not in self.k else torch.cat([self.k[layer_idx], k], 2)
        values = v if layer_idx not in self.v else torch.cat([self.v[layer_idx], v], 2)
        if self.store:
            self.k[layer_idx], self.v[layer_idx] = keys, values
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask[None, None], enable_gqa=True)


def release_generate(model, prompt, gen_length, block_length, steps, strategy, threshold=0.85):
    """SDAR's generate (JetAstra/SDAR generate.py), greedy, written from its description: blocks of
    absolute positions over ceil((P + G) / bs) blocks, a block-lower-triangular mask, the prompt's
    complete blocks prefilled and stored, then per block up to steps + 1 forwards of the block alone:
    a denoising forward while masks remain (a fixed count per step from the block length; `dynamic`:
    every position above the threshold when there are at least that many), and a storing forward
    once none remain."""
    mask_id, bs = model.mask_token_id, block_length
    p = len(prompt)
    blocks = math.ceil((p + gen_length) / bs)
    allowed = torch.tril(torch.ones(blocks, blocks, dtype=torch.bool))
    allowed = allowed.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    x = [mask_id] * (blocks * bs)
    x[:p] = prompt
    kv = ConcatKV()
    prefill = (p // bs) * bs
    if prefill:
        kv.run(model, x[:prefill], 0, allowed[:prefill, :prefill], store=True)
    counts = [bs // steps + (1 if i < bs % steps else 0) for i in range(steps)]
    for b in range(p // bs, blocks):
        s, e = b * bs, (b + 1) * bs
        cur = torch.tensor(x[s:e])
        for step in range(steps + 1):
            masked = cur == mask_id
            if not masked.any():
                kv.run(model, cur.tolist(), s, allowed[s:e, :e], store=True)
                break
            logits = kv.run(model, cur.tolist(), s, allowed[s:e, :e], store=False)
            probs = logits.softmax(-1)
            x0 = probs.argmax(-1)
            confidence = torch.where(masked, probs.gather(-1, x0[:, None])[:, 0], -torch.inf)
            transfer = torch.zeros_like(masked)
            high = confidence > threshold
            if strategy == "dynamic" and high.sum() >= counts[step]:
                transfer = high
            else:
                transfer[confidence.topk(counts[step]).indices] = True
            cur[transfer] = x0[transfer]
        x[s:e] = cur.tolist()
    return x[p : p + gen_length]


# A random model over 286 tokens is confident near 1/286: 0.006 makes some steps commit several tokens.
SCHEDULERS = {"static": LowConfidenceScheduler(), "dynamic": ThresholdScheduler(threshold=0.006)}


@pytest.mark.parametrize(
    "strategy, prompt_len, gen_length, steps",
    [
        ("static", 8, 16, 4),  # the prompt ends at a block boundary
        ("static", 8, 16, 2),  # two tokens per step
        ("static", 7, 13, 4),  # the first block holds the prompt's end and one mask
        ("dynamic", 8, 16, 4),
        ("dynamic", 6, 14, 4),
    ],
)
@pytest.mark.parametrize("cached", [True, False])
def test_equals_the_release_loop(model, strategy, prompt_len, gen_length, steps, cached):
    prompt = list(range(10, 10 + prompt_len))
    scheduler = SCHEDULERS[strategy]
    expected = release_generate(model, prompt, gen_length, 4, steps, strategy, threshold=0.006)
    out = decode(model, [prompt], gen_length, 4, steps, scheduler, cache="freecache" if cached else "none")
    assert out["sequences"][0].tolist() == expected
    if strategy == "dynamic":  # the threshold commits several tokens in some step
        assert out["nfe"] < gen_length


def test_a_batch_of_mixed_prompt_lengths_equals_each_prompt_alone(model):
    prompts = [list(range(10, 17)), list(range(20, 33)), [40, 41], list(range(50, 54))]
    scheduler = ThresholdScheduler(threshold=0.006)
    for cache in ("freecache", "none"):
        batch = decode(model, prompts, 12, 4, 4, scheduler, cache=cache)
        steps = []
        for i, prompt in enumerate(prompts):
            alone = decode(model, [prompt], 12, 4, 4, scheduler, cache=cache)
            assert torch.equal(alone["sequences"][0], batch["sequences"][i]), (cache, i)
            assert torch.equal(alone["commit_step"][0], batch["commit_step"][i]), (cache, i)
            steps.append(alone["nfe"])
        # every row at its own pace: the batch takes the steps of its slowest row, no more
        assert batch["nfe"] == max(steps) and min(steps) < max(steps)


def test_attention_is_causal_across_blocks(model):
    mask = block_causal_mask(torch.arange(4, 12)[None], 4, torch.tensor([[True] * 11 + [False]]))
    assert mask.shape == (1, 8, 12)
    assert mask[0, 0].tolist() == [True] * 8 + [False] * 4  # block 1 sees blocks 0 and 1
    assert mask[0, 7].tolist() == [True] * 11 + [False]  # block 2 sees everything real
    # Changing a later block changes nothing before it.
    ids = torch.arange(10, 22)[None]
    other = ids.clone()
    other[0, 8:] = 5
    store = ConcatKV()
    full = block_causal_mask(torch.arange(12)[None], 4, torch.ones(1, 12, dtype=torch.bool))[0]
    a = store.run(model, ids[0].tolist(), 0, full, store=False)
    b = store.run(model, other[0].tolist(), 0, full, store=False)
    assert torch.equal(a[:8], b[:8]) and not torch.equal(a[8:], b[8:])


def test_pipeline_defaults_and_refusals(tmp_path):
    path = random_checkpoint("SDARForCausalLM", tmp_path / "sdar", tie_word_embeddings=True)
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["block_size"] == 4
    pipe = DLMPipeline.from_pretrained(path, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.model.lm_head.weight is pipe.model.model.embed_tokens.weight
    assert pipe.default_block_length == 4
    assert isinstance(pipe.scheduler, ThresholdScheduler) and pipe.scheduler.config.threshold == 0.85
    out = pipe("Mia has 3 pens.", max_new_tokens=8)
    assert out.sequences.shape == (1, 8) and out.stats["block_diffusion"]
    with pytest.raises(ValueError, match="max_new_tokens=10 is not divisible by block_length=4"):
        pipe("Hi", max_new_tokens=10)
    with pytest.raises(ValueError, match="cfg_scale=1.0"):
        pipe("Hi", max_new_tokens=8, cfg_scale=1.0)


def test_a_checkpoint_missing_a_q_norm_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = random_checkpoint("SDARForCausalLM", tmp_path / "sdar")
    (shard,) = path.glob("*.safetensors")
    state = load_file(shard)
    del state["model.layers.1.self_attn.q_norm.weight"]
    save_file(state, shard)
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.self_attn.q_norm.weight'\]"):
        DLMPipeline.from_pretrained(path)


def reference_sdar_logits(model, ids, block):
    """One sequence ids [n] -> logits [n, V] in float64 from the state dict alone: Qwen3's layer (per-head
    RMSNorm of queries and keys before RoPE, GQA, SwiGLU) under a block-causal mask."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    n, heads, kv, hd = len(ids), c.num_attention_heads, c.num_key_value_heads, c.head_dim

    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps))

    inv = 1.0 / c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(n)[:, None].double() * inv
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]

    def rope(x):
        a, b = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    allowed = (torch.arange(n)[None] // block) <= (torch.arange(n)[:, None] // block)
    x = sd["model.embed_tokens.weight"][ids]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        h = norm(x, sd[f"{p}.input_layernorm.weight"])
        q = rope(
            norm((h @ sd[f"{p}.self_attn.q_proj.weight"].T).view(n, heads, hd), sd[f"{p}.self_attn.q_norm.weight"])
        )
        k = rope(norm((h @ sd[f"{p}.self_attn.k_proj.weight"].T).view(n, kv, hd), sd[f"{p}.self_attn.k_norm.weight"]))
        v = (h @ sd[f"{p}.self_attn.v_proj.weight"].T).view(n, kv, hd)
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", probs, v).reshape(n, -1) @ sd[f"{p}.self_attn.o_proj.weight"].T
        h = norm(x, sd[f"{p}.post_attention_layernorm.weight"])
        gate, up, down = (sd[f"{p}.mlp.{m}_proj.weight"] for m in ("gate", "up", "down"))
        x = x + (F.silu(h @ gate.T) * (h @ up.T)) @ down.T
    return norm(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def test_the_forward_equals_an_independent_reference(model):
    torch.manual_seed(2)
    ids = torch.randint(3, 200, (2, 14))
    logits = block_causal_logits(model, ids, 4)
    for b in range(2):
        torch.testing.assert_close(logits[b], reference_sdar_logits(model, ids[b], 4), rtol=1e-10, atol=1e-10)


def test_logits_equal_transformers_qwen3_under_the_block_mask_bit_for_bit():
    """SDAR's released modeling file is transformers' modeling_qwen3.py (4.52.4) with the block mask
    given by its generate: transformers' own Qwen3 with our weights and that mask gives our float32
    logits bit for bit."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    ours = tiny_sdar()
    c = ours.config
    config = Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    qwen3 = Qwen3ForCausalLM(config).eval()
    qwen3.load_state_dict(ours.state_dict(), strict=True)
    logits, expected = side_by_side(ours, qwen3)
    assert torch.equal(logits, expected)


def test_the_moe_sizes_equal_transformers_qwen3_moe_under_the_block_mask():
    """SDAR-MoE (SDARMoeForCausalLM) is Qwen3-MoE's layer under the block mask: transformers' own
    Qwen3-MoE (experts stored fused there; the same numbers) with our weights gives our float32 logits
    bit for bit, with a dense layer among the sparse ones and renormalized top-k routing."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from dlmcache.testing import tiny_sdar_moe

    ours = tiny_sdar_moe()
    c = ours.config
    assert [hasattr(layer.mlp, "experts") for layer in ours.model.layers] == [True, False]
    config = Qwen3MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.moe_intermediate_size, num_experts=c.num_experts,
        num_experts_per_tok=c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob, mlp_only_layers=c.mlp_only_layers,
        decoder_sparse_step=1, num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    reference = Qwen3MoeForCausalLM(config).eval()
    state = ours.state_dict()
    fused = {k: v for k, v in state.items() if ".experts." not in k}
    for i, layer in enumerate(ours.model.layers):
        if hasattr(layer.mlp, "experts"):
            experts = layer.mlp.experts
            fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts]
            )
            fused[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([e.down_proj.weight for e in experts])
    reference.load_state_dict(fused, strict=True)
    logits, expected = side_by_side(ours, reference)
    assert torch.equal(logits, expected)  # float32, bit for bit


def side_by_side(ours, reference, n: int = 14, block: int = 4):
    """Our block-causal forward of random ids [2, n] and a transformers model's under the same mask."""
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (2, n))
    valid = torch.ones(2, n, dtype=torch.bool)
    cols = torch.arange(n).expand(2, -1)
    logits = block_causal_logits(ours, ids, block)
    with torch.no_grad():
        mask = block_causal_mask(cols, block, valid)[:, None]
        expected = reference(input_ids=ids, attention_mask=mask, position_ids=cols).logits
    return logits, expected


# ---------------------------------------------------------------------- on the batched engine


@pytest.fixture(scope="module")
def sdar_pipe(tmp_path_factory):
    path = random_checkpoint("SDARForCausalLM", tmp_path_factory.mktemp("sdar") / "sdar")
    pipe = DLMPipeline.from_pretrained(path, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


BLOCK_PROMPTS = ["Mia has 3 pens.", "Tom has 10 eggs. He buys 4 more eggs. How many now?", "Hi", "Compute 45+38-27."]
BLOCK_SCHEDULERS = {
    "low_confidence": lambda: LowConfidenceScheduler(),
    "threshold": lambda: ThresholdScheduler(threshold=0.006),
    "sampled": lambda: LowConfidenceScheduler(temperature=0.8),  # draws: selected alone, with its generator
    # LLaDA2.1's token editing: post steps hold the row in its block while they edit
    "editing": lambda: TokenEditingScheduler(threshold=0.006, edit_threshold=0.0045, max_post_steps=3),
    # ... sampled: its rows run alone on the engine, each drawing from its request's generator
    "editing_sampled": lambda: TokenEditingScheduler(0.006, 0.0045, max_post_steps=3, temperature=0.8),
}
# (max_new_tokens, block_length, steps): blocks of 4 (the checkpoint's) and of 8, 1 or 2 tokens per step
BLOCK_SCHEDULES = [(16, 4, 16), (24, 4, 12), (16, 8, 16), (12, 4, 6)]


def block_request(pipe, i, scheduler, cache, stop_at_eos=False, schedule=None):
    ids = pipe.encode_prompts(BLOCK_PROMPTS[i % len(BLOCK_PROMPTS)])[0]
    g, b, s = schedule or BLOCK_SCHEDULES[i % len(BLOCK_SCHEDULES)]
    generator = None if scheduler.batched else torch.Generator().manual_seed(100 + i)
    return Request(ids, g, b, s, copy.copy(scheduler), BlockCache(cache), stop_at_eos=stop_at_eos,
                   generator=generator, id=str(i))  # fmt: skip


def block_alone(pipe, i, scheduler, cache, stop_at_eos=False, schedule=None):
    """The prompt alone (a pipeline call of its own): sequence, commit steps and forwards."""
    g, b, s = schedule or BLOCK_SCHEDULES[i % len(BLOCK_SCHEDULES)]
    generator = None if scheduler.batched else torch.Generator().manual_seed(100 + i)
    out = pipe(BLOCK_PROMPTS[i % len(BLOCK_PROMPTS)], max_new_tokens=g, block_length=b, steps=s, scheduler=scheduler,
               cache=cache, generator=generator, stop_at_eos=stop_at_eos)  # fmt: skip
    return out.sequences[0], out.commit_step[0], out.nfe


def run_decoder(decoder, requests, on_step=None):
    """Decode `requests` (added at once) on a pool whose unwritten slots hold NaN: a key read before it
    is written (a masked one too: NaN x 0 is NaN) shows in the logits. `on_step(decoder, step)` may add
    or cancel between steps."""
    for t in decoder.pool.k + decoder.pool.v:
        t[decoder.pool.block_size :] = float("nan")  # all but the null block
    for r in requests:
        decoder.add(r)
    done, step = {}, 0
    while len(decoder):
        for f in decoder.step():
            assert f.error is None
            done[f.request.id] = f
        step += 1
        if on_step is not None:
            on_step(decoder, step)
    return done


@pytest.mark.parametrize("cache", ["freecache", "none"])
def test_a_batch_gives_each_request_what_it_gets_alone(sdar_pipe, cache):
    """Block diffusion rows of one flattened forward, with different prompts (ending inside a block
    or on its edge), lengths, block lengths, steps, schedulers (a sampling one with its generator) and
    EOS stops: each gets the tokens, commit steps and forwards it gets alone."""
    pipe = sdar_pipe
    items = [(i, name, bool(i % 2)) for i, name in enumerate(list(BLOCK_SCHEDULERS) * 2)]
    requests = [block_request(pipe, i, BLOCK_SCHEDULERS[n](), make_cache(cache), eos) for i, n, eos in items]
    decoder = BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id)
    done = run_decoder(decoder, requests)
    for i, name, eos in items:
        sequence, commit, nfe = block_alone(pipe, i, BLOCK_SCHEDULERS[name](), make_cache(cache), eos)
        assert torch.equal(done[str(i)].sequence, sequence.cpu()), (cache, i, name)
        assert torch.equal(done[str(i)].commit_step, commit.cpu()), (cache, i, name)
        assert done[str(i)].stats["steps"] == nfe
    assert all(done[str(i)].stats["edited_tokens"] > 0 for i, name, _ in items if name.startswith("editing"))
    assert decoder.pool.free_blocks == decoder.pool.num_blocks
    # a request alone on the engine (one row: its attention rows, each ending at its block's end)
    lone = run_decoder(BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id), requests[:1])
    assert torch.equal(lone["0"].sequence, done["0"].sequence)


def test_the_cache_feeds_each_row_its_active_block_and_the_newly_finished_ones(model):
    """The finished blocks' cache feeds, per row and without padding: at its first forward the row's
    prompt blocks and its active block (the prefill merged in), then its active block, plus the
    previous block at each block's first step (its final KV); and gives the tokens of recomputing
    everything up to the active block's end at every step."""
    prompts = [list(range(10, 18)), list(range(20, 27))]  # two complete blocks; one complete + 3 tokens
    requests = [Request(p, 16, 4, 16, LowConfidenceScheduler(), BlockCache(make_cache("freecache")), id=str(i))
                for i, p in enumerate(prompts)]  # fmt: skip
    decoder = BatchedDecoder.for_requests(model, None, requests)
    done = run_decoder(decoder, requests)
    reference = decode(model, prompts, 16, 4, 4, LowConfidenceScheduler(), cache="none")
    for i in range(2):
        assert torch.equal(done[str(i)].sequence, reference["sequences"][i]), i
    # row 0: blocks [8, 12) .. [20, 24), 4 steps each: [0, 12) at its first forward, then 4 per step and
    # the previous block again at each later block's first step
    assert done["0"].stats["fed_tokens"] == 12 + 3 * 4 + 3 * (8 + 3 * 4)
    # row 1: block [4, 8) holds 3 prompt tokens and 1 mask (one step, feeding [0, 8)); [8, 12) .. [16, 20)
    # as row 0's; the last, [20, 23), has 3 masks: 3 steps of 3, the first with [16, 20)
    assert done["1"].stats["fed_tokens"] == 8 + 3 * (8 + 3 * 4) + (7 + 2 * 3)
    # no separate prefill forward; recomputing feeds everything up to the active block's end each step
    assert decoder.forwards == reference["nfe"] == 16
    assert reference["stats"][0]["fed_tokens"] == sum(4 * (3 + b) * 4 for b in range(4))


def test_block_requests_join_mid_flight_and_cancels_leave_the_others_alone(sdar_pipe):
    pipe = sdar_pipe
    make = [lambda i, n=n: block_request(pipe, i, BLOCK_SCHEDULERS[n](), make_cache("freecache"))
            for n in ("low_confidence", "threshold")]  # fmt: skip
    first = [make[i % 2](i) for i in range(2)]
    later = [make[i % 2](i) for i in range(2, 5)]
    victim = block_request(pipe, 5, LowConfidenceScheduler(), make_cache("freecache"), schedule=(64, 4, 64))

    def on_step(decoder, step):
        if step == 2:
            for r in later + [victim]:
                decoder.add(r)
        if step == 5:
            assert [r.id for r in decoder.cancel({"5"})] == ["5"]

    decoder = BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id)
    done = run_decoder(decoder, first, on_step)
    assert sorted(done, key=int) == [str(i) for i in range(5)]
    for i in range(5):
        sequence, _, _ = block_alone(pipe, i, make[i % 2](i).scheduler, make_cache("freecache"))
        assert torch.equal(done[str(i)].sequence, sequence.cpu()), i
    assert decoder.pool.free_blocks == decoder.pool.num_blocks


def test_block_ops_and_host_reads_per_step_do_not_grow_with_the_batch(model):
    counts = {}
    for rows in (1, 16):
        decoder = BatchedDecoder(model, None)
        for i in range(rows):
            ids = [5 + (7 * i + j) % 90 for j in range(10 + i)]
            decoder.add(
                Request(ids, 32, 4, 32, LowConfidenceScheduler(), BlockCache(make_cache("freecache")), id=str(i))
            )
        counts[rows], reads = step_costs(decoder, warm_steps=6)  # past the prefill and into a second block
        assert reads <= 2  # (one: the step's results)
    assert counts[16] <= 1.5 * counts[1], counts


def test_block_and_full_attention_requests_do_not_share_a_batch(model):
    decoder = BatchedDecoder(model, None)
    decoder.add(Request([5, 6, 7], 8, 4, 8, LowConfidenceScheduler(), BlockCache(make_cache("none")), id="a"))
    with pytest.raises(ValueError, match="block diffusion and full-attention requests do not share a batch"):
        decoder.add(Request([5, 6, 7], 8, 4, 8, LowConfidenceScheduler(), make_cache("dual"), id="b"))
    assert decoder.pool.free_blocks == decoder.pool.num_blocks - decoder.pool.blocks_for(11)


@pytest.mark.parametrize("options", [dict(policy="snapkv", budget=0.5), dict(policy="knorm", budget=2)])
def test_a_compressed_prefix_gives_each_request_what_it_gets_alone(sdar_pipe, options):
    """The prompt's complete blocks compressed after the first forward (with their own queries): each
    request gets the tokens it gets alone, the compression changes them, and the requests give the
    prefix's pool blocks back."""
    pipe = sdar_pipe
    prompts = [p * 3 for p in BLOCK_PROMPTS]  # prompts of several blocks
    kw = dict(max_new_tokens=12, scheduler=LowConfidenceScheduler())
    batch = pipe(prompts, cache=make_cache("freecache", **options), **kw)
    plain = pipe(prompts, cache=make_cache("freecache"), **kw)
    assert not torch.equal(batch.sequences, plain.sequences)
    assert batch.stats["kv_bytes"] < plain.stats["kv_bytes"]
    for i, prompt in enumerate(prompts):
        alone = pipe(prompt, cache=make_cache("freecache", **options), **kw)
        assert torch.equal(alone.sequences[0], batch.sequences[i]), (options, i)


def test_a_policy_scoring_by_masked_queries_is_refused_for_block_diffusion(sdar_pipe):
    with pytest.raises(ValueError, match="policy='maskkv': it scores the prompt by the masked positions' queries"):
        sdar_pipe("Hi", max_new_tokens=8, cache=make_cache("freecache", policy="maskkv", budget=0.5))
