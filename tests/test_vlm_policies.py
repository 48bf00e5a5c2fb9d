"""GUI-KV and PrefixKV against their rules written out on hand-made tensors, and inside generate on
tiny random Qwen2-VL / Qwen2.5-VL models and a text-only Llama."""

import math

import pytest
import torch
import torch.nn.functional as F
from dlmcache.kernels.cache import CompressedCache
from dlmcache.kernels.policies import ScoreInputs
from dlmcache.vlm.guikv import GUIKV, screenshot_tags
from dlmcache.vlm.prefixkv import (
    PrefixKV,
    PrefixKVBudget,
    PrefixKVProfile,
    PrefixKVScore,
    calibrate,
    prefix_keep_counts,
)
from dlmcache.vlm.tiny import tiny_processor, tiny_vlm
from PIL import Image, ImageDraw

from tests.helpers import tiny_llama

# ---------------------------------------------------------------- GUI-KV rule


def test_screenshot_tags_number_runs_of_image_tokens():
    ids = torch.tensor([[1, 7, 7, 2, 7, 7, 7, 3], [7, 2, 2, 2, 2, 2, 7, 7]])
    assert screenshot_tags(ids, 7).tolist() == [[-1, 0, 0, -1, 1, 1, 1, -1], [0, -1, -1, -1, -1, -1, 1, 1]]


def _guikv_inputs(seed=0, b=1, h=2, g=2, length=20, d=8, w=4, hidden=6):
    gen = torch.Generator().manual_seed(seed)
    tags = torch.full((b, length), -1)
    tags[:, 2:8] = 0  # previous screenshot: 6 tokens
    tags[:, 10:16] = 1  # current screenshot: 6 tokens
    return ScoreInputs(
        keys=torch.randn(b, h, length, d, generator=gen),
        values=torch.randn(b, h, length, d, generator=gen),
        queries=torch.randn(b, h * g, w, d, generator=gen),
        hidden=torch.randn(b, length, hidden, generator=gen) * torch.linspace(0.5, 3, length)[:, None],
        tags=tags[:, None].expand(-1, h, -1),
        budget=10,
    )


def _reference_guikv(inp, window, alpha, tau, rank, subspace):
    """GUI-KV's psi written out token by token."""
    b, hq, _, d = inp.queries.shape
    h, length = inp.heads, inp.length
    g = hq // h
    psi = torch.zeros(b, h, length)
    for bi in range(b):
        for hi in range(h):
            att = torch.zeros(length)
            for gi in range(g):
                q = inp.queries[bi, hi * g + gi, -window:]
                for wi in range(window):
                    pos = length - window + wi
                    s = (inp.keys[bi, hi, : pos + 1] @ q[wi]) / math.sqrt(d)
                    att[: pos + 1] += s.softmax(0) / g
            psi[bi, hi] = F.avg_pool1d(att[None, None], 5, 1, 2, count_include_pad=False)[0, 0]
        tags = inp.tags[bi, 0]
        cur = (tags == 1).nonzero().flatten()
        r = inp.hidden[bi, cur].norm(dim=-1)
        z = (r - r.mean()) / (r.std(unbiased=False) + 1e-8)
        psi[bi, :, cur] += alpha * (z / tau).softmax(0)
        prev = (tags == 0).nonzero().flatten()
        n_drop = math.floor((1 - inp.budget / length) * len(prev))
        for hi in range(h):
            kc = inp.keys[bi, hi, cur]
            if subspace == "qr":
                basis = torch.linalg.qr(kc.T).Q[:, : min(rank, *kc.shape)]
            else:
                basis = torch.linalg.svd(kc, full_matrices=False).Vh[: min(rank, *kc.shape)].T
            rho = torch.stack([(inp.keys[bi, hi, j] - basis @ (basis.T @ inp.keys[bi, hi, j])).norm() for j in prev])
            psi[bi, hi, prev[rho.argsort()[:n_drop]]] = 0
    return psi


