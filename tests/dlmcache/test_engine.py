"""The batched engine: a batch against each request decoded alone (token for token, with mixed
prompts, schedules, schedulers and caches, joins mid-flight and cancels); its pool, ops and host
reads; `DLMPipeline.__call__` on it."""

import copy
import random

import pytest
import torch
from dlmcache.kernels.pool import PoolFull

from dlmcache import DLMPipeline, DreamScheduler, LowConfidenceScheduler, ThresholdScheduler
from dlmcache.cache import BlockCache, FreeCache, make_cache
from dlmcache.engine import BatchedDecoder, Request
from tests.helpers import step_costs, tiny_dream, tiny_llada

PROMPTS = [
    "Mia has 3 pens.",
    "Tom has 10 eggs. He buys 4 more eggs. How many eggs does Tom have now?",
    "Hi",
    "Compute 45+38-27.",
]
CACHES = {
    "none": lambda: make_cache("none"),
    "prefix": lambda: make_cache("prefix"),
    "dual": lambda: make_cache("dual"),
    "freecache": lambda: FreeCache(),
    "token": lambda: FreeCache(freeze="token", suffix_window=0),
    "flashdlm": lambda: FreeCache(flashdlm=True),
    "every2_drop": lambda: FreeCache(refresh_every=2, refresh_drift=None, suffix_window=2, beyond_window="drop"),
    "token_every3": lambda: FreeCache(freeze="token", refresh_every=3, probe_tokens=2),
    # refreshes of the canvas alone (refresh_prompt=False), the prompt's KV read from the pool
    "canvas_drift": lambda: FreeCache(refresh_drift=1e-3, refresh_prompt=False),
    "canvas_token_every2": lambda: FreeCache(freeze="token", refresh_every=2, refresh_prompt=False),
    "canvas_dual": lambda: make_cache("dual", refresh_prompt=False),
    # compressed prompts: a segment per request and layer, merged with the pool's canvas keys
    "snapkv": lambda: FreeCache(policy="snapkv", budget=0.5),
    "token_maskkv": lambda: FreeCache(freeze="token", suffix_window=0, policy="maskkv", budget=0.5),
    "dual_h2o_pyramid_refresh_prompt": lambda: make_cache(
        "dual", policy="h2o", budget=0.5, allocator="pyramid", refresh_prompt=True
    ),
}
SCHEDULERS = {
    "low_confidence": lambda: LowConfidenceScheduler(),
    "threshold": lambda: ThresholdScheduler(threshold=0.1),
    "sampled": lambda: LowConfidenceScheduler(temperature=0.8),  # draws: runs alone, with its generator
    "dream_origin": lambda: DreamScheduler(alg="origin", temperature=0.5),
    "dream_maskgit": lambda: DreamScheduler(alg="maskgit_plus", temperature=0.0),
}
# (max_new_tokens, block_length, steps) per prompt: different lengths, blocks and steps per block
SCHEDULES = [(24, 8, 12), (16, 16, 16), (24, 12, 6), (16, 4, 8)]


