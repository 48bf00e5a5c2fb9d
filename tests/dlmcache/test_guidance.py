"""Guided unmasking: the guide's cache and acceptance rule, vocabulary mapping and the scheduler."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dlmcache import DLMPipeline, LowConfidenceScheduler, tinytask
from dlmcache.guidance import ARGuide, VocabMap
from tests.helpers import tiny_llada, tiny_llama

PROMPTS = ["Mia has 3 pens.", "Tom has 10 eggs. He buys 4 more eggs. How many eggs does Tom have now?", "Hi"]


def tiny_guide(tokenizer, seed=0, vocab=None):
    """A random 2-layer Llama guide over `tokenizer`'s vocabulary."""
    return tiny_llama(
        seed, vocab_size=vocab or len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_position_embeddings=2048,
    )  # fmt: skip


def full_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def test_verify_matches_full_forward_and_rolls_back(tiny_tokenizer):
    model = tiny_guide(tiny_tokenizer)
    guide = ARGuide(model, tiny_tokenizer, rule="greedy", chunk_size=6)
    guide.attach(tiny_tokenizer, len(tiny_tokenizer))
    prompt = [3, 40, 41, 42, 43]
    session = guide.begin(torch.tensor([prompt]), torch.ones(1, 5, dtype=torch.bool))
    # Build drafts whose first three tokens are the guide's own greedy continuation, then a wrong one.
    seq = list(prompt)
    for _ in range(3):
        seq.append(int(full_logits(model, seq)[-1].argmax()))
    wrong = (int(full_logits(model, seq)[-1].argmax()) + 1) % len(tiny_tokenizer)
    drafts = torch.tensor([seq[5:] + [wrong, 50, 51]])
    k = session.verify(drafts, torch.zeros_like(drafts, dtype=torch.bool), torch.ones_like(drafts, dtype=torch.bool))
    assert k.tolist() == [3]
    # After the partial accept, the cache holds exactly prompt + 3 accepted tokens.
    torch.testing.assert_close(session.next_logits[0], full_logits(model, seq)[-1], rtol=1e-5, atol=1e-5)
    forced = torch.tensor([[60, 61]])
    k = session.verify(forced, torch.ones_like(forced, dtype=torch.bool), torch.ones_like(forced, dtype=torch.bool))
    assert k.tolist() == [2]
    torch.testing.assert_close(session.next_logits[0], full_logits(model, seq + [60, 61])[-1], rtol=1e-5, atol=1e-5)


def test_prefills_of_several_generations_share_one_forward(tiny_tokenizer):
    """`begin_many` prefills generations of different widths and row counts in one forward; each
    session is then the one `begin` makes alone: same mask, cache, prediction and verify results."""
    model = tiny_guide(tiny_tokenizer)
    guide = ARGuide(model, tiny_tokenizer, rule="greedy", chunk_size=4)
    guide.attach(tiny_tokenizer, len(tiny_tokenizer))
    prompts = [
        (torch.tensor([[3, 40, 41]]), torch.ones(1, 3, dtype=torch.bool)),
        (torch.tensor([[1, 3, 50, 51, 52, 53, 54], [3, 60, 61, 62, 63, 64, 65]]), torch.ones(2, 7, dtype=torch.bool)),
        (torch.tensor([[3]]), torch.ones(1, 1, dtype=torch.bool)),
    ]  # fmt: skip
    prompts[1][1][0, 0] = False  # a left-padded row beside a full one
    shared = guide.begin_many(prompts)
    drafts = torch.tensor([[70, 71, 72, 73]])
    for (ids, mask), together in zip(prompts, shared, strict=True):
        alone = guide.begin(ids, mask)
        assert torch.equal(together.mask, alone.mask) and torch.equal(together.length, alone.length)
        torch.testing.assert_close(together.next_logits, alone.next_logits, rtol=1e-5, atol=1e-6)
        for ours, theirs in zip(together.cache.layers, alone.cache.layers, strict=True):
            assert ours.keys.shape == theirs.keys.shape
            torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-5, atol=1e-6)
        tokens = drafts.expand(ids.shape[0], -1)
        forced, live = torch.zeros_like(tokens, dtype=torch.bool), torch.ones_like(tokens, dtype=torch.bool)
        forced[:, :2] = True  # two tokens in (the greedy test of the rest reads the prefilled cache)
        assert torch.equal(together.verify(tokens, forced, live), alone.verify(tokens, forced, live))
        torch.testing.assert_close(together.next_logits, alone.next_logits, rtol=1e-5, atol=1e-6)
    assert guide.begin_many([]) == []


