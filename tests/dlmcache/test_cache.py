"""KV reuse across denoising steps, against recomputing everything."""

import pytest
import torch

from dlmcache import DLMPipeline, DreamScheduler, LowConfidenceScheduler, ThresholdScheduler
from dlmcache.cache import (
    CACHES,
    CanvasStore,
    DualCache,
    FreeCache,
    NoCache,
    PrefixCache,
    Refresh,
    Scatter,
    Window,
    make_cache,
    refreshes_prompt,
)
from tests.helpers import tiny_dream, tiny_llada

PROMPTS = ["Mia has 3 pens.", "Tom has 10 eggs. He buys 4 more eggs. How many eggs does Tom have now?", "Hi"]
SCHEDULERS = {
    "low_confidence": lambda: LowConfidenceScheduler(),
    "low_confidence_t": lambda: LowConfidenceScheduler(temperature=0.8),
    "random": lambda: LowConfidenceScheduler(remasking="random"),
    "cfg": lambda: LowConfidenceScheduler(),  # with the pipeline's cfg_scale (CALL_OPTIONS)
    "maskgit_plus": lambda: DreamScheduler(alg="maskgit_plus"),
    "entropy_t": lambda: DreamScheduler(alg="entropy", temperature=0.5, top_p=0.9),
    "topk_margin": lambda: DreamScheduler(alg="topk_margin"),
    "origin": lambda: DreamScheduler(alg="origin"),
    "threshold": lambda: ThresholdScheduler(threshold=0.1),
}


CALL_OPTIONS = {"cfg": {"cfg_scale": 1.0}}


