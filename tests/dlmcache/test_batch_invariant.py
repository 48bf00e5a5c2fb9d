"""Batch-invariant mode (`set_batch_invariant`): a request's logits at every step are the same bits in
a batch (with joins mid-flight) as alone, in float32 and bfloat16, for every cache rule and for block
diffusion, and for mixture-of-experts models."""

import pytest
import torch

from dlmcache import LowConfidenceScheduler
from dlmcache.cache import BlockCache, FreeCache, make_cache
from dlmcache.engine import Request
from dlmcache.testing import (
    engine_logits,
    tiny_dream,
    tiny_llada,
    tiny_llada2,
    tiny_llada_moe,
    tiny_sdar,
    tiny_sdar_moe,
)
from tests.dlmcache.test_engine import CACHES as ENGINE_CACHES

PROMPTS = [[5, 9, 14], list(range(20, 37)), [7], list(range(40, 50))]
SCHEDULES = [(24, 8, 12), (16, 16, 16), (24, 12, 6), (16, 4, 8)]  # (new tokens, block, steps)
CACHES = ENGINE_CACHES  # every cache rule of the engine tests, compressed prompts included


def requests(rule, schedules=SCHEDULES):
    return [Request(PROMPTS[i], g, b, s, LowConfidenceScheduler(), rule(), id=str(i))
            for i, (g, b, s) in enumerate(schedules)]  # fmt: skip


def assert_invariant(model, make, **options):
    together = engine_logits(model, make(), join_at=2, **options)
    for r in make():
        alone = engine_logits(model, [r], **options)[r.id]
        assert len(alone) == len(together[r.id]) > 0
        for step, (a, b) in enumerate(zip(alone, together[r.id], strict=True)):
            assert torch.equal(a, b), (r.id, step, (a.float() - b.float()).abs().max().item())


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request):
    built = (tiny_llada if request.param == "llada" else tiny_dream)(seed=3)
    built.set_batch_invariant(True)
    return built


@pytest.mark.parametrize("cache", list(CACHES))
def test_a_requests_logits_are_the_same_bits_alone_and_in_a_batch(model, cache):
    assert_invariant(model, lambda: requests(lambda: CACHES[cache]()))


@pytest.mark.parametrize("build", [tiny_llada_moe, tiny_llada2, tiny_sdar_moe], ids=lambda b: b.__name__)
def test_mixture_of_experts(build):
    """The experts' products (each expert a different number of a step's tokens) and LLaDA2's float32
    gate: every step's logits the same bits alone and in a batch."""
    model = build(seed=7)
    model.set_batch_invariant(True)
    if model.block_diffusion:
        schedules = [(16, 4, 8), (16, 8, 8), (8, 4, 4), (16, 4, 16)]
        assert_invariant(model, lambda: requests(lambda: BlockCache(make_cache("freecache")), schedules))
    else:
        assert_invariant(model, lambda: requests(lambda: CACHES["token"]()))


def test_steps_padded_to_shape_buckets():
    """`graphs="buckets"` (the shapes `--graphs cuda` captures): padded tokens, attention rows and keys
    change nothing in a row's bits."""
    model = tiny_llada(seed=8)
    model.set_batch_invariant(True)
    assert_invariant(model, lambda: requests(lambda: CACHES["token"]()), graphs="buckets")


def test_bfloat16_and_block_diffusion():
    bf16 = tiny_llada(seed=4, dtype=torch.bfloat16)
    bf16.set_batch_invariant(True)
    assert_invariant(bf16, lambda: requests(lambda: FreeCache(freeze="token", suffix_window=0)))
    block = tiny_sdar(seed=5)
    block.set_batch_invariant(True)
    schedules = [(16, 4, 8), (16, 8, 8), (8, 4, 4), (16, 4, 16)]
    assert_invariant(block, lambda: requests(lambda: BlockCache(make_cache("freecache")), schedules))


@pytest.mark.parametrize("linear", ["torch", "onednn"])
def test_a_projection_gives_each_row_its_bits_alone(linear):
    """In the mode a projection's rows are the same bits in any batch as alone (and the products
    torch's, up to rounding), with plain and with oneDNN-packed weights; off, every flag is off."""
    from dlmcache.models.layers import Linear, RMSNorm, onednn_dtypes

    if linear == "onednn" and not onednn_dtypes():
        pytest.skip("this torch build has no oneDNN linear")
    model = tiny_llada(seed=1)
    model.set_linear_backend(linear)
    model.set_batch_invariant(True)
    block = model.model.transformer.blocks[0]
    for module, width in (
        (model.model.transformer.ff_out, model.config.d_model),
        (block.ff_out, block.ff_out.in_features),
    ):
        x = torch.randn(37, width)
        together = module(x)
        alone = torch.cat([module(x[i : i + 1]) for i in range(len(x))])
        assert torch.equal(together, alone)
        assert torch.equal(module(x[None])[0], together)  # leading dims are rows too
        torch.testing.assert_close(together, torch.nn.functional.linear(x, module.weight), rtol=1e-5, atol=1e-5)
    assert all(m.batch_invariant for m in model.modules() if isinstance(m, (Linear, RMSNorm)))
    model.set_batch_invariant(False)
    assert not any(m.batch_invariant for m in model.modules() if isinstance(m, (Linear, RMSNorm)))


def test_a_bad_flag_is_refused_by_name():
    with pytest.raises(TypeError, match="enabled='yes'"):
        tiny_llada().set_batch_invariant("yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path (Triton matmul and norm) needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cuda_path_gives_the_same_bits_alone_and_in_a_batch(dtype):
    model = tiny_llada(seed=6, dtype=dtype).cuda()
    model.set_batch_invariant(True)
    for make in (CACHES["token"], CACHES["dual"]):
        assert_invariant(model, lambda make=make: requests(lambda: make()))
