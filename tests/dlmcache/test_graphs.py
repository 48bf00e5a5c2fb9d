"""The engine's static shapes (`dlmcache.engine.graphs`): a step padded to shape buckets gives every
request the tokens and commit steps of the unpadded step, with full attention (every cache rule,
joins and a cancel) and block diffusion; CUDA graphs over those buckets where a GPU runs them."""

import pytest
import torch

from dlmcache.engine import BatchedDecoder
from dlmcache.engine.graphs import Buckets, pad_step, round_up
from dlmcache.schedulers import LowConfidenceScheduler, ThresholdScheduler
from tests.dlmcache.test_blockdiffusion import (
    BLOCK_SCHEDULERS,
    block_request,
    run_decoder,
    sdar_pipe,  # noqa: F401  (the fixture)
)
from tests.dlmcache.test_engine import CACHES, SCHEDULERS, pipe, request, run  # noqa: F401  (pipe: the fixture)

RULES = ["none", "prefix", "dual", "freecache", "token", "every2_drop", "canvas_drift", "canvas_token_every2"]


def decode(dlm, make_requests, on_step=None, **options):
    decoder = BatchedDecoder(dlm.model, dlm.tokenizer.eos_token_id, **options)
    done = run(decoder, make_requests(), on_step)
    assert decoder.pool.free_blocks == decoder.pool.num_blocks
    return done


def test_round_up_and_bad_buckets():
    assert [round_up(n, 16) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    assert round_up(3, 1) == 4 and round_up(1, 1) == 1
    with pytest.raises(ValueError, match=r"Buckets\(keys=0\)"):
        Buckets(keys=0)


def test_full_attention_steps_padded_to_buckets_decode_the_same_tokens(pipe):  # noqa: F811
    """Rows of every cache rule and of batched and sampling schedulers, a join after two steps and a
    cancel: padded to buckets (small floors, so the sizes change as rows come and go), each request
    gets what it gets at its own shapes."""
    names = list(SCHEDULERS)

    def make_requests():
        return [request(pipe, i, SCHEDULERS[names[i % len(names)]](), CACHES[r]()) for i, r in enumerate(RULES)]

    def joins(decoder, step):
        if step == 2:
            decoder.add(request(pipe, 20, LowConfidenceScheduler(), CACHES["token"]()))
            decoder.add(request(pipe, 21, ThresholdScheduler(threshold=0.1), CACHES["dual"](), schedule=(64, 8, 64)))
        if step == 4:
            decoder.cancel({"21"})

    want = decode(pipe, make_requests, joins)
    got = decode(pipe, make_requests, joins, graphs="buckets", buckets=Buckets(tokens=8, keys=16, queries=4))
    assert sorted(got) == sorted(want) and "21" not in got
    for i, f in want.items():
        assert torch.equal(got[i].sequence, f.sequence), i
        assert torch.equal(got[i].commit_step, f.commit_step), i
    # a lone request too (the unpadded step reads its keys as a view; the padded one gathers them)
    lone = lambda: [request(pipe, 1, LowConfidenceScheduler(), CACHES["token"]())]  # noqa: E731
    assert torch.equal(decode(pipe, lone, graphs="buckets")["1"].sequence, decode(pipe, lone)["1"].sequence)


def test_block_diffusion_steps_padded_to_buckets_decode_the_same_tokens(sdar_pipe):  # noqa: F811
    """Block diffusion rows (an attention row per fed block, each with its own key limit; LLaDA2.1's
    token editing among the schedulers) on a NaN-filled pool: padded, each gets its tokens."""
    items = [(i, name) for i, name in enumerate(BLOCK_SCHEDULERS)]
    results = []
    for options in ({}, {"graphs": "buckets", "buckets": Buckets(tokens=8, keys=16, queries=4)}):
        requests = [block_request(sdar_pipe, i, BLOCK_SCHEDULERS[n](), CACHES["freecache"](), bool(i % 2))
                    for i, n in items]  # fmt: skip
        decoder = BatchedDecoder(sdar_pipe.model, sdar_pipe.tokenizer.eos_token_id, **options)
        results.append(run_decoder(decoder, requests))
    for i, _ in items:
        assert torch.equal(results[0][str(i)].sequence, results[1][str(i)].sequence), i
        assert torch.equal(results[0][str(i)].commit_step, results[1][str(i)].commit_step), i


def test_pad_step_shapes_and_refusals(pipe):  # noqa: F811
    decoder = BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id)
    for i in range(3):
        decoder.add(request(pipe, i, LowConfidenceScheduler(), CACHES["token"]()))
    step = decoder.batch.plan()
    sizes = Buckets().sizes(step)
    padded = pad_step(step, sizes)
    t_b, r_b, k_b, n_b, m_b = sizes
    assert padded.input_ids.shape == (t_b,) and padded.key_slots.shape == (r_b, k_b) and padded.max_queries == n_b
    assert padded.logit_index.shape == (m_b,) and padded.tokens == t_b >= step.tokens
    # every padded token is a query of a scratch row whose one valid key is the null slot
    scratch = padded.query_row[step.tokens :]
    assert bool((scratch >= step.key_slots.shape[0]).all()) and bool(padded.key_valid[scratch, 0].all())
    assert bool((padded.slots[step.tokens :] == 0).all())
    with pytest.raises(ValueError, match="smaller than the step's"):
        pad_step(step, (step.tokens - 1, r_b, k_b, n_b, m_b))
    with pytest.raises(ValueError, match="graphs='warp'"):
        BatchedDecoder(pipe.model, None, graphs="warp")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs the model on a CUDA device"):
            BatchedDecoder(pipe.model, None, graphs="cuda")
    from dlmcache.testing import tiny_llada_moe

    with pytest.raises(ValueError, match="reads the host in its forward"):
        BatchedDecoder(tiny_llada_moe(), None, graphs="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_decode_what_eager_steps_decode(tiny_tokenizer):
    """On a GPU: the same requests through replayed graphs and through eager steps (float32 on one
    device: the same kernels, so the same tokens), with a join that changes the bucket."""
    from dlmcache import DLMPipeline
    from tests.helpers import tiny_llada

    model = tiny_llada(tiny_tokenizer).cuda()
    gpu = DLMPipeline(model=model, tokenizer=tiny_tokenizer, scheduler=LowConfidenceScheduler())
    make = lambda: [request(gpu, i, LowConfidenceScheduler(), CACHES[r]()) for i, r in enumerate(RULES)]  # noqa: E731
    eager = decode(gpu, make, graphs="buckets")
    graphed = BatchedDecoder(model, tiny_tokenizer.eos_token_id, graphs="cuda")
    done = run(graphed, make())
    assert len(graphed._graphed.graphs) >= 1
    for i, f in eager.items():
        assert torch.equal(done[i].sequence, f.sequence), i
