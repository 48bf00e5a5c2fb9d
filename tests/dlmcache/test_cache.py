"""KV reuse across denoising steps, against recomputing everything."""

import pytest
import torch

from dlmcache import DLMPipeline, DreamScheduler, LowConfidenceScheduler, ThresholdScheduler
from dlmcache.cache import CACHES, FreeCache, make_cache, refreshes_prompt
from tests.helpers import tiny_dream, tiny_llada, trace

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


def make_pipe(tokenizer, arch, scheduler, **config):
    model = (tiny_llada if arch == "llada" else tiny_dream)(tokenizer, **config)
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
    assert got.stats["full_forwards"] == ref.stats["full_forwards"] > 0  # every step of every row


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
    layers = {"llada": "n_layers", "dream": "num_hidden_layers"}[arch]
    for n in (1, 2):
        pipe = make_pipe(tiny_tokenizer, arch, LowConfidenceScheduler(), **{layers: n})
        pipe.model.double()
        want = run(pipe, "none")
        got = run(pipe, FreeCache(refresh_every=1, refresh_drift=None, freeze=freeze, refresh_prompt=False))
        assert got.stats["full_forwards"] == 1 and got.stats["canvas_refreshes"] == got.nfe - 1
        same = torch.equal(got.sequences, want.sequences) and torch.equal(got.commit_step, want.commit_step)
        assert same is (n == 1), n


#: Every cache whose cached steps refeed each position whose token changed since it was last fed.
EXACT_ON_ONE_LAYER = {
    "prefix": lambda: make_cache("prefix"),
    "dual": lambda: make_cache("dual"),
    "block": lambda: FreeCache(refresh_drift=None),
    "block_window2": lambda: FreeCache(refresh_drift=None, suffix_window=2),
    "token": lambda: FreeCache(freeze="token", refresh_drift=None),
    "token_window0": lambda: FreeCache(freeze="token", suffix_window=0, refresh_drift=None),
    "canvas_dual": lambda: make_cache("dual", refresh_prompt=False),
}


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("cache", list(EXACT_ON_ONE_LAYER))
def test_on_a_one_layer_model_a_cache_that_refeeds_what_changed_decodes_as_none(arch, cache, tiny_tokenizer):
    """A one-layer model's K/V at a position depend on that position's token alone, so a cached step
    that refeeds every position committed since it was last fed reads exact K/V everywhere: its
    logits are the cache-free ones (float64; the pool's writes, the slots each row reads, absolute
    RoPE positions and Dream's shifted predecessor all enter). FlashDLM's rule, which freezes a block
    with the KV its last step left (masks where that step committed), is the control: it differs."""
    layers = {"llada": "n_layers", "dream": "num_hidden_layers"}[arch]
    pipe = make_pipe(tiny_tokenizer, arch, ThresholdScheduler(threshold=0.05), **{layers: 1})
    pipe.model.double()
    kw = dict(max_new_tokens=24, block_length=8)

    @torch.no_grad()
    def worst_difference(prompt, cache, **settings) -> float:
        p, worst = len(pipe.encode_prompts(prompt)[0]), 0.0
        for step in trace(pipe, prompt, cache, **kw, **settings):
            full = pipe.model(step["canvas"][None]).logits[0][active_targets(step["canvas"], pipe, p)]
            worst = max(worst, float((step["logits"] - full).abs().max()))
        return worst

    for prompt in PROMPTS[:2]:
        assert worst_difference(prompt, EXACT_ON_ONE_LAYER[cache]()) < 1e-9, prompt
        assert worst_difference(prompt, EXACT_ON_ONE_LAYER[cache](), steps=6) < 1e-9, prompt
    # (two steps a block: each block's last step commits several tokens, whose KV FlashDLM keeps masked)
    assert worst_difference(PROMPTS[1], FreeCache(flashdlm=True), steps=6) > 1e-6


