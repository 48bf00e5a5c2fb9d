"""CompressedCache as a transformers cache: attaching is scoped and leaves the model working,
compress_every works for every policy it accepts (and refuses the others up front), and bad
arguments are refused at construction or at the prefill with the value named."""

import gc

import pytest
import torch
from dlmcache.kernels.cache import CompressedCache, cache_argument
from dlmcache.kernels.policies import EVICTION, H2O, KIVI, KNorm, Pyramid, SnapKV, StreamingLLM, get_policy
from dlmcache.kernels.policies.base import resolve_budget

from tests.helpers import tiny_llama


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_an_attached_model_still_works_normally_and_is_restored_when_the_cache_goes():
    """The README's `CompressedCache(..., model=model)` used to leave the model broken: a later plain
    forward raised ReferenceError (cache collected) or RuntimeError (cache alive)."""
    model = tiny_llama()
    ids, other = torch.randint(1, 200, (1, 24)), torch.randint(1, 200, (2, 17))
    want = _logits(model, other)
    own = model.config._attn_implementation
    cache = CompressedCache(policy=SnapKV(window=8), budget=0.5, model=model)
    model.generate(ids, **cache_argument(cache), max_new_tokens=3, do_sample=False)
    assert model.config._attn_implementation == f"dlmcache_{own}"
    assert torch.equal(_logits(model, other), want)  # cache alive: other forwards are untouched
    model.generate(other, max_new_tokens=2, do_sample=False)  # and generate with its own cache
    del cache
    gc.collect()
    assert model.config._attn_implementation == own
    assert torch.equal(_logits(model, other), want)


def test_with_block_detaches_and_attachments_are_counted():
    model = tiny_llama()
    own = model.config._attn_implementation
    ids = torch.randint(1, 200, (1, 24))
    with CompressedCache(policy=SnapKV(window=8), budget=0.5, model=model) as first:
        second = CompressedCache(policy=SnapKV(window=8), budget=0.5, model=model)
        model.generate(ids, **cache_argument(first), max_new_tokens=2, do_sample=False)
    assert model.config._attn_implementation == f"dlmcache_{own}"  # `second` still needs the routing
    model.generate(ids, **cache_argument(second), max_new_tokens=2, do_sample=False)
    assert max(second.stored_tokens()) <= 12 + 1
    second.detach()
    second.detach()  # idempotent
    assert model.config._attn_implementation == own


def _refusal(name: str) -> str | None:
    """Why `compress_every` is refused for a registry policy (None: it is accepted)."""
    try:
        CompressedCache(policy=get_policy(name), budget=0.25, compress_every=4)
    except ValueError as e:
        assert "compress_every=4" in str(e)
        return str(e)
    return None


AR_EVICTION = sorted(cls.name for cls in EVICTION if "mask_queries" not in cls.needs)  # MaskKV: diffusion LMs only


def test_maskkv_is_refused_by_an_autoregressive_cache():
    with pytest.raises(ValueError, match="MaskKV reads the still-masked answer positions' queries"):
        CompressedCache(policy=get_policy("maskkv"), budget=0.5)


@pytest.mark.parametrize("name", AR_EVICTION)
def test_compress_every_works_for_every_policy_it_accepts(name):
    """It used to raise a size mismatch for key-only policies with the model attached and to be
    ignored silently for query policies."""
    refused = _refusal(name)
    if refused:  # before any decoding, naming the policy and what it would need
        assert type(get_policy(name)).__name__ in refused and "which decoding steps do not provide" in refused
        return
    model = tiny_llama()
    ids = torch.randint(1, 200, (2, 32))
    cache = CompressedCache(policy=get_policy(name), budget=0.25, compress_every=4, model=model)
    model.generate(ids, **cache_argument(cache), max_new_tokens=13, do_sample=False)
    cache.detach()
    for layer in cache.layers:
        # 44 tokens seen; the last compression (of everything seen then) was at most 4 steps ago
        kept = layer.valid.sum(-1).float().mean()
        assert kept <= resolve_budget(0.25, layer.seen) + 4, (name, layer.layer_idx, kept)


