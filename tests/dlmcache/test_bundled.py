"""The bundled tiny models load offline and solve their task (greedy, so the results are fixed)."""

import pytest
import torch

from dlmcache import DLMPipeline, ThresholdScheduler, tinytask

N = 24  # held-out problems; the README's accuracy is measured on 500 by scripts/eval_tiny.py
GEN = dict(max_new_tokens=64, block_length=32)


@pytest.fixture(scope="module")
def pipe():
    pipe = DLMPipeline.from_pretrained("dlmcache/tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def problems():
    return tinytask.test_problems(N)


def accuracy(texts, problems):
    return sum(tinytask.is_correct(t, p) for t, p in zip(texts, problems, strict=True)) / len(problems)


def test_tiny_dlm_solves_its_task(pipe, problems):
    assert pipe.model.config.model_type == "llada"
    assert sum(p.numel() for p in pipe.model.parameters()) < 5e6
    out = pipe([tinytask.messages(p) for p in problems], **GEN)
    assert accuracy(out.texts, problems) >= 0.5, out.texts[:4]
    # Every completion has the solution's layout, ends at EOS, and the fill after it is all EOS.
    eos = pipe.tokenizer.eos_token_id
    for row in out.sequences.tolist():
        first = row.index(eos)
        assert set(row[first:]) == {eos}


def test_freecache_keeps_the_tiny_models_accuracy(pipe, problems):
    prompts = [tinytask.messages(p) for p in problems]
    pipe.set_cache("none")
    ref = pipe(prompts, **GEN)
    pipe.set_cache("freecache")
    cached = pipe(prompts, **GEN)
    pipe.set_cache("none")
    # The block and the suffix (the prompt frozen), a few probes, and a few rows refreshed on drift.
    assert cached.stats["fed_tokens"] < 0.75 * ref.stats["fed_tokens"]
    assert abs(accuracy(cached.texts, problems) - accuracy(ref.texts, problems)) <= 0.05


def test_tiny_guide_solves_its_task_and_guides(pipe, problems):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlmcache.locations import resolve_path

    path = resolve_path("dlmcache/tiny-guide")
    guide = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    chats = [tok.apply_chat_template(tinytask.messages(p), add_generation_prompt=True) for p in problems[:10]]
    chats = [c["input_ids"] if isinstance(c, dict) or hasattr(c, "keys") else c for c in chats]
    texts = []
    for ids in chats:
        out = guide.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        texts.append(tok.decode(out[0, len(ids) :], skip_special_tokens=True))
    assert accuracy(texts, problems[:10]) >= 0.5, texts[:3]

    prompts = [tinytask.messages(p) for p in problems]
    guided = DLMPipeline.from_pretrained("dlmcache/tiny", cache="freecache", guide="dlmcache/tiny-guide")
    guided.set_progress_bar_config(disable=True)
    out = guided(prompts, **GEN)
    assert out.nfe <= 16  # vs 64 one token per step: drafts are accepted many at a time
    assert accuracy(out.texts, problems) >= 0.5


def test_tiny_long_solves_the_long_prompt_task():
    """The second bundled model answers the last question after up to 12 solved distractors."""
    long = DLMPipeline.from_pretrained("dlmcache/tiny-long", cache="freecache")
    long.set_progress_bar_config(disable=True)
    items = tinytask.long_context_problems(16)
    chats = [tinytask.messages(p, shots) for p, shots in items]
    lengths = [
        len(
            long.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        for c in chats
    ]
    assert max(lengths) > 250  # the distractors make the prompt many times the question
    out = long(chats, **GEN)
    assert accuracy(out.texts, [p for p, _ in items]) >= 0.5, out.texts[:4]


def test_tiny_block_solves_its_task_block_by_block(problems):
    """The bundled block diffusion model (SDAR's architecture, blocks of 4, its release's default
    threshold rule): its exact block cache gives the recomputed tokens, and it commits several tokens
    per forward."""
    block = DLMPipeline.from_pretrained("dlmcache/tiny-block")
    block.set_progress_bar_config(disable=True)
    assert block.model.block_diffusion and block.default_block_length == 4
    prompts = [tinytask.messages(p) for p in problems]
    block.set_cache("none")
    ref = block(prompts, max_new_tokens=64)
    block.set_cache("freecache")
    cached = block(prompts, max_new_tokens=64)
    assert torch.equal(cached.sequences, ref.sequences)
    assert cached.stats["fed_tokens"] < 0.4 * ref.stats["fed_tokens"]
    assert accuracy(cached.texts, problems) >= 0.5, cached.texts[:4]
    assert isinstance(block.scheduler, ThresholdScheduler) and block.scheduler.config.threshold == 0.85
    assert block(prompts[0], max_new_tokens=64).nfe < 32
