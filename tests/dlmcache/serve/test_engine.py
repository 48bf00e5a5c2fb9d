"""The serving engine in-process: every request gets exactly what the pipeline gives it alone."""

import threading

import pytest
import torch

from dlmcache import DLMPipeline, LowConfidenceScheduler, ThresholdScheduler, TokenEditingScheduler, tinytask
from dlmcache.cache import DenoisingCache, FreeCache, make_cache
from dlmcache.serve.engine import Cancelled, Engine, Job, QueueFull


@pytest.fixture(scope="module")
def pipe():
    pipe = DLMPipeline.from_pretrained("dlmcache/tiny")
    pipe.set_progress_bar_config(disable=True)
    pipe.set_cache("freecache", suffix_window=0, freeze="token")
    return pipe


class Results:
    """Collects `on_done` results by key; `wait(n)` blocks until n have arrived."""

    def __init__(self):
        self.items, self.cv = {}, threading.Condition()

    def callback(self, key):
        def done(result):
            with self.cv:
                self.items[key] = result
                self.cv.notify_all()

        return done

    def wait(self, n, timeout=120):
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.items) >= n, timeout), f"{len(self.items)} of {n} finished"
        return self.items


def requests_mix():
    """Requests that differ in prompt, length, schedule, scheduler, sampling and cache."""
    problems = tinytask.test_problems(10)
    chat = [tinytask.messages(p) for p in problems]
    return [
        (chat[0], dict(max_new_tokens=64, block_length=32)),
        (chat[1], dict(max_new_tokens=32, block_length=32, steps=16)),
        (chat[2], dict(max_new_tokens=64, block_length=16, scheduler=ThresholdScheduler(threshold=0.9))),
        (chat[3], dict(max_new_tokens=64, block_length=32, cache=make_cache("none"))),
        (chat[4], dict(max_new_tokens=64, block_length=32, cache=FreeCache())),
        (chat[5], dict(max_new_tokens=48, block_length=16, cache=make_cache("dual"))),
        (
            chat[6],
            dict(
                max_new_tokens=64,
                block_length=32,
                scheduler=LowConfidenceScheduler(temperature=0.7),
                generator=torch.Generator().manual_seed(5),
            ),
        ),  # fmt: skip
        (chat[7], dict(max_new_tokens=64, block_length=32, stop_at_eos=False)),
        # The prompt's KV compressed (issue 16's caches): MaskKV, and MaskKV + int4 codes.
        (chat[8], dict(max_new_tokens=64, block_length=32, cache=FreeCache(policy="maskkv", budget=12))),
        (
            chat[9],
            dict(max_new_tokens=32, block_length=32, cache=FreeCache(policy="maskkv", budget=0.5, quantizer="kivi4")),
        ),
    ]


def alone(pipe, prompt, options):
    options = dict(options)
    if "generator" in options:
        options["generator"] = torch.Generator().manual_seed(5)
    return pipe(prompt, **{"stop_at_eos": True, **options})  # the request alone


def submit_all(engine, items, results, start=0):
    for i, (prompt, options) in enumerate(items, start):
        options = {"stop_at_eos": True, **options}
        if "generator" in options:
            options["generator"] = torch.Generator().manual_seed(5)
        engine.submit(Job(prompt, options, results.callback(i), id=str(i)))


def serve_and_compare(pipe, items, max_batch: int, **options) -> Engine:
    """Serve `items` together on an engine over `pipe` (`options`: the engine's); each result must
    equal the pipeline alone (sequences and forwards). Returns the stopped engine (for its counters)."""
    engine = Engine(pipe, max_batch=max_batch, **options).start()
    try:
        results = Results()
        submit_all(engine, items, results)
        got = results.wait(len(items))
    finally:
        engine.stop()
    for i, (prompt, options) in enumerate(items):
        want = alone(pipe, prompt, options)
        assert torch.equal(got[i].sequences, want.sequences), i
        assert got[i].nfe == want.nfe
    return engine


def test_requests_batched_together_equal_each_alone(pipe):
    engine = serve_and_compare(pipe, requests_mix(), max_batch=16)
    assert engine.stats.forward_rows > engine.stats.forwards  # forwards really carried several requests
    assert engine.running == 0
    # every request was a row of the decoder, compressed prompts included: no request ran a loop of its own
    assert engine.decoder.forwards == engine.stats.forwards


def test_steps_padded_to_shape_buckets_serve_the_same_answers(pipe):
    """The engine with static shapes (`graphs="buckets"`, what `--graphs cuda` replays as graphs):
    every request still gets what the pipeline gives it alone."""
    engine = serve_and_compare(pipe, requests_mix(), max_batch=16, graphs="buckets")
    assert engine.decoder.graphs == "buckets" and engine.stats.forward_rows > engine.stats.forwards