def make_pipe(tokenizer, arch, scheduler):
    model = (tiny_llada if arch == "llada" else tiny_dream)(tokenizer)
    pipe = DLMPipeline(model=model, tokenizer=tokenizer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, cache, prompts=PROMPTS, seed=0, **kw):
    pipe.set_cache(cache)
    kw = {"max_new_tokens": 24, "block_length": 8, "steps": 12, **kw}
    return pipe(prompts, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_freecache_refresh_every_step_is_bit_identical_to_none(arch, sched, tiny_tokenizer):
    pipe = make_pipe(tiny_tokenizer, arch, SCHEDULERS[sched]())
    options = CALL_OPTIONS.get(sched, {})
    ref = run(pipe, "none", **options)
    got = run(pipe, FreeCache(refresh_every=1), **options)
    assert torch.equal(got.sequences, ref.sequences)
    token = run(pipe, FreeCache(refresh_every=1, freeze="token"), **options)
    assert torch.equal(token.sequences, ref.sequences)
    assert got.nfe == ref.nfe and torch.equal(got.commit_step, ref.commit_step)
    assert got.stats["full_forwards"] == got.nfe


def test_the_default_refresh_scope_per_cache():
    """Who recomputes the prompt on a refresh when `refresh_prompt` is not given: FreeCache each row by
    its prompt's length (None), except with `refresh_every` (k = 1 must stay `none`); Fast-dLLM's
    caches always (their refresh is a full forward); any cache with a compressed prompt never."""
    assert refreshes_prompt(24, 24) and not refreshes_prompt(25, 24)
    assert FreeCache().refresh_prompt is None and FreeCache(freeze="token").refresh_prompt is None
    assert FreeCache(refresh_every=4).refresh_prompt is True
    assert make_cache("dual").refresh_prompt is True and make_cache("prefix").refresh_prompt is True
    assert FreeCache(policy="snapkv", budget=0.5).refresh_prompt is False
    assert make_cache("dual", quantizer="kivi4").refresh_prompt is False
    assert "refresh_prompt" not in repr(FreeCache()) and "refresh_prompt=True" in repr(FreeCache(refresh_prompt=True))
    with pytest.raises(TypeError, match="refresh_prompt='yes'"):
        FreeCache(refresh_prompt="yes")


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("freeze", ["block", "token"])
def test_a_canvas_refresh_equals_a_full_one_where_the_prompt_kv_cannot_change(arch, freeze, tiny_tokenizer):
    """A one-layer model's prompt KV depends on the prompt's tokens alone, so a refresh of the canvas
    against the first forward's prompt KV (refresh_prompt=False) computes what a full refresh does:
    refreshing every step gives the cache-free tokens. With two layers the prompt's KV would change
    and the canvas refresh reads the stale one: the tokens differ (so the check is not vacuous)."""
    build = tiny_llada if arch == "llada" else tiny_dream
    layers = {"llada": "n_layers", "dream": "num_hidden_layers"}[arch]
    for n in (1, 2):
        model = build(tiny_tokenizer, **{layers: n}).double()
        pipe = DLMPipeline(model=model, tokenizer=tiny_tokenizer, scheduler=LowConfidenceScheduler())
        pipe.set_progress_bar_config(disable=True)
        want = run(pipe, "none")
        got = run(pipe, FreeCache(refresh_every=1, refresh_drift=None, freeze=freeze, refresh_prompt=False))
        assert got.stats["full_forwards"] == 1 and got.stats["canvas_refreshes"] == got.nfe - 1
        same = torch.equal(got.sequences, want.sequences) and torch.equal(got.commit_step, want.commit_step)
        assert same is (n == 1), n


class Recorder:
    """Wraps a cache and records (canvas, targets, logits, refreshed?) at every step."""

    def __init__(self, inner):
        self.inner, self.log = inner, []
        self.name = inner.name

    def prepare(self, model, layout):
        self.inner.prepare(model, layout)

    def step_logits(self, x, targets, start, end):
        full_before = self.inner.stats.full_forwards
        logits = self.inner.step_logits(x, targets, start, end)
        self.log.append((x.clone(), targets.clone(), start, end, logits, self.inner.stats.full_forwards > full_before))
        return logits

    @property
    def stats(self):
        return self.inner.stats


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("cls", [PrefixCache, DualCache])
def test_prefix_and_dual_refresh_steps_reproduce_none(arch, cls, tiny_tokenizer):
    pipe = make_pipe(tiny_tokenizer, arch, LowConfidenceScheduler())
    rec = Recorder(cls())
    pipe.set_cache("none")
    pipe.cache = rec
    pipe(PROMPTS, max_new_tokens=24, block_length=8, steps=12)
    refreshes = [entry for entry in rec.log if entry[5]]
    assert len(refreshes) == 3  # one per block
    reference = NoCache()
    for x, targets, start, end, logits, _ in refreshes:
        reference.prepare(pipe.model, rec.inner.layout)
        with torch.no_grad():
            want = reference.step_logits(x, targets, start, end)
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    assert rec.stats.fed_tokens < 12 * x.shape[1]


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_window_over_fresh_cache_equals_full_forward(arch, tiny_tokenizer):
    """A windowed forward whose cached KV is current reproduces the full forward: checks the buffer
    writes, absolute RoPE positions, padding and Dream's shifted predecessor."""
    pipe = make_pipe(tiny_tokenizer, arch, LowConfidenceScheduler())
    model = pipe.model.double()
    x, layout = pipe.prepare_canvas(pipe.encode_prompts(PROMPTS), 24)
    layout.block_length = 8
    torch.manual_seed(0)
    gen = x[:, layout.prompt_len :]
    gen[torch.rand(gen.shape) < 0.5] = 7  # some committed tokens
    start, end, length = layout.prompt_len + 8, layout.prompt_len + 16, layout.length
    targets = torch.arange(start, end)
    shift = model.logit_shift
    with torch.no_grad():
        kv = CanvasStore(model, layout)
        kv.begin(Refresh(), x, None, None)
        full = model(x, positions=layout.positions, cache=kv, logits_index=targets).logits
        for w_start, w_end in [(start - shift, end), (start - shift, length), (3, end + 4)]:
            kv.begin(Window(w_start, w_end, length), x, None, torch.arange(w_start, w_end))
            got = model(
                x[:, w_start:w_end],
                positions=layout.positions[:, w_start:w_end],
                cache=kv,
                logits_index=targets - w_start,
            ).logits
            torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-10)
        # Dropping what lies beyond the window = a full forward of the truncated canvas.
        cut = end + 4
        trunc = model(
            x[:, :cut],
            positions=layout.positions[:, :cut],
            attention_mask=layout.key_mask[:, :cut],
            logits_index=targets,
        ).logits
        kv = CanvasStore(model, layout)
        kv.begin(Window(0, cut, cut), x, None, torch.arange(cut))
        model(x[:, :cut], positions=layout.positions[:, :cut], cache=kv)
        kv.begin(Window(start - shift, cut, cut), x, None, torch.arange(start - shift, cut))
        got = model(
            x[:, start - shift : cut],
            positions=layout.positions[:, start - shift : cut],
            cache=kv,
            logits_index=targets - (start - shift),
        ).logits
        torch.testing.assert_close(got, trunc, rtol=1e-10, atol=1e-10)


