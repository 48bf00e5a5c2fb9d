"""Batches of token sequences of different lengths."""

from __future__ import annotations

import numpy as np
import torch


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """Right-align `rows` in a [B, max length] tensor filled with `pad_id` on the left; returns the ids
    and the mask of real tokens [B, L] (False on the padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = True
    return ids, mask


def after_eos(tokens: np.ndarray, mask_id: int, eos_id: int, region: np.ndarray | None = None) -> np.ndarray:
    """The positions [B, L] that stopping at EOS fills with EOS: in each row whose text up to an EOS is
    committed (no mask before it), every masked position after that EOS. `region` [B, L]: the
    generated positions the rule reads (None: all of `tokens`). Host arrays (the engine's row state)."""
    masked, eos = tokens == mask_id, tokens == eos_id
    if region is not None:
        masked, eos = masked & region, eos & region
    clean_eos = eos & (masked.cumsum(-1) == 0)
    return (clean_eos.cumsum(-1) > 0) & masked