def active_targets(canvas: torch.Tensor, pipe, prompt_len: int, block: int = 8) -> torch.Tensor:
    """The still-masked positions of the active block of `canvas` (the first block, counted from the
    prompt's end, that holds a mask): what a step computes logits for."""
    masked = (canvas == pipe.mask_token_id).nonzero().flatten()
    start = prompt_len + (int(masked[0]) - prompt_len) // block * block
    return masked[masked < start + block]


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("name", ["prefix", "dual"])
def test_prefix_and_dual_refresh_at_each_block_start_as_a_full_forward(arch, name, tiny_tokenizer):
    """Fast-dLLM's caches recompute everything at the first step of each block: those steps feed every
    position and give the logits of a full forward of the same canvas; the other steps feed the block
    (dual) or the block and everything after it (prefix)."""
    pipe = make_pipe(tiny_tokenizer, arch, LowConfidenceScheduler())
    pipe.model.double()
    prompt = pipe.encode_prompts(PROMPTS[1])[0]
    p, shift = len(prompt), pipe.model.logit_shift
    steps = trace(pipe, PROMPTS[1], make_cache(name), max_new_tokens=24, block_length=8, steps=12)
    assert len(steps) == 12
    for i, step in enumerate(steps):
        start = p + i // 4 * 8
        if i % 4 == 0:
            assert step["fed"] == list(range(p + 24))
            full = pipe.model(step["canvas"][None]).logits[0]
            torch.testing.assert_close(step["logits"], full[active_targets(step["canvas"], pipe, p)])
        else:
            assert step["fed"] == list(range(start - shift, start + 8 if name == "dual" else p + 24))


