"""The batch-invariant mode's ops: `batch_invariant_linear` (a fixed-tiling Triton kernel; fixed-size
row chunks through torch) and `rms_norm` (a Triton kernel, one program per row), against float64
references on awkward shapes, and each row's result the same bits whatever the rows beside it."""

import pytest
import torch
from dlmcache.kernels.ops import batch_invariant_linear, rms_norm
from dlmcache.kernels.ops.backend import interpreting
from dlmcache.kernels.ops.matmul import CHUNK_ROWS, elementwise, fixed_chunks, linear_reference
from dlmcache.kernels.ops.norm import rms_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}


def needs_triton(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        if DEVICE == "cpu" and not interpreting():
            pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("m, k, n", [(1, 7, 5), (33, 100, 70), (5, 64, 130), (17, 33, 1)])
def test_linear_matches_the_float64_reference(backend, dtype, m, k, n):
    needs_triton(backend)
    x, w, b = rand(m, k, dtype=dtype), rand(n, k, dtype=dtype, seed=1), rand(n, dtype=dtype, seed=2)
    for bias in (None, b):
        out = batch_invariant_linear(x, w, bias, backend=backend)
        assert out.shape == (m, n) and out.dtype == dtype
        want = linear_reference(x, w, bias).double()
        tol = TOL[dtype] * max(1.0, k**0.5)
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rows_are_the_same_bits_in_any_batch(backend, dtype):
    """Row i of a product over M rows equals its product alone, at every M and at every place: the
    property torch's matmul lacks (it changes kernels with M)."""
    needs_triton(backend)
    w = rand(96, 200, dtype=dtype, seed=1)
    x = rand(70, 200, dtype=dtype)
    alone = torch.cat([batch_invariant_linear(x[i : i + 1], w, backend=backend) for i in range(len(x))])
    for m in (2, 3, CHUNK_ROWS - 1, CHUNK_ROWS + 1, 33, 70):
        assert torch.equal(batch_invariant_linear(x[:m], w, backend=backend), alone[:m]), m
        shuffled = torch.randperm(m, generator=torch.Generator().manual_seed(m)).to(DEVICE)
        assert torch.equal(batch_invariant_linear(x[shuffled], w, backend=backend), alone[shuffled]), m
    assert torch.equal(batch_invariant_linear(x.view(7, 10, 200), w, backend=backend), alone.view(7, 10, 96))


def test_fixed_chunks_feed_every_product_the_same_row_count():
    shapes = []

    def product(rows):
        shapes.append(tuple(rows.shape))
        return rows * 2

    x = rand(2, 19, 3)
    assert torch.equal(fixed_chunks(x, product, rows=8), x * 2)
    assert shapes == [(8, 3)] * 5  # 38 rows in 5 chunks of 8, the last padded with zeros
    assert fixed_chunks(x[:0], product).shape == (0, 19, 3)
    with pytest.raises(ValueError, match="rows=0"):
        fixed_chunks(x, product, rows=0)


@pytest.mark.parametrize(
    "fn", [torch.nn.functional.silu, torch.sigmoid, torch.cos, torch.sin], ids=lambda f: f.__name__
)
def test_elementwise_gives_an_element_the_same_bits_whatever_the_size(fn):
    """torch's CPU loop computes each thread's last few elements with scalar code (silu there rounds
    otherwise); `elementwise` pads so that none is: an element's bits do not depend on the size."""
    x = rand(4096) * 20
    full = elementwise(fn, x)
    torch.testing.assert_close(full, fn(x), rtol=2e-6, atol=1e-6)
    for n in range(1, 300):
        assert torch.equal(elementwise(fn, x[:n]), full[:n]), n
    assert torch.equal(elementwise(fn, x.view(64, 64)[:5, :7]), full.view(64, 64)[:5, :7])


def test_linear_rejects_bad_inputs_by_name():
    x, w = rand(3, 4), rand(5, 4)
    with pytest.raises(ValueError, match=r"x \(3, 4\) must be \[..., K\] and weight \(5, 3\)"):
        batch_invariant_linear(x, w[:, :3])
    with pytest.raises(ValueError, match=r"bias \(4,\) must be \[N\] = \[5\]"):
        batch_invariant_linear(x, w, rand(4))
    with pytest.raises(TypeError, match="share a dtype"):
        batch_invariant_linear(x.double(), w)
    with pytest.raises(ValueError, match="backend='cuda'"):
        batch_invariant_linear(x, w, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 3, 100), (37, 128), (2, 24)])
def test_rms_norm_matches_the_reference(backend, dtype, shape):
    needs_triton(backend)
    x, w = rand(*shape, dtype=dtype), rand(shape[-1], dtype=dtype, seed=1)
    out = rms_norm(x, w, 1e-6, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype
    want = rms_norm_reference(x.double(), w.double(), 1e-6)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_rows_are_the_same_bits_in_any_batch(backend):
    needs_triton(backend)
    x, w = rand(65, 300), rand(300, seed=1)
    alone = torch.cat([rms_norm(x[i : i + 1], w, 1e-5, backend=backend) for i in range(len(x))])
    for m in (2, 31, 65):
        assert torch.equal(rms_norm(x[:m], w, 1e-5, backend=backend), alone[:m]), m


def test_rms_norm_rejects_bad_inputs_by_name():
    with pytest.raises(ValueError, match=r"weight \(3,\) \[D\]"):
        rms_norm(rand(2, 4), rand(3), 1e-6)
    with pytest.raises(ValueError, match="eps=-1"):
        rms_norm(rand(2, 4), rand(4), -1)
