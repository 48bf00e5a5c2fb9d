"""KV policies against their rules written out by hand, and CompressedCache inside `generate`."""

import math

import pytest
import torch
import torch.nn.functional as F
from dlmcache.kernels.cache import CompressedCache, cache_argument
from dlmcache.kernels.policies import (
    EVICTION,
    GEAR,
    H2O,
    KIVI,
    STORAGE,
    TOVA,
    AdaKV,
    CAKEBudget,
    CAKEScore,
    ClusterKV,
    DuoAttention,
    EpiCache,
    FastGen,
    HeadKV,
    KNorm,
    KVCrush,
    LaCache,
    MiKV,
    MiniCache,
    Pyramid,
    RandomEviction,
    RetrievalAttention,
    ScoreInputs,
    SentenceKV,
    SnapKV,
    StreamingLLM,
    ThinK,
    Uniform,
    get_policy,
    merge_into_nearest,
    ragged_topk,
    resolve_budget,
)
from dlmcache.kernels.policies.storage import PlainStore

from tests.helpers import tiny_llama


def inputs(b=2, h=2, g=2, length=12, d=8, w=4, seed=0, key_mask=None):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, length, d, generator=gen)
    values = torch.randn(b, h, length, d, generator=gen)
    queries = torch.randn(b, h * g, w, d, generator=gen)
    return ScoreInputs(keys=keys, values=values, queries=queries, key_mask=key_mask)


def reference_window_attention(inp, w):
    """softmax(q k^T / sqrt(d)) of the last w queries, causal (query i at position L - w + i)."""
    b, hq, _, d = inp.queries.shape
    h, length = inp.heads, inp.length
    q = inp.queries[:, :, -w:]
    k = inp.keys.repeat_interleave(hq // h, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    for i in range(w):
        s[:, :, i, length - w + i + 1 :] = float("-inf")
    return s.softmax(-1)  # [B, Hq, w, L]


def test_streaming_llm_keeps_sinks_and_recent():
    inp = inputs()
    kept = StreamingLLM(n_sink=2).select(inp, 6)
    assert kept[0, 0].tolist() == [0, 1, 8, 9, 10, 11]
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :3] = False  # row 1 is left-padded: its sinks are positions 3 and 4
    kept = StreamingLLM(n_sink=2).select(inputs(key_mask=mask), 6)
    assert kept[1, 1].tolist() == [3, 4, 8, 9, 10, 11]


def test_knorm_keeps_lowest_norms():
    inp = inputs()
    kept = KNorm().select(inp, 5)
    want = inp.keys.norm(dim=-1).topk(5, largest=False).indices.sort().values
    assert torch.equal(kept, want)


def test_snapkv_rule():
    inp = inputs(w=4)
    pol = SnapKV(window=4, kernel=3)
    attn = reference_window_attention(inp, 4).sum(2)  # [B, Hq, L]
    attn = attn.view(2, 2, 2, 12).mean(2)
    pooled = F.avg_pool1d(attn.reshape(-1, 1, 12), 3, 1, 1, count_include_pad=False).reshape(2, 2, 12)
    torch.testing.assert_close(pol.score(inp), pooled, rtol=1e-5, atol=1e-6)
    kept = pol.select(inp, 7)
    assert (kept[..., -4:] == torch.arange(8, 12)).all()  # the observation window
    rest = pooled[..., :8].topk(3).indices.sort().values
    assert torch.equal(kept[..., :3], rest)
    # A budget below the window keeps the window's newest tokens (not a tie-break among them).
    assert (pol.select(inp, 3) == torch.arange(9, 12)).all()


