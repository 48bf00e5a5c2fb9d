"""Mixture-of-experts: the router against its definition written out token by token, and the grouped
experts against the per-token loop (float64 exactly enough, float32 / bfloat16 close), on awkward
shapes: one token, experts no token picks, top_k = E, no tokens at all."""

import pytest
import torch
import torch.nn.functional as F
from dlmcache.kernels.ops.moe import Router, moe_experts, moe_experts_reference


def expert_weights(e, d, i, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(shape, generator=g) / shape[-1] ** 0.5).to(dtype) for shape in ((e, i, d), (e, i, d), (e, d, i))
    ]


def test_softmax_routing_is_top_k_of_the_probabilities():
    logits = torch.randn(9, 6, generator=torch.Generator().manual_seed(0))
    probs = logits.softmax(-1)
    for norm in (False, True):
        weights, experts = Router(6, 2, norm_topk_prob=norm, routed_scaling_factor=2.5)(logits)
        for t in range(9):
            want = sorted(range(6), key=lambda e: -float(probs[t, e]))[:2]
            assert experts[t].tolist() == want
            kept = probs[t, want]
            torch.testing.assert_close(weights[t], 2.5 * (kept / kept.sum() if norm else kept))


def test_sigmoid_group_limited_routing_follows_its_definition():
    """Per token: biased affinities; a group scores the sum of its two highest; the topk_group best
    groups stay, the others' affinities count as 0; the top_k of what remains win; their weights are
    the unbiased affinities, normalized, scaled."""
    g = torch.Generator().manual_seed(1)
    e, groups, keep, k = 16, 4, 2, 3
    logits, bias = torch.randn(11, e, generator=g), 0.3 * torch.randn(e, generator=g)
    router = Router(e, k, scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=1.5, n_group=groups,
                    topk_group=keep)  # fmt: skip
    weights, experts = router(logits, bias)
    size = e // groups
    for t in range(11):
        score = [float(torch.sigmoid(logits[t, x])) for x in range(e)]
        choice = [score[x] + float(bias[x]) for x in range(e)]
        group_score = [sum(sorted(choice[q * size : (q + 1) * size])[-2:]) for q in range(groups)]
        kept = sorted(range(groups), key=lambda q: -group_score[q])[:keep]
        masked = [choice[x] if x // size in kept else 0.0 for x in range(e)]
        want = sorted(range(e), key=lambda x: -masked[x])[:k]
        assert experts[t].tolist() == want, t
        w = torch.tensor([score[x] for x in want])
        torch.testing.assert_close(weights[t], 1.5 * w / w.sum())


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_experts=4, top_k=5), "top_k=5 exceeds num_experts=4"),
        (dict(num_experts=4, top_k=0), "top_k=0 must be a positive integer"),
        (dict(num_experts=4, top_k=1, scoring="relu"), "scoring='relu'"),
        (dict(num_experts=6, top_k=1, scoring="sigmoid", n_group=4), "n_group=4 does not divide num_experts=6"),
        (dict(num_experts=8, top_k=1, n_group=2), "needs scoring='sigmoid'"),
        (dict(num_experts=8, top_k=1, scoring="sigmoid", n_group=2, topk_group=3), "topk_group=3 exceeds n_group=2"),
        (dict(num_experts=8, top_k=5, scoring="sigmoid", n_group=4, topk_group=2), "fewer than top_k=5"),
        (dict(num_experts=4, top_k=1, routed_scaling_factor=0), "routed_scaling_factor=0"),
        (dict(num_experts=4, top_k=1, norm_topk_prob=1), "norm_topk_prob=1 must be a bool"),
    ],
)
def test_bad_routers_are_refused_naming_the_value(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Router(**options)


def test_bad_router_inputs_are_refused():
    router = Router(4, 2)
    with pytest.raises(ValueError, match=r"router logits \(3, 5\)"):
        router(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="only the sigmoid scoring takes a selection bias"):
        router(torch.zeros(3, 4), torch.zeros(4))


@pytest.mark.parametrize(
    "tokens, e, k, used",
    [(1, 4, 1, 4), (37, 8, 2, 3), (5, 3, 3, 3), (64, 16, 4, 16), (0, 4, 2, 4)],
    ids=["one-token", "unused-experts", "k-equals-E", "64-tokens", "no-tokens"],
)
@pytest.mark.parametrize("combine", ["expert", "slot"])
def test_grouped_experts_equal_the_per_token_loop(tokens, e, k, used, combine):
    g = torch.Generator().manual_seed(tokens)
    d, i = 24, 40
    x = torch.randn(tokens, d, generator=g, dtype=torch.float64)
    # top-k over the first `used` experts only: the others get no token
    logits = torch.randn(tokens, e, generator=g)
    logits[:, used:] = -torch.inf
    weights, experts = Router(e, k)(logits)
    w = expert_weights(e, d, i)
    want = moe_experts_reference(x, weights, experts, *w, combine=combine)
    got = moe_experts(x, weights, experts, *w, combine=combine)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        low = (x.to(dtype), weights, experts, *(t.to(dtype) for t in w))
        got = moe_experts(*low, combine=combine)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        # each combine against the reference loop in the same dtype
        torch.testing.assert_close(got, moe_experts_reference(*low, combine=combine), rtol=tol, atol=tol)


def test_slot_combine_weighs_in_the_routers_dtype_and_sums_in_routing_order():
    """The "slot" combine (DeepSeek-V3's `moe_infer`): bf16 expert outputs are weighed by float32 weights in
    float32 and summed over the slots in routing order before the cast back, which differs from
    casting the weights to bf16 first ("expert"); bit for bit what that recipe computes."""
    g = torch.Generator().manual_seed(5)
    t, d, i, e, k = 9, 16, 24, 6, 3
    x = torch.randn(t, d, generator=g).bfloat16()
    weights, experts = Router(e, k)(torch.randn(t, e, generator=g))
    w = [m.bfloat16() for m in expert_weights(e, d, i)]
    outputs = torch.stack([  # [T, k, d] each pair's expert output, in bf16
        torch.stack([F.linear(F.silu(F.linear(x[r], w[0][j])) * F.linear(x[r], w[1][j]), w[2][j]) for j in row])
        for r, row in enumerate(experts.tolist())
    ])  # fmt: skip
    want = (outputs.float() * weights[..., None]).sum(1).bfloat16()
    assert torch.equal(moe_experts(x, weights, experts, *w, combine="slot"), want)
    assert not torch.equal(moe_experts(x, weights, experts, *w, combine="expert"), want)
    with pytest.raises(ValueError, match="combine='tokens'"):
        moe_experts(x, weights, experts, *w, combine="tokens")


def test_router_and_experts_equal_the_dense_mixture():
    """Independent of both paths: every expert on every token, weighted by the router's weight for it
    (0 for the experts a token did not pick)."""
    g = torch.Generator().manual_seed(3)
    t, d, i, e, k = 13, 16, 24, 8, 2
    x, logits = torch.randn(t, d, generator=g, dtype=torch.float64), torch.randn(t, e, generator=g)
    weights, experts = Router(e, k, norm_topk_prob=True)(logits)
    dense = torch.zeros(t, e, dtype=torch.float64).scatter(1, experts, weights.double())
    w_gate, w_up, w_down = expert_weights(e, d, i)
    every = torch.stack([F.linear(F.silu(x @ w_gate[j].T) * (x @ w_up[j].T), w_down[j]) for j in range(e)], 1)
    torch.testing.assert_close(moe_experts(x, weights, experts, w_gate, w_up, w_down),
                               (dense[..., None] * every).sum(1), rtol=1e-12, atol=1e-12)  # fmt: skip


def test_bad_expert_inputs_are_refused():
    w = expert_weights(4, 8, 12)
    x, weights, experts = torch.randn(3, 8, dtype=torch.float64), torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"x \(3,\): expected \[tokens, hidden\]"):
        moe_experts(x[:, 0], weights, experts, *w)
    with pytest.raises(ValueError, match=r"outside \[0, 4\): 0..4"):
        moe_experts(x, weights, experts.index_fill(1, torch.tensor([1]), 4), *w)
    with pytest.raises(ValueError, match=r"w_down \(4, 12, 8\): expected \[4, 8, 12\]"):
        moe_experts(x, weights, experts, w[0], w[1], w[2].transpose(1, 2))
    with pytest.raises(ValueError, match="must share a dtype"):
        moe_experts(x.float(), weights, experts, *w)
    with pytest.raises(ValueError, match=r"must both be \[tokens=3, top_k\]"):
        moe_experts(x, weights[:, :1], experts, *w)