@pytest.fixture(scope="module", params=["llada", "dream"])
def pipe(request, tiny_tokenizer):
    build = tiny_llada if request.param == "llada" else tiny_dream
    model = build(tiny_tokenizer).double()
    pipe = DLMPipeline(model=model, tokenizer=tiny_tokenizer, scheduler=LowConfidenceScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(i):
    return torch.Generator().manual_seed(100 + i)


def request(pipe, i, scheduler, cache, stop_at_eos=False, schedule=None):
    ids = pipe.encode_prompts(PROMPTS[i % len(PROMPTS)])[0]
    g, b, s = schedule or SCHEDULES[i % len(SCHEDULES)]
    generator = seeded(i) if not scheduler.batched else None
    return Request(ids, g, b, s, copy.copy(scheduler), cache, stop_at_eos=stop_at_eos,
                   generator=generator, id=str(i))  # fmt: skip


def alone(pipe, i, scheduler, cache, stop_at_eos=False, schedule=None):
    g, b, s = schedule or SCHEDULES[i % len(SCHEDULES)]
    generator = seeded(i) if not scheduler.batched else None
    out = pipe(PROMPTS[i % len(PROMPTS)], max_new_tokens=g, block_length=b, steps=s, scheduler=scheduler,
               cache=cache, generator=generator, stop_at_eos=stop_at_eos)  # fmt: skip
    return out.sequences[0], out.nfe


def run(decoder, requests, on_step=None):
    """Decode `requests` (added at once); `on_step(decoder, step)` may add or cancel between steps."""
    for r in requests:
        decoder.add(r)
    done, step = {}, 0
    while len(decoder):
        for f in decoder.step():
            done[f.request.id] = f
        step += 1
        if on_step is not None:
            on_step(decoder, step)
    return done


def test_mixed_caches_and_eos_stops_in_one_batch(pipe):
    """Every cache strategy and scheduler in the same batch, half the rows stopping at EOS (a batch of
    one cache against each request alone is the golden tests' `test_a_batch_of_cases_decodes_as_recorded`)."""
    items = [(c, s) for c in CACHES for s in ("low_confidence", "threshold", "dream_maskgit")]
    requests = [
        request(pipe, i, SCHEDULERS[s](), CACHES[c](), stop_at_eos=bool(i % 2)) for i, (c, s) in enumerate(items)
    ]
    done = run(BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id), requests)
    for i, (c, s) in enumerate(items):
        sequence, _ = alone(pipe, i, SCHEDULERS[s](), CACHES[c](), stop_at_eos=bool(i % 2))
        assert torch.equal(done[str(i)].sequence, sequence), (c, s)


def test_requests_join_mid_flight_and_cancels_leave_the_others_alone(pipe):
    decoder = BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id)
    names = ("freecache", "token", "dual")
    make = [lambda i, c=c: request(pipe, i, LowConfidenceScheduler(), CACHES[c]()) for c in names]
    first = [make[i % 3](i) for i in range(3)]
    later = [make[i % 3](i) for i in range(3, 6)]
    victims = [request(pipe, 6, LowConfidenceScheduler(), FreeCache(), schedule=(64, 8, 64))]

    def on_step(decoder, step):
        if step == 2:
            for r in later + victims:
                decoder.add(r)
        if step == 5:
            assert [r.id for r in decoder.cancel({"6"})] == ["6"]

    done = run(decoder, first, on_step)
    assert sorted(done, key=int) == [str(i) for i in range(6)]
    for i in range(6):
        sequence, _ = alone(pipe, i, LowConfidenceScheduler(), CACHES[names[i % 3]]())
        assert torch.equal(done[str(i)].sequence, sequence), i
    assert decoder.pool.free_blocks == decoder.pool.num_blocks


def test_a_thousand_requests_with_random_cancels_free_every_block(tiny_tokenizer):
    model = tiny_llada(tiny_tokenizer)
    decoder = BatchedDecoder(model, tiny_tokenizer.eos_token_id, max_tokens=16 * 48, block_size=8)
    rng = random.Random(0)
    waiting = [
        Request(
            [5 + rng.randrange(100) for _ in range(rng.randrange(1, 30))],
            8,
            8,
            2,
            ThresholdScheduler(0.5),
            FreeCache(freeze="token"),
            id=str(i),
        )  # fmt: skip
        for i in range(1000)
    ]
    finished = cancelled = 0
    while waiting or len(decoder):
        while waiting and decoder.can_add(waiting[0]) and len(decoder) < 16:
            decoder.add(waiting.pop(0))
        running = [r.id for r in decoder.batch.requests]
        if rng.random() < 0.3:
            cancelled += len(decoder.cancel({rng.choice(running)}))
        finished += len(decoder.step())
    assert finished + cancelled == 1000 and cancelled >= 30
    assert decoder.pool.free_blocks == decoder.pool.num_blocks


def test_admission_is_by_free_blocks(tiny_tokenizer):
    model = tiny_llada(tiny_tokenizer)
    decoder = BatchedDecoder(model, tiny_tokenizer.eos_token_id, max_tokens=64, block_size=16)
    big = Request(list(range(5, 45)), 16, 16, 16, LowConfidenceScheduler(), FreeCache())  # 56 tokens
    decoder.add(big)
    assert not decoder.can_add(big) and decoder.fits(big)
    with pytest.raises(PoolFull, match="free"):
        decoder.add(big)
    huge = Request(list(range(5, 100)), 16, 16, 16, LowConfidenceScheduler(), FreeCache())
    assert not decoder.fits(huge)


