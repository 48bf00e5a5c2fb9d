"""Every Triton kernel against its torch reference (run by the Triton interpreter on CPU, natively on
CUDA), with awkward shapes, NaN-prefilled outputs, fp32 / bf16 / fp16 inputs and a float64 reference."""

import pytest
import torch
from dlmcache.kernels.ops import attention, dequantize_kv, gather_kv, merge_attention, quantize_kv, quantized_attention
from dlmcache.kernels.ops.attention import attention_reference
from dlmcache.kernels.ops.backend import use_triton
from dlmcache.kernels.ops.quantize import pack, unpack
from dlmcache.kernels.ops.quantize import reference as qref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def triton_ops():
    from dlmcache.kernels.ops.attention import triton as att
    from dlmcache.kernels.ops.gather import triton as gat
    from dlmcache.kernels.ops.quantize import triton as qua
    from dlmcache.kernels.ops.quantized_attention import triton as qatt

    return att, qua, qatt, gat


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


ATTENTION_CASES = [
    # B, Hq, Hkv, Lq, Lk, D
    (1, 2, 1, 1, 1, 64),
    (2, 4, 2, 1, 17, 64),
    (1, 7, 1, 1, 500, 64),  # GQA 7:1, decode over a long cache
    (2, 2, 2, 17, 63, 128),
    (1, 7, 1, 5, 63, 128),
    (1, 4, 4, 63, 63, 64),  # prefill-shaped, square
    (1, 2, 1, 3, 40, 24),  # head dim not a power of two
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("splits", [1, 3])
def test_attention_fp32(case, causal, splits):
    b, hq, hkv, lq, lk, d = case
    q, k, v = rand(b, hq, lq, d, seed=1), rand(b, hkv, lk, d, seed=2), rand(b, hkv, lk, d, seed=3)
    kv_len = torch.tensor([lk, max(lq, lk - 7)][:b], device=DEVICE)
    key_mask = torch.rand(b, lk, generator=torch.Generator().manual_seed(4)).to(DEVICE) > 0.25
    key_mask[:, -1] = True  # every causal query keeps at least its own key
    att, *_ = triton_ops()
    out = torch.full_like(q, float("nan"))
    att.attention(q, k, v, kv_len=kv_len, key_mask=key_mask, causal=causal, num_splits=splits, out=out)
    ref = attention_reference(q.double(), k.double(), v.double(), kv_len=kv_len, key_mask=key_mask, causal=causal)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, rtol=TOL[torch.float32], atol=TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [(2, 4, 2, 1, 63, 64), (1, 7, 1, 17, 40, 128)], ids=lambda c: "x".join(map(str, c)))
def test_attention_low_precision(dtype, case):
    b, hq, hkv, lq, lk, d = case
    q, k, v = (
        rand(b, hq, lq, d, dtype=dtype),
        rand(b, hkv, lk, d, dtype=dtype, seed=5),
        rand(b, hkv, lk, d, dtype=dtype, seed=6),
    )
    att, *_ = triton_ops()
    out = att.attention(q, k, v, causal=True)
    assert out.dtype == dtype
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("causal", [False, True])
def test_attention_fused_cpu_path(case, causal, dtype):
    """`backend="auto"` on CPU runs torch's tiled attention (with the log-sum-exp) instead of the
    reference: the same rule, every mask kind, GQA, causal, lengths."""
    from dlmcache.kernels.ops.attention import fused_cpu_available

    b, hq, hkv, lq, lk, d = case
    q, k, v = (rand(b, hq, lq, d, seed=31), rand(b, hkv, lk, d, seed=32), rand(b, hkv, lk, d, seed=33))
    q, k, v = q.cpu().to(dtype), k.cpu().to(dtype), v.cpu().to(dtype)
    assert fused_cpu_available(q)
    kv_len = torch.tensor([lk, max(lq, lk - 7)][:b])
    key_mask = torch.rand(b, hkv, lk, generator=torch.Generator().manual_seed(34)) > 0.25
    key_mask[..., -1] = True
    out, lse = attention(q, k, v, kv_len=kv_len, key_mask=key_mask, causal=causal, return_lse=True)
    ref, ref_lse = attention_reference(
        q.double(), k.double(), v.double(), kv_len=kv_len, key_mask=key_mask, causal=causal, return_lse=True
    )
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)