def test_maskkv_rule():
    """MaskKV by hand, in float64: each masked position's softmax over the (unpadded) prompt keys,
    summed over the masked positions, averaged over the KV head's query group, then averaged over the
    real keys among each key's neighbours (kernel 3); padding is never kept."""
    g = torch.Generator().manual_seed(3)
    b, hkv, hq, length, m, d = 2, 2, 4, 12, 5, 8
    keys, values = torch.randn(b, hkv, length, d, generator=g), torch.randn(b, hkv, length, d, generator=g)
    mask_queries = torch.randn(b, hq, m, d, generator=g)
    key_mask = torch.ones(b, length, dtype=torch.bool)
    key_mask[0, :3] = False
    inp = ScoreInputs(keys=keys, values=values, mask_queries=mask_queries, key_mask=key_mask)
    want = torch.zeros(b, hkv, length, dtype=torch.float64)
    for row in range(b):
        real = key_mask[row].nonzero().flatten()
        for head in range(hq):
            k = keys[row, head // 2, real].double()
            for pos in range(m):
                p = torch.softmax(k @ mask_queries[row, head, pos].double() / math.sqrt(d), 0)
                want[row, head // 2, real] += p / 2  # mean over the 2 query heads of the group
    pooled = torch.zeros_like(want)
    for row in range(b):
        for i in range(length):
            near = [j for j in (i - 1, i, i + 1) if 0 <= j < length and key_mask[row, j]]
            pooled[row, :, i] = want[row][:, near].mean(-1) if near else 0.0
    policy = get_policy("maskkv", kernel=3, window=0)
    torch.testing.assert_close(policy.score(inp).double(), pooled, rtol=1e-5, atol=1e-6)
    kept = policy.select(inp, 5)
    assert (kept[0] >= 3).all()
    ranking = pooled.masked_fill(~key_mask[:, None], float("-inf"))
    assert torch.equal(kept, ranking.topk(5, -1).indices.sort(-1).values)
    # The default keeps the last `window` prompt tokens first, inside the budget.
    tail = get_policy("maskkv", kernel=3, window=2).select(inp, 5)
    assert torch.equal(
        tail,
        torch.cat([ranking[..., :-2].topk(3, -1).indices, torch.tensor([10, 11]).expand(b, hkv, 2)], -1)
        .sort(-1)
        .values,
    )
    with pytest.raises(ValueError, match="masked positions' queries"):
        policy.score(ScoreInputs(keys=keys, values=values))
    with pytest.raises(ValueError, match="kernel=4"):
        get_policy("maskkv", kernel=4)
    with pytest.raises(ValueError, match="window=-1"):
        get_policy("maskkv", window=-1)


def test_h2o_rule():
    inp = inputs(w=12)  # every prefill query
    want = reference_window_attention(inp, 12).mean(2).view(2, 2, 2, 12).mean(2)
    torch.testing.assert_close(H2O().score(inp), want, rtol=1e-5, atol=1e-6)
    # kvpress's observed attention: each key's sum divided by the number of queries that see it
    seen_by = torch.arange(12, 0, -1, dtype=torch.float32)
    received = reference_window_attention(inp, 12).sum(2).view(2, 2, 2, 12).mean(2)
    torch.testing.assert_close(H2O(per_key_mean=True).score(inp), received / seen_by, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="per_key_mean=1"):
        H2O(per_key_mean=1)


def test_tova_rule():
    inp = inputs()
    last = reference_window_attention(inp, 1)[:, :, 0].mean(1)  # [B, L], averaged over all query heads
    score = TOVA().score(inp)
    torch.testing.assert_close(score[:, 0], last, rtol=1e-5, atol=1e-6)
    assert torch.equal(score[:, 0], score[:, 1])  # one ranking for all heads
    assert (TOVA().select(inp, 3)[..., -1] == 11).all()


def test_padding_is_evicted_first():
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :5] = False
    kept = KNorm().select(inputs(key_mask=mask), 7)
    assert (kept[0] >= 5).all()


def test_pyramid_budgets():
    pyr = Pyramid(beta=20, window=8)
    budgets = [pyr.layer_budget(64, 1000, layer, 4) for layer in range(4)]
    lo, hi = (64 - 8) / 20, 2 * (64 - 8) - (64 - 8) / 20
    assert budgets == [round(hi - i * (hi - lo) / 3 + 8) for i in range(4)]
    assert abs(sum(budgets) / 4 - 64) <= 1 and budgets == sorted(budgets, reverse=True)
    assert Uniform().layer_budget(0.25, 100, 3, 4) == 25


def test_budget_validation():
    assert resolve_budget(0.5, 11) == 5 and resolve_budget(3, 11) == 3 and resolve_budget(30, 11) == 11
    for bad in (0.0, 1.5, 0, -2, "half", True):
        with pytest.raises(ValueError, match="budget"):
            resolve_budget(bad, 10)
    with pytest.raises(ValueError, match="budget"):
        CompressedCache(KNorm(), budget=0.0)
    with pytest.raises(TypeError, match="EvictionPolicy"):
        CompressedCache(policy="knorm")
    with pytest.raises(ValueError, match="unknown policy 'foo'"):
        get_policy("foo")
    with pytest.raises(ValueError, match="kernel=4"):
        SnapKV(kernel=4)


def test_kivi_store_round_trip():
    keys, values = torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64)
    store = KIVI(bits=4, group_size=32, residual=16).store(keys, values)
    # 100 tokens: 64 quantized in two groups of 32, the newest 36 kept in full precision.
    assert store.length == 100 and store.k_res.shape[2] == 36
    k, v = store.read()
    assert torch.equal(k[:, :, 64:], keys[:, :, 64:]) and torch.equal(v[:, :, 64:], values[:, :, 64:])
    assert (k[:, :, :64] - keys[:, :, :64]).abs().max() < 0.5 and (v - values).abs().max() < 0.5
    assert store.nbytes < 0.6 * 2 * keys.numel() * keys.element_size()
    store.append(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))
    assert store.length == 101