def test_the_batch_invariant_mode_serves_the_same_answers():
    """The server's engine with `--batch-invariant` (the model's mode): every request of the mix,
    compressed prompts included, still gets what the pipeline gives it alone."""
    pipe = DLMPipeline.from_pretrained("dlmcache/tiny")
    pipe.set_progress_bar_config(disable=True)
    pipe.set_cache("freecache", suffix_window=0, freeze="token")
    pipe.model.set_batch_invariant(True)
    engine = serve_and_compare(pipe, requests_mix(), max_batch=16)
    assert engine.stats.forward_rows > engine.stats.forwards


def test_a_cache_without_an_engine_rule_fails_its_request_alone(pipe):
    class Custom(DenoisingCache):  # a strategy without a rule for the engine
        name = "custom"

    chat = tinytask.messages(tinytask.test_problems(1)[0])
    engine = Engine(pipe, max_batch=4).start()
    results = Results()
    try:
        engine.submit(Job(chat, dict(max_new_tokens=32, cache=Custom()), results.callback(0)))
        engine.submit(Job(chat, dict(max_new_tokens=32), results.callback(1)))
        got = results.wait(2)
    finally:
        engine.stop()
    assert isinstance(got[0], ValueError) and "a Custom has no rule for the engine" in str(got[0])
    assert torch.equal(got[1].sequences, alone(pipe, chat, dict(max_new_tokens=32)).sequences)


def test_requests_join_a_running_batch_at_the_next_step(pipe):
    """Half of the requests arrive while the first half is decoding (at its 5th step): they join the
    running batch and still get what they would alone."""
    items = requests_mix()
    engine = Engine(pipe, max_batch=16).start()
    results = Results()
    joined = threading.Event()
    first, rest = items[:4], items[4:]

    def on_step(sequences, commit_step):
        if int((commit_step >= 0).sum()) >= 5 and not joined.is_set():
            joined.set()
            submit_all(engine, rest, results, start=len(first))

    try:
        prompt, options = first[0]
        engine.submit(Job(prompt, {"stop_at_eos": True, **options}, results.callback(0), on_step=on_step))
        submit_all(engine, first[1:], results, start=1)
        got = results.wait(len(items))
    finally:
        engine.stop()
    assert joined.is_set()
    for i, (prompt, options) in enumerate(items):
        assert torch.equal(got[i].sequences, alone(pipe, prompt, options).sequences), i


def test_cancel_frees_the_slot_and_errors_stay_with_their_request(pipe):
    engine = Engine(pipe, max_batch=2, max_queue=1).start()
    results = Results()
    chat = [tinytask.messages(p) for p in tinytask.test_problems(4)]
    try:
        long_job = Job(chat[0], dict(max_new_tokens=256, block_length=32, stop_at_eos=False), results.callback("long"))
        engine.submit(long_job)
        # block_length does not divide max_new_tokens: this request fails inside the pipeline ...
        engine.submit(Job(chat[1], dict(max_new_tokens=64, block_length=48), results.callback("bad")))
        engine.submit(Job(chat[2], dict(max_new_tokens=64, block_length=32), results.callback("ok")))
        with pytest.raises(QueueFull):  # 2 running + 1 waiting
            engine.submit(Job(chat[3], dict(max_new_tokens=64), results.callback("over")))
        long_job.cancel()
        got = results.wait(3)
    finally:
        engine.stop()
    assert isinstance(got["long"], Cancelled)
    assert isinstance(got["bad"], ValueError) and "block_length=48" in str(got["bad"])
    want = pipe(chat[2], max_new_tokens=64, block_length=32, stop_at_eos=True)
    assert torch.equal(got["ok"].sequences, want.sequences)  # ... and the others go on
    assert engine.running == 0 and engine.queued == 0
    assert (engine.stats.cancelled, engine.stats.failed, engine.stats.finished) == (1, 1, 1)


def test_drain_finishes_the_running_and_refuses_new(pipe):
    from dlmcache.serve.engine import Draining

    engine = Engine(pipe, max_batch=4).start()
    results = Results()
    chat = tinytask.messages(tinytask.test_problems(1)[0])
    try:
        engine.submit(Job(chat, dict(max_new_tokens=64, block_length=32), results.callback(0)))
        assert engine.drain(timeout=120)
        with pytest.raises(Draining):
            engine.submit(Job(chat, dict(max_new_tokens=64), results.callback(1)))
    finally:
        engine.stop()
    assert set(results.items) == {0} and not isinstance(results.items[0], Exception)


def test_engine_arguments_are_validated(pipe):
    with pytest.raises(ValueError, match="max_batch=0"):
        Engine(pipe, max_batch=0)
    with pytest.raises(ValueError, match="max_queue=-1"):
        Engine(pipe, max_queue=-1)
    with pytest.raises(ValueError, match="threads=0"):
        Engine(pipe, threads=0)