CACHE_MODES = {
    "prefix": lambda: PrefixCache(),
    "dual": lambda: DualCache(),
    "freecache": lambda: FreeCache(),
    "freecache_w4": lambda: FreeCache(suffix_window=4),
    "freecache_drop": lambda: FreeCache(suffix_window=0, beyond_window="drop"),
    "freecache_r3": lambda: FreeCache(refresh_every=3),
    "freecache_token": lambda: FreeCache(freeze="token"),
    "freecache_token_w0": lambda: FreeCache(suffix_window=0, freeze="token"),
    "freecache_no_drift": lambda: FreeCache(refresh_drift=None),
    # A threshold this low makes rows refresh at different steps: each must still decode as if alone.
    "freecache_drift": lambda: FreeCache(refresh_drift=1e-3),
    "freecache_token_w0_drift": lambda: FreeCache(suffix_window=0, freeze="token", refresh_drift=1e-3),
    "freecache_drop_drift": lambda: FreeCache(suffix_window=0, beyond_window="drop", refresh_drift=1e-3),
}


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("mode", list(CACHE_MODES))
@pytest.mark.parametrize("sched", ["low_confidence", "threshold", "maskgit_plus"])
def test_batch_equals_one_by_one(arch, mode, sched, tiny_tokenizer):
    pipe = make_pipe(tiny_tokenizer, arch, SCHEDULERS[sched]())
    batch = run(pipe, CACHE_MODES[mode]())
    for i, prompt in enumerate(PROMPTS):
        alone = run(pipe, CACHE_MODES[mode](), prompts=[prompt])
        assert torch.equal(alone.sequences[0], batch.sequences[i]), (mode, i)


@pytest.mark.parametrize("mode", list(CACHE_MODES))
def test_cached_modes_feed_fewer_tokens(mode, tiny_tokenizer):
    pipe = make_pipe(tiny_tokenizer, "llada", LowConfidenceScheduler())
    ref = run(pipe, "none")
    got = run(pipe, CACHE_MODES[mode]())
    assert got.nfe == ref.nfe == 12
    assert got.stats["fed_tokens"] < ref.stats["fed_tokens"]
    assert got.stats["reused_tokens"] > 0 and got.stats["kv_bytes"] > 0
    assert not (got.sequences == tiny_tokenizer.mask_token_id).any()


class PlanLog(FreeCache):
    """FreeCache that records (canvas, targets, block end, plan) at every step in `log`, a list shared
    with the copy each pipeline call works on."""

    def __init__(self, log: list, **options):
        super().__init__(**options)
        self.log = log

    def _plan(self, canvas, targets, start, end):
        plans = super()._plan(canvas, targets, start, end)
        self.log.append((canvas[0].clone(), targets.clone(), end, plans))
        return plans