EVICTION_NAMES = [cls.name for cls in EVICTION if "mask_queries" not in cls.needs]  # MaskKV: test_maskkv_*


@pytest.mark.parametrize("name", sorted(EVICTION_NAMES))
def test_every_policy_keeps_its_budget_in_generate(name):
    model = tiny_llama()
    ids = torch.randint(1, 200, (2, 64))
    policy = get_policy(name)
    cache = CompressedCache(policy=policy, budget=0.25, model=model)
    out = model.generate(ids, **cache_argument(cache), max_new_tokens=4, do_sample=False)
    cache.detach()
    assert out.shape == (2, 68)
    # 16 kept per head and layer after prefill, then 3 generated tokens written (the 4th is never fed back).
    for layer in cache.layers:
        assert (layer.valid[..., :-3].sum(-1).sum(-1) == 2 * 16).all()
        assert layer.valid[..., -3:].all()
    full_bytes = 3 * 2 * (2 * 2 * 67 * 32 * 4)
    assert cache.nbytes < 0.35 * full_bytes or name in ("adakv",)


def test_full_budget_is_exact_and_compression_changes_little():
    model = tiny_llama()
    ids = torch.randint(1, 200, (2, 64))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
        full = CompressedCache(policy=SnapKV(window=8), budget=1.0, model=model)
        got = model.generate(ids, **cache_argument(full), max_new_tokens=6, do_sample=False)
        full.detach()
    assert torch.equal(got, want)


def test_padded_batch_equals_rows_alone():
    model = tiny_llama()
    short, long_ = torch.randint(1, 200, (1, 40)), torch.randint(1, 200, (1, 64))
    batch = torch.cat([torch.cat([torch.zeros(1, 24, dtype=torch.long), short], 1), long_])
    mask = torch.ones_like(batch)
    mask[0, :24] = 0
    kw = dict(max_new_tokens=5, do_sample=False)
    cache = CompressedCache(policy=SnapKV(window=8), budget=20, model=model, attention_mask=mask)
    out = model.generate(batch, attention_mask=mask, **cache_argument(cache), **kw)
    cache.detach()
    for row, ids in ((0, short), (1, long_)):
        alone = CompressedCache(policy=SnapKV(window=8), budget=20, model=model)
        want = model.generate(ids, **cache_argument(alone), **kw)
        alone.detach()
        assert torch.equal(out[row, -5:], want[0, -5:]), row


def test_query_policies_need_the_model():
    model = tiny_llama()
    ids = torch.randint(1, 200, (1, 32))
    with pytest.raises(ValueError, match="queries"):
        model.generate(ids, **cache_argument(CompressedCache(policy=SnapKV(), budget=0.5)), max_new_tokens=2)