@pytest.mark.parametrize("subspace", ["qr", "svd"])
def test_guikv_score_is_the_rule(subspace):
    inp = _guikv_inputs()
    pol = GUIKV(window=4, alpha=2.0, temperature=3.5, rank=3, subspace=subspace)
    want = _reference_guikv(inp, 4, 2.0, 3.5, 3, subspace)
    torch.testing.assert_close(pol.score(inp), want, rtol=1e-5, atol=1e-6)
    # floor((1 - 10/20) * 6) = 3 previous-screenshot tokens zeroed per head
    assert ((pol.score(inp)[0, :, 2:8] == 0).sum(-1) == 3).all()
    kept = pol.select(inp, 10)
    assert (kept[..., -4:] == torch.arange(16, 20)).all()  # the observation window


def test_guikv_saliency_favours_high_norm_tokens_and_qr_differs_from_svd():
    inp = _guikv_inputs()
    no_att = GUIKV(window=4, rank=3, alpha=1000.0)  # saliency dominates
    top = no_att.score(inp)[0, 0, 10:16].argmax()
    assert top == inp.hidden[0, 10:16].norm(dim=-1).argmax()
    qr = GUIKV(window=4, rank=3, subspace="qr").score(inp)
    svd = GUIKV(window=4, rank=3, subspace="svd").score(inp)
    assert not torch.equal(qr, svd)


def test_guikv_without_screenshots_is_pooled_window_attention():
    inp = _guikv_inputs()
    inp.tags = None
    from dlmcache.kernels.policies import SnapKV

    torch.testing.assert_close(GUIKV(window=4).score(inp), SnapKV(window=4, kernel=5).score(inp))


def test_guikv_validation():
    for kwargs, match in (({"budget": 0.0}, "budget"), ({"subspace": "pca"}, "subspace"), ({"kernel": 4}, "kernel")):
        with pytest.raises(ValueError, match=match):
            GUIKV(**kwargs)


# ---------------------------------------------------------------- PrefixKV rule


def test_prefix_keep_counts_equalise_attention_mass():
    # layer 0 concentrated (a few tokens hold the mass), layer 1 flat
    concentrated = torch.tensor([10.0, 5.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5])
    flat = torch.ones(8)
    counts = prefix_keep_counts([concentrated, flat], budget=0.5, protect=1)
    assert sum(counts) == 8
    assert counts[0] < counts[1]
    # both layers keep (about) the same fraction p of their attention mass
    mass0 = concentrated.sort(descending=True).values[: counts[0]].sum() / concentrated.sum()
    mass1 = counts[1] / 8
    assert abs(mass0 - mass1) < 0.2
    assert prefix_keep_counts([flat, flat], budget=1.0) == [8, 8]
    with pytest.raises(ValueError, match="budget"):
        prefix_keep_counts([flat], budget=1.5)


def test_prefixkv_profile_round_trip_and_budgets(tmp_path):
    prof = PrefixKVProfile(keep_ratios=[0.4, 0.1, 0.3], budget=0.25, samples=2)
    prof.save(tmp_path / "p.json")
    back = PrefixKVProfile.load(tmp_path / "p.json")
    assert back == prof
    alloc = PrefixKVBudget(back)
    assert [alloc.layer_budget(0.25, 100, i, 3) for i in range(3)] == [40, 10, 30]
    with pytest.raises(ValueError, match="calibrated for 0.25"):
        alloc.validate(0.5)
    with pytest.raises(ValueError, match="keep_ratios"):
        PrefixKVProfile(keep_ratios=[0.0], budget=0.1)


