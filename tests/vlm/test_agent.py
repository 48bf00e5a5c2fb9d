"""GUIAgentSession: reusing the cache equals re-prefilling, compression to the budget, screenshot
history, validation, atomic steps, teacher forcing, and the methods by name."""

import math

import pytest
import torch
from dlmcache.vlm.guikv import GUIKV
from dlmcache.vlm.prefixkv import (
    PrefixKV,
)
from dlmcache.vlm.tiny import tiny_vlm
from PIL import Image

from tests.vlm.helpers import session_run, shot


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_session_reusing_the_cache_equals_reprefilling_every_turn(kind, processor):
    from dlmcache.vlm.agent import GUIAgentSession

    model = tiny_vlm(processor, kind, seed=1)
    reuse = GUIAgentSession(model, processor, max_new_tokens=5)
    again = GUIAgentSession(model, processor, max_new_tokens=5, reuse_cache=False)
    texts_a, logits_a = session_run(reuse)
    texts_b, logits_b = session_run(again)
    assert texts_a == texts_b
    for a, b in zip(logits_a, logits_b, strict=True):  # M-RoPE positions stay right across turns
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [s.prefill_tokens for s in reuse.stats][1:] < [s.prefill_tokens for s in again.stats][1:]
    assert reuse.stats[-1].seen_tokens == again.stats[-1].seen_tokens


def test_session_compression_shrinks_the_cache_to_the_budget(processor):
    from dlmcache.vlm.agent import GUIAgentSession

    model = tiny_vlm(processor, "qwen2_vl", seed=2)
    full = GUIAgentSession(model, processor, max_new_tokens=4)
    gui = GUIAgentSession(model, processor, compression=GUIKV(budget=0.2), max_new_tokens=4)
    session_run(full)
    session_run(gui)
    for f, g in zip(full.stats, gui.stats, strict=True):
        assert g.kv_bytes <= 0.25 * f.kv_bytes
        assert g.seen_tokens == f.seen_tokens
    for layer in gui.cache.layers:  # after the last turn's prefill: floor(0.2 * seen), then decoded tokens
        prefill_seen = gui.stats[-1].seen_tokens - (gui.stats[-1].generated_tokens - 1)
        assert layer.valid.sum() == 2 * (math.floor(0.2 * prefill_seen) + gui.stats[-1].generated_tokens - 1)
    gui.reset()
    assert gui.cache is None and gui.stats == [] and gui.screenshots == 0


def test_session_keeps_at_most_max_screenshots(processor):
    from dlmcache.vlm.agent import GUIAgentSession

    model = tiny_vlm(processor, "qwen2_vl", seed=2)
    session = GUIAgentSession(model, processor, max_screenshots=2, max_new_tokens=3)
    session_run(session, turns=3)
    for layer in session.cache.layers:
        stored = layer.tags[layer.valid]
        assert not (stored == 0).any() and (stored == 1).any() and (stored == 2).any()
    assert session.stats[-1].screenshots_in_context == 2


def test_session_validation(processor):
    from dlmcache.kernels.policies import SnapKV
    from dlmcache.vlm.agent import GUIAgentSession

    model = tiny_vlm(processor, "qwen2_vl")
    with pytest.raises(ValueError, match="needs budget"):
        GUIAgentSession(model, processor, compression=SnapKV())
    with pytest.raises(ValueError, match="max_screenshots"):
        GUIAgentSession(model, processor, max_screenshots=0)
    with pytest.raises(TypeError, match="get_rope_index"):
        GUIAgentSession(torch.nn.Linear(2, 2), processor)
    with pytest.raises(ValueError, match="instruction"):
        GUIAgentSession(model, processor).step(shot(0), "  ")
    session = GUIAgentSession(model, processor, compression=SnapKV(window=4), budget=0.3, max_new_tokens=2)
    session.step(shot(0), "Open settings")
    assert session.stats[0].kept_tokens == pytest.approx(math.floor(0.3 * session.stats[0].prefill_tokens) + 1)


