"""Denoising caches that compress the prompt's KV with the shared policies (`dlmcache.kernels`)."""

import pytest
import torch
from dlmcache.kernels.compression import score_inputs
from dlmcache.kernels.ops.quantized_attention import reference as quantized_reference
from dlmcache.kernels.policies import EVICTION, KIVI, CAKEBudget, EvictionPolicy, MiKV, SnapKV
from dlmcache.kernels.policies.quant import KIVIStore
from dlmcache.kernels.store import KVSegment

from dlmcache import DLMPipeline, DreamScheduler, LowConfidenceScheduler, ThresholdScheduler
from dlmcache.cache import FreeCache, make_cache, prompt_compression
from dlmcache.guidance import ARGuide
from tests.helpers import tiny_dream, tiny_llada, tiny_llama, trace

PROMPTS = ["Mia has 3 pens.", "Tom has 10 eggs. He buys 4 more eggs. How many eggs does Tom have now?", "Hi"]


def model_for(arch, tokenizer, dtype=torch.float32):
    """Head dim 32: KIVI's value groups (per token, over channels) need at least 32 channels."""
    if arch == "llada":
        return tiny_llada(tokenizer, d_model=128, dtype=dtype)
    return tiny_dream(tokenizer, hidden_size=128, dtype=dtype)


def make_pipe(tokenizer, arch, scheduler=None, dtype=torch.float32):
    pipe = DLMPipeline(
        model=model_for(arch, tokenizer, dtype), tokenizer=tokenizer, scheduler=scheduler or LowConfidenceScheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, cache, prompts=PROMPTS, **kw):
    pipe.set_cache(cache)
    kw = {"max_new_tokens": 24, "block_length": 8, "steps": 12, **kw}
    return pipe(prompts, generator=torch.Generator().manual_seed(0), **kw)


class NeedsHidden(EvictionPolicy):
    name = "needs_hidden"
    needs = frozenset({"hidden"})


@pytest.mark.parametrize(
    "options, error",
    [
        ({"policy": "snapkv", "budget": 0.0}, r"budget=0.0 as a fraction kept must be in \(0, 1\]"),
        ({"policy": "snapkv", "budget": 1.5}, r"budget=1.5 as a fraction kept must be in \(0, 1\]"),
        ({"policy": "snapkv", "budget": -3}, r"budget=-3 as a token count must be >= 1"),
        ({"budget": 0.25}, r"budget=0.25 .* without a policy"),
        ({"policy": "no_such"}, r"unknown policy 'no_such'"),
        ({"policy": "pyramid"}, r"policy=.* is not an eviction policy"),
        ({"policy": "clusterkv"}, r"policy='clusterkv' is a recall policy"),
        ({"policy": NeedsHidden()}, r"policy='needs_hidden' reads \['hidden'\]"),
        ({"policy": "snapkv", "allocator": CAKEBudget()}, r"allocator='cake_budget' cascades"),
        ({"policy": "snapkv", "allocator": "ada"}, r"allocator='ada': expected one of"),
        ({"quantizer": "kivi3"}, r"quantizer='kivi3': expected"),
        ({"quantizer": MiKV()}, r"quantizer='mikv': .* only KIVI"),
        ({"refresh_prompt": 1}, r"refresh_prompt=1 must be None \(the cache.s default\) or a bool"),
    ],
)
def test_invalid_compression_is_refused_before_decoding(options, error):
    with pytest.raises((ValueError, TypeError), match=error):
        FreeCache(**options)
    with pytest.raises(ValueError, match="bits=3"):
        KIVI(bits=3)


def test_compression_options_resolve():
    c = prompt_compression("snapkv", 0.25, "pyramid", "kivi4")
    assert isinstance(c.policy, SnapKV) and c.budget == 0.25 and c.allocator.name == "pyramid"
    assert isinstance(c.quantizer, KIVI) and (c.quantizer.bits, c.quantizer.residual) == (4, 0)
    assert prompt_compression() is None
    cache = make_cache("dual", policy="maskkv", budget=0.5)
    assert cache.compression.policy.name == "maskkv"
    assert "policy='maskkv', budget=0.5" in repr(FreeCache(policy="maskkv", budget=0.5))