def test_prefixkv_score_is_head_averaged_received_attention():
    gen = torch.Generator().manual_seed(0)
    inp = ScoreInputs(
        keys=torch.randn(1, 2, 10, 8, generator=gen),
        values=torch.randn(1, 2, 10, 8, generator=gen),
        queries=torch.randn(1, 4, 10, 8, generator=gen),
    )
    want = torch.zeros(10)
    for hq in range(4):
        k = inp.keys[0, hq // 2]
        for i in range(10):
            want[: i + 1] += (k[: i + 1] @ inp.queries[0, hq, i] / math.sqrt(8)).softmax(0) / 4
    s = PrefixKVScore(n_sink=1).score(inp)
    assert torch.isinf(s[0, :, 0]).all()
    torch.testing.assert_close(s[0, 0, 1:], want[1:], rtol=1e-5, atol=1e-6)
    assert torch.equal(s[0, 0], s[0, 1])  # one ranking for the layer


# ---------------------------------------------------------------- in generate, on tiny VLMs


def _shot(i: int) -> Image.Image:
    im = Image.new("RGB", (224, 224), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([10 + 6 * i, 10, 120, 70], fill=(30, 60, 200))
    d.rectangle([20, 120 + 4 * i, 200, 150], outline="black")
    return im


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def _two_screenshot_batch(processor):
    chats = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": _shot(0)},
                    {"type": "image", "image": _shot(1)},
                    {"type": "text", "text": "Compute 45+38-27."},
                ],
            }
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": _shot(2)},
                    {"type": "image", "image": _shot(3)},
                    {"type": "text", "text": "Open settings please."},
                ],
            }
        ],
    ]
    processor.tokenizer.padding_side = "left"
    return processor.apply_chat_template(
        chats, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True, padding=True
    )


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_guikv_and_prefixkv_in_generate_keep_their_budget(kind, processor):
    model = tiny_vlm(processor, kind)
    inp = _two_screenshot_batch(processor)
    length = inp["input_ids"].shape[1]
    tags = screenshot_tags(inp["input_ids"], model.config.image_token_id)
    assert tags.max() == 1
    guikv = CompressedCache(
        policy=GUIKV(budget=0.25), budget=0.25, model=model, token_tags=tags, attention_mask=inp["attention_mask"]
    )
    out = model.generate(**inp, past_key_values=guikv, max_new_tokens=3, do_sample=False)
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
    model.generate(**inp, past_key_values=cache, max_new_tokens=2, do_sample=False)
    cache.detach()
    for i, layer in enumerate(cache.layers):
        assert (layer.valid[..., :-1].sum(-1) == max(1, round(profile.keep_ratios[i] * length))).all()


def test_full_budget_guikv_generates_what_the_full_cache_does(processor):
    model = tiny_vlm(processor, "qwen2_vl", seed=3)
    inp = _two_screenshot_batch(processor)
    want = model.generate(**inp, max_new_tokens=6, do_sample=False)
    tags = screenshot_tags(inp["input_ids"], model.config.image_token_id)
    cache = CompressedCache(
        policy=GUIKV(budget=1.0), budget=1.0, model=model, token_tags=tags, attention_mask=inp["attention_mask"]
    )
    got = model.generate(**inp, past_key_values=cache, max_new_tokens=6, do_sample=False)
    cache.detach()
    assert torch.equal(got, want)


def test_guikv_and_prefixkv_on_a_text_only_model():
    model = tiny_llama(hidden_size=64, num_hidden_layers=2)
    ids = torch.randint(1, 200, (2, 40))
    cache = CompressedCache(policy=GUIKV(), budget=0.25, model=model)
    model.generate(ids, past_key_values=cache, max_new_tokens=2, do_sample=False)
    cache.detach()
    assert cache.stored_tokens() == [11, 11]
    profile = calibrate(model, None, [{"input_ids": ids[:1]}], budget=0.25)
    cache = PrefixKV(profile).cache(model)
    model.generate(ids, past_key_values=cache, max_new_tokens=2, do_sample=False)
    cache.detach()
    assert sum(cache.stored_tokens()) - 2 == sum(round(r * 40) for r in profile.keep_ratios)


# ---------------------------------------------------------------- the agent session