def test_quantized_cache_generates_close_to_full():
    model = tiny_llama()
    ids = torch.randint(1, 200, (1, 96))
    with pytest.raises(ValueError, match="KIVI stores quantized entries: build the cache with"):
        model(ids, **cache_argument(CompressedCache(quantizer=KIVI())))
    cache = CompressedCache(quantizer=KIVI(bits=8, group_size=32, residual=32), model=model)
    with torch.no_grad():
        logits_q = model(ids, **cache_argument(cache)).logits
        step_q = model(torch.tensor([[5]]), **cache_argument(cache)).logits
        plain = model(torch.cat([ids, torch.tensor([[5]])], 1)).logits
    torch.testing.assert_close(logits_q, plain[:, :96], rtol=1e-5, atol=1e-5)  # prefill attends in full
    assert (step_q[0, -1] - plain[0, -1]).abs().max() < 0.05  # int8 KV after prefill
    # 3 layers x (K, V) x 2 heads x 97 tokens x 32 dims in float32, against 64 tokens int8 (+ fp16 scales)
    # and a 33-token float32 residual: 0.66 * 0.28 + 0.34 = 0.53 of it.
    full = 3 * 2 * 2 * 97 * 32 * 4
    assert 0.5 * full < cache.nbytes < 0.55 * full


def test_random_policy_is_seeded():
    inp = inputs()
    assert torch.equal(RandomEviction(seed=3).select(inp, 5), RandomEviction(seed=3).select(inp, 5))


def test_ragged_topk():
    scores = torch.tensor([[[0.1, 0.9, 0.5, 0.7], [0.4, 0.3, 0.2, 0.1]]])
    index, kept = ragged_topk(scores, torch.tensor([[3, 1]]))
    assert index.tolist() == [[[1, 2, 3], [0, 0, 0]]]
    assert kept.tolist() == [[[True, True, True], [True, False, False]]]


def test_adakv_spends_the_layer_budget_across_heads():
    inp = inputs(h=4, g=1, length=40, w=8, seed=3)
    ada = AdaKV(scorer=SnapKV(window=4), safeguard=0.25)
    index, kept = ada.select_ragged(inp, 10)
    counts = kept.sum(-1)
    assert (counts.sum(-1) == 4 * 10).all()  # the layer keeps H * keep in total
    assert (counts >= 2).all()  # each head at least safeguard * keep
    for b in range(2):
        for h in range(4):  # the window (last 4 tokens) is kept in every head
            assert set(range(36, 40)) <= set(index[b, h][kept[b, h]].tolist())


def test_headkv_budgets_follow_head_scores():
    inp = inputs(h=2, g=1, length=60, w=8)
    pol = HeadKV(head_scores=torch.tensor([[3.0, 1.0]]), beta=2.0, scorer=SnapKV(window=4))
    _, kept = pol.select_ragged(inp, 20)
    # (20 - 10) + s_h * 10 * 2 with s = (0.75, 0.25): 25 and 15.
    assert kept.sum(-1)[0].tolist() == [25, 15]


def test_duo_attention_heads():
    inp = inputs(h=2, g=1, length=50)
    pol = DuoAttention(head_map=torch.tensor([[True, False]]), n_sink=2, min_recent=4)
    index, kept = pol.select_ragged(inp, 30)
    assert kept.sum(-1)[0].tolist() == [50, 10]  # (2*30 - 50) / 1 = 10 for the streaming head
    assert index[0, 1][kept[0, 1]].tolist() == [0, 1] + list(range(42, 50))


RAGGED = {
    "adakv": lambda: AdaKV(scorer=SnapKV(window=8)),
    "headkv": lambda: HeadKV(head_scores=torch.rand(3, 2) + 0.1, scorer=SnapKV(window=8)),
    "duo": lambda: DuoAttention(head_map=torch.tensor([[True, False], [False, False], [False, True]]), min_recent=4),
}


@pytest.mark.parametrize("name", sorted(RAGGED))
def test_ragged_policies_in_generate(name):
    model = tiny_llama()
    ids = torch.randint(1, 200, (2, 64))
    cache = CompressedCache(policy=RAGGED[name](), budget=16, model=model)
    out = model.generate(ids, **cache_argument(cache), max_new_tokens=4, do_sample=False)
    cache.detach()
    assert out.shape == (2, 68)
    for layer in cache.layers:
        kept = layer.valid[..., :-3].sum(-1)  # per-head entries kept from the prompt
        if name == "adakv":
            assert (kept.sum(-1) == 2 * 16).all()
        assert (kept <= 64).all() and (kept >= 1).all()