def test_attention_row_without_keys_is_zero():
    q, k, v = rand(1, 2, 2, 64), rand(1, 1, 20, 64), rand(1, 1, 20, 64)
    mask = torch.zeros(1, 20, dtype=torch.bool, device=DEVICE)
    att, *_ = triton_ops()
    out = att.attention(q, k, v, key_mask=mask, num_splits=2)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(attention_reference(q, k, v, key_mask=mask), torch.zeros_like(out))


def test_attention_reference_matches_sdpa():
    q, k, v = rand(2, 4, 9, 64), rand(2, 2, 30, 64), rand(2, 2, 30, 64)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(attention(q, k, v, backend="torch"), want, rtol=1e-5, atol=1e-5)


def _naive_attention(q, k, v, valid, scale=None):
    """The rule written out per (row, query head): softmax over the valid keys of its KV head; float64;
    valid [B, Hkv, Lq, Lk]; rows without a valid key are zero with log-sum-exp -inf."""
    b, hq, lq, d = q.shape
    g = hq // k.shape[1]
    scale = scale or d**-0.5
    out = torch.zeros(b, hq, lq, d, dtype=torch.float64)
    lse = torch.full((b, hq, lq), float("-inf"), dtype=torch.float64)
    for i in range(b):
        for h in range(hq):
            for j in range(lq):
                keep = valid[i, h // g, j]
                if keep.any():
                    s = (k[i, h // g][keep].double() @ q[i, h, j].double()) * scale
                    out[i, h, j] = s.softmax(0) @ v[i, h // g][keep].double()
                    lse[i, h, j] = torch.logsumexp(s, 0)
    return out, lse


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
@pytest.mark.parametrize("splits", [1, 3])
def test_attention_with_per_head_key_mask_and_lse(backend, splits):
    """A [B, H_kv, L_k] key mask (compressed caches keep different tokens per head) and the rows'
    log-sum-exp, against the rule written out; a row whose head keeps nothing is zero, lse -inf."""
    b, hq, hkv, lq, lk, d = 2, 4, 2, 3, 40, 32
    q, k, v = rand(b, hq, lq, d, seed=21), rand(b, hkv, lk, d, seed=22), rand(b, hkv, lk, d, seed=23)
    mask = torch.rand(b, hkv, lk, generator=torch.Generator().manual_seed(24)).to(DEVICE) > 0.4
    mask[1, 0] = False  # this head attends to nothing
    if backend != "triton":  # "auto" on CPU: torch's tiled CPU attention
        out, lse = attention(q, k, v, key_mask=mask, return_lse=True, backend=backend)
    else:
        att, *_ = triton_ops()
        out, lse = att.attention(q, k, v, key_mask=mask, return_lse=True, num_splits=splits)
    want, want_lse = _naive_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu()[:, :, None].expand(-1, -1, lq, -1))
    torch.testing.assert_close(out.double().cpu(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse.double().cpu(), want_lse, rtol=2e-5, atol=2e-5)
    assert torch.isinf(lse[1, :2]).all() and (out[1, :2] == 0).all()


def test_merge_attention_over_disjoint_key_sets_equals_attention_over_all():
    b, hq, hkv, lq, d = 2, 4, 2, 5, 32
    q, k, v = rand(b, hq, lq, d, seed=31), rand(b, hkv, 50, d, seed=32), rand(b, hkv, 50, d, seed=33)
    mask = torch.rand(b, hkv, 50, generator=torch.Generator().manual_seed(34)).to(DEVICE) > 0.3
    mask[0, 1, 30:] = False  # the second part has nothing for this head: it must not count
    want = attention(q.double(), k.double(), v.double(), key_mask=mask, backend="torch")
    parts = [
        attention(q, k[:, :, a:e], v[:, :, a:e], key_mask=mask[..., a:e], return_lse=True, backend="torch")
        for a, e in ((0, 30), (30, 50))
    ]
    out, lse = merge_attention(parts)
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)
    _, want_lse = attention(q, k, v, key_mask=mask, return_lse=True, backend="torch")
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_quantize_matches_reference_and_error_bound(bits, group, axis):
    length = 128 if axis == "channel" else 17
    x = rand(2, 3, length, 128, seed=bits) * 3
    _, qua, *_ = triton_ops()
    got = qua.quantize_kv(x, bits, group, axis)
    ref = qref.quantize_kv(x, bits, group, axis)
    assert torch.equal(got.data, ref.data) and torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)
    out = torch.full_like(x, float("nan"))
    out.copy_(qua.dequantize_kv(got))
    assert torch.equal(out, qref.dequantize_kv(ref))
    # |x - x'| <= scale / 2, plus the float16 rounding of the group's range and minimum.
    per_element = 2 if axis == "channel" else 3  # the dim each group's scale and zero repeat along
    scale, zero = (t.float().repeat_interleave(group, per_element) for t in (ref.scale, ref.zero))
    bound = scale / 2 + 2**-10 * (scale * (2**bits - 1) + zero.abs()) + 1e-6
    assert ((out - x).abs() <= bound).all()
    assert got.nbytes < x.numel() * x.element_size() * bits / 16  # codes + fp16 scales < half the bits


def test_quantize_float32_scales_are_within_half_a_step():
    x = rand(1, 2, 64, 64)
    q = quantize_kv(x, 4, 32, "channel", scale_dtype=torch.float32)
    scale = q.scale.float().repeat_interleave(32, 2)
    assert ((dequantize_kv(q) - x).abs() <= scale / 2 + 1e-6).all()


def test_packing_layout():
    codes = torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]], dtype=torch.uint8)
    assert pack(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 0xFF]]
    assert torch.equal(unpack(pack(codes, 2), 2), codes)
    assert pack(torch.tensor([[5, 12]], dtype=torch.uint8), 4).tolist() == [[5 | 12 << 4]]