def test_freecache_window_schedule(tiny_tokenizer):
    """What block freezing feeds: a refresh first, then the active window from the frozen boundary, and
    the finished block once more on the first step of the next block (the delayed freeze)."""
    pipe = make_pipe(tiny_tokenizer, "llada", LowConfidenceScheduler())
    p = len(pipe.encode_prompts(PROMPTS[0])[0])
    cache = FreeCache(freeze="block", suffix_window=4, refresh_drift=None)  # drift probes: the drift test
    fed = [s["fed"] for s in trace(pipe, PROMPTS[0], cache, max_new_tokens=16, block_length=8, steps=4)]
    assert fed == [list(range(p + 16)), list(range(p, p + 12)), list(range(p, p + 16)), list(range(p + 8, p + 16))]


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_flashdlm_is_one_option(arch, tiny_tokenizer):
    """flashdlm=True: FlashDLM's FreeCache: each step feeds from the active block's start (minus
    Dream's predecessor) to the end of the canvas, a finished block is frozen as its last step left it
    (no delayed step), and nothing is refreshed after the first forward."""
    pipe = make_pipe(tiny_tokenizer, arch, LowConfidenceScheduler())
    p, shift = len(pipe.encode_prompts(PROMPTS[0])[0]), pipe.model.logit_shift
    steps = trace(pipe, PROMPTS[0], FreeCache(flashdlm=True), max_new_tokens=16, block_length=8, steps=4)
    starts = [p, p + 8, p + 8]
    assert [s["fed"] for s in steps] == [list(range(p + 16))] + [list(range(s - shift, p + 16)) for s in starts]
    with pytest.raises(ValueError, match=r"drop \['freeze', 'refresh_drift'\]"):
        FreeCache(flashdlm=True, freeze="token", refresh_drift=0.1)
    assert repr(FreeCache(flashdlm=True)) == "FreeCache(flashdlm=True)"


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_token_freezing_feeds_what_is_not_final(arch, tiny_tokenizer):
    """freeze="token": each step feeds exactly the positions whose KV is not final (still masked, or
    committed since they were last fed) plus Dream's predecessors of the targets; fewer tokens than
    freezing whole blocks."""
    pipe = make_pipe(tiny_tokenizer, arch, LowConfidenceScheduler())
    p, shift, mask = len(pipe.encode_prompts(PROMPTS[1])[0]), pipe.model.logit_shift, tiny_tokenizer.mask_token_id
    kw = dict(max_new_tokens=24, block_length=8, steps=12)
    steps = trace(pipe, PROMPTS[1], FreeCache(suffix_window=0, freeze="token", refresh_drift=None), **kw)
    token = run(pipe, FreeCache(suffix_window=0, freeze="token", refresh_drift=None), prompts=[PROMPTS[1]])
    block = run(pipe, FreeCache(freeze="block", suffix_window=0, refresh_drift=None), prompts=[PROMPTS[1]])
    assert token.stats["fed_tokens"] < block.stats["fed_tokens"]
    final = None
    for i, step in enumerate(steps):
        x = step["canvas"]
        if i == 0:
            assert step["fed"] == list(range(len(x)))
            final = x != mask
            continue
        targets = active_targets(x, pipe, p)
        end = p + (int(targets[0]) - p) // 8 * 8 + 8
        need = ~final
        need[end:] = False
        need[targets] = True
        need[targets - shift] = True
        assert step["fed"] == need.nonzero().flatten().tolist(), i
        final |= need & (x != mask)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_drift_refreshes_follow_the_threshold(arch, tiny_tokenizer):
    """refresh_drift: a low threshold makes rows refresh at different steps (each still decoding as if
    alone), a threshold no cosine distance reaches never refreshes after the first forward; the
    probes are fed beside the window."""
    pipe = make_pipe(tiny_tokenizer, arch, LowConfidenceScheduler())
    low = run(pipe, FreeCache(suffix_window=2, refresh_drift=2e-3, probe_tokens=3))
    assert low.stats["drift_refreshes"] > 0
    for i, prompt in enumerate(PROMPTS):
        alone = run(pipe, FreeCache(suffix_window=2, refresh_drift=2e-3, probe_tokens=3), prompts=[prompt])
        assert torch.equal(alone.sequences[0], low.sequences[i]), i
    never = run(pipe, FreeCache(suffix_window=2, refresh_drift=1.9))
    assert never.stats["drift_refreshes"] == 0 and never.stats["full_forwards"] == 1
    probed = run(pipe, FreeCache(suffix_window=2, refresh_drift=1.9, probe_tokens=3))
    unprobed = run(pipe, FreeCache(suffix_window=2, refresh_drift=None))
    assert probed.stats["fed_tokens"] > unprobed.stats["fed_tokens"]


@pytest.mark.parametrize("mode", ["prefix", "dual", "freecache", "token", "drop"])
def test_cached_modes_feed_fewer_tokens(mode, tiny_tokenizer):
    caches = {
        "prefix": lambda: make_cache("prefix"), "dual": lambda: make_cache("dual"), "freecache": lambda: FreeCache(),
        "token": lambda: FreeCache(freeze="token"), "drop": lambda: FreeCache(suffix_window=0, beyond_window="drop"),
    }  # fmt: skip
    pipe = make_pipe(tiny_tokenizer, "llada", LowConfidenceScheduler())
    ref = run(pipe, "none")
    got = run(pipe, caches[mode]())
    assert got.nfe == ref.nfe == 12
    assert got.stats["fed_tokens"] < ref.stats["fed_tokens"]
    assert got.stats["reused_tokens"] > 0 and got.stats["kv_bytes"] > 0
    assert not (got.sequences == tiny_tokenizer.mask_token_id).any()


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


def test_from_pretrained_with_cache_options(tiny_tokenizer, tmp_path):
    pipe = make_pipe(tiny_tokenizer, "llada", LowConfidenceScheduler())
    pipe.save_pretrained(tmp_path)
    loaded = DLMPipeline.from_pretrained(tmp_path, cache="freecache", cache_options={"suffix_window": 8})
    assert isinstance(loaded.cache, FreeCache) and loaded.cache.suffix_window == 8