def test_compress_every_refuses_what_decoding_cannot_feed():
    assert _refusal("h2o") and "all_queries" in _refusal("h2o")
    assert _refusal("retrieval_attention") and "recall" in _refusal("retrieval_attention")
    with pytest.raises(ValueError, match="quantize them twice"):
        CompressedCache(policy=KNorm(), budget=0.5, quantizer=KIVI(), compress_every=8)
    with pytest.raises(ValueError, match="needs an eviction policy"):
        CompressedCache(budget=0.5, compress_every=8)
    for name in ("streaming_llm", "knorm", "snapkv", "tova"):
        assert _refusal(name) is None, name


def test_compress_every_with_key_only_and_query_policies_in_generate():
    model = tiny_llama()
    ids = torch.randint(1, 200, (1, 40))
    for policy in (StreamingLLM(), KNorm(), SnapKV(window=8)):
        cache = CompressedCache(policy=policy, budget=10, compress_every=5, model=model)
        model.generate(ids, **cache_argument(cache), max_new_tokens=11, do_sample=False)
        cache.detach()
        assert all(n <= 10 + 5 for n in cache.stored_tokens()), (policy, cache.stored_tokens())


def test_bad_arguments_are_refused_at_construction():
    with pytest.raises(TypeError, match="quantizer must be a QuantizationPolicy, got str"):
        CompressedCache(quantizer="kivi")
    with pytest.raises(TypeError, match="allocator must be a BudgetAllocator, got SnapKV"):
        CompressedCache(policy=SnapKV(), allocator=SnapKV(), budget=0.5)
    with pytest.raises(TypeError, match="policy must be an EvictionPolicy, got Pyramid"):
        CompressedCache(policy=Pyramid(), budget=0.5)
    with pytest.raises(ValueError, match=r"attention_mask must be a \[batch, length\]"):
        CompressedCache(policy=KNorm(), budget=0.5, attention_mask=torch.ones(1, 1, 8))
    with pytest.raises(ValueError, match="attention_mask"):
        CompressedCache(policy=KNorm(), budget=0.5, attention_mask=torch.ones(1, 8))  # float
    with pytest.raises(TypeError, match="token_tags"):
        CompressedCache(policy=KNorm(), budget=0.5, token_tags=[[0, 1]])
    with pytest.raises(ValueError, match="compress_every=True"):
        CompressedCache(policy=KNorm(), budget=0.5, compress_every=True)
    with pytest.raises(TypeError, match="capture_queries"):
        CompressedCache(capture_queries=1)


def test_wrong_shaped_masks_and_tags_are_errors_not_ignored():
    model = tiny_llama()
    ids = torch.randint(1, 200, (2, 16))
    bad_mask = CompressedCache(
        policy=H2O(), budget=0.5, model=model, attention_mask=torch.ones(2, 15, dtype=torch.long)
    )
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 15\) but the prefill is \[2, 16\]"):
        model.generate(ids, **cache_argument(bad_mask), max_new_tokens=2)
    bad_mask.detach()
    bad_tags = CompressedCache(policy=KNorm(), budget=0.5, token_tags=torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_tags has shape \(1, 16\) but the segment is \[2, 16\]"):
        model.generate(ids, **cache_argument(bad_tags), max_new_tokens=2)


def test_tags_label_only_the_segment_they_were_set_for():
    model = tiny_llama()
    ids = torch.randint(1, 200, (1, 16))
    tags = torch.arange(16)[None]
    cache = CompressedCache(policy=StreamingLLM(), budget=1.0, token_tags=tags)
    model.generate(ids, **cache_argument(cache), max_new_tokens=3, do_sample=False)
    layer = cache.layers[0]
    assert torch.equal(layer.tags[0, 0], torch.cat([torch.arange(16), torch.full((2,), -1)]))
