import pytest
import torch

from dlmcache import DLMPipeline, DreamScheduler, LowConfidenceScheduler, ThresholdScheduler
from tests.helpers import tiny_dream, tiny_llada, write_hub_checkpoint

PROMPTS = ["Mia has 3 pens.", "Tom has 10 eggs. He buys 4 more eggs. How many eggs does Tom have now?", "Hi"]


def make_pipe(tokenizer, arch="llada", scheduler=None, **model_kw):
    model = (tiny_llada if arch == "llada" else tiny_dream)(tokenizer, **model_kw)
    sched = scheduler or (LowConfidenceScheduler() if arch == "llada" else DreamScheduler(alg="maskgit_plus"))
    pipe = DLMPipeline(model=model, tokenizer=tokenizer, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "arch, scheduler",
    [
        ("llada", LowConfidenceScheduler()),
        ("dream", DreamScheduler(alg="entropy")),
        ("llada", ThresholdScheduler(threshold=0.05)),
    ],
)
def test_batch_equals_one_by_one(arch, scheduler, tiny_tokenizer):
    pipe = make_pipe(tiny_tokenizer, arch, scheduler)
    pipe.model.double()  # a random model has near-ties that float32 rounding of padded rows can flip
    kw = dict(max_new_tokens=16, block_length=8, steps=8)
    batch = pipe(PROMPTS, **kw)
    for i, p in enumerate(PROMPTS):
        alone = pipe(p, **kw)
        assert torch.equal(alone.sequences[0], batch.sequences[i]), i
        assert alone.texts[0] == batch.texts[i]


def test_greedy_decoding_is_llada_reference(tiny_tokenizer):
    """The pipeline on one prompt equals LLaDA's generate() written out (no cache, greedy)."""
    pipe = make_pipe(tiny_tokenizer)
    prompt = pipe.encode_prompts(PROMPTS[1])[0]
    gen, block, steps, mask_id = 12, 4, 6, tiny_tokenizer.mask_token_id
    x = torch.tensor([prompt + [mask_id] * gen])
    per_block = steps // (gen // block)
    with torch.no_grad():
        for b in range(gen // block):
            s, e = len(prompt) + b * block, len(prompt) + (b + 1) * block
            count = (x[:, s:e] == mask_id).sum().item()
            plan = [count // per_block + (i < count % per_block) for i in range(per_block)]
            for k in plan:
                logits = pipe.model(x).logits
                x0 = logits.argmax(-1)
                conf = logits.softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
                conf[:, e:] = float("-inf")
                conf = torch.where(x == mask_id, conf, torch.tensor(float("-inf")))
                idx = torch.topk(conf[0], k).indices
                x[0, idx] = x0[0, idx]
    out = pipe(PROMPTS[1], max_new_tokens=gen, block_length=block, steps=steps)
    assert torch.equal(out.sequences[0], x[0, len(prompt) :])
    assert out.nfe == steps


def test_cfg_matches_formula(tiny_tokenizer):
    pipe = make_pipe(tiny_tokenizer, scheduler=LowConfidenceScheduler())
    prompt = pipe.encode_prompts(PROMPTS[0])[0]
    mask_id = tiny_tokenizer.mask_token_id
    x = torch.tensor([prompt + [mask_id] * 4])
    un = torch.full_like(x, mask_id)
    with torch.no_grad():
        cond, uncond = pipe.model(x).logits, pipe.model(un).logits
    guided = uncond + 3.0 * (cond - uncond)
    block = guided[0, len(prompt) :]
    first = block.softmax(-1).max(-1).values.argmax()
    out = pipe(PROMPTS[0], max_new_tokens=4, block_length=4, steps=4, cfg_scale=2.0)
    assert out.commit_step[0, first] == 0
    assert out.sequences[0, first] == block[first].argmax()


def test_output_fields(tiny_tokenizer):
    pipe = make_pipe(tiny_tokenizer)
    out = pipe(PROMPTS[:2], max_new_tokens=8, block_length=4, steps=4)
    assert out.sequences.shape == (2, 8) and out.commit_step.shape == (2, 8)
    assert out.nfe == 4 and out.stats["steps"] == 4 and out.stats["tokens_per_step"] == 2.0
    assert (out.commit_step >= 0).all() and out.commit_step.max() == 3
    assert out.stats["cache"] == "none" and out.stats["forwards"] == 4
    texts, seqs, nfe, _, _ = pipe(PROMPTS[:2], max_new_tokens=8, block_length=4, steps=4, return_dict=False)
    assert texts == out.texts and nfe == 4


def test_prompt_forms_agree(tiny_tokenizer):
    pipe = make_pipe(tiny_tokenizer)
    kw = dict(max_new_tokens=8, block_length=8)
    text = pipe(PROMPTS[0], **kw).sequences
    chat = pipe([[{"role": "user", "content": PROMPTS[0]}]], **kw).sequences
    ids = pipe.encode_prompts(PROMPTS[0])[0]
    from_ids = pipe(ids, **kw).sequences
    from_tensor = pipe(torch.tensor([ids]), **kw).sequences
    assert torch.equal(text, chat) and torch.equal(text, from_ids) and torch.equal(text, from_tensor)
    raw = pipe.encode_prompts(PROMPTS[0], chat_template=False)[0]
    assert raw == tiny_tokenizer(PROMPTS[0])["input_ids"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=10, block_length=4), "max_new_tokens=10 is not divisible by block_length=4"),
        (dict(max_new_tokens=8, block_length=4, steps=3), "steps=3 is not divisible by the number of blocks"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(max_new_tokens=8, block_length=0), "block_length=0"),
        (dict(max_new_tokens=8, block_length=4, steps=2.5), "steps=2.5"),
        (dict(max_new_tokens=600, block_length=600), "exceeds the model's 512"),
    ],
)
def test_invalid_schedule(kwargs, match, tiny_tokenizer):
    with pytest.raises(ValueError, match=match):
        make_pipe(tiny_tokenizer)(PROMPTS[0], **kwargs)