@pytest.mark.parametrize("cache", ["token", "freecache", "dual", "token_maskkv"])
def test_ops_and_host_reads_per_step_do_not_grow_with_the_batch(tiny_tokenizer, cache):
    """Dispatched ops of one step at 16 requests are at most 1.5x those at 1; one host read a step
    (the invariant allows two)."""
    model = tiny_llada(tiny_tokenizer)
    counts = {}
    for rows in (1, 16):
        decoder = BatchedDecoder(model, tiny_tokenizer.eos_token_id)
        for i in range(rows):
            ids = [5 + (7 * i + j) % 90 for j in range(10 + i)]
            decoder.add(Request(ids, 32, 16, 32, LowConfidenceScheduler(), CACHES[cache](), id=str(i)))
        counts[rows], reads = step_costs(decoder, warm_steps=3)  # past the first (refreshing) forward
        assert reads == 1
    assert counts[16] <= 1.5 * counts[1], counts


def test_every_cache_is_a_rule_and_block_diffusion_has_its_own():
    """The caches are the engine's rules: their scope and compression as given; on a block diffusion
    model every cache is the exact cache of the finished blocks, `none` the full recompute, `dual` the
    sub-block cache, each with its name and compression."""
    assert FreeCache(policy="snapkv", budget=0.5).compression.policy.name == "snapkv"
    assert make_cache("dual", quantizer="kivi4").refresh_prompt is False  # a compressed prompt stays
    assert FreeCache().refresh_drift > 0 and FreeCache().compression is None
    block = {name: BlockCache(make_cache(name)) for name in ("none", "dual", "freecache", "prefix")}
    assert all(isinstance(rule, BlockCache) and rule.name == name for name, rule in block.items())
    assert block["none"].recompute and block["dual"].sub_block
    assert not block["freecache"].recompute and not block["freecache"].sub_block
    assert BlockCache(make_cache("dual", quantizer="kivi4")).compression.quantizer.bits == 4


def test_the_triton_paged_kernel_decodes_the_same_tokens(tiny_tokenizer):
    """The engine with the paged Triton kernel (the interpreter on CPU) against its torch path."""
    pytest.importorskip("triton")
    from dlmcache.kernels.ops.backend import interpreting

    if not torch.cuda.is_available() and not interpreting():
        pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    model = tiny_llada(tiny_tokenizer).double()
    pipe = DLMPipeline(model=model, tokenizer=tiny_tokenizer, scheduler=LowConfidenceScheduler())
    outs = {}
    # (and padded to shape buckets: the kernel's row starts over scratch rows, as a CUDA graph runs it)
    for backend, graphs in (("torch", "off"), ("triton", "off"), ("triton", "buckets")):
        model.set_attention_backend(backend)
        decoder = BatchedDecoder(model, tiny_tokenizer.eos_token_id, graphs=graphs)
        requests = [request(pipe, i, LowConfidenceScheduler(), FreeCache(freeze="token"), schedule=(8, 8, 8))
                    for i in range(2)]  # fmt: skip
        outs[backend, graphs] = {k: f.sequence for k, f in run(decoder, requests).items()}
    model.set_attention_backend("auto")
    want = outs["torch", "off"]
    assert all(torch.equal(want[k], out[k]) for out in outs.values() for k in want)


