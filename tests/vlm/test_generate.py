"""GUI-KV and PrefixKV inside generate on tiny random Qwen2-VL / Qwen2.5-VL models and a text-only
Llama."""

import pytest
import torch
from dlmcache.kernels.cache import CompressedCache, cache_argument
from dlmcache.vlm.guikv import GUIKV, screenshot_tags
from dlmcache.vlm.prefixkv import (
    PrefixKV,
    calibrate,
)
from dlmcache.vlm.tiny import tiny_vlm

from tests.helpers import tiny_llama
from tests.vlm.helpers import two_screenshot_batch


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_guikv_and_prefixkv_in_generate_keep_their_budget(kind, processor):
    model = tiny_vlm(processor, kind)
    inp = two_screenshot_batch(processor)
    length = inp["input_ids"].shape[1]
    tags = screenshot_tags(inp["input_ids"], model.config.image_token_id)
    assert tags.max() == 1
    guikv = CompressedCache(
        policy=GUIKV(budget=0.25), budget=0.25, model=model, token_tags=tags, attention_mask=inp["attention_mask"]
    )
    out = model.generate(**inp, **cache_argument(guikv), max_new_tokens=3, do_sample=False)
    guikv.detach()
    assert out.shape == (2, length + 3)
    for layer in guikv.layers:  # floor(L / 4) kept per row and KV head, then 2 decoded tokens
        assert (layer.valid[..., :-2].sum(-1) == length // 4).all()
    full_bytes = sum(
        2 * layer.keys.shape[0] * layer.keys.shape[1] * (length + 2) * layer.keys.shape[3] * 4 for layer in guikv.layers
    )
    assert guikv.nbytes < 0.3 * full_bytes  # stored at the KV-head count: memory shrinks by the budget

    single = {k: v[:1] for k, v in inp.items() if k not in ("pixel_values", "image_grid_thw")}
    single.update(
        pixel_values=inp["pixel_values"][: inp["pixel_values"].shape[0] // 2], image_grid_thw=inp["image_grid_thw"][:2]
    )
    single = {
        k: v[:, -int(inp["attention_mask"][0].sum()) :]
        if k in ("input_ids", "attention_mask", "mm_token_type_ids")
        else v
        for k, v in single.items()
    }
    profile = calibrate(model, processor, [single], budget=0.3)
    assert len(profile.keep_ratios) == model.config.text_config.num_hidden_layers
    cache = PrefixKV(profile).cache(model, attention_mask=inp["attention_mask"])
    model.generate(**inp, **cache_argument(cache), max_new_tokens=2, do_sample=False)
    cache.detach()
    for i, layer in enumerate(cache.layers):
        assert (layer.valid[..., :-1].sum(-1) == max(1, round(profile.keep_ratios[i] * length))).all()


def test_full_budget_guikv_generates_what_the_full_cache_does(processor):
    model = tiny_vlm(processor, "qwen2_vl", seed=3)
    inp = two_screenshot_batch(processor)
    want = model.generate(**inp, max_new_tokens=6, do_sample=False)
    tags = screenshot_tags(inp["input_ids"], model.config.image_token_id)
    cache = CompressedCache(
        policy=GUIKV(budget=1.0), budget=1.0, model=model, token_tags=tags, attention_mask=inp["attention_mask"]
    )
    got = model.generate(**inp, **cache_argument(cache), max_new_tokens=6, do_sample=False)
    cache.detach()
    assert torch.equal(got, want)


def test_guikv_and_prefixkv_on_a_text_only_model():
    model = tiny_llama(hidden_size=64, num_hidden_layers=2)
    ids = torch.randint(1, 200, (2, 40))
    cache = CompressedCache(policy=GUIKV(), budget=0.25, model=model)
    model.generate(ids, **cache_argument(cache), max_new_tokens=2, do_sample=False)
    cache.detach()
    assert cache.stored_tokens() == [11, 11]
    profile = calibrate(model, None, [{"input_ids": ids[:1]}], budget=0.25)
    cache = PrefixKV(profile).cache(model)
    model.generate(ids, **cache_argument(cache), max_new_tokens=2, do_sample=False)
    cache.detach()
    assert sum(cache.stored_tokens()) - 2 == sum(round(r * 40) for r in profile.keep_ratios)