def test_invalid_prompts(tiny_tokenizer):
    pipe = make_pipe(tiny_tokenizer)
    mask_id = tiny_tokenizer.mask_token_id
    with pytest.raises(ValueError, match="mask token id"):
        pipe([5, mask_id, 6], max_new_tokens=4, block_length=4)
    with pytest.raises(ValueError, match="empty string"):
        pipe(["ok", ""], max_new_tokens=4, block_length=4)
    with pytest.raises(ValueError, match="non-empty"):
        pipe([], max_new_tokens=4, block_length=4)
    with pytest.raises(TypeError, match="prompt\\[0\\]"):
        pipe([3.5], max_new_tokens=4, block_length=4)
    with pytest.raises(TypeError, match="integer ids"):
        pipe(torch.ones(2, 3), max_new_tokens=4, block_length=4)
    vocab = pipe.model.get_input_embeddings().num_embeddings
    for ids in ([5, vocab], [-1, 5], torch.tensor([[5, vocab + 7]])):
        with pytest.raises(ValueError, match=r"prompt\[0\] has token ids outside the vocabulary"):
            pipe(ids, max_new_tokens=4, block_length=4)
    for chat, match in (
        ([{"role": "robot", "content": "hi"}], "role='robot'"),
        ([{"role": "user"}], "content must be a string, got None"),
        ([{"role": "user", "content": ["hi"]}], "content must be a string"),
    ):
        with pytest.raises(ValueError, match=match):
            pipe([chat], max_new_tokens=4, block_length=4)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LowConfidenceScheduler(temperature=float("nan")), "temperature=nan"),
        (lambda: DreamScheduler(temperature=float("nan")), "temperature=nan"),
        (lambda: DreamScheduler(alg_temp=float("inf")), "alg_temp=inf"),
        (lambda: DreamScheduler(top_k=2.5), "top_k=2.5"),
        (lambda: ThresholdScheduler(threshold=float("nan")), "threshold=nan"),
    ],
)
def test_non_finite_sampling_settings_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_cfg_scale_is_checked(tiny_tokenizer):
    with pytest.raises(ValueError, match="cfg_scale=inf"):
        make_pipe(tiny_tokenizer)(PROMPTS[0], max_new_tokens=4, block_length=4, cfg_scale=float("inf"))