def test_ragged_attention_equals_per_head_reference():
    """A ragged layer attends exactly like full attention where each head sees only its kept tokens."""
    model = tiny_llama()
    ids = torch.randint(1, 200, (1, 40))
    pol = DuoAttention(head_map=torch.tensor([[True, False]] * 3), n_sink=2, min_recent=4)
    cache = CompressedCache(policy=pol, budget=20, model=model)
    with torch.no_grad():
        model(ids, **cache_argument(cache))
        got = model(torch.tensor([[7]]), **cache_argument(cache)).logits[0, -1]
    cache.detach()
    # Reference: full cache, but streaming heads (KV head 1) masked to sinks + recent via eager attention.
    keep = torch.zeros(2, 41, dtype=torch.bool)
    keep[0] = True
    stream = (2 * 20 - 40) // 1
    stream = max(stream, 2 + 4)
    keep[1, :2] = True
    keep[1, 40 - (stream - 2) : 40] = True
    keep[1, 40] = True
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mask = torch.ones(41, 41, dtype=torch.bool).tril()[None, None].repeat(1, 4, 1, 1)
    mask[0, :, 40] = keep.repeat_interleave(2, 0)  # only the new token sees the compressed cache

    def headwise(module, q, k, v, attention_mask, **kw):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, mask, **kw)

    AttentionInterface.register("test_headwise", headwise)
    AttentionMaskInterface.register("test_headwise", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation("test_headwise")
    with torch.no_grad():
        want = model(torch.cat([ids, torch.tensor([[7]])], 1)).logits[0, -1]
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cake_score_rule():
    inp = inputs(w=4)
    attn = reference_window_attention(inp, 4)  # [B, Hq, w, L]
    indicator = attn.mean(2) + 200.0 * attn.var(2, unbiased=False)
    indicator = indicator.view(2, 2, 2, 12).mean(2)
    pooled = F.avg_pool1d(indicator.reshape(-1, 1, 12), 5, 1, 2, count_include_pad=False).reshape(2, 2, 12)
    torch.testing.assert_close(CAKEScore(window=4).score(inp), pooled, rtol=1e-4, atol=1e-6)


def test_cake_budgets_cascade_to_preferences():
    model = tiny_llama()
    ids = torch.randint(1, 200, (1, 64))
    alloc = CAKEBudget(window=8)
    cache = CompressedCache(policy=CAKEScore(window=8), budget=16, allocator=alloc, model=model)
    with torch.no_grad():
        model(ids, **cache_argument(cache))
    cache.detach()
    kept = cache.stored_tokens()
    prefs = torch.tensor([alloc.preferences[i] for i in range(3)], dtype=torch.float64)
    want = [round(float(v)) for v in prefs / prefs.sum() * 16 * 3]
    assert kept == want and abs(sum(kept) - 48) <= 1


@pytest.mark.parametrize("cls", STORAGE, ids=lambda c: c.name)
def test_every_storage_policy_in_generate(cls):
    model = tiny_llama()
    ids = torch.randint(1, 200, (2, 96))
    # KIVI's residual shortened to see quantization at 96 tokens; MiniCache merging every token pair
    # (random layers are far apart; real adjacent deep layers are not).
    special = {KIVI: {"residual": 32}, MiniCache: {"retain_angle": 4.0}}
    cache = CompressedCache(quantizer=cls(**special.get(cls, {})), model=model)
    with torch.no_grad():
        out = model.generate(ids, **cache_argument(cache), max_new_tokens=4, do_sample=False)
    cache.detach()
    assert out.shape == (2, 100)
    assert cache.stored_tokens() == [96 + 3] * 3
    full = 3 * 2 * 2 * 2 * 99 * 32 * 4
    assert cache.nbytes < (0.9 if cls is ThinK else 0.75) * full  # ThinK prunes key channels only


@pytest.mark.parametrize(
    "make, tol",
    [
        (lambda: MiKV(important=0.25, low_bits=4), 0.6),
        (lambda: GEAR(bits=4, rank=4), 0.3),
        (lambda: ThinK(prune=0.25), None),
    ],
    ids=["mikv", "gear", "think"],
)
def test_storage_round_trip(make, tol):
    torch.manual_seed(0)
    keys, values = torch.randn(1, 2, 64, 32), torch.randn(1, 2, 64, 32)
    queries = torch.randn(1, 4, 64, 32)
    inp = ScoreInputs(keys=keys, values=values, queries=queries)
    policy = make()
    store = policy.store(keys, values, inp)
    k, v = store.read()
    assert k.shape == keys.shape and v.shape == values.shape
    if isinstance(policy, ThinK):
        # Kept channels exact, pruned channels zero, the 32 recent tokens complete.
        zero_channels = (k[:, :, :32] == 0).all(2)
        assert zero_channels.sum(-1).tolist() == [[8, 8]]
        assert torch.equal(k[:, :, 32:], keys[:, :, 32:]) and torch.equal(v, values)
        kept = ~zero_channels
        assert torch.equal(
            k[:, :, :32][kept[:, :, None, :].expand(-1, -1, 32, -1)],
            keys[:, :, :32][kept[:, :, None, :].expand(-1, -1, 32, -1)],
        )
    else:
        assert (k - keys).abs().max() < tol and (v - values).abs().max() < tol
    if isinstance(policy, MiKV):
        assert torch.equal(k[store.hi_idx], keys[store.hi_idx])  # important tokens exact
    assert store.nbytes_as(2) < 2 * keys.numel() * 2


def test_merge_folds_similar_tokens():
    keys = torch.tensor([[[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]]]])
    values = torch.tensor([[[[1.0, 0.0], [3.0, 0.0], [0.0, 5.0], [7.0, 7.0]]]])
    index = torch.tensor([[[0, 2]]])  # keep tokens 0 and 2; 1 is similar to 0, 3 to neither
    k, v = merge_into_nearest(keys, values, index, threshold=0.5)
    sim = torch.nn.functional.cosine_similarity(keys[0, 0, 1], keys[0, 0, 0], dim=0)
    torch.testing.assert_close(v[0, 0, 0], (values[0, 0, 0] + sim * values[0, 0, 1]) / (1 + sim))
    torch.testing.assert_close(v[0, 0, 1], values[0, 0, 2])  # token 3 (cos -1 / 0) was dropped