def test_freecache_window_schedule(tiny_tokenizer):
    """What FreeCache feeds: a refresh first, then the active window from the frozen boundary, and the
    finished block once more on the first step of the next block (the delayed freeze)."""
    pipe = make_pipe(tiny_tokenizer, "llada", LowConfidenceScheduler())
    log = []
    cache = PlanLog(log, suffix_window=4, refresh_drift=None)  # drift probes: test_drift_refresh_follows_its_rule
    run(pipe, cache, prompts=[PROMPTS[0]], max_new_tokens=16, block_length=8, steps=4)
    plans = [entry[3] for entry in log]
    p = len(pipe.encode_prompts(PROMPTS[0])[0])
    assert plans[0] == [Refresh(prompt=True)]
    assert plans[1] == [Window(p, p + 12, p + 16)]  # block 0, frozen prompt
    assert plans[2] == [Window(p, p + 16, p + 16)]  # block 1 + the finished block 0 once more
    assert plans[3] == [Window(p + 8, p + 16, p + 16)]


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_flashdlm_is_one_option(arch, tiny_tokenizer):
    """flashdlm=True: FlashDLM's FreeCache: each step feeds from the active block's start (minus
    Dream's predecessor) to the end of the canvas, a finished block is frozen as its last step left it
    (no delayed step), and nothing is refreshed after the first forward."""
    pipe = make_pipe(tiny_tokenizer, arch, LowConfidenceScheduler())
    log = []
    run(pipe, PlanLog(log, flashdlm=True), prompts=[PROMPTS[0]], max_new_tokens=16, block_length=8, steps=4)
    p, length, shift = len(pipe.encode_prompts(PROMPTS[0])[0]), None, pipe.model.logit_shift
    length = p + 16
    starts = [p, p, p + 8, p + 8]
    assert [entry[3] for entry in log] == [[Refresh(prompt=True)]] + [
        [Window(s - shift, length, length)] for s in starts[1:]
    ]
    with pytest.raises(ValueError, match=r"drop \['freeze', 'refresh_drift'\]"):
        FreeCache(flashdlm=True, freeze="token", refresh_drift=0.1)
    assert repr(FreeCache(flashdlm=True)) == "FreeCache(flashdlm=True)"


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_token_freezing_feeds_what_is_not_final(arch, tiny_tokenizer):
    """freeze="token": each step feeds exactly the positions whose KV is not final (still masked, or
    committed since they were last fed) plus Dream's predecessors of the targets; fewer tokens than
    freezing whole blocks."""
    pipe = make_pipe(tiny_tokenizer, arch, LowConfidenceScheduler())
    log = []
    cache = PlanLog(log, suffix_window=0, freeze="token", refresh_drift=None)
    out = run(pipe, cache, prompts=[PROMPTS[1]])
    seen, plans = [entry[:3] for entry in log], [entry[3] for entry in log]
    block = run(pipe, FreeCache(suffix_window=0, refresh_drift=None), prompts=[PROMPTS[1]])
    assert out.stats["fed_tokens"] < block.stats["fed_tokens"]
    mask, shift = tiny_tokenizer.mask_token_id, pipe.model.logit_shift
    final = None
    for (x, targets, end), (pl,) in zip(seen, plans, strict=True):
        if isinstance(pl, Refresh):
            final = x != mask
            continue
        assert isinstance(pl, Scatter)
        need = ~final
        need[end:] = False
        need[targets] = True
        need[targets - shift] = True
        assert torch.equal(pl.index, need.nonzero().flatten())
        final |= need & (x != mask)
    assert not (out.sequences == mask).any()


