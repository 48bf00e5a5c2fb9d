"""The shared KV store: a segment's attention equals attention over its valid entries written out,
compaction and appends keep every entry's metadata, and quantized entries are attended without a
full-precision copy of the cache (in CompressedCache's decoding too)."""

import pytest
import torch
from dlmcache.kernels.cache import CompressedCache, cache_argument
from dlmcache.kernels.ops import attention, merge_attention
from dlmcache.kernels.ops.quantized_attention import reference as qaref
from dlmcache.kernels.policies import KIVI, SnapKV
from dlmcache.kernels.policies.quant import KIVIStore
from dlmcache.kernels.store import KVSegment

from tests.helpers import tiny_llama


def _segment(b=2, h=2, s=40, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(b, h, s, d, generator=g), torch.randn(b, h, s, d, generator=g)
    valid = torch.rand(b, h, s, generator=g) > 0.3
    tags = torch.randint(0, 3, (b, s), generator=g)
    return KVSegment.dense(keys, values, valid=valid, tags=tags), keys, values, valid


def test_attend_is_attention_over_the_valid_entries_and_merges_across_segments():
    seg, keys, values, valid = _segment()
    q = torch.randn(2, 4, 3, 32)
    out, lse = seg.attend(q)
    want, want_lse = attention(q, keys, values, key_mask=valid, return_lse=True, backend="torch")
    torch.testing.assert_close(out, want) and torch.testing.assert_close(lse, want_lse)
    # two segments (a compressed prompt and a live canvas) merge into attention over both
    other, k2, v2, valid2 = _segment(s=17, seed=1)
    merged, _ = merge_attention([seg.attend(q), other.attend(q)])
    both = attention(
        q, torch.cat([keys, k2], 2), torch.cat([values, v2], 2), key_mask=torch.cat([valid, valid2], 2), backend="torch"
    )
    torch.testing.assert_close(merged, both, rtol=1e-5, atol=1e-6)


def test_gather_keep_append_and_snapshot_carry_metadata():
    seg, keys, values, valid = _segment()
    before = seg.snapshot()
    index = torch.tensor([[[3, 1, 7], [0, 2, 9]], [[5, 6, 8], [1, 4, 39]]])
    kept = torch.tensor([[[True, True, False], [True, True, True]], [[True, True, True], [True, False, True]]])
    seg.gather(index, kept)
    assert torch.equal(seg.read()[0], keys.gather(2, index[..., None].expand(-1, -1, -1, 32)))
    assert torch.equal(seg.valid, valid.gather(2, index) & kept)
    assert torch.equal(seg.origin, index)
    seg.append(torch.ones(2, 2, 2, 32), torch.ones(2, 2, 2, 32), origin=torch.tensor([[40, 41], [40, 41]]))
    assert seg.length == 5 and seg.origin[0, 0].tolist() == [3, 1, 7, 40, 41] and seg.valid[..., 3:].all()
    seg.keep(seg.origin != 1)
    assert (
        seg.length == 5
        and (seg.origin[seg.valid] != 1).all()
        and {40, 41} <= set(seg.origin[0, 0][seg.valid[0, 0]].tolist()) <= {3, 7, 40, 41}
    )
    assert before.length == 40 and torch.equal(before.read()[0], keys)  # the snapshot did not move


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_segment_attends_through_its_codes(bits):
    """KIVI's store attends with quantized attention: equal to attention over its dequantized entries,
    never dequantizing more than a chunk at a time."""
    seg, keys, values, valid = _segment(s=100, d=64)
    seg.store_with(KIVI(bits=bits, group_size=32, residual=16))
    store = seg.data
    assert isinstance(store, KIVIStore) and store.quantized_length == 64
    dk, dv = store.read()
    q = torch.randn(2, 4, 1, 64)
    qaref.peak_dequantized_tokens = 0
    out, lse = seg.attend(q)
    want, want_lse = attention(q, dk, dv, key_mask=valid, return_lse=True, backend="torch")
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-5)
    assert 0 < qaref.peak_dequantized_tokens <= qaref.DEFAULT_CHUNK


def test_compressed_cache_decodes_from_kivi_codes_without_reading_them_whole(monkeypatch):
    """Decoding with a KIVI cache used to dequantize the whole cache every step; the routed attention
    now reads the codes through quantized attention. Prefill scoring may read them; decoding may not."""
    model = tiny_llama(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)  # head dim 64
    ids = torch.randint(1, 200, (1, 150))
    cache = CompressedCache(policy=SnapKV(window=8), budget=0.5, quantizer=KIVI(bits=8, residual=8), model=model)
    with torch.no_grad():
        model(ids, **cache_argument(cache))
        monkeypatch.setattr(KIVIStore, "read", lambda self: pytest.fail("a decoding step dequantized the cache"))
        qaref.peak_dequantized_tokens = 0
        for t in range(3):
            model(torch.tensor([[5 + t]]), position_ids=torch.tensor([[150 + t]]), **cache_argument(cache))
    monkeypatch.undo()
    assert qaref.peak_dequantized_tokens > 0
    # the same step with the entries dequantized up front (what the old store did): the same logits
    layer = cache.layers[0]
    assert layer.segment.data.quantized_length > 0 and layer.stored == 75 + 3


@pytest.mark.parametrize("quantized", [False, True])
def test_segment_rows_select_and_replace(quantized):
    """select_rows gives those rows alone; set_rows replaces rows (growing whichever of the two is
    shorter by invalid fillers) and leaves a snapshot taken before as it was."""
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 2, 64, 32, generator=g), torch.randn(3, 2, 64, 32, generator=g)
    segment = KVSegment.dense(keys, values)
    if quantized:
        segment.store_with(KIVI(bits=8, group_size=32, residual=0))
    before = segment.snapshot()
    part = segment.select_rows(torch.tensor([2, 0]))
    torch.testing.assert_close(part.read()[0], segment.read()[0][[2, 0]])
    new_keys, new_values = torch.randn(1, 2, 96, 32, generator=g), torch.randn(1, 2, 96, 32, generator=g)
    other = KVSegment.dense(new_keys, new_values, origin=torch.arange(100, 196)[None])
    if quantized:
        other.store_with(KIVI(bits=8, group_size=32, residual=0))
    segment.set_rows(torch.tensor([1]), other)
    assert segment.length == 96 and before.length == 64
    got_keys, _ = segment.read()
    torch.testing.assert_close(got_keys[1], other.read()[0][0])
    torch.testing.assert_close(got_keys[[0, 2], :, :64], before.read()[0][[0, 2]])
    assert segment.valid[[0, 2], :, 64:].sum() == 0 and segment.valid[1].all()
    assert (segment.origin[[0, 2], :, 64:] == -1).all() and torch.equal(segment.origin[1, 0], torch.arange(100, 196))
    shorter = KVSegment.dense(new_keys[:, :, :32], new_values[:, :, :32])
    if quantized:
        shorter.store_with(KIVI(bits=8, group_size=32, residual=0))
    segment.set_rows(torch.tensor([0]), shorter)
    assert segment.length == 96 and segment.valid[0].sum() == 2 * 32
