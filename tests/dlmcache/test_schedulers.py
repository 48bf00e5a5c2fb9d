"""Each unmasking rule against the rule written out by hand, on hand-made logits."""

import pytest
import torch
import torch.nn.functional as F

from dlmcache.schedulers import (
    DreamScheduler,
    LowConfidenceScheduler,
    ThresholdScheduler,
    select_topk,
    transfer_quota,
)

V = 11


def llada_num_transfer_tokens(mask_index, steps):
    """LLaDA's get_num_transfer_tokens, written out: masks // steps each step, remainder first."""
    count = mask_index.sum(1, keepdim=True)
    base, rem = count // steps, count % steps
    out = base.repeat(1, steps)
    for i in range(count.shape[0]):
        out[i, : rem[i]] += 1
    return out


def llada_reference_step(logits, x, mask_index, k, temperature, remasking, generator):
    """One step of LLaDA's generate() on a block, row by row with torch.topk."""
    if temperature > 0:
        lg = logits.to(torch.float64)
        noise = torch.rand(lg.shape, dtype=torch.float64, generator=generator)
        x0 = (lg.exp() / (-torch.log(noise)) ** temperature).argmax(-1)
    else:
        x0 = logits.argmax(-1)
    if remasking == "low_confidence":
        conf = torch.gather(F.softmax(logits.to(torch.float64), dim=-1), -1, x0[..., None]).squeeze(-1)
    else:
        conf = torch.rand(x0.shape, generator=generator)
    x0 = torch.where(mask_index, x0, x)
    conf = torch.where(mask_index, conf, torch.tensor(float("-inf")))
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    for j in range(conf.shape[0]):
        _, idx = torch.topk(conf[j], k=int(k[j]))
        transfer[j, idx] = True
    out = x.clone()
    out[transfer] = x0[transfer]
    return out


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_low_confidence_whole_block_matches_llada(temperature, remasking):
    torch.manual_seed(0)
    b, n, steps, mask_id = 3, 10, 4, -1
    x = torch.randint(0, V, (b, n))
    x[0, :] = mask_id
    x[1, ::2] = mask_id
    x[2, 3:] = mask_id
    sched = LowConfidenceScheduler(remasking=remasking, temperature=temperature)
    ref = x.clone()
    plan = llada_num_transfer_tokens(ref == mask_id, steps)
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i in range(steps):
        logits = torch.randn(b, n, V, dtype=torch.float64)
        out = sched.step(logits, x, x == mask_id, i, steps, generator=g_ours)
        assert torch.equal(out.transfer_index.sum(1), plan[:, i])
        ref = llada_reference_step(logits, ref, ref == mask_id, plan[:, i], temperature, remasking, g_ref)
        x = out.prev_sample
        assert torch.equal(x, ref)
    assert not (x == mask_id).any()


def test_quota_equals_llada_split_for_every_count():
    for steps in (1, 3, 4, 7):
        for masks in range(0, 20):
            mask = torch.zeros(1, 20, dtype=torch.bool)
            mask[0, :masks] = True
            plan = llada_num_transfer_tokens(mask, steps)[0]
            for i in range(steps):
                assert transfer_quota(mask, i, steps).item() == plan[i]
                mask[0, mask[0].nonzero()[: plan[i]]] = False


def test_select_topk_rows_differ():
    score = torch.tensor([[0.1, 0.9, 0.5, float("-inf")], [0.3, 0.2, 0.8, 0.7]])
    got = select_topk(score, torch.tensor([2, 3]))
    assert got.tolist() == [[False, True, True, False], [True, False, True, True]]
    assert select_topk(score, torch.tensor([4, 0]))[0].tolist() == [True, True, True, False]