def test_make_requests_decodes_what_the_call_decodes(pipe):
    """`DLMPipeline.make_requests` takes `__call__`'s arguments: the engine decodes each prompt as the
    call does alone, and bad arguments fail as the call's do."""
    kw = dict(max_new_tokens=24, block_length=8, steps=12, cache=FreeCache(freeze="token"), stop_at_eos=True)
    requests = pipe.make_requests(PROMPTS[:3], **kw)
    decoder = BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id)
    for i, r in enumerate(requests):
        r.id = str(i)
    done = run(decoder, requests)
    for i, prompt in enumerate(PROMPTS[:3]):
        assert torch.equal(done[str(i)].sequence, pipe(prompt, **kw).sequences[0]), i
    with pytest.raises(ValueError, match="not divisible by block_length=5"):
        pipe.make_requests("Hi", max_new_tokens=24, block_length=5)
    with pytest.raises(TypeError, match="cache must be a DenoisingCache"):
        pipe.make_requests("Hi", cache="dual")
    assert [r.rows for r in pipe.make_requests("Hi", cfg_scale=1.0)] == [2]
    (compressed,) = pipe.make_requests("Hi", cache=FreeCache(policy="snapkv", budget=0.5))
    assert compressed.rule.compression is not None


# ---------------------------------------------------------------- DLMPipeline.__call__ on the engine


@pytest.mark.parametrize("cache", ["dual", "token"])
def test_a_batched_call_gives_each_prompt_its_tokens(pipe, cache):
    """A batch of prompts of different lengths: the engine's rows (no left padding, each at its own
    pace) give the tokens of each prompt alone; the callback sees every row's canvas after every
    step, and its last view is the output."""
    kw = dict(max_new_tokens=24, block_length=8, steps=12, cache=CACHES[cache](), stop_at_eos=True)
    views = []
    got = pipe(PROMPTS, callback_on_step_end=lambda _, step, s: views.append((step, s["sequences"].clone())), **kw)
    alone = [pipe(prompt, **kw) for prompt in PROMPTS]
    for i, out in enumerate(alone):
        assert torch.equal(out.sequences[0], got.sequences[i])
    assert [step for step, _ in views] == list(range(1, got.nfe + 1))
    assert torch.equal(views[-1][1], got.sequences.cpu()) and got.nfe == max(out.nfe for out in alone)
    committed = got.commit_step >= 0
    assert committed.all() and int(got.commit_step.max()) < got.nfe


def test_freecache_default_refresh_scope_is_each_prompts_own(pipe):
    """FreeCache's default refresh scope (`refreshes_prompt`): a prompt longer than its answer refreshes
    its canvas alone, a shorter one its prompt too. In a batch of both, each row gets the tokens it
    gets alone with its scope fixed; alone, the default equals that fixed scope in tokens and counters
    (and the two scopes differ in both)."""
    kw = dict(max_new_tokens=24, block_length=8, steps=12)
    prompts = [PROMPTS[1], PROMPTS[2]]
    lengths = [len(ids) for ids in pipe.encode_prompts(prompts)]
    assert lengths[0] > kw["max_new_tokens"] >= lengths[1]  # one on each side of the rule
    default = lambda: FreeCache(refresh_drift=1e-3)  # noqa: E731  (a drift threshold that fires often)
    fixed = [FreeCache(refresh_drift=1e-3, refresh_prompt=False), FreeCache(refresh_drift=1e-3, refresh_prompt=True)]
    for prompt, scope, other in zip(prompts, fixed, reversed(fixed), strict=True):
        alone = pipe(prompt, cache=default(), **kw)
        want = pipe(prompt, cache=scope, **kw)
        assert torch.equal(alone.sequences, want.sequences)
        for key in ("forwards", "full_forwards", "canvas_refreshes", "drift_refreshes", "fed_tokens"):
            assert alone.stats[key] == want.stats[key], key
        assert alone.stats["full_forwards"] != pipe(prompt, cache=other, **kw).stats["full_forwards"]
    assert pipe(prompts[0], cache=default(), **kw).stats["canvas_refreshes"] > 0
    got = pipe(prompts, cache=default(), **kw)
    for i, (prompt, scope) in enumerate(zip(prompts, fixed, strict=True)):
        assert torch.equal(got.sequences[i], pipe(prompt, cache=scope, **kw).sequences[0]), i