def test_kvcrush_keeps_representatives_of_evicted_groups():
    inp = inputs(h=2, g=1, length=40, w=8)
    base = SnapKV(window=4)
    plain = set(base.select(inp, 10)[0, 0].tolist())
    crush = KVCrush(base=base, fraction=0.3).select(inp, 10)
    assert crush.shape == (2, 2, 10)
    assert len(set(crush[0, 0].tolist()) - plain) >= 1  # representatives replaced some of the plain picks


RECALLERS = {
    "retrieval_attention": lambda: RetrievalAttention(n_sink=2, recent=4),
    "sentencekv": lambda: SentenceKV(boundaries=(7, 9), n_sink=2, recent=4),
    "clusterkv": lambda: ClusterKV(tokens_per_cluster=8, n_sink=2, recent=4),
    "epicache": lambda: EpiCache(segment=16, episodes=3, n_sink=2, recent=4),
}


@pytest.mark.parametrize("name", sorted(RECALLERS))
def test_recall_policies_attend_to_their_budget(name):
    model = tiny_llama()
    ids = torch.randint(1, 200, (2, 64))
    cache = CompressedCache(policy=RECALLERS[name](), budget=16, model=model, token_ids=ids)
    out = model.generate(ids, **cache_argument(cache), max_new_tokens=4, do_sample=False)
    cache.detach()
    assert out.shape == (2, 68)
    for layer in cache.layers:
        assert (layer.attended == 16).all()  # prompt tokens attended at the last step, per head
        assert layer.stored == 64 + 3  # nothing evicted: recall policies keep the prompt


def test_retrieval_attention_picks_top_keys():
    keys = torch.zeros(1, 1, 10, 4)
    keys[0, 0, :, 0] = torch.arange(10.0)  # q . k grows with the position index along dim 0
    keys[0, 0, 5, 0] = 100.0
    pol = RetrievalAttention(n_sink=1, recent=2)
    state = pol.build(ScoreInputs(keys=keys, values=keys))
    chosen = pol.recall(state, torch.tensor([[[[1.0, 0, 0, 0]]]]), 5)
    assert chosen[0, 0].nonzero().flatten().tolist() == [0, 5, 7, 8, 9]


