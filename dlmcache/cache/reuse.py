"""KV reuse across denoising steps: the shared loop and Fast-dLLM's prefix and dual caches.

Every strategy here keeps one `CanvasStore` and, per step, either refreshes it (`plans.Refresh`) or
feeds some positions that attend to cached KV for the rest (`plans.Window`, `plans.Scatter`). They
differ only in `_plan`. Each can also compress the prompt's KV with the shared policies
(`store.prompt_compression`): evicted to a budget and / or stored in KIVI's packed codes.
"""

from __future__ import annotations

import torch

from .base import DenoisingCache
from .plans import Plan, Refresh, Scatter, Window
from .store import CanvasStore, prompt_compression


def refreshes_prompt(prompt_len: int, new_tokens: int) -> bool:
    """FreeCache's default refresh scope for a row with an uncompressed prompt of `prompt_len` tokens
    and `new_tokens` to generate: recompute the prompt too while it is no longer than the answer, the
    canvas alone when it is longer.

    Both sides of the rule are measured (docs/results.md, "The scope of a refresh"): on the bundled
    task's short prompts (19 tokens, 64 new) recomputing the prompt is worth 1.4-1.8 points and
    costs at most a second canvas's worth of tokens per refresh; on long prompts the canvas alone is as
    accurate (tiny-long, up to ~580 tokens) and a refresh no longer costs a forward over the whole
    prompt (a 4k prompt's, ~10 s on a CPU, each time the drift test fires)."""
    return prompt_len <= new_tokens