def _session_run(session, turns=3):
    texts, logits = [], []
    for t in range(turns):
        texts.append(session.step(_shot(t), f"Click button {t}"))
        logits.append(session.last_logits)
    return texts, logits


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_session_reusing_the_cache_equals_reprefilling_every_turn(kind, processor):
    from dlmcache.vlm.agent import GUIAgentSession

    model = tiny_vlm(processor, kind, seed=1)
    reuse = GUIAgentSession(model, processor, max_new_tokens=5)
    again = GUIAgentSession(model, processor, max_new_tokens=5, reuse_cache=False)
    texts_a, logits_a = _session_run(reuse)
    texts_b, logits_b = _session_run(again)
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
    _session_run(full)
    _session_run(gui)
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
    _session_run(session, turns=3)
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
        GUIAgentSession(model, processor).step(_shot(0), "  ")
    session = GUIAgentSession(model, processor, compression=SnapKV(window=4), budget=0.3, max_new_tokens=2)
    session.step(_shot(0), "Open settings")
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
    clean.step(_shot(0), "Click button 0")
    hurt.step(_shot(0), "Click button 0")
    vocab = model.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match="action_ids has ids outside the vocabulary"):
        hurt.step(_shot(1), "Click button 1", action_ids=[5, vocab + 3])
    with pytest.raises(ValueError, match="screenshot has size 0x0"):
        hurt.step(Image.new("RGB", (0, 0)), "Click button 1")
    with pytest.raises(TypeError, match="screenshot must be a PIL image"):
        hurt.step("shot.png", "Click button 1")
    # an error inside the step, after the new turn's prefill wrote into the cache
    with monkeypatch.context() as m:
        m.setattr(GUIAgentSession, "_decode", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            hurt.step(_shot(1), "Click button 1")
    assert len(hurt.history) == len(clean.history) == 1 and len(hurt.stats) == 1
    assert hurt.cache.get_seq_length() == clean.cache.get_seq_length()
    for t in (1, 2):
        assert hurt.step(_shot(t), f"Click button {t}") == clean.step(_shot(t), f"Click button {t}")
        torch.testing.assert_close(hurt.last_logits, clean.last_logits, rtol=0, atol=0)
    assert [s.seen_tokens for s in hurt.stats] == [s.seen_tokens for s in clean.stats]


def test_session_teacher_forcing_measures_agreement(processor):
    from dlmcache.vlm.agent import GUIAgentSession

    model = tiny_vlm(processor, "qwen2_vl", seed=4)
    ref = GUIAgentSession(model, processor, max_new_tokens=4)
    texts, _ = _session_run(ref, turns=2)
    actions = [turn["generated"] for turn in ref.history]
    again = GUIAgentSession(model, processor, max_new_tokens=4)
    for t in range(2):
        assert again.step(_shot(t), f"Click button {t}", action_ids=actions[t]) == texts[t]
        assert again.last_agreement == 1.0
    other = [list(reversed(a)) for a in actions]
    forced = GUIAgentSession(model, processor, max_new_tokens=4)
    forced.step(_shot(0), "Click button 0", action_ids=other[0])
    assert forced.history[-1]["generated"] == other[0]
    assert forced.last_agreement < 1.0 or other[0] == actions[0]


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_saved_checkpoint_loads_and_runs_the_benchmark(kind, processor, tmp_path):
    """The real-checkpoint path of scripts/bench_vlm.py (and the app) on a checkpoint written with the
    hub layout: config, safetensors weights, tokenizer, image processor, chat template."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from dlmcache.vlm.loading import load_vlm

    model = tiny_vlm(processor, kind, seed=5)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    loaded, proc = load_vlm(str(tmp_path / "ckpt"), torch.float32)
    inp = _two_screenshot_batch(processor)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inp).logits, model(**inp).logits)
    assert hasattr(proc, "image_processor")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(root / "scripts" / "bench_vlm.py"), "--model", str(tmp_path / "ckpt"),
         "--dtype", "float32", "--size", "224x224", "--turns", "2", "--budgets", "0.25", "--repeats", "1",
         "--max-new-tokens", "3", "--calibration", "1", "--threads", "1", "--out", str(out)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert results["full, reused"]["top1_agreement"] == 1.0
    assert results["GUI-KV 25%"]["kv_ratio"] <= 0.3
    turns = results["GUI-KV 25%"]["per_turn"]
    assert len(turns) == 2 and turns[1]["seen_tokens"] > turns[0]["seen_tokens"]
    assert out.with_suffix(".png").exists()