def test_a_guide_wraps_the_scheduler_and_removing_it_restores_it(tiny_tokenizer):
    from dlmcache.schedulers import GuidedScheduler

    pipe = make_pipe(tiny_tokenizer, scheduler=ThresholdScheduler(threshold=0.5))
    own = pipe.scheduler
    pipe.set_guide("dlmcache/tiny-guide")
    assert isinstance(pipe.scheduler, GuidedScheduler) and pipe.scheduler.base is own
    pipe.set_scheduler("low_confidence")  # the guide stays, over the new rule
    assert isinstance(pipe.scheduler, GuidedScheduler) and isinstance(pipe.scheduler.base, LowConfidenceScheduler)
    pipe.set_guide(None)
    assert isinstance(pipe.scheduler, LowConfidenceScheduler)
    pipe.set_scheduler(None)
    assert pipe.scheduler is own
    with pytest.raises(ValueError, match="scheduler='greedy'"):
        pipe.set_scheduler("greedy")


def test_scheduler_by_name(tiny_tokenizer, tmp_path):
    path = write_hub_checkpoint(make_pipe(tiny_tokenizer).model, tmp_path / "m", tiny_tokenizer)
    assert isinstance(DLMPipeline.from_pretrained(path, scheduler="threshold").scheduler, ThresholdScheduler)
    with pytest.raises(ValueError, match="scheduler='fastest'"):
        DLMPipeline.from_pretrained(path, scheduler="fastest")
    with pytest.raises(TypeError, match="scheduler must be a DLMScheduler"):
        DLMPipeline.from_pretrained(path, scheduler=ThresholdScheduler)


def test_unknown_cache(tiny_tokenizer, tmp_path):
    pipe = make_pipe(tiny_tokenizer)
    with pytest.raises(ValueError, match="cache='fastest'"):
        pipe.set_cache("fastest")
    write_hub_checkpoint(pipe.model, tmp_path, tiny_tokenizer)
    with pytest.raises(ValueError, match="cache='fastest'"):
        DLMPipeline.from_pretrained(tmp_path, cache="fastest")


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="neither model_index.json nor config.json"):
        DLMPipeline.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="model_type='llama'"):
        DLMPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_save_and_load_round_trip(arch, tiny_tokenizer, tmp_path):
    pipe = make_pipe(tiny_tokenizer, arch)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DLMPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    kw = dict(max_new_tokens=8, block_length=4)
    assert torch.equal(loaded(PROMPTS[:2], **kw).sequences, pipe(PROMPTS[:2], **kw).sequences)
    hub = DLMPipeline.from_pretrained(write_hub_checkpoint(pipe.model, tmp_path / "hub", tiny_tokenizer))
    hub.set_progress_bar_config(disable=True)
    assert type(hub.scheduler) is (LowConfidenceScheduler if arch == "llada" else DreamScheduler)


def test_bf16_pipeline_runs(tiny_tokenizer):
    pipe = make_pipe(tiny_tokenizer)
    pipe.to(torch.bfloat16)
    out = pipe(PROMPTS, max_new_tokens=8, block_length=4)
    assert out.sequences.shape == (3, 8) and not (out.sequences == tiny_tokenizer.mask_token_id).any()


