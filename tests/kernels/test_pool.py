"""The paged KV pool (blocks, slots, admission) and paged attention over it, against attention over
each request's own keys alone in float64."""

import pytest
import torch
from dlmcache.kernels.ops import attention, paged_attention, paged_layout
from dlmcache.kernels.pool import KVPool, PoolFull, bytes_per_token

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_blocks_are_allocated_freed_and_bounded():
    pool = KVPool(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=4, block_size=16)
    a = pool.allocate(17)  # two blocks
    b = pool.allocate(16)
    assert len(a) == 2 and len(b) == 1 and pool.free_blocks == 1 and not set(a) & set(b)
    assert pool.can_allocate(16) and not pool.can_allocate(17)
    with pytest.raises(PoolFull, match="1 of 4 are free"):
        pool.allocate(20)
    with pytest.raises(PoolFull, match="4 in all"):
        pool.allocate(65)
    pool.free(a)
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(a)  # twice
    pool.free(b)
    assert pool.free_blocks == 4


def test_slots_follow_the_block_table():
    pool = KVPool(1, 1, 4, num_blocks=8, block_size=4)
    assert pool.allocate(1) == [1]  # block 0 is the null block
    slots = pool.slots([5, 2, 7], 10)
    assert slots.tolist() == [20, 21, 22, 23, 8, 9, 10, 11, 28, 29]
    with pytest.raises(ValueError, match="fewer than"):
        pool.slots([5], 10)


def test_pool_sized_by_bytes():
    per_token = bytes_per_token(3, 2, 16, torch.bfloat16)
    assert per_token == 2 * 3 * 2 * 16 * 2
    pool = KVPool.for_bytes(per_token * 16 * 6 + 7, 3, 2, 16, block_size=16, dtype=torch.bfloat16)
    assert pool.num_blocks == 5 and pool.nbytes == per_token * 16 * 6  # with the null block
    assert all(bool((t[:16] == 0).all()) for t in pool.k + pool.v)
    with pytest.raises(ValueError, match="does not hold two blocks"):
        KVPool.for_bytes(10, 3, 2, 16)
    with pytest.raises(ValueError, match="num_blocks=0"):
        KVPool(1, 1, 1, num_blocks=0)


# per request: (queries fed, keys stored, keys attended)
CASES = [
    [(1, 1, 1)],
    [(17, 63, 63), (1, 500, 480), (5, 40, 33)],
    [(63, 63, 63), (2, 17, 17)],
]


@pytest.mark.parametrize("backend", ["torch", "auto", "triton"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("heads", [(4, 4, 64), (7, 1, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("invariant", [False, True], ids=["batched", "batch_invariant"])
def test_paged_attention_equals_each_request_alone(backend, case, heads, dtype, invariant):
    """Each request's queries over its own keys, against float64 attention per request; with
    `batch_invariant` (row by row off the kernel) each row's result is also the same bits as with its
    row alone in the layout."""
    if invariant and backend == "triton":
        pytest.skip("the kernel reads every row on its own either way")
    if backend == "triton":
        pytest.importorskip("triton")
        from dlmcache.kernels.ops.backend import interpreting

        if DEVICE == "cpu" and not interpreting():
            pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    hq, hkv, d = heads
    g = torch.Generator().manual_seed(0)
    block = 16
    pool = KVPool(1, hkv, d, num_blocks=64, block_size=block, dtype=dtype, device=DEVICE)
    # Slots nobody owns hold garbage (finite: the pool only ever holds written K/V) that must not leak.
    pool.k[0].copy_(1e4 * torch.randn(pool.k[0].shape, generator=g))
    pool.v[0].copy_(1e4 * torch.randn(pool.v[0].shape, generator=g))
    width = max(k for _, k, _ in case)
    queries, key_slots, key_valid, row_ids, ranks, reference, reference_lse = [], [], [], [], [], [], []
    pool.allocate(3 * block)  # requests do not start at slot 0
    for r, (n, stored, attended) in enumerate(case):
        slots = pool.slots(pool.allocate(stored)[::-1] if r % 2 else pool.allocate(stored), stored)
        k = torch.randn(stored, hkv, d, generator=g).to(dtype)
        v = torch.randn(stored, hkv, d, generator=g).to(dtype)
        pool.write(0, slots, k.to(DEVICE), v.to(DEVICE))
        q = torch.randn(n, hq, d, generator=g).to(dtype)
        queries.append(q)
        key_slots.append(torch.nn.functional.pad(slots, (0, width - stored)))
        key_valid.append(torch.arange(width, device=DEVICE) < attended)
        row_ids.append(torch.full((n,), r))
        ranks.append(torch.arange(n))
        one, lse = attention(
            q.double().transpose(0, 1)[None], k[:attended].double().transpose(0, 1)[None],
            v[:attended].double().transpose(0, 1)[None], backend="torch", return_lse=True,
        )  # fmt: skip
        reference.append(one[0].transpose(0, 1))
        reference_lse.append(lse[0].transpose(0, 1))
    layout = paged_layout(
        torch.stack(key_slots), torch.stack(key_valid), torch.cat(row_ids).to(DEVICE), torch.cat(ranks).to(DEVICE),
        max(n for n, _, _ in case), dtype, batch_invariant=invariant,
    )  # fmt: skip
    out = paged_attention(torch.cat(queries).to(DEVICE), pool.k[0], pool.v[0], layout, backend=backend)
    if invariant:
        start = 0
        for r, q in enumerate(queries):
            own = slice(0, case[r][1])  # its own width (a batch pads to the widest row)
            one = paged_layout(layout.key_slots[r : r + 1, own], layout.key_valid[r : r + 1, own],
                               torch.zeros(len(q), dtype=torch.long, device=DEVICE),
                               torch.arange(len(q), device=DEVICE), len(q), dtype, batch_invariant=True)  # fmt: skip
            alone = paged_attention(q.to(DEVICE), pool.k[0], pool.v[0], one, backend=backend)
            assert torch.equal(alone, out[start : start + len(q)]), r
            start += len(q)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double().cpu(), torch.cat(reference), rtol=tol, atol=tol)
    # the log-sum-exps too (what merging with attention over other keys needs), the same outputs with them
    same, lse = paged_attention(torch.cat(queries).to(DEVICE), pool.k[0], pool.v[0], layout, backend=backend,
                                return_lse=True)  # fmt: skip
    assert lse.shape == out.shape[:2] and lse.dtype in (torch.float32, torch.float64)
    torch.testing.assert_close(same.double().cpu(), torch.cat(reference), rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double().cpu(), torch.cat(reference_lse), rtol=tol, atol=tol)


def test_paged_layout_rejects_bad_shapes():
    with pytest.raises(ValueError, match="must be \\[R, K\\]"):
        paged_layout(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool), torch.zeros(1),
                     torch.zeros(1), 1, torch.float32)  # fmt: skip
    with pytest.raises(ValueError, match="max_queries=0"):
        paged_layout(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool),
                     torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 0, torch.float32)  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "auto", "triton"])
