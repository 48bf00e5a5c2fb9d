"""The policy API shared by autoregressive LMs, the DLM caches and the VLM module: three base classes,
each declaring the hooks a cache may call on it (so a cache never probes a policy with getattr).

- `EvictionPolicy`: scores every cached token of one layer ([B, H_kv, L], higher = keep) from whatever
  it `needs`; the base class turns scores into kept indices once (top-k per row and head, padding
  never kept, the observation window always kept). `is_recall` policies keep everything and choose
  what each query attends to instead (`recall.RecallPolicy`).
- `BudgetAllocator`: how a total budget splits over layers; `cascading` ones share it over the layers
  the prefill has reached (`observe`, `cascade_budgets`), re-trimming earlier layers.
- `QuantizationPolicy`: how kept tokens are stored (`store`); `cross_layer` ones let adjacent layers
  share one store (`merge_pair`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch


@dataclass
class ScoreInputs:
    """What a layer offers a policy at compression time.

    keys / values: [B, H_kv, L, D] (keys after RoPE); queries: [B, H_q, W, D] the last W queries of the
    prefill (after RoPE), when the model is attached; hidden: [B, L, d] the attention input (after the
    layer norm), when a policy needs it; key_mask: [B, L] or [B, H_kv, L], True for real tokens;
    token_ids: [B, L]; mask_queries: [B, H_q, M, D] a diffusion LM's queries at its M still-masked
    answer positions (after RoPE), whose attention over these keys MaskKV scores by; tags: [B, H_kv, L]
    integer labels of the stored tokens that a caller set (e.g. which screenshot a visual token came
    from, -1 for text; see `CompressedCache.token_tags`);
    budget: how many tokens this layer keeps (for scores that depend on it, as GUI-KV's);
    layer_idx / num_layers; scale: the attention scale (1/sqrt(D) by default); extra: anything a
    caller adds for a specific policy.
    """

    keys: torch.Tensor
    values: torch.Tensor
    layer_idx: int = 0
    num_layers: int = 1
    queries: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    mask_queries: torch.Tensor | None = None
    tags: torch.Tensor | None = None
    budget: int | None = None
    scale: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    @property
    def heads(self) -> int:
        return self.keys.shape[1]

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def head_mask(self) -> torch.Tensor | None:
        """key_mask as [B, H_kv, L] (None when every entry is real)."""
        if self.key_mask is None:
            return None
        return self.key_mask if self.key_mask.dim() == 3 else self.key_mask[:, None].expand(-1, self.heads, -1)

    def _grouped_queries(self, window: int | None) -> torch.Tensor:
        """The last `window` queries (all when None) as float32 [B, H_kv, G, W, D], pre-scaled."""
        if self.queries is None:
            raise ValueError("this policy needs the queries: attach the model (CompressedCache(..., model=model))")
        q = self.queries if window is None else self.queries[:, :, -window:]
        b, hq, w, d = q.shape
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(d)
        return q.float().view(b, self.heads, hq // self.heads, w, d) * scale

    def _attention_rows(self, qf: torch.Tensor, start: int, w: int) -> torch.Tensor:
        """Softmax rows of queries `qf` (window offsets start.. of a window of w) over all keys, causal
        inside the window and without padded keys; fully masked rows are 0."""
        scores = torch.einsum("bhgwd,bhld->bhgwl", qf, self.keys.float())
        pos = torch.arange(self.length, device=qf.device)
        qpos = self.length - w + start + torch.arange(qf.shape[3], device=qf.device)
        valid = pos[None, :] <= qpos[:, None]  # [W, L]
        if self.key_mask is not None:
            valid = valid & self.head_mask[:, :, None, None, :]
        scores.masked_fill_(~valid, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num_(0.0)

    def window_attention(self, window: int | None = None) -> torch.Tensor:
        """Softmax attention of the last `window` queries over all keys, [B, H_kv, G, W, L] in float32
        (G query heads per KV head), causal inside the window and without padded keys."""
        qf = self._grouped_queries(window)
        return self._attention_rows(qf, 0, qf.shape[3])

    def mask_attention(self) -> torch.Tensor:
        """Softmax attention of the masked answer positions' queries over these keys (without padded
        keys), [B, H_kv, G, M, L] in float32: every answer position sees the whole prompt (a diffusion
        LM attends bidirectionally). Rows without masked positions are empty (M = 0)."""
        if self.mask_queries is None:
            raise ValueError("this policy needs the masked positions' queries: only a diffusion-LM cache has them")
        b, hq, m, d = self.mask_queries.shape
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(d)
        qf = self.mask_queries.float().view(b, self.heads, hq // self.heads, m, d) * scale
        scores = torch.einsum("bhgmd,bhld->bhgml", qf, self.keys.float())
        if self.key_mask is not None:
            scores.masked_fill_(~self.head_mask[:, :, None, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num_(0.0)

    def attention_received(self, window: int | None = None, chunk: int = 256) -> torch.Tensor:
        """Attention each key receives, summed over the last `window` queries (all when None), as
        [B, H_kv, G, L] float32: `window_attention(window).sum(3)` computed `chunk` queries at a time,
        so an all-queries score (H2O, EMS, FastGen, D2O) never materialises the L x L matrix."""
        qf = self._grouped_queries(window)
        w = qf.shape[3]
        out = qf.new_zeros(*qf.shape[:3], self.length)
        for start in range(0, w, chunk):
            out += self._attention_rows(qf[:, :, :, start : start + chunk], start, w).sum(3)
        return out


class EvictionPolicy:
    """Base of the eviction scorers (each a small dataclass). Subclasses implement `score` and set
    `needs` to the inputs they read: "queries" (the last `window` queries), "all_queries" (every
    prefill query), "mask_queries" (a diffusion LM's masked positions), "hidden", "token_ids"."""

    name: ClassVar[str] = "base"
    needs: ClassVar[frozenset[str]] = frozenset()
    #: The last `window` tokens are always kept (SnapKV's observation window); 0 = none.
    window: int = 0
    #: Keeps every token and selects what each decoding query attends to (`recall.RecallPolicy`).
    is_recall: ClassVar[bool] = False

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """[B, H_kv, L] importance of every cached token (higher = keep)."""
        raise NotImplementedError

    @property
    def query_window(self) -> int | None:
        """How many of the last prefill queries `score` reads (None: all of them)."""
        return None if "all_queries" in self.needs else max(self.window, 1)

    def ranking(self, inputs: ScoreInputs) -> torch.Tensor:
        """`score` made ready for top-k: the observation window above every other token, its most
        recent first (a budget smaller than the window keeps the window's newest tokens, not an
        arbitrary tie-break among them), padding at -inf. [B, H_kv, L]"""
        scores = self.score(inputs).to(torch.float32, copy=True)
        if self.window:
            start = max(0, inputs.length - self.window)
            top = scores.amax(-1, keepdim=True)
            recency = torch.arange(1, inputs.length - start + 1, device=scores.device, dtype=scores.dtype)
            scores[..., start:] = top + recency * (top.abs() + 1)
        if inputs.key_mask is not None:
            scores = scores.masked_fill(~inputs.head_mask, float("-inf"))
        return scores

    def select(self, inputs: ScoreInputs, keep: int) -> torch.LongTensor:
        """Sorted indices [B, H_kv, keep] of the tokens to keep: the `window` most recent ones, then
        the best scores; padding (key_mask False) goes last."""
        length = inputs.length
        if keep >= length:
            return torch.arange(length, device=inputs.keys.device).expand(inputs.batch, inputs.heads, length)
        return self.ranking(inputs).topk(keep, dim=-1).indices.sort(dim=-1).values

    def merge(self, inputs: ScoreInputs, index: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values [B, H, K, D] to store for the kept `index`, when the policy folds evicted
        tokens into them (D2O, EMS); None (the default) stores the kept tokens as they are."""
        return None

    def select_ragged(self, inputs: ScoreInputs, keep: int) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Per-head selections of different sizes: (indices [B, H, K_max], which of them are kept
        [B, H, K_max]); K_max may exceed `keep` while the heads' total stays H * keep. Uniform
        policies keep `keep` per head."""
        index = self.select(inputs, keep)
        return index, torch.ones_like(index, dtype=torch.bool)


class BudgetAllocator:
    """Maps (budget, tokens seen, layer) to the tokens that layer keeps."""

    name: ClassVar[str] = "base"
    #: Budgets are shared over the layers compressed so far (the cache calls `observe` on each layer,
    #: then `cascade_budgets`, and re-trims earlier layers to their new budgets).
    cascading: ClassVar[bool] = False

    def validate(self, budget) -> None:
        resolve_budget(budget, 1 << 30)

    def layer_budget(self, budget, length: int, layer_idx: int, num_layers: int) -> int:
        raise NotImplementedError

    def observe(self, inputs: ScoreInputs) -> None:
        """Cascading allocators: record what this layer's budget depends on."""
        raise NotImplementedError

    def cascade_budgets(self, budget, length: int, layers: list[int]) -> dict[int, int]:
        """Cascading allocators: the budgets of `layers` (those compressed so far)."""
        raise NotImplementedError


class QuantizationPolicy:
    """Builds the per-layer store that holds K/V in compressed form (KIVI, MiKV, GEAR, ThinK, MiniCache).
    A store has `append(keys, values)`, `read() -> (keys, values)`, `length` and
    `nbytes_as(element_bytes)`. `needs` lists what the policy reads besides K/V ("queries",
    "all_queries")."""

    name: ClassVar[str] = "base"
    needs: ClassVar[frozenset[str]] = frozenset()
    #: From the middle layer up, every second layer shares its store with the one below (`merge_pair`).
    cross_layer: ClassVar[bool] = False

    def store(self, keys: torch.Tensor, values: torch.Tensor, inputs=None):
        """The store for one layer's keys / values [B, H, L, D]; `inputs`: a `ScoreInputs` with the
        queries when the cache has them."""
        raise NotImplementedError

    def merge_pair(self, lower, upper):
        """Cross-layer policies: the two stores that replace a lower and an upper layer's."""
        raise NotImplementedError


def pool1d(x: torch.Tensor, kernel: int, mode: str = "avg", mask: torch.Tensor | None = None) -> torch.Tensor:
    """Same-length 1-D pooling over the last dim (odd kernel), as SnapKV smooths its scores. Positions
    where `mask` (broadcastable to x) is False take no part, so padding does not dilute real tokens."""
    if kernel <= 1:
        return x
    shape = x.shape
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype).expand_as(x)
    flat, mflat = (x * m).reshape(-1, 1, shape[-1]), m.reshape(-1, 1, shape[-1])
    if mode == "max":
        filled = flat.masked_fill(mflat == 0, float("-inf"))
        out = torch.nn.functional.max_pool1d(filled, kernel, stride=1, padding=kernel // 2)
        out = out.masked_fill(out == float("-inf"), 0.0)
    else:
        total = torch.nn.functional.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
        count = torch.nn.functional.avg_pool1d(mflat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
        out = total / count.clamp_min(1e-9)
    return out.reshape(shape)


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def check_pooling(kernel, pooling) -> None:
    """The smoothing of `pool1d`: an odd kernel >= 1, "avg" or "max"."""
    if not isinstance(kernel, int) or isinstance(kernel, bool) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel={kernel!r} must be an odd integer >= 1")
    if pooling not in ("avg", "max"):
        raise ValueError(f"pooling={pooling!r}: expected 'avg' or 'max'")


def resolve_budget(budget: float | int, length: int) -> int:
    """Tokens kept out of `length`: a float in (0, 1] is the fraction *kept*; an int is a count."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget={budget!r} must be a fraction kept in (0, 1] or a token count >= 1")
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(f"budget={budget} as a fraction kept must be in (0, 1]")
        return max(1, math.floor(length * budget))
    if budget < 1:
        raise ValueError(f"budget={budget} as a token count must be >= 1")
    return min(budget, length)
