"""Denoising caches that compress the prompt's KV with the shared policies (`dlmcache.kernels`)."""

import math

import pytest
import torch
from dlmcache.kernels.compression import score_inputs
from dlmcache.kernels.ops.quantized_attention import reference as quantized_reference
from dlmcache.kernels.policies import EVICTION, KIVI, CAKEBudget, EvictionPolicy, MiKV, SnapKV
from dlmcache.kernels.policies.quant import KIVIStore
from dlmcache.kernels.store import KVSegment

from dlmcache import DLMPipeline, DreamScheduler, LowConfidenceScheduler, ThresholdScheduler
from dlmcache.cache import CanvasStore, FreeCache, Refresh, Window, make_cache, prompt_compression
from dlmcache.guidance import ARGuide
from tests.helpers import tiny_dream, tiny_llada, tiny_llama

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


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("quantizer", [None, "kivi8"])
def test_window_over_compressed_prompt_equals_full_forward(arch, quantizer, tiny_tokenizer):
    """With every prompt entry kept (and stored exactly in float64, or in 8-bit codes), a window that
    attends over the prompt segment and the canvas buffer, merged by log-sum-exp, reproduces the full
    forward: checks the segment assembly of a padded batch, absolute positions and the merge."""
    pipe = make_pipe(tiny_tokenizer, arch, dtype=torch.float64)
    model = pipe.model
    x, layout = pipe.prepare_canvas(pipe.encode_prompts(PROMPTS), 24)
    layout.block_length = 8
    torch.manual_seed(0)
    gen = x[:, layout.prompt_len :]
    gen[torch.rand(gen.shape) < 0.5] = 7
    p, length, shift = layout.prompt_len, layout.length, model.logit_shift
    targets = torch.arange(p + 8, p + 16)
    store = CanvasStore(model, layout, prompt_compression("knorm", 10_000, quantizer=quantizer))  # keeps all
    with torch.no_grad():
        store.begin(Refresh(), x, None, None)
        full = model(x, positions=layout.positions, cache=store, logits_index=targets).logits
        assert store.base == p and store.k[0].shape[2] == length - p
        for w_start in (p + 8 - shift, p):
            store.begin(Window(w_start, length, length), x, None, torch.arange(w_start, length))
            got = model(
                x[:, w_start:], positions=layout.positions[:, w_start:], cache=store, logits_index=targets - w_start
            ).logits
            if quantizer is None:
                torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-10)
            else:  # 8-bit keys and values: close, not equal
                torch.testing.assert_close(got.softmax(-1), full.softmax(-1), rtol=0, atol=2e-2)
    segment = store.prompt[0]
    real = layout.key_mask[:, :p].sum(-1)
    assert torch.equal(segment.valid[:, 0].sum(-1), real)  # every real prompt token, no padding
    assert segment.length == (p if quantizer is None else math.ceil(p / 32) * 32)


@pytest.mark.parametrize("policy", ["snapkv", "maskkv", "h2o", "knorm"])
def test_each_row_keeps_what_its_policy_ranks_best(policy, tiny_tokenizer, monkeypatch):
    """The compressed prompt of each row of a padded batch is the top `keep` of the policy's ranking
    computed on that row's prompt alone (without its padding), from the refresh's own queries, and
    holds those entries' keys exactly."""
    pipe = make_pipe(tiny_tokenizer, "llada")
    model = pipe.model
    x, layout = pipe.prepare_canvas(pipe.encode_prompts(PROMPTS), 24)
    p = layout.prompt_len
    store = CanvasStore(model, layout, prompt_compression(policy, 0.5))
    seen, write_refresh = {}, CanvasStore._write_refresh

    def spy(self, layer_idx, q, k, v):
        seen[layer_idx] = (q.clone(), k.clone(), v.clone())
        write_refresh(self, layer_idx, q, k, v)

    monkeypatch.setattr(CanvasStore, "_write_refresh", spy)
    with torch.no_grad():
        store.begin(Refresh(), x, None, None)
        model(x, positions=layout.positions, cache=store)
    c = store.compression
    assert sorted(seen) == list(range(model.num_layers))
    for layer_idx, (q, k, v) in seen.items():
        segment = store.prompt[layer_idx]
        stored_keys = segment.read()[0]
        for b in range(len(PROMPTS)):
            n = int(layout.key_mask[b, :p].sum())
            rows = slice(b, b + 1)
            if policy == "maskkv":  # the whole answer is masked at the first step
                extra = {"mask_queries": q[rows, :, p:]}
            else:
                extra = {"queries": q[rows, :, p - n : p]}
            prompt = KVSegment.dense(k[rows, :, p - n : p], v[rows, :, p - n : p])
            inputs = score_inputs(prompt, layer_idx, model.num_layers, scale=32**-0.5, **extra)
            keep = c.layer_budget(n, layer_idx, model.num_layers)
            want = c.policy.ranking(inputs).topk(keep, dim=-1).indices.sort(-1).values[0] + (p - n)  # [H, keep]
            for h in range(want.shape[0]):
                kept = segment.valid[b, h]
                assert torch.equal(segment.origin[b, h][kept], want[h]), (layer_idx, b, h)
                assert torch.equal(stored_keys[b, h][kept], k[b, h, want[h]])


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
@pytest.mark.parametrize("sched", ["low_confidence", "threshold", "entropy"])
def test_batch_equals_one_by_one_with_compression(arch, mode, sched, tiny_tokenizer):
    scheduler = {
        "low_confidence": LowConfidenceScheduler(),
        "threshold": ThresholdScheduler(threshold=0.1),
        "entropy": DreamScheduler(alg="entropy"),
    }[sched]
    # float64: a padded batch attends over more (masked) keys than a row alone, which moves float32
    # logits by ~3e-7 and can flip a near-tie of a random model's entropy; the logic is what is tested.
    pipe = make_pipe(tiny_tokenizer, arch, scheduler, dtype=torch.float64)
    batch = run(pipe, MODES[mode](), engine=False)
    assert batch.stats["kv_bytes"] < run(pipe, "freecache", engine=False).stats["kv_bytes"]
    on_engine = run(pipe, MODES[mode]())  # the batched engine: each row's prompt a segment of its own
    for i, prompt in enumerate(PROMPTS):
        alone = run(pipe, MODES[mode](), prompts=[prompt], engine=False)
        assert torch.equal(alone.sequences[0], batch.sequences[i]), (mode, i)
        assert torch.equal(alone.sequences[0], on_engine.sequences[i]), (mode, i)
    if "drift" in mode:  # some steps refreshed some rows only, in forwards of their own
        assert batch.stats["forwards"] > batch.stats["steps"]
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
    joining mid-flight, one cancelled, one recompressing at its refreshes: each gets the step loop's
    tokens for it alone, and finished rows leave no blocks and no segments behind."""
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
        alone = pipe(PROMPTS[i % len(PROMPTS)], cache=caches[i % len(caches)](), engine=False, **settings(i))
        assert torch.equal(done[str(i)].sequence, alone.sequences[0].cpu()), i
    assert decoder.pool.free_blocks == decoder.pool.num_blocks and not decoder.prompts.segments