class DriftSpy(FreeCache):
    """Records every step's plans with each row's canvas at its last refresh, and at every drift
    measurement the probes (fed index, probe mask), the fresh last-layer values, the reference and the
    drift (in lists shared with the copy each pipeline call works on)."""

    def __init__(self, **options):
        super().__init__(**options)
        self.records, self.plans, self.layouts = [], [], []

    def prepare(self, model, layout):
        super().prepare(model, layout)
        self.layouts.append(layout)
        rule, observe = self.refresher, self.refresher.observe

        def spy(refresh, rows, fed, values, canvas):
            probe = rule.probe
            reference = None if rule.reference is None else rule.reference.clone()
            observe(refresh, rows, fed, values, canvas)
            if not refresh and probe is not None:
                self.records.append((probe[0], probe[1].clone(), values.clone(), reference, rule.drift.clone()))

        rule.observe = spy

    def _plan(self, canvas, targets, start, end):
        tokens = self.refresher.refreshed_tokens
        before = None if tokens is None else tokens.clone()
        plans = super()._plan(canvas, targets, start, end)
        self.plans.append((plans, before))
        return plans


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_drift_refresh_follows_its_rule(arch, tiny_tokenizer):
    """refresh_drift: a row's probes are the last `probe_tokens` positions before its first fed one
    that were committed at its last refresh; its drift is the max over heads and probes of
    1 - cos(fresh last-layer value, value at that refresh); a row whose drift exceeds the threshold
    refreshes at the next step, in a full forward of its own rows, the others run their cached plan."""
    pipe = make_pipe(tiny_tokenizer, arch, LowConfidenceScheduler())
    threshold = 2e-3
    cache = DriftSpy(suffix_window=2, refresh_drift=threshold, probe_tokens=3)
    out = run(pipe, cache)
    mask, key_mask = tiny_tokenizer.mask_token_id, cache.layouts[0].key_mask
    measured = iter(cache.records)
    stale = torch.zeros(len(PROMPTS), dtype=torch.bool)
    refreshes = split_steps = 0
    for plans, refreshed in cache.plans[1:]:
        if stale.all():
            assert plans == [Refresh(prompt=cache.refresh_prompt)]
        else:
            assert isinstance(plans[0], Scatter)
            if stale.any():  # the stale rows are then recomputed whole, on their own
                split_steps += 1
                assert len(plans) == 2 and isinstance(plans[1], Refresh)
                assert torch.equal(plans[1].rows, stale.nonzero().flatten())
            else:
                assert len(plans) == 1
        refreshes += int(stale.sum())
        drift = torch.zeros(len(PROMPTS))
        if isinstance(plans[0], Scatter):
            plan = plans[0]
            index, probe, fresh, reference, got = next(measured)
            assert torch.equal(index, plan.index)
            for b in range(len(PROMPTS)):
                if stale[b]:
                    assert not probe[b].any()
                    continue
                probed = plan.index[probe[b]]
                first = int(plan.index[plan.write[b] & ~probe[b]][0])
                committed = ((refreshed[b] != mask) & key_mask[b]).nonzero().flatten()
                assert probed.tolist() == committed[committed < first][-3:].tolist()
                cos = torch.nn.functional.cosine_similarity(fresh[b][:, probe[b]], reference[b][:, probed], dim=-1)
                expect = (1 - cos).max() if probed.numel() else torch.tensor(0.0, dtype=cos.dtype)
                torch.testing.assert_close(got[b], expect.to(got.dtype))
            drift = got
        stale = (drift > threshold) & ~stale
    assert next(measured, None) is None
    assert refreshes == out.stats["drift_refreshes"] > 0 and split_steps > 0
    assert not (out.sequences == mask).any()
    never = run(pipe, FreeCache(suffix_window=2, refresh_drift=1.9))
    assert never.stats["drift_refreshes"] == 0 and never.stats["full_forwards"] == 1


def test_cache_options_are_validated():
    with pytest.raises(ValueError, match="suffix_window=-1"):
        FreeCache(suffix_window=-1)
    with pytest.raises(ValueError, match="beyond_window='keep'"):
        FreeCache(beyond_window="keep")
    with pytest.raises(ValueError, match="refresh_every=0"):
        FreeCache(refresh_every=0)
    with pytest.raises(ValueError, match="refresh_drift=0"):
        FreeCache(refresh_drift=0)
    with pytest.raises(ValueError, match="probe_tokens=0"):
        FreeCache(probe_tokens=0)
    with pytest.raises(ValueError, match="freeze='row'"):
        FreeCache(freeze="row")
    with pytest.raises(ValueError, match="does not take options"):
        make_cache("dual", refresh_every=2)
    with pytest.raises(ValueError, match="ready cache object"):
        make_cache(FreeCache(), refresh_every=2)
    assert sorted(CACHES) == ["dual", "freecache", "none", "prefix"]


def test_plans_reject_bad_windows(tiny_tokenizer):
    with pytest.raises(ValueError, match="bad window"):
        Window(4, 3, 10)
    with pytest.raises(ValueError, match="bad fed positions"):
        Scatter(torch.tensor([3, 2]), None, 10)
    with pytest.raises(ValueError, match="bad fed positions"):
        Scatter(torch.tensor([3, 10]), None, 10)
    pipe = make_pipe(tiny_tokenizer, "llada", LowConfidenceScheduler())
    x, layout = pipe.prepare_canvas(pipe.encode_prompts(PROMPTS[:1]), 8)
    store = CanvasStore(pipe.model, layout)
    with pytest.raises(ValueError, match="attends past the canvas"):
        store.begin(Window(0, 2, layout.length + 1), x, None, torch.arange(2))


def test_from_pretrained_with_cache_options(tiny_tokenizer, tmp_path):
    pipe = make_pipe(tiny_tokenizer, "llada", LowConfidenceScheduler())
    pipe.save_pretrained(tmp_path)
    loaded = DLMPipeline.from_pretrained(tmp_path, cache="freecache", cache_options={"suffix_window": 8})
    assert isinstance(loaded.cache, FreeCache) and loaded.cache.suffix_window == 8