def test_sentencekv_recalls_whole_sentences():
    keys = torch.randn(1, 1, 12, 4)
    token_ids = torch.tensor([[1, 2, 99, 3, 4, 5, 99, 6, 7, 99, 8, 9]])  # sentences end at id 99
    pol = SentenceKV(boundaries=(99,), n_sink=0, recent=0)
    state = pol.build(ScoreInputs(keys=keys, values=keys, token_ids=token_ids))
    assert state["group"][0, 0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3]
    q = state["centroids"][0, 0, 1][None, None, None]  # a query aligned with sentence 1's mean key
    chosen = pol.recall(state, q, 4)
    assert set(range(3, 7)) <= set(chosen[0, 0].nonzero().flatten().tolist())


def test_minicache_merges_adjacent_layers():
    torch.manual_seed(0)
    k0, v0 = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    # Layer 1 = layer 0 rescaled, with tokens 0-4 pointing elsewhere: those stay unmerged.
    k1, v1 = 2.0 * k0.clone(), 3.0 * v0.clone()
    k1[:, :, :5] = torch.randn(1, 2, 5, 16)
    policy = MiniCache(retain_angle=0.1)
    low, up = policy.merge_pair(PlainStore(k0, v0), PlainStore(k1, v1))
    for view, (k, v) in ((low, (k0, v0)), (up, (k1, v1))):
        rk, rv = view.read()
        torch.testing.assert_close(rk, k, rtol=1e-5, atol=1e-5)  # same direction: exact from norms
        torch.testing.assert_close(rv, v, rtol=1e-5, atol=1e-5)
    plain = 2 * 2 * k0.numel() * 4
    assert low.nbytes_as(None) == 0 and up.nbytes_as(None) < 0.7 * plain


def test_lacache_ladder():
    inp = inputs(b=1, h=1, length=20)
    inp.num_layers = 4
    # span 2 over 4 layers: units of 2 positions, each layer keeps one of them, alternating.
    even = LaCache(n_sink=1, window=2, span=2).select(ScoreInputs(**{**inp.__dict__, "layer_idx": 0}), 7)
    odd = LaCache(n_sink=1, window=2, span=2).select(ScoreInputs(**{**inp.__dict__, "layer_idx": 1}), 7)
    assert even[0, 0].tolist() == [0, 10, 12, 14, 16, 18, 19]
    assert odd[0, 0].tolist() == [0, 11, 13, 15, 17, 18, 19]


def test_fastgen_profiles_and_budget():
    inp = inputs(h=2, g=1, length=30, w=30)
    inp.token_ids = torch.arange(30).expand(2, -1)
    cheap = FastGen(recovery=0.0, special_ids=(5, 6))  # every head satisfied by the special tokens
    index, kept = cheap.select_ragged(inp, 8)
    assert (kept.sum(-1) == 8).all()
    for b in range(2):
        assert {0, 5, 6} <= set(index[b, 0][kept[b, 0]].tolist())
    _, kept = FastGen(recovery=0.9).select_ragged(inp, 8)
    assert (kept.sum(-1).sum(-1) == 16).all()  # H * budget in total, however the profiles differ


def test_largest_remainder():
    from dlmcache.kernels.policies.patterns import largest_remainder

    assert largest_remainder(torch.tensor([[2.5, 2.5, 3.0]])).tolist() in ([[3, 2, 3]], [[2, 3, 3]])
    assert largest_remainder(torch.tensor([[1.2, 1.3, 1.5]])).sum().item() == 4


@pytest.mark.parametrize("window", [None, 5])
def test_attention_received_in_chunks_equals_the_full_matrix(window):
    torch.manual_seed(0)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :4] = False  # left padding in row 1
    inp = inputs(b=2, length=13, w=13, key_mask=mask)
    full = inp.window_attention(window).sum(3)
    torch.testing.assert_close(inp.attention_received(window, chunk=3), full, rtol=1e-6, atol=1e-6)