def dream_reference_counts(mask_index, i, steps, eps):
    timesteps = torch.linspace(1, eps, steps + 1)
    t, s = timesteps[i], timesteps[i + 1]
    m = mask_index.sum(1)
    return m if i == steps - 1 else (m * (1 - s / t)).long()


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_confidence_rules(alg):
    torch.manual_seed(0)
    b, n, steps = 2, 12, 5
    sched = DreamScheduler(alg=alg)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, :4] = False
    x = torch.zeros(b, n, dtype=torch.long)
    for i in range(steps):
        logits = torch.randn(b, n, V)
        out = sched.step(logits, x, mask, i, steps)
        probs = logits.softmax(-1)
        top = probs.sort(-1, descending=True).values
        conf = {
            "maskgit_plus": top[..., 0],
            "topk_margin": top[..., 0] - top[..., 1],
            "entropy": (probs * torch.log(probs + 1e-10)).sum(-1),
        }[alg].masked_fill(~mask, float("-inf"))
        k = dream_reference_counts(mask, i, steps, 1e-3)
        for r in range(b):
            expected = set(torch.topk(conf[r], int(k[r])).indices.tolist()) if k[r] else set()
            assert set(out.transfer_index[r].nonzero().flatten().tolist()) == expected
        assert torch.equal(out.x0, probs.argmax(-1))
        mask = mask & ~out.transfer_index
    assert not mask.any()


def test_dream_origin_transfers_with_probability():
    sched = DreamScheduler(alg="origin")
    mask = torch.ones(1, 4000, dtype=torch.bool)
    out = sched.step(
        torch.randn(1, 4000, V),
        torch.zeros(1, 4000, dtype=torch.long),
        mask,
        2,
        8,
        generator=torch.Generator().manual_seed(0),
    )
    ratio = sched.transfer_ratio(2, 8)
    timesteps = torch.linspace(1, 1e-3, 9)
    assert ratio == pytest.approx(float(1 - timesteps[3] / timesteps[2]), rel=1e-5)
    assert out.transfer_index.float().mean().item() == pytest.approx(ratio, abs=0.02)
    last = sched.step(torch.randn(1, 4000, V), torch.zeros(1, 4000, dtype=torch.long), mask, 7, 8)
    assert last.transfer_index.all()


