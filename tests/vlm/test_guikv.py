"""GUI-KV against its rule written out on hand-made tensors."""

import math

import pytest
import torch
import torch.nn.functional as F
from dlmcache.kernels.policies import ScoreInputs
from dlmcache.vlm.guikv import GUIKV, screenshot_tags

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