def test_quantize_rejects_bad_arguments():
    x = rand(1, 1, 40, 64)
    with pytest.raises(ValueError, match="bits=3"):
        quantize_kv(x, 3)
    with pytest.raises(ValueError, match="group_size=48"):
        quantize_kv(x, 4, 48)
    with pytest.raises(ValueError, match="sequence length 40"):
        quantize_kv(x, 4, 32, "channel")
    with pytest.raises(ValueError, match="axis='row'"):
        quantize_kv(x, 4, 32, "row")


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("residual", [0, 1, 17])
@pytest.mark.parametrize("case", [(2, 4, 2, 1, 64), (1, 7, 1, 3, 128)], ids=lambda c: "x".join(map(str, c)))
def test_quantized_attention(bits, residual, case):
    b, hq, hkv, lq, d = case
    lz = 64
    q, k, v = rand(b, hq, lq, d, seed=7), rand(b, hkv, lz, d, seed=8), rand(b, hkv, lz, d, seed=9)
    kq, vq = qref.quantize_kv(k, bits, 32, "channel"), qref.quantize_kv(v, bits, 32, "token")
    k_res = rand(b, hkv, residual, d, seed=10) if residual else None
    v_res = rand(b, hkv, residual, d, seed=11) if residual else None
    *_, qatt, _ = triton_ops()
    for splits, causal in [(1, False), (2, True)]:
        out = torch.full_like(q, float("nan"))
        qatt.quantized_attention(q, kq, vq, k_res, v_res, causal=causal, num_splits=splits, out=out)
        ref = quantized_attention(q.double(), kq, vq, k_res, v_res, causal=causal, backend="torch")
        torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [32, 64, 1024])