@pytest.mark.parametrize("rows", [1, 3])
def test_dense_queries_may_come_as_rows(backend, rows):
    """With every row feeding the same count, queries as rows [R, Hq, N, D] give the flattened result."""
    if backend == "triton":
        pytest.importorskip("triton")
        from dlmcache.kernels.ops.backend import interpreting

        if DEVICE == "cpu" and not interpreting():
            pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(1)
    pool = KVPool(1, 2, 16, num_blocks=16, block_size=8, device=DEVICE)
    pool.k[0].copy_(torch.randn(pool.k[0].shape, generator=g))
    pool.v[0].copy_(torch.randn(pool.v[0].shape, generator=g))
    n, width = 5, 20
    key_slots = torch.stack([pool.slots(pool.allocate(width), width) for _ in range(rows)])
    key_valid = torch.arange(width, device=DEVICE)[None] < torch.tensor([[20], [13], [7]][:rows], device=DEVICE)
    layout = paged_layout(key_slots, key_valid, torch.arange(rows).repeat_interleave(n).to(DEVICE),
                          torch.arange(n).repeat(rows).to(DEVICE), n, torch.float32)  # fmt: skip
    assert layout.dense
    flat = torch.randn(rows * n, 4, 16, generator=g).to(DEVICE)
    want = paged_attention(flat, pool.k[0], pool.v[0], layout, backend=backend)
    as_rows = flat.view(rows, n, 4, 16).transpose(1, 2)
    got = paged_attention(as_rows, pool.k[0], pool.v[0], layout, backend=backend)
    torch.testing.assert_close(got.transpose(1, 2).reshape(rows * n, 4, 16), want, rtol=0, atol=0)
    _, want_lse = paged_attention(flat, pool.k[0], pool.v[0], layout, backend=backend, return_lse=True)
    _, got_lse = paged_attention(as_rows, pool.k[0], pool.v[0], layout, backend=backend, return_lse=True)
    assert got_lse.shape == (rows, 4, n)
    torch.testing.assert_close(got_lse.transpose(1, 2).reshape(rows * n, 4), want_lse, rtol=0, atol=0)
    with pytest.raises(ValueError, match="need a dense layout"):
        sparse = paged_layout(key_slots, key_valid, torch.zeros(2, dtype=torch.long, device=DEVICE),
                              torch.arange(2, device=DEVICE), 3, torch.float32)  # fmt: skip
        paged_attention(as_rows, pool.k[0], pool.v[0], sparse, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("every_key", [False, True])
def test_one_row_on_consecutive_slots_reads_a_view(backend, every_key):
    """`first_slot` (the row's keys are a view of the pool) and `every_key` (no mask) give what the
    gathered, masked path gives, bit for bit, with garbage in every slot the row does not own."""
    g = torch.Generator().manual_seed(2)
    pool = KVPool(1, 2, 16, num_blocks=16, block_size=8, device=DEVICE)
    pool.k[0].copy_(1e3 * torch.randn(pool.k[0].shape, generator=g))
    pool.v[0].copy_(1e3 * torch.randn(pool.v[0].shape, generator=g))
    pool.allocate(8)  # the row starts past slot 8
    width, n = 21, 6
    blocks = pool.allocate(width)
    slots = pool.slots(blocks, width)
    assert torch.equal(slots, torch.arange(slots[0], slots[0] + width, device=DEVICE))
    valid = torch.ones(1, width, dtype=torch.bool, device=DEVICE)
    if not every_key:
        valid[0, 15:] = False
    args = (slots[None], valid, torch.zeros(n, dtype=torch.long, device=DEVICE), torch.arange(n, device=DEVICE), n)
    q = torch.randn(1, 4, n, 16, generator=g).to(DEVICE)
    want = paged_attention(q, pool.k[0], pool.v[0], paged_layout(*args, torch.float32), backend=backend)
    fast = paged_layout(*args, torch.float32, first_slot=int(slots[0]), every_key=every_key)
    assert (fast.bias is None) == every_key
    got = paged_attention(q, pool.k[0], pool.v[0], fast, backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="first_slot=-1 needs one row"):
        paged_layout(*args, torch.float32, first_slot=-1)