def test_block_diffusion_requests_are_served_and_equal_each_alone(tmp_path):
    """An SDAR checkpoint: its requests are rows of the batched engine (no pipeline loop runs), and every
    request gets what the pipeline's reference loop gives it alone."""
    from dlmcache.testing import random_checkpoint

    path = random_checkpoint("SDARForCausalLM", tmp_path / "sdar")
    sdar = DLMPipeline.from_pretrained(path, torch_dtype=torch.float64)
    sdar.set_progress_bar_config(disable=True)
    problems = tinytask.test_problems(4)
    editing = TokenEditingScheduler(threshold=0.006, edit_threshold=0.0045, max_post_steps=3)
    items = [
        (tinytask.messages(problems[0]), dict(max_new_tokens=16)),
        (tinytask.messages(problems[1]), dict(max_new_tokens=24, steps=12)),
        (tinytask.messages(problems[2]), dict(max_new_tokens=16, scheduler=ThresholdScheduler(threshold=0.006))),
        (tinytask.messages(problems[3]), dict(max_new_tokens=16, cache=make_cache("none"))),
        # LLaDA2.1's token editing: post steps keep the row in its block beside the others
        (tinytask.messages(problems[1]), dict(max_new_tokens=16, scheduler=editing)),
        # the block cache: its prefill forward asks for no logits
        (tinytask.messages(problems[0]), dict(max_new_tokens=16, cache=make_cache("freecache"))),
        (tinytask.messages(problems[1]), dict(max_new_tokens=16, cache=make_cache("freecache"))),
    ]
    engine = serve_and_compare(sdar, items, max_batch=4)
    assert engine.stats.forward_rows > engine.stats.forwards
    assert engine.decoder.forwards == engine.stats.forwards  # every forward was the batched decoder's
    # the body's `edit_threshold` asks for token editing (the threshold kept, or the release's 0.95)
    from dlmcache.serve.requests import _scheduler

    asked = _scheduler({"edit_threshold": 0.5}, sdar)
    assert isinstance(asked, TokenEditingScheduler) and asked.config.threshold == 0.95
    assert asked.config.edit_threshold == 0.5
    sdar.set_scheduler("token_editing")
    kept = _scheduler({"threshold": 0.3}, sdar)
    assert isinstance(kept, TokenEditingScheduler) and (kept.config.threshold, kept.config.edit_threshold) == (0.3, 0.9)
    hot = _scheduler({"edit_threshold": 0.5, "temperature": 0.7}, sdar)  # sampled token editing
    assert isinstance(hot, TokenEditingScheduler) and hot.config.temperature == 0.7 and not hot.batched


class Exploding(LowConfidenceScheduler):
    """A plug-in scheduler with a bug: its select raises from its request's third step on."""

    def select(self, logits, mask_index, step_index, num_steps, generator, context):
        if step_index >= 2:
            raise RuntimeError("a bug in a plug-in scheduler")
        return super().select(logits, mask_index, step_index, num_steps, generator, context)


def test_a_request_whose_step_raises_fails_alone_and_the_others_go_on(pipe):
    """Issue 37, case 1: one bad request used to fail every request of its step (500 for its
    neighbours too). Its error is its own; the others get exactly what they get alone."""
    items = requests_mix()[:4]
    chat = tinytask.messages(tinytask.test_problems(1)[0])
    engine = Engine(pipe, max_batch=8).start()
    results = Results()
    try:
        engine.submit(Job(chat, dict(max_new_tokens=32, scheduler=Exploding()), results.callback("bad")))
        submit_all(engine, items, results)
        got = results.wait(len(items) + 1)
    finally:
        engine.stop()
    assert isinstance(got["bad"], RuntimeError) and "plug-in scheduler" in str(got["bad"])
    for i, (prompt, options) in enumerate(items):
        assert torch.equal(got[i].sequences, alone(pipe, prompt, options).sequences), i
    assert (engine.stats.failed, engine.stats.finished) == (1, len(items))
    assert engine.decoder.pool.free_blocks == engine.decoder.pool.num_blocks  # every block back


def test_a_block_prompt_that_fills_its_blocks_exactly_is_served_beside_others():
    """Issue 37, case 1's reproducer: on the bundled block diffusion model (blocks of 4), a prompt of
    4 ids with its prefix compressed (SnapKV, half) raised IndexError and failed its neighbour."""
    block = DLMPipeline.from_pretrained("dlmcache/tiny-block")
    block.set_progress_bar_config(disable=True)
    compressed = make_cache("prefix", policy="snapkv", budget=0.5)
    chat = tinytask.messages(tinytask.test_problems(1)[0])
    items = [([5, 5, 5, 5], dict(max_new_tokens=16, cache=compressed)), (chat, dict(max_new_tokens=16))]
    serve_and_compare(block, items, max_batch=4)