def test_quantized_attention_reference_works_a_chunk_at_a_time(causal, chunk):
    """The torch path never dequantizes the whole cache: chunk by chunk, merged by log-sum-exp, it
    equals attention over the fully dequantized keys, with a per-head key mask and causal queries."""
    from dlmcache.kernels.ops.quantized_attention import reference as qaref

    b, hq, hkv, lq, lz, r, d = 2, 4, 2, 3, 128, 9, 64
    q, k, v = rand(b, hq, lq, d, seed=41), rand(b, hkv, lz, d, seed=42), rand(b, hkv, lz, d, seed=43)
    kq, vq = qref.quantize_kv(k, 4, 32, "channel"), qref.quantize_kv(v, 4, 32, "token")
    k_res, v_res = rand(b, hkv, r, d, seed=44), rand(b, hkv, r, d, seed=45)
    mask = torch.rand(b, hkv, lz + r, generator=torch.Generator().manual_seed(46)).to(DEVICE) > 0.3
    mask[..., -1] = True
    keys = torch.cat([qref.dequantize_kv(kq, torch.float64), k_res.double()], 2)
    values = torch.cat([qref.dequantize_kv(vq, torch.float64), v_res.double()], 2)
    want, want_lse = attention(q.double(), keys, values, key_mask=mask, causal=causal, return_lse=True, backend="torch")
    qaref.peak_dequantized_tokens = 0
    got, lse = qaref.quantized_attention(
        q, kq, vq, k_res, v_res, key_mask=mask, causal=causal, return_lse=True, chunk=chunk
    )
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-5, atol=2e-5)
    assert 0 < qaref.peak_dequantized_tokens <= min(chunk, lz)
    *_, qatt, _ = triton_ops()
    out, tlse = qatt.quantized_attention(q, kq, vq, k_res, v_res, key_mask=mask, causal=causal, return_lse=True)
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(tlse.double(), want_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("case", [(1, 1, 1, 1, 64), (2, 3, 50, 17, 64), (1, 2, 500, 63, 128)], ids=str)
def test_gather_kv(case):
    b, h, length, n, d = case
    k, v = rand(b, h, length, d, seed=12), rand(b, h, length, d, seed=13)
    g = torch.Generator().manual_seed(14)
    index = torch.stack(
        [torch.stack([torch.randperm(length, generator=g)[:n].sort().values for _ in range(h)]) for _ in range(b)]
    ).to(DEVICE)
    *_, gat = triton_ops()
    out_k = torch.full((b, h, n + 5, d), float("nan"), device=DEVICE)
    out_v = torch.full_like(out_k, float("nan"))
    got_k, got_v = gat.gather_kv(k, v, index, out_k, out_v)
    want_k, want_v = gather_kv(k, v, index, backend="torch")
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert got_k.data_ptr() == out_k.data_ptr() and out_k[:, :, n:].isnan().all()
    # In place: compact k and v themselves.
    k2, v2 = k.clone(), v.clone()
    in_k, in_v = gat.gather_kv(k2, v2, index, k2, v2)
    assert torch.equal(in_k, want_k) and torch.equal(in_v, want_v) and in_k.data_ptr() == k2.data_ptr()


def test_gather_rejects_bad_index():
    k = rand(1, 2, 10, 64)
    with pytest.raises(ValueError, match="index must be"):
        gather_kv(k, k, torch.zeros(1, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot hold"):
        gather_kv(k, k, torch.zeros(1, 2, 4, dtype=torch.long), out_k=torch.empty(1, 2, 3, 64))


def test_dispatch():
    q = torch.randn(1, 2, 1, 64)
    assert not use_triton("torch", q)
    assert use_triton("auto", q) == q.is_cuda
    with pytest.raises(ValueError, match="backend='fast'"):
        use_triton("fast", q)
    k = torch.randn(1, 1, 9, 64)
    torch.testing.assert_close(attention(q, k, k, backend="auto"), attention_reference(q, k, k))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dense_attention_takes_a_mask_per_query(backend):
    """Block diffusion's block-causal mask [B, n, L]: each query its own keys (through SDPA on every
    backend), against the float64 reference."""
    from dlmcache.kernels.ops import dense_attention
    from dlmcache.kernels.ops.attention import masked_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 11, 8), torch.randn(2, 2, 11, 8)
    mask = torch.rand(2, 5, 11) < 0.6
    mask[:, :, 0] = True  # every query attends at least one key
    out = dense_attention(q, k, v, mask, backend)
    expected, _ = masked_attention(q.double(), k.double(), v.double(), mask[:, None])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
