"""GUI-KV (Huang et al., "GUI-KV: Efficient GUI Agents via KV Cache with Spatio-Temporal Awareness",
arXiv 2510.00536): which KV entries a GUI agent keeps when its prompt holds several screenshots.

Per layer, with a uniform budget of C tokens out of N (every layer keeps the same number):

1. attention score, as SnapKV: A_i = avg-pool (kernel 5) of the softmax attention that the last w
   (8) queries give token i, summed over those queries (averaged over a KV head's query group);
2. spatial saliency of the *current* screenshot's visual tokens: r_i = ||x_i||_2 of the attention
   input (after the layer norm), z = standardised r, S = softmax(z / tau) over that screenshot
   (tau = 3.5), and psi_i = A_i + alpha * S_i (alpha = 2);
3. temporal redundancy, when the prompt holds >= 2 screenshots: the current screenshot's keys span a
   rank-r subspace (r = 32); each visual key k_j of the earlier screenshots gets the residual
   rho_j = ||k_j - Q Q^T k_j||, and the floor((1 - C/N) * M) most redundant of those M tokens (smallest
   rho) get psi = 0;
4. keep the top (C - w) of psi plus the last w tokens.

`subspace="qr"` takes Q from a reduced QR of the current keys in token order, as the authors' code
does (so Q spans the first r keys in raster order); `subspace="svd"` takes the r principal
directions instead. Keys and values stay at the model's KV-head count (the authors' code expands GQA
heads before storing, so its memory saving is far below the budget); here memory shrinks by the
budget.

Which stored token belongs to which screenshot comes from `ScoreInputs.tags` (`CompressedCache`'s
`token_tags`, what `GUIAgentSession` sets) or, for a single prefill, from runs of `image_token_id`
in the prompt ids. Without screenshots GUI-KV is SnapKV with a small window, so it also runs on
text-only models through the same API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from dlmcache.kernels.policies.base import EvictionPolicy, ScoreInputs, check_positive, pool1d


def screenshot_tags(token_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[B, L] index of the screenshot (run of consecutive `image_token_id`) each token belongs to,
    counted from 0 in prompt order per row, and -1 for every other token."""
    is_img = token_ids == image_token_id
    starts = is_img & ~torch.nn.functional.pad(is_img[:, :-1], (1, 0), value=False)
    run = starts.long().cumsum(-1) - 1
    return torch.where(is_img, run, torch.full_like(run, -1))


@dataclass
class GUIKV(EvictionPolicy):
    """GUI-KV's token scores (see the module docstring). `budget` is the fraction of the prompt
    *kept*, used by `GUIAgentSession` / `make_cache`; a `CompressedCache` given this policy with its
    own budget uses that one."""

    budget: float = 0.2
    window: int = 8
    kernel: int = 5
    alpha: float = 2.0
    temperature: float = 3.5
    rank: int = 32
    subspace: str = "qr"
    image_token_id: int | None = None
    name = "guikv"
    needs = frozenset({"queries", "hidden"})

    def __post_init__(self):
        if isinstance(self.budget, bool) or not 0 < self.budget <= 1:
            raise ValueError(f"budget={self.budget!r} must be a fraction kept in (0, 1]")
        for name in ("window", "rank", "temperature"):
            check_positive(name, getattr(self, name))
        check_positive("alpha", self.alpha, allow_zero=True)
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel={self.kernel} must be an odd integer >= 1")
        if self.subspace not in ("qr", "svd"):
            raise ValueError(f"subspace={self.subspace!r}: expected 'qr' or 'svd'")

    def tags(self, inputs: ScoreInputs) -> torch.Tensor | None:
        """[B, H, L] screenshot index of every stored token (-1: not visual), or None."""
        if inputs.tags is not None and bool((inputs.tags >= 0).any()):
            return inputs.tags
        if self.image_token_id is not None and inputs.token_ids is not None:
            tags = screenshot_tags(inputs.token_ids.to(inputs.keys.device), self.image_token_id)
            if tags.shape[-1] == inputs.length:
                return tags[:, None].expand(-1, inputs.heads, -1)
        return None

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        attn = inputs.window_attention(self.window)  # [B, H, G, W, L]
        psi = pool1d(attn.sum(3).mean(2), self.kernel, "avg", inputs.head_mask)  # [B, H, L]
        tags = self.tags(inputs)
        if tags is None:
            return psi
        valid = inputs.head_mask if inputs.key_mask is not None else torch.ones_like(tags, dtype=torch.bool)
        for b in range(inputs.batch):
            current = int(tags[b].max())
            if current < 0:
                continue
            self._add_saliency(psi, inputs, b, (tags[b, 0] == current).nonzero().flatten())
            if bool(((tags[b] >= 0) & (tags[b] < current)).any()):
                self._zero_redundant(psi, inputs, b, tags[b], valid[b], current)
        return psi

    def _add_saliency(self, psi: torch.Tensor, inputs: ScoreInputs, b: int, positions: torch.Tensor) -> None:
        """psi[b, :, current screenshot] += alpha * softmax(standardised ||x|| / tau)."""
        if inputs.hidden is None:
            raise ValueError("GUIKV reads the attention inputs: attach the model (CompressedCache(..., model=model))")
        offset = inputs.length - inputs.hidden.shape[1]  # hidden may cover only the newest segment
        r = inputs.hidden[b, positions - offset].float().norm(dim=-1)
        z = (r - r.mean()) / (r.std(unbiased=False) + 1e-8)
        psi[b, :, positions] += self.alpha * torch.softmax(z / self.temperature, dim=0)

    def basis(self, current_keys: torch.Tensor) -> torch.Tensor:
        """[D, r] orthonormal basis of the current screenshot's keys [n, D] (float32)."""
        r = min(self.rank, *current_keys.shape)
        if self.subspace == "qr":
            q, _ = torch.linalg.qr(current_keys.T, mode="reduced")  # columns in token order
            return q[:, :r]
        _, _, vh = torch.linalg.svd(current_keys, full_matrices=False)
        return vh[:r].T

    def _zero_redundant(self, psi, inputs: ScoreInputs, b: int, tags, valid, current: int) -> None:
        """psi = 0 for the floor((1 - C/N) M) earlier-screenshot tokens best explained by the current
        screenshot's key subspace, per KV head."""
        n = int(valid[0].sum())
        keep = inputs.budget if inputs.budget is not None else math.floor(self.budget * n)
        for h in range(inputs.heads):
            keys = inputs.keys[b, h].float()
            basis = self.basis(keys[tags[h] == current])
            prev = ((tags[h] >= 0) & (tags[h] < current) & valid[h]).nonzero().flatten()
            k_prev = keys[prev]
            rho = (k_prev - k_prev @ basis @ basis.T).norm(dim=-1)
            drop = math.floor((1 - min(keep, n) / n) * prev.numel())
            if drop:
                psi[b, h, prev[rho.argsort()[:drop]]] = 0.0