class KVReuseCache(DenoisingCache):
    """Base of the KV-reusing strategies: the store, the plan dispatch and statistics.

    Options every KV-reusing cache takes, to compress the prompt's KV after the first forward:
      policy: an eviction policy by registry name or instance (None: keep every prompt entry);
        budget: the fraction of each row's prompt kept, in (0, 1], or a token count; allocator: how
        the budget splits over layers ("uniform", "pyramid"); quantizer: "kivi2" / "kivi4" / "kivi8"
        or a `KIVI`. See `store.prompt_compression` for what is refused and why.
    The scope of a refresh after the first forward, for every KV-reusing cache:
      refresh_prompt: True: recompute the prompt too (and compress it again, if it is compressed);
        False: recompute the generation region only (and the few prompt positions the step reads
        queries from), against the prompt's KV of the first forward, computed while the whole answer
        was masked. None (default): `default_refresh_prompt`: False with a compressed prompt
        (docs/results.md measures both), True for Fast-dLLM's prefix and dual caches otherwise
        (their refresh recomputes everything), and for FreeCache each row's own by the length of its
        prompt (`refreshes_prompt`).
    """

    def __init__(
        self, policy=None, budget: float | int = 1.0, allocator=None, quantizer=None, refresh_prompt: bool | None = None
    ):
        super().__init__()
        self.compression = prompt_compression(policy, budget, allocator, quantizer)
        if refresh_prompt is not None and not isinstance(refresh_prompt, bool):
            raise TypeError(f"refresh_prompt={refresh_prompt!r} must be None (the cache's default) or a bool")
        self.refresh_prompt = self.default_refresh_prompt() if refresh_prompt is None else refresh_prompt

    def default_refresh_prompt(self) -> bool | None:
        """Whether a refresh recomputes the prompt when `refresh_prompt` is not given (None: each row
        as `refreshes_prompt` says for its prompt)."""
        return self.compression is None

    def _compression_repr(self) -> str:
        c = self.compression
        default = self.refresh_prompt == self.default_refresh_prompt()
        scope = "" if default else f", refresh_prompt={self.refresh_prompt}"
        if c is None:
            return scope
        policy = None if c.policy is None else c.policy.name
        quantizer = None if c.quantizer is None else f"kivi{c.quantizer.bits}"
        return f", policy={policy!r}, budget={c.budget}, quantizer={quantizer!r}{scope}"

    def prepare(self, model, layout) -> None:
        super().prepare(model, layout)
        self.store = CanvasStore(model, layout, self.compression)
        self.shift = model.logit_shift
        if self.refresh_prompt is None:  # each row's own scope, by its prompt's length (left padding off)
            prompt_lens = layout.key_mask[:, : layout.prompt_len].sum(1).tolist()
            new_tokens = layout.length - layout.prompt_len
            self._row_refreshes_prompt = torch.tensor([refreshes_prompt(p, new_tokens) for p in prompt_lens])
        self.stats.extra.update(kv_bytes=self.store.nbytes, canvas_refreshes=0)

    def _plan(self, canvas: torch.LongTensor, targets: torch.LongTensor, start: int, end: int) -> list[Plan]:
        """The step's plans: the first for the whole batch, the next ones `Refresh` some of its rows
        (one forward each; their logits replace those rows')."""
        raise NotImplementedError

    def _logits(self, x, targets, start, end):
        plans = self._plan(x, targets, start, end)
        logits = self._forward(x, targets, plans[0])
        for plan in plans[1:]:
            logits[plan.rows] = self._forward(x, targets, plan)
        self._after_step(x, plans)
        self.stats.extra["kv_bytes"] = self.store.nbytes
        return logits

    def _after_step(self, x: torch.LongTensor, plans: list[Plan]) -> None:
        """Called once the step's forwards have run (the drift rule measures here)."""

    def _refresh(self) -> Refresh:
        """The whole batch's refresh: the first recomputes the prompt, later ones as `refresh_prompt` says
        (None: each row by its prompt's length)."""
        return Refresh(prompt=True if self.step == 0 else self.refresh_prompt)

    def _refresh_lead(self) -> int:
        """How many of the prompt's last positions a refresh of the canvas alone feeds as queries
        (their KV is rewritten unless the prompt is compressed): Dream predicts its first target from
        the prompt's last position."""
        return self.shift

    def _forward(self, x, targets, plan: Plan) -> torch.Tensor:
        if isinstance(plan, Refresh) and plan.prompt is None:
            return self._refresh_by_row(x, targets, plan.rows)
        if isinstance(plan, Refresh):
            rows = plan.rows
            if plan.prompt:
                self.store.begin(plan, x, rows, None)
                logits = self.full_forward(x if rows is None else x[rows], targets, kv=self.store, rows=rows)
                self._observe(x, plan, torch.arange(self.layout.length, device=x.device))
                return logits
            # The generation region only, against the prompt's stored (maybe compressed) KV.
            self.stats.extra["canvas_refreshes"] += self._share(rows)
            length = self.layout.length
            start = max(self.layout.prompt_len - self._refresh_lead(), 0)
            return self._cached_forward(x, targets, Window(start, length, length), rows, refresh=plan)
        return self._cached_forward(x, targets, plan, None)

    def _refresh_by_row(self, x, targets, rows) -> torch.Tensor:
        """A refresh whose rows each take their own scope: one forward for the rows that recompute their
        prompt, one for those that recompute their canvas alone, and their logits back in row order."""
        index = torch.arange(x.shape[0], device=x.device) if rows is None else rows
        whole = self._row_refreshes_prompt.to(index.device)[index]
        if bool(whole.all()) or not bool(whole.any()):  # one scope for all of them: one forward
            return self._forward(x, targets, Refresh(rows=rows, prompt=bool(whole[0])))
        parts = [(index[whole], True), (index[~whole], False)]
        outs = [self._forward(x, targets, Refresh(rows=part, prompt=prompt)) for part, prompt in parts]
        logits = outs[0].new_empty((index.numel(), *outs[0].shape[1:]))
        for (part, _), out in zip(parts, outs, strict=True):
            logits[torch.searchsorted(index, part)] = out
        return logits

    def _observe(self, x, plan: Plan, fed: torch.LongTensor) -> None:
        """Called after every forward with the plan it ran (a canvas-only refresh as its `Refresh`) and
        the positions it fed; the store's `fresh_values` holds their last-layer values."""

    def _cached_forward(self, x, targets, plan: Window | Scatter, rows, refresh: Refresh | None = None) -> torch.Tensor:
        if isinstance(plan, Scatter):
            fed = plan.index
            logits_index = torch.searchsorted(fed, targets)
        else:
            # Targets lie in [start, end) of the block; a window starts at or before start - shift,
            # since Dream predicts token i from hidden state i-1.
            fed = slice(plan.start, plan.end)
            logits_index = targets - plan.start
        index = fed if isinstance(fed, torch.Tensor) else torch.arange(plan.start, plan.end, device=x.device)
        self.store.begin(plan, x, rows, index)
        n_fed, share = index.numel(), self._share(rows)
        self.stats.forwards += 1
        self.stats.fed_tokens += n_fed * share
        self.stats.reused_tokens += (plan.attend_end - n_fed) * share
        xs, positions = x, self.layout.positions
        if rows is not None:
            xs, positions = x[rows], positions[rows]
        logits = self.model(xs[:, fed], positions=positions[:, fed], cache=self.store, logits_index=logits_index).logits
        self._observe(x, refresh or plan, index)
        return logits


class PrefixCache(KVReuseCache):
    """`cache="prefix"` (Fast-dLLM prefix cache, Wu et al., arXiv 2505.22618): a full forward at the
    first step of every block refreshes all KV; the block's other steps feed the block and everything
    after it, reusing the KV of the prompt and the finished blocks."""

    name = "prefix"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._compression_repr().removeprefix(', ')})"

    def prepare(self, model, layout) -> None:
        super().prepare(model, layout)
        self._block = None

    def _new_block(self, start: int) -> bool:
        new = self._block != start
        self._block = start
        return new

    def _plan(self, canvas, targets, start, end):
        if self._new_block(start):
            return [self._refresh()]
        length = self.layout.length
        return [Window(start - self.shift, length, length)]


class DualCache(PrefixCache):
    """`cache="dual"` (Fast-dLLM DualCache): like `prefix`, but the masked suffix after the block is
    reused too, so only the current block is fed between refreshes."""

    name = "dual"

    def _plan(self, canvas, targets, start, end):
        if self._new_block(start):
            return [self._refresh()]
        return [Window(start - self.shift, end, self.layout.length)]