def test_dream_top_p_top_k_filtering():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    sched = DreamScheduler(alg="maskgit_plus", temperature=1.0, top_p=0.7)
    _, probs = sched.sample_tokens(logits, None)
    # 0.5 alone < 0.7, 0.5 + 0.3 crosses it: the first two survive, renormalised.
    torch.testing.assert_close(probs[0, 0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    sched = DreamScheduler(alg="maskgit_plus", temperature=1.0, top_k=3)
    _, probs = sched.sample_tokens(logits, None)
    torch.testing.assert_close(probs[0, 0], torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    sched = DreamScheduler(alg="maskgit_plus", temperature=0.5)
    _, probs = sched.sample_tokens(logits, None)
    torch.testing.assert_close(probs[0, 0], (logits[0, 0] / 0.5).softmax(-1))


def test_dream_alg_temp_samples_distinct_masked_positions():
    sched = DreamScheduler(alg="maskgit_plus", alg_temp=0.5)
    mask = torch.tensor([[True, True, False, True, True, True]])
    out = sched.step(
        torch.randn(1, 6, V),
        torch.zeros(1, 6, dtype=torch.long),
        mask,
        0,
        2,
        generator=torch.Generator().manual_seed(3),
    )
    k = dream_reference_counts(mask, 0, 2, 1e-3)
    assert out.transfer_index.sum().item() == k.item()
    assert not out.transfer_index[0, 2]


def test_threshold_commits_confident_and_at_least_quota():
    probs = torch.tensor(
        [[[0.95, 0.05], [0.6, 0.4], [0.92, 0.08], [0.7, 0.3]], [[0.5, 0.5], [0.55, 0.45], [0.8, 0.2], [0.51, 0.49]]]
    )
    logits = probs.log()
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    sched = ThresholdScheduler(threshold=0.9)
    out = sched.step(logits, torch.zeros(2, 4, dtype=torch.long), mask, 0, 4)
    # Row 0: the two above 0.9 (position 3 is not masked). Row 1: none above, quota 1 -> the best.
    assert out.transfer_index.tolist() == [[True, False, True, False], [False, False, True, False]]
    out = sched.step(logits, torch.zeros(2, 4, dtype=torch.long), mask, 3, 4)  # last step: all
    assert torch.equal(out.transfer_index, mask)


def _near_tie_logits() -> torch.Tensor:
    """float32 logits of two masked positions whose top-token probabilities differ by ~5e-11: equal
    in a float32 softmax, ordered in float64 (position 1 is the more confident one)."""
    logits = torch.zeros(1, 2, V)
    logits[:, :, 0] = 10.0
    logits[0, 0, 1] = 1e-6  # a slightly larger denominator: position 0 is a hair less confident
    p32 = torch.softmax(logits, -1)[0, :, 0]
    p64 = torch.softmax(logits.double(), -1)[0, :, 0]
    assert p32[0] == p32[1] and p64[1] > p64[0]
    return logits


@pytest.mark.parametrize("make", [LowConfidenceScheduler, lambda: ThresholdScheduler(threshold=0.99999)])
def test_near_ties_are_broken_as_the_float64_reference_does(make):
    """LLaDA's and Fast-dLLM's rules rank by a float64 softmax; a float32 one tied these two positions
    and committed the lower index where the reference commits the other."""
    mask = torch.ones(1, 2, dtype=torch.bool)
    out = make().step(_near_tie_logits(), torch.zeros(1, 2, dtype=torch.long), mask, 0, 2)
    assert out.transfer_index.tolist() == [[False, True]]
    assert out.confidence.dtype == torch.float64


def test_dream_defaults_follow_the_checkpoint_generation_config():
    """The released Instruct checkpoint's generation_config.json has temperature 0.0, top_k null and
    alg "origin"; `diffusion_generate` called with its defaults fills the null top_k with 50."""
    released = {"alg": "origin", "alg_temp": None, "eps": 0.001, "temperature": 0.0, "top_k": None, "top_p": None}
    s = DreamScheduler.from_generation_config(released)
    assert (s.config.alg, s.config.temperature, s.config.top_k, s.config.top_p, s.config.eps) == (
        "origin", 0.0, 50, None, 0.001,
    )  # fmt: skip
    s = DreamScheduler.from_generation_config({"alg": "entropy", "top_k": 20, "top_p": 0.9, "temperature": 0.2})
    assert (s.config.alg, s.config.top_k, s.config.top_p, s.config.temperature) == ("entropy", 20, 0.9, 0.2)
    assert DreamScheduler.from_generation_config({}).config.temperature == 1.0


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (LowConfidenceScheduler, {"remasking": "lowest"}),
        (LowConfidenceScheduler, {"temperature": -1.0}),
        (DreamScheduler, {"alg": "greedy"}),
        (DreamScheduler, {"eps": 0.0}),
        (DreamScheduler, {"top_p": 1.5}),
        (DreamScheduler, {"top_k": 0}),
        (ThresholdScheduler, {"threshold": 1.5}),
    ],
)
def test_invalid_config(cls, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_step_validates_shapes():
    sched = LowConfidenceScheduler()
    with pytest.raises(ValueError, match="must agree"):
        sched.step(torch.randn(1, 4, V), torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool), 0, 2)
    with pytest.raises(ValueError, match="step_index=2"):
        sched.step(torch.randn(1, 4, V), torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool), 2, 2)


@pytest.mark.parametrize(
    "sched",
    [
        LowConfidenceScheduler(remasking="random", temperature=0.3),
        DreamScheduler(alg="topk_margin", eps=0.01, temperature=0.2, top_p=0.95, top_k=50, alg_temp=0.1),
        ThresholdScheduler(threshold=0.75),
    ],
)
def test_save_pretrained_round_trip(sched, tmp_path):
    sched.save_pretrained(tmp_path)
    loaded = type(sched).from_pretrained(tmp_path)
    assert dict(loaded.config) == dict(sched.config)


def test_dream_official_default_call_is_available_and_differs_from_ours():
    """The official `diffusion_generate(input_ids)` call never reads generation_config.json: it samples
    (origin, temperature 1.0, top_k 50, top_p 1.0); ours reads the file, greedy for Dream-Instruct."""
    official = DreamScheduler.diffusion_generate_default().config
    assert (official.alg, official.eps, official.temperature, official.top_k, official.top_p) == (
        "origin", 1e-3, 1.0, 50, None)  # fmt: skip
    ours = DreamScheduler.from_generation_config({"temperature": 0.0, "top_k": None, "alg": "origin"}).config
    assert ours.temperature == 0.0 and official.temperature == 1.0