def test_rows_advance_independently(tiny_tokenizer):
    """Row 0 accepts 1 token, row 1 accepts 3; later predictions match fresh forwards per row."""
    model = tiny_guide(tiny_tokenizer)
    guide = ARGuide(model, tiny_tokenizer, rule="greedy")
    guide.attach(tiny_tokenizer, len(tiny_tokenizer))
    prompts = [[3, 40, 41], [3, 50, 51, 52, 53]]
    ids = torch.tensor([[1, 1] + prompts[0], prompts[1]])
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    session = guide.begin(ids, mask)
    forced = torch.tensor([[True, False, False], [True, True, True]])
    k = session.verify(torch.tensor([[70, 71, 72], [80, 81, 82]]), forced, torch.ones(2, 3, dtype=torch.bool))
    # Row 0: 70 forced, then 71 must be the guide's argmax after 70 (it is not, almost surely).
    expect0 = 2 if int(full_logits(model, prompts[0] + [70])[-1].argmax()) == 71 else 1
    assert k.tolist() == [expect0, 3]
    session.verify(torch.tensor([[90], [91]]), torch.ones(2, 1, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool))
    row0 = prompts[0] + [70, 71, 72][:expect0] + [90]
    row1 = prompts[1] + [80, 81, 82, 91]
    torch.testing.assert_close(session.next_logits[0], full_logits(model, row0)[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(session.next_logits[1], full_logits(model, row1)[-1], rtol=1e-5, atol=1e-5)


def test_topk_relative_rule():
    guide = ARGuide.__new__(ARGuide)
    guide.rule, guide.top_k, guide.relative = "topk_relative", 2, 0.5
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.6, 0.25, 0.15], [0.4, 0.35, 0.25], [0.4, 0.35, 0.25]]])
    tokens = torch.tensor([[1, 1, 2, -1]])
    # 0.3 >= 0.25 and top-2: yes; 0.25 < 0.3: no; rank 3: no; unmapped: no.
    assert guide.accept(probs.log(), tokens).tolist() == [[True, False, False, False]]
    guide.rule = "greedy"
    assert guide.accept(probs.log(), torch.tensor([[0, 1, 0, 0]])).tolist() == [[True, False, True, True]]