def test_a_batch_sampled_from_one_generator_draws_row_by_row(pipe):
    """A sampling batch with one generator: each request draws from it in turn (the first prompt's
    draws are the ones it makes alone from a fresh generator, the second's then differ from its own
    alone), and the same seed decodes the same tokens."""
    kw = dict(max_new_tokens=16, block_length=8, steps=16, scheduler=SCHEDULERS["sampled"]())
    prompts = [PROMPTS[0], PROMPTS[0]]
    batch = pipe(prompts, generator=seeded(1), **kw)
    assert torch.equal(batch.sequences, pipe(prompts, generator=seeded(1), **kw).sequences)
    assert not torch.equal(batch.sequences[0], batch.sequences[1])  # one stream, two draws per step
    with pytest.raises(TypeError, match="'engine'"):  # (the step loop is gone: one loop)
        pipe(prompts, engine=False, **kw)


@pytest.mark.parametrize("cache", ["none", "dual", "token", "every2_drop"])
def test_classifier_free_guidance_is_a_second_row(pipe, cache):
    """CFG on the engine: each request's unconditional row (prompt masked, its own KV) runs beside
    it; a batch gives each request its tokens alone, also beside requests without CFG, and the pool
    holds and frees both rows (test_pipeline checks the formula)."""
    kw = dict(max_new_tokens=24, block_length=8, steps=12, cfg_scale=1.5, cache=CACHES[cache]())
    got = pipe(PROMPTS[:3], **kw)
    assert not torch.equal(got.sequences, pipe(PROMPTS[:3], **{**kw, "cfg_scale": 0.0}).sequences)
    alone = pipe(PROMPTS[1], **kw)
    assert torch.equal(alone.sequences[0], got.sequences[1])

    decoder = BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id)
    free = decoder.pool.free_blocks
    (guided,) = pipe.make_requests(PROMPTS[1], **kw)
    guided.id = "cfg"
    others = [request(pipe, i, LowConfidenceScheduler(), CACHES[cache]()) for i in (0, 2)]
    done = run(decoder, [others[0], guided, others[1]])
    assert torch.equal(done["cfg"].sequence, alone.sequences[0])
    for r in others:
        assert torch.equal(done[r.id].sequence, alone_seq(pipe, int(r.id), cache))
    assert decoder.pool.free_blocks == free and len(decoder.batch.requests) == 0


def alone_seq(pipe, i, cache):
    return alone(pipe, i, LowConfidenceScheduler(), CACHES[cache]())[0]


def test_cancelling_a_guided_request_frees_both_rows(pipe):
    decoder = BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id)
    free = decoder.pool.free_blocks
    (guided,) = pipe.make_requests(PROMPTS[0], max_new_tokens=16, block_length=8, cfg_scale=1.0)
    guided.id = "cfg"
    decoder.add(guided)
    decoder.add(request(pipe, 1, LowConfidenceScheduler(), CACHES["dual"]()))
    assert len(decoder) == 2 and len(decoder.batch.requests) == 3
    decoder.step()
    assert decoder.cancel({"cfg"}) == [guided]
    assert len(decoder) == 1 and len(decoder.batch.requests) == 1
    while len(decoder):
        decoder.step()
    assert decoder.pool.free_blocks == free


def test_float32_batches_equal_each_request_alone_on_cpu(tiny_tokenizer):
    """In float32 on the CPU too (the tests above run in float64): 12 mixed requests in one batch
    give each the tokens it gets alone, so the flattened matmuls' low bits do not depend on the batch
    here. (On GPU a batched GEMM promises no such thing; see docs/engine.md.)"""
    pipe = DLMPipeline(model=tiny_llada(tiny_tokenizer), tokenizer=tiny_tokenizer, scheduler=LowConfidenceScheduler())
    pipe.set_progress_bar_config(disable=True)
    caches = ["token", "dual", "freecache"]
    requests = [request(pipe, i, LowConfidenceScheduler(), CACHES[caches[i % 3]]()) for i in range(12)]
    done = run(BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id), requests)
    for i in range(12):
        assert torch.equal(done[str(i)].sequence, alone_seq(pipe, i, caches[i % 3])), i


@pytest.fixture(scope="module")
def guided_pipe():
    pipe = DLMPipeline.from_pretrained("dlmcache/tiny", cache="freecache", guide="dlmcache/tiny-guide")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("cache", ["none", "dual", "freecache", "token"])