def test_a_segment_that_keeps_every_entry_decodes_as_the_pool(tiny_tokenizer):
    """With every prompt entry kept and stored exactly (float64), attention over the prompt's segment
    merged by log-sum-exp with the pool's canvas keys gives, step for step, the logits of the
    uncompressed cache (which reads the prompt from the pool): checks the segment's assembly, its
    absolute positions and the merge. (No drift test, and LLaDA's unshifted logits: the drift test's
    probes in the prompt, like the prompt's last position that predicts Dream's first target, write
    their fresh KV to the pool, never to a compressed prompt's segment.)"""
    pipe = make_pipe(tiny_tokenizer, "llada", dtype=torch.float64)
    kw = dict(max_new_tokens=24, block_length=8, steps=12)
    for prompt in PROMPTS[:2]:
        plain = trace(pipe, prompt, FreeCache(refresh_prompt=False, refresh_drift=None), **kw)
        kept = trace(pipe, prompt, FreeCache(policy="knorm", budget=10_000, refresh_prompt=False, refresh_drift=None),
                     **kw)  # fmt: skip
        assert len(kept) == len(plain)
        for a, b in zip(kept, plain, strict=True):
            assert torch.equal(a["canvas"], b["canvas"]) and a["fed"] == b["fed"]
            torch.testing.assert_close(a["logits"], b["logits"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("policy", ["snapkv", "maskkv", "h2o", "knorm"])
def test_each_row_keeps_what_its_policy_ranks_best(policy, tiny_tokenizer, monkeypatch):
    """Each request's compressed prompt is the top `keep` of the policy's ranking computed on that
    prompt alone, from the first forward's own queries (a policy scoring by the masked positions reads
    theirs), and holds those entries' keys exactly."""
    from dlmcache.engine import BatchedDecoder, runner

    pipe = make_pipe(tiny_tokenizer, "llada")
    model = pipe.model
    seen, evict = [], runner.evict_prompt

    def spy(compression, q, k, v, prompt_len, masked, layer_idx, num_layers):
        segment = evict(compression, q, k, v, prompt_len, masked, layer_idx, num_layers)
        seen.append((q.clone(), k.clone(), prompt_len, layer_idx, segment))
        return segment

    monkeypatch.setattr(runner, "evict_prompt", spy)
    cache = FreeCache(policy=policy, budget=0.5)
    requests = pipe.make_requests(PROMPTS, max_new_tokens=24, block_length=8, cache=cache)
    decoder = BatchedDecoder.for_requests(model, None, requests)
    for r in requests:
        decoder.add(r)
    with torch.no_grad():
        decoder.step()
    assert len(seen) == len(PROMPTS) * model.num_layers
    c = requests[0].rule.compression
    for q, k, p, layer_idx, segment in seen:
        extra = {"mask_queries": q[:, :, p:]} if policy == "maskkv" else {"queries": q[:, :, :p]}
        prompt = KVSegment.dense(k[:, :, :p], k[:, :, :p])
        inputs = score_inputs(prompt, layer_idx, model.num_layers, scale=q.shape[-1] ** -0.5, **extra)
        keep = c.layer_budget(p, layer_idx, model.num_layers)
        want = c.policy.ranking(inputs).topk(keep, dim=-1).indices.sort(-1).values[0]  # [H, keep]
        stored_keys = segment.read()[0]
        for h in range(want.shape[0]):
            kept = segment.valid[0, h]
            assert torch.equal(segment.origin[0, h][kept], want[h]), (layer_idx, h)
            assert torch.equal(stored_keys[0, h][kept], k[0, h, want[h]])


MODES = {
    "freecache_snapkv": lambda: FreeCache(policy="snapkv", budget=0.5),
    "freecache_token_maskkv_kivi4": lambda: FreeCache(
        suffix_window=0, freeze="token", policy="maskkv", budget=0.5, quantizer="kivi4"
    ),
    # rows refresh at different steps and recompress their own prompts (set_rows on a quantized segment)
    "freecache_drift_refresh_prompt": lambda: FreeCache(
        policy="knorm", budget=0.4, quantizer="kivi2", refresh_drift=0.05, refresh_prompt=True
    ),
    "freecache_drift_canvas_only": lambda: FreeCache(policy="h2o", budget=0.5, allocator="pyramid", refresh_drift=1e-2),
    "freecache_every3": lambda: FreeCache(policy="snapkv", budget=3, refresh_every=3, refresh_drift=None),
    "prefix_knorm": lambda: make_cache("prefix", policy="knorm", budget=0.5),
    "dual_maskkv_refresh_prompt": lambda: make_cache("dual", policy="maskkv", budget=0.5, refresh_prompt=True),
}


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("mode", list(MODES))
def test_batch_equals_one_by_one_with_compression(arch, mode, tiny_tokenizer):
    """Each row's prompt a segment of its own: a batch gives every prompt what it gets alone, with
    fewer KV bytes than the uncompressed cache where the prompt is never recomputed (its pool blocks
    go back; float64, so that near ties of a random model's logits are the logic's, not rounding's)."""
    for scheduler in (ThresholdScheduler(threshold=0.1), DreamScheduler(alg="entropy")):
        pipe = make_pipe(tiny_tokenizer, arch, scheduler, dtype=torch.float64)
        batch = run(pipe, MODES[mode]())
        if not MODES[mode]().refresh_prompt:
            assert batch.stats["kv_bytes"] < run(pipe, "freecache").stats["kv_bytes"]
        for i, prompt in enumerate(PROMPTS):
            alone = run(pipe, MODES[mode](), prompts=[prompt])
            assert torch.equal(alone.sequences[0], batch.sequences[i]), (mode, i)
        assert not (batch.sequences == tiny_tokenizer.mask_token_id).any()


def test_drift_refreshes_happen_with_a_compressed_prompt(tiny_tokenizer):
    """The drift test probes the prompt's last positions too when it is compressed (a refresh of the
    canvas alone feeds them as queries for their reference), so rows do refresh."""
    pipe = make_pipe(tiny_tokenizer, "llada")
    out = run(pipe, FreeCache(policy="snapkv", budget=0.5, refresh_drift=1e-3))
    assert out.stats["drift_refreshes"] > 0 and out.stats["canvas_refreshes"] == out.stats["drift_refreshes"] / 3
    assert out.stats["full_forwards"] == 1  # only the first forward recomputes the prompt
    again = run(pipe, FreeCache(policy="snapkv", budget=0.5, refresh_drift=1e-3, refresh_prompt=True))
    assert again.stats["full_forwards"] > 1 and again.stats["canvas_refreshes"] == 0


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_refresh_every_step_with_a_kept_prompt_is_bit_identical_to_none(arch, tiny_tokenizer):
    """Compression happens after a refresh's attention: with refresh_prompt=True and refresh_every=1
    every step is the cache-free forward, whatever is stored."""
    pipe = make_pipe(tiny_tokenizer, arch)
    ref = run(pipe, "none")
    got = run(pipe, FreeCache(refresh_every=1, refresh_drift=None, policy="snapkv", budget=0.3, refresh_prompt=True))
    assert torch.equal(got.sequences, ref.sequences)


def test_guided_unmasking_with_a_compressed_prompt(tiny_tokenizer):
    guide_model = tiny_llama(
        0, vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
        max_position_embeddings=2048,
    )  # fmt: skip
    pipe = make_pipe(tiny_tokenizer, "llada")
    pipe.set_guide(ARGuide(guide_model, tiny_tokenizer, chunk_size=4))
    cache = lambda: FreeCache(policy="maskkv", budget=0.5, quantizer="kivi4")  # noqa: E731
    batch = run(pipe, cache(), max_new_tokens=16, steps=None)
    for i, prompt in enumerate(PROMPTS):
        alone = run(pipe, cache(), prompts=[prompt], max_new_tokens=16, steps=None)
        assert torch.equal(alone.sequences[0], batch.sequences[i]), i


def test_a_quantized_prompt_is_never_dequantized_whole(tiny_tokenizer, monkeypatch):
    """Decoding over a KIVI-quantized prompt of 1,100 tokens reads the codes through quantized
    attention, a chunk at a time: the store's full-precision `read` is never called, and no chunk
    dequantizes more than the reference's chunk size."""
    model = tiny_llada(tiny_tokenizer, d_model=128, max_sequence_length=2048)
    pipe = DLMPipeline(model=model, tokenizer=tiny_tokenizer, scheduler=LowConfidenceScheduler())
    pipe.set_progress_bar_config(disable=True)
    ids = torch.randint(10, len(tiny_tokenizer) - 10, (1100,), generator=torch.Generator().manual_seed(0)).tolist()

    def refuse(self):
        raise AssertionError("the quantized prompt was dequantized whole")

    monkeypatch.setattr(KIVIStore, "read", refuse)
    monkeypatch.setattr(quantized_reference, "peak_dequantized_tokens", 0)
    out = run(pipe, FreeCache(quantizer="kivi4", refresh_drift=None), prompts=[ids], max_new_tokens=16, steps=4)
    peak = quantized_reference.peak_dequantized_tokens
    assert 0 < peak <= quantized_reference.DEFAULT_CHUNK < 1100
    assert (
        out.stats["kv_bytes"]
        < 0.4 * run(pipe, "freecache", prompts=[ids], max_new_tokens=16, steps=4).stats["kv_bytes"]
    )


@pytest.mark.parametrize("name", sorted(cls.name for cls in EVICTION))
def test_every_registry_eviction_policy_compresses_a_prompt(name, tiny_tokenizer):
    pipe = make_pipe(tiny_tokenizer, "dream")
    out = run(pipe, FreeCache(policy=name, budget=0.5), prompts=PROMPTS[1:2], max_new_tokens=16, steps=8)
    full = run(pipe, "freecache", prompts=PROMPTS[1:2], max_new_tokens=16, steps=8)
    assert out.stats["kv_bytes"] < full.stats["kv_bytes"]
    assert not (out.sequences == tiny_tokenizer.mask_token_id).any()


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize(
    "options",
    [
        {},  # block freeze, drift refresh (the default)
        {"freeze": "token"},
        {"freeze": "token", "suffix_window": 0},
        {"refresh_drift": None},
        {"refresh_every": 3},
        {"flashdlm": True},
    ],
)
def test_keeping_everything_is_no_compression(arch, options, tiny_tokenizer):
    """A policy at budget=1.0 (no quantizer) decodes token for token as the uncompressed cache, in every
    freeze and refresh mode (issue 24: the drift refresh gave other tokens on every prompt)."""
    model = (tiny_llada if arch == "llada" else tiny_dream)(tiny_tokenizer).double()
    pipe = DLMPipeline(model=model, tokenizer=tiny_tokenizer, scheduler=LowConfidenceScheduler())
    pipe.set_progress_bar_config(disable=True)
    prompts = ["Mia has 3 pens.", "Tom has 10 eggs. He buys 4 more eggs. How many eggs?", "Hi"]
    kw = dict(max_new_tokens=24, block_length=8, steps=24)
    plain = pipe(prompts, cache=FreeCache(**options), **kw)
    for policy in ("snapkv", "maskkv"):
        kept = pipe(prompts, cache=FreeCache(policy=policy, budget=1.0, **options), **kw)
        assert torch.equal(kept.sequences, plain.sequences), (policy, options)
        assert kept.nfe == plain.nfe


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_compressed_prompts_on_the_engine_join_leave_and_mix_kinds(arch, tiny_tokenizer):
    """Rows whose prompts are kept in full precision, in 4-bit and in 2-bit codes (one stack each),
    joining mid-flight, one cancelled, one recompressing at its refreshes: each gets the tokens it
    gets alone, and finished rows leave no blocks and no segments behind."""
    from dlmcache.engine import BatchedDecoder

    pipe = make_pipe(tiny_tokenizer, arch, dtype=torch.float64)
    caches = [
        lambda: make_cache("dual"),  # uncompressed, beside them, and the first to finish: the rows after it move
        lambda: FreeCache(policy="snapkv", budget=0.5),
        lambda: FreeCache(freeze="token", suffix_window=0, policy="maskkv", budget=0.5, quantizer="kivi4"),
        lambda: FreeCache(policy="knorm", budget=0.4, quantizer="kivi2", refresh_drift=0.05, refresh_prompt=True),
        lambda: make_cache("dual", policy="h2o", budget=0.5, allocator="pyramid"),
    ]
    schedules = {
        0: dict(max_new_tokens=8, block_length=8, steps=4),
        6: dict(max_new_tokens=64, block_length=8, steps=64),  # cancelled mid-flight
    }

    def settings(i):
        return schedules.get(i, dict(max_new_tokens=24, block_length=8, steps=12))

    def request(i):
        (r,) = pipe.make_requests(PROMPTS[i % len(PROMPTS)], cache=caches[i % len(caches)](), **settings(i))
        r.id = str(i)
        return r

    decoder = BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id, max_tokens=512, block_size=8)
    for t in decoder.pool.k + decoder.pool.v:  # a slot read before it is written shows as NaN logits
        t[decoder.pool.block_size :] = float("nan")
    for i in range(3):
        decoder.add(request(i))
    later = [request(i) for i in range(3, 6)]
    victim = request(6)
    done, step = {}, 0
    while len(decoder):
        done.update({f.request.id: f for f in decoder.step()})
        step += 1
        if step == 1:  # the rows that compressed their prompt for good gave its whole blocks back
            given_back = [r.id for r in decoder.batch.requests
                          if len(decoder.blocks[id(r)]) < decoder.pool.blocks_for(r.kv_tokens)]  # fmt: skip
            assert given_back == ["1", "2"]  # (not "0", whose prompt is not compressed)
        if step == 2:
            for r in later + [victim]:
                decoder.add(r)
        if step == 6:
            assert [r.id for r in decoder.cancel({"6"})] == ["6"]
    assert sorted(done, key=int) == [str(i) for i in range(6)]
    for i in range(6):
        alone = pipe(PROMPTS[i % len(PROMPTS)], cache=caches[i % len(caches)](), **settings(i))
        assert torch.equal(done[str(i)].sequence, alone.sequences[0].cpu()), i
    assert decoder.pool.free_blocks == decoder.pool.num_blocks and not decoder.prompts.segments