def make_pipe(tokenizer, guide):
    pipe = DLMPipeline(model=tiny_llada(tokenizer), tokenizer=tokenizer, scheduler=LowConfidenceScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.set_guide(guide)
    return pipe


def test_forced_acceptance_commits_whole_blocks(tiny_tokenizer):
    """A guide that accepts everything commits every draft: one forward per block, and the tokens are
    the DLM's argmax drafts at the block's first step."""
    guide = ARGuide(tiny_guide(tiny_tokenizer), tiny_tokenizer, top_k=len(tiny_tokenizer), relative=0.0)
    pipe = make_pipe(tiny_tokenizer, guide)
    out = pipe(PROMPTS[:1], max_new_tokens=16, block_length=8, stop_at_eos=False)
    assert out.nfe == 2 and out.stats["accepted_drafts"] == 16
    x = torch.tensor([pipe.encode_prompts(PROMPTS[0])[0] + [tiny_tokenizer.mask_token_id] * 16])
    p = x.shape[1] - 16
    with torch.no_grad():
        x[0, p : p + 8] = pipe.model(x).logits[0, p : p + 8].argmax(-1)
        x[0, p + 8 :] = pipe.model(x).logits[0, p + 8 :].argmax(-1)
    assert torch.equal(out.sequences[0], x[0, p:])


def test_no_mapping_falls_back_to_most_confident(tiny_tokenizer):
    """With every draft unmappable the guide accepts nothing: each step commits the DLM's most
    confident token, i.e. LLaDA's low-confidence rule with one token per step."""
    guide = ARGuide(tiny_guide(tiny_tokenizer), tiny_tokenizer)
    pipe = make_pipe(tiny_tokenizer, guide)
    guide.vocab_map.table[:] = -1
    out = pipe(PROMPTS, max_new_tokens=16, block_length=8, stop_at_eos=False)
    ref = DLMPipeline(model=pipe.model, tokenizer=tiny_tokenizer, scheduler=LowConfidenceScheduler())
    ref.set_progress_bar_config(disable=True)
    want = ref(PROMPTS, max_new_tokens=16, block_length=8, steps=16)
    assert torch.equal(out.sequences, want.sequences) and out.nfe == 16
    assert out.stats["accepted_drafts"] == 0


@pytest.mark.parametrize("rule", ["topk_relative", "greedy"])
def test_batch_equals_one_by_one(rule, tiny_tokenizer):
    guide = ARGuide(tiny_guide(tiny_tokenizer), tiny_tokenizer, rule=rule, chunk_size=4)
    pipe = make_pipe(tiny_tokenizer, guide)
    pipe.set_cache("freecache")
    batch = pipe(PROMPTS, max_new_tokens=16, block_length=8)
    for i, prompt in enumerate(PROMPTS):
        alone = pipe(prompt, max_new_tokens=16, block_length=8)
        assert torch.equal(alone.sequences[0], batch.sequences[i]), i


def test_stops_at_eos(tiny_tokenizer):
    """A row whose text up to an EOS is committed has every masked position after it filled with EOS;
    a row with a mask before its EOS does not."""
    from dlmcache.batching import after_eos

    eos, mask = tiny_tokenizer.eos_token_id, tiny_tokenizer.mask_token_id
    gen = np.array([[5, eos, mask, mask], [mask, eos, mask, 6], [7, 8, 9, eos]])
    filled = after_eos(gen, mask, eos)
    gen[filled] = eos
    assert gen.tolist() == [[5, eos, eos, eos], [mask, eos, mask, 6], [7, 8, 9, eos]]
    assert filled.sum().item() == 2


def char_tokenizer():
    """A second, unrelated offline tokenizer: byte-level BPE with a small vocabulary and other ids."""
    corpus = [p.question + " " + p.solution for p in tinytask.make_problems(300, 7)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<eos>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def test_vocab_map_between_different_tokenizers(tiny_tokenizer):
    other = char_tokenizer()
    vmap = VocabMap(tiny_tokenizer, other)
    assert not vmap.identity and 0 < vmap.coverage < 1
    guide_vocab = {i: t for t, i in other.get_vocab().items()}
    dlm_vocab = {i: t for t, i in tiny_tokenizer.get_vocab().items()}
    for d, g in enumerate(vmap.table.tolist()):
        if g >= 0 and d not in tiny_tokenizer.all_special_ids:
            assert dlm_vocab[d] == guide_vocab[g]  # same byte-level string, never a look-alike
    assert vmap(torch.tensor([tiny_tokenizer.eos_token_id])).item() == other.eos_token_id
    assert vmap(torch.tensor([tiny_tokenizer.mask_token_id])).item() == -1
    digits = tiny_tokenizer.convert_tokens_to_ids(list("0123456789"))
    assert (vmap(torch.tensor(digits)) == torch.tensor(other.convert_tokens_to_ids(list("0123456789")))).all()
    same = VocabMap(tiny_tokenizer, tiny_tokenizer)
    assert same.identity and torch.equal(same.table, torch.arange(len(tiny_tokenizer)))


def test_guide_with_other_vocabulary_runs(tiny_tokenizer):
    other = char_tokenizer()
    guide = ARGuide(tiny_guide(other, vocab=len(other)), other, chunk_size=8)
    pipe = make_pipe(tiny_tokenizer, guide)
    out = pipe(PROMPTS[:2], max_new_tokens=16, block_length=8)
    assert not (out.sequences == tiny_tokenizer.mask_token_id).any()
    assert out.stats["guide_forwards"] > 1


def test_guide_options_are_validated(tiny_tokenizer):
    model = tiny_guide(tiny_tokenizer)
    for kwargs, match in [
        ({"rule": "sometimes"}, "rule='sometimes'"),
        ({"top_k": 0}, "top_k=0"),
        ({"relative": 1.5}, "relative=1.5"),
        ({"chunk_size": 0}, "chunk_size=0"),
    ]:
        with pytest.raises(ValueError, match=match):
            ARGuide(model, tiny_tokenizer, **kwargs)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        ARGuide(model)