def test_guided_unmasking_runs_as_rows_of_the_engine(guided_pipe, cache):
    """The bundled model and its trained guide (which accepts long runs of drafts): a batch gives each
    prompt its tokens and accepted drafts alone, in fewer forwards than tokens; in a `BatchedDecoder`
    a guided request decodes beside unguided ones as it does alone."""
    from dlmcache import tinytask

    prompts = [tinytask.messages(p) for p in tinytask.test_problems(3)]
    kw = dict(max_new_tokens=64, block_length=32, cache=CACHES[cache]())
    batch = guided_pipe(prompts, **kw)
    accepted = 0
    for i, prompt in enumerate(prompts):
        alone = guided_pipe([prompt], **kw)
        assert torch.equal(alone.sequences[0], batch.sequences[i]) and alone.nfe < 64
        accepted += alone.stats["accepted_drafts"]
    assert accepted == batch.stats["accepted_drafts"] > 0

    decoder = BatchedDecoder(guided_pipe.model, guided_pipe.tokenizer.eos_token_id)
    (guided,) = guided_pipe.make_requests([prompts[0]], **kw)
    plain = guided_pipe.make_requests([prompts[1], prompts[2]], scheduler=LowConfidenceScheduler(), **kw)
    for i, r in enumerate([guided, *plain]):
        r.id = str(i)
    done = run(decoder, [plain[0], guided, plain[1]])
    assert torch.equal(done["0"].sequence, batch.sequences[0])
    for i in (1, 2):
        alone = guided_pipe([prompts[i]], scheduler=LowConfidenceScheduler(), **kw)
        assert torch.equal(done[str(i)].sequence, alone.sequences[0])
    assert done["0"].stats["accepted_drafts"] > 0 and done["0"].stats["steps"] < done["1"].stats["steps"]


def test_a_lone_request_on_scattered_blocks_gathers_its_keys(pipe):
    """A request alone reads its keys as a view of the pool only when its blocks are consecutive; on
    scattered blocks (a pool others fragmented) it gathers them, and gets its tokens either way."""
    cache = "token"
    for scatter in (False, True):
        decoder = BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id, max_tokens=16 * 16, block_size=8)
        if scatter:  # take every other block, then give them back: the free list is interleaved
            taken = [decoder.pool.allocate(8) for _ in range(8)]
            for blocks in taken[::2]:
                decoder.pool.free(blocks)
        r = request(pipe, 1, LowConfidenceScheduler(), CACHES[cache]())
        decoder.add(r)
        assert (decoder._first_slot() is None) == scatter
        done = run(decoder, [])
        assert torch.equal(done[r.id].sequence, alone_seq(pipe, 1, cache))


def test_guided_rows_share_their_guide_forwards(guided_pipe):
    """Guided requests of one guide share their guide forwards: the prompts' prefill of the requests
    admitted together is one forward, and the drafts are verified in one forward per chunk round of
    a step, not one per request. Each request still gets its tokens alone."""
    from dlmcache import tinytask

    prompts = [tinytask.messages(p) for p in tinytask.test_problems(4)]
    kw = dict(max_new_tokens=64, block_length=32, cache=CACHES["token"]())
    requests = guided_pipe.make_requests(prompts, **kw)
    for i, r in enumerate(requests):
        r.id = str(i)
    guide_model = guided_pipe.scheduler.guide.model
    calls = []
    original = guide_model.forward

    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    decoder = BatchedDecoder(guided_pipe.model, guided_pipe.tokenizer.eos_token_id)
    guide_model.forward = counted
    try:
        for r in requests:
            decoder.add(r)
        assert calls == []  # the prefill waits for the first step
        done = run(decoder, [])
    finally:
        guide_model.forward = original
    per_request = sum(done[str(i)].stats["guide_forwards"] for i in range(len(prompts)))  # prefill included
    assert calls[0] == len(prompts)  # one prefill for the four
    assert max(calls) == len(prompts) and len(calls) < per_request  # rows of one forward, fewer forwards
    for i, prompt in enumerate(prompts):
        alone = guided_pipe([prompt], **kw)
        assert torch.equal(done[str(i)].sequence, alone.sequences[0].cpu()), i