@pytest.mark.parametrize("reuse_cache", [True, False])
def test_a_failed_step_leaves_the_session_as_it_was(reuse_cache, processor, monkeypatch):
    """A step with out-of-vocabulary action_ids used to leave the session broken (KeyError:
    'generated' on the next step); so did any error after the prefill."""
    from dlmcache.kernels.policies import SnapKV
    from dlmcache.vlm.agent import GUIAgentSession

    model = tiny_vlm(processor, "qwen2_vl", seed=5)

    def session():
        return GUIAgentSession(model, processor, compression=SnapKV(window=4), budget=0.5, max_new_tokens=3,
                               reuse_cache=reuse_cache)  # fmt: skip

    clean, hurt = session(), session()
    clean.step(shot(0), "Click button 0")
    hurt.step(shot(0), "Click button 0")
    vocab = model.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match="action_ids has ids outside the vocabulary"):
        hurt.step(shot(1), "Click button 1", action_ids=[5, vocab + 3])
    with pytest.raises(ValueError, match="screenshot has size 0x0"):
        hurt.step(Image.new("RGB", (0, 0)), "Click button 1")
    with pytest.raises(TypeError, match="screenshot must be a PIL image"):
        hurt.step("shot.png", "Click button 1")
    # an error inside the step, after the new turn's prefill wrote into the cache
    with monkeypatch.context() as m:
        m.setattr(GUIAgentSession, "_decode", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            hurt.step(shot(1), "Click button 1")
    assert len(hurt.history) == len(clean.history) == 1 and len(hurt.stats) == 1
    assert hurt.cache.get_seq_length() == clean.cache.get_seq_length()
    for t in (1, 2):
        assert hurt.step(shot(t), f"Click button {t}") == clean.step(shot(t), f"Click button {t}")
        torch.testing.assert_close(hurt.last_logits, clean.last_logits, rtol=0, atol=0)
    assert [s.seen_tokens for s in hurt.stats] == [s.seen_tokens for s in clean.stats]


def test_session_teacher_forcing_measures_agreement(processor):
    from dlmcache.vlm.agent import GUIAgentSession

    model = tiny_vlm(processor, "qwen2_vl", seed=4)
    ref = GUIAgentSession(model, processor, max_new_tokens=4)
    texts, _ = session_run(ref, turns=2)
    actions = [turn["generated"] for turn in ref.history]
    again = GUIAgentSession(model, processor, max_new_tokens=4)
    for t in range(2):
        assert again.step(shot(t), f"Click button {t}", action_ids=actions[t]) == texts[t]
        assert again.last_agreement == 1.0
    other = [list(reversed(a)) for a in actions]
    forced = GUIAgentSession(model, processor, max_new_tokens=4)
    forced.step(shot(0), "Click button 0", action_ids=other[0])
    assert forced.history[-1]["generated"] == other[0]
    assert forced.last_agreement < 1.0 or other[0] == actions[0]


def test_methods_by_name(processor):
    from dlmcache.kernels.policies import SnapKV, StreamingLLM
    from dlmcache.vlm.methods import METHODS, session_compression

    assert METHODS == ("GUI-KV", "PrefixKV", "SnapKV", "StreamingLLM")
    assert isinstance(session_compression("GUI-KV", 0.2)["compression"], GUIKV)
    snap = session_compression("SnapKV", 0.2)
    assert isinstance(snap["compression"], SnapKV) and snap["budget"] == 0.2
    assert isinstance(session_compression("StreamingLLM", 0.3)["compression"], StreamingLLM)
    model = tiny_vlm(processor, "qwen2_vl")
    chats = [[{"role": "user", "content": [{"type": "image", "image": shot(0)}, {"type": "text", "text": "Go."}]}]]
    prefix = session_compression("PrefixKV", 0.25, model, processor, chats)["compression"]
    assert isinstance(prefix, PrefixKV) and prefix.budget == 0.25
    with pytest.raises(ValueError, match="calibrated first"):
        session_compression("PrefixKV", 0.25)
    with pytest.raises(ValueError, match="unknown method 'H3O'"):
        session_compression("H3O", 0.25)
