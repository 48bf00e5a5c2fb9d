"""PrefixKV against its rule written out on hand-made tensors: prefix counts, profiles, scores."""

import math

import pytest
import torch
from dlmcache.kernels.policies import ScoreInputs
from dlmcache.vlm.prefixkv import (
    PrefixKVBudget,
    PrefixKVProfile,
    PrefixKVScore,
    prefix_keep_counts,
)

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
