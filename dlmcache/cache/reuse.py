"""KV reuse across denoising steps: the options every reusing cache shares, and Fast-dLLM's prefix
and dual caches.

Each strategy here refreshes (recomputes the canvas) at some steps and between them feeds some
positions that attend to the KV the pool holds for the rest. Each can also compress the prompt's KV
with the shared policies (`compression.prompt_compression`): evicted to a budget and / or stored in
KIVI's packed codes.
"""

from __future__ import annotations

from .base import DenoisingCache
from .compression import prompt_compression


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
    """Base of the KV-reusing strategies: their shared options.

    Options every KV-reusing cache takes, to compress the prompt's KV after the first forward:
      policy: an eviction policy by registry name or instance (None: keep every prompt entry);
        budget: the fraction of each row's prompt kept, in (0, 1], or a token count; allocator: how
        the budget splits over layers ("uniform", "pyramid"); quantizer: "kivi2" / "kivi4" / "kivi8"
        or a `KIVI`. See `compression.prompt_compression` for what is refused and why.
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


class PrefixCache(KVReuseCache):
    """`cache="prefix"` (Fast-dLLM prefix cache, Wu et al., arXiv 2505.22618): a full forward at the
    first step of every block refreshes all KV; the block's other steps feed the block and everything
    after it, reusing the KV of the prompt and the finished blocks."""

    name = "prefix"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._compression_repr().removeprefix(', ')})"

    @classmethod
    def refresh(cls, b, rows):
        return b.start[rows] != b.state["last_start"][rows]  # a new block

    @classmethod
    def feed(cls, b, rows, refresh):
        length = b.state["length"][rows]
        return (b.pos >= (b.start[rows] - b.shift)[:, None]) & b.in_len[rows], length


class DualCache(PrefixCache):
    """`cache="dual"` (Fast-dLLM DualCache): like `prefix`, but the masked suffix after the block is
    reused too, so only the current block is fed between refreshes."""

    name = "dual"

    block_mode = "sub_block"  # on Fast-dLLM v2 (decoding blocks inside an attention block)

    @classmethod
    def feed(cls, b, rows, refresh):
        start, end = b.start[rows, None], b.end[rows, None]
        return (b.pos >= start - b.shift) & (b.pos < end), b.state["length"][rows]