@pytest.mark.parametrize("scheduler", [LowConfidenceScheduler(), ThresholdScheduler(threshold=0.5)])
def test_step_callback_sees_each_committed_state(scheduler, tiny_tokenizer):
    pipe = make_pipe(tiny_tokenizer, scheduler=scheduler)
    frames = []

    def on_step(p, step, state):
        assert p is pipe
        frames.append((step, state["sequences"].clone(), state["commit_step"].clone()))

    out = pipe(["hello there", "a b c d"], max_new_tokens=16, block_length=8, callback_on_step_end=on_step)
    assert [f[0] for f in frames] == list(range(1, out.nfe + 1))
    for step, seq, commit in frames:
        done = (out.commit_step >= 0) & (out.commit_step < step)  # committed by the end of this step
        assert torch.equal(commit >= 0, done)
        assert torch.equal(seq[done], out.sequences[done])
        assert (seq[~done] == pipe.mask_token_id).all()


@pytest.mark.parametrize("guided", [False, True])
def test_one_pipeline_serves_concurrent_threads(guided):
    """Two threads calling one pipeline (with its cache strategy, scheduler and guide) each get the
    answer they would get alone; per-call state lives on each call's own copies."""
    from concurrent.futures import ThreadPoolExecutor

    from dlmcache.tinytask import test_problems

    pipe = DLMPipeline.from_pretrained(
        "dlmcache/tiny", cache="freecache", guide="dlmcache/tiny-guide" if guided else None
    )
    pipe.set_progress_bar_config(disable=True)
    problems = [p.question for p in test_problems(8)]
    jobs = [problems[:4], problems[4:]]
    kw = dict(max_new_tokens=32, block_length=32)
    alone = [pipe(prompts, **kw) for prompts in jobs]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(2):
            together = list(pool.map(lambda prompts: pipe(prompts, **kw), jobs))
            for a, b in zip(alone, together, strict=True):
                assert torch.equal(a.sequences, b.sequences) and a.nfe == b.nfe
                assert a.stats["fed_tokens"] == b.stats["fed_tokens"]


def test_dream_default_scheduler_reads_the_checkpoint_generation_config(tiny_tokenizer, tmp_path):
    import json

    path = write_hub_checkpoint(make_pipe(tiny_tokenizer, "dream").model, tmp_path / "d", tiny_tokenizer)
    assert type(DLMPipeline.from_pretrained(path).scheduler) is DreamScheduler  # no file: the class defaults
    (path / "generation_config.json").write_text(
        json.dumps({"alg": "maskgit_plus", "temperature": 0.0, "top_k": None, "top_p": None, "eps": 0.001})
    )
    sched = DLMPipeline.from_pretrained(path).scheduler
    assert (sched.config.alg, sched.config.top_k, sched.config.temperature) == ("maskgit_plus", 50, 0.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=24, block_length=5), "block_length"),
        (dict(max_new_tokens=24, block_length=8, steps=4), "steps"),
        (dict(max_new_tokens=8, block_length=8, steps=16), "steps"),
        (dict(cfg_scale=float("nan")), "cfg_scale"),
        (dict(max_new_tokens=512, prompt_len=10), "max_new_tokens"),
        (dict(stop_at_eos="yes"), "stop_at_eos"),
    ],
)
def test_decode_settings_name_the_field(kwargs, field, tiny_tokenizer):
    """One place checks a generation's settings (the pipeline, the engine's requests and the server all
    go through it): each refusal names its field, before any work."""
    from dlmcache.cache import make_cache
    from dlmcache.settings import DecodeSettings, SettingsError

    model = tiny_llada(tiny_tokenizer)
    with pytest.raises(SettingsError) as caught:
        DecodeSettings.resolve(model, LowConfidenceScheduler(), make_cache("none"), **kwargs)
    assert caught.value.field == field and isinstance(caught.value, ValueError)
    ok = DecodeSettings.resolve(model, LowConfidenceScheduler(), make_cache("none"), max_new_tokens=64)
    assert (ok.block_length, ok.steps, ok.num_blocks, ok.stop_at_eos) == (32, 64, 2, False)
