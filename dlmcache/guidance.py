"""Guided unmasking (Hu et al., FlashDLM, arXiv 2505.21467, Sec. 4): a small autoregressive model
verifies the diffusion model's drafts, so many tokens can be committed per denoising step.

`ARGuide` wraps any `transformers` causal LM with its own incremental KV cache over the text committed
so far; `VocabMap` translates DLM token ids into the guide's vocabulary (identity when both use the
same vocabulary, as Dream and Qwen2.5 do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerBase

from dlmcache.kernels.cache import cache_argument

RULES = ("topk_relative", "greedy")
_SPACE_MARKS = ("Ġ", "▁")  # byte-level BPE and SentencePiece spellings of a leading space


def _canonical(token: str) -> str:
    """A token's text with the tokenizer-specific leading-space mark replaced by a plain space."""
    for mark in _SPACE_MARKS:
        if token.startswith(mark):
            return " " + token[len(mark) :]
    return token


def check_guide_options(**options) -> None:
    """Validate `ARGuide` options (rule, top_k, relative, chunk_size) without loading a model."""
    known = {"rule", "top_k", "relative", "chunk_size"}
    if set(options) - known:
        raise ValueError(f"unknown guide options {sorted(set(options) - known)}: expected {sorted(known)}")
    rule, top_k = options.get("rule", "topk_relative"), options.get("top_k", 2)
    relative, chunk = options.get("relative", 0.5), options.get("chunk_size", 32)
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}: expected one of {RULES}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} must be a positive integer")
    if isinstance(relative, bool) or not isinstance(relative, (int, float)) or not 0 <= relative <= 1:
        raise ValueError(f"relative={relative!r} must be in [0, 1]")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size={chunk!r} must be a positive integer")


class VocabMap:
    """DLM token id -> guide token id, or -1 when the guide has no token with the same text.

    Tokens are matched through their strings (with the leading-space marks of byte-level BPE and
    SentencePiece normalised), so unrelated tokenizers map wherever their vocabularies share a token;
    special tokens map through their role (EOS to EOS, PAD to PAD). A draft whose token has no match
    is rejected by the guide, never replaced by a look-alike.
    """

    def __init__(
        self,
        dlm_tokenizer: PreTrainedTokenizerBase,
        guide_tokenizer: PreTrainedTokenizerBase,
        dlm_vocab_size: int | None = None,
    ):
        size = dlm_vocab_size or len(dlm_tokenizer)
        self.identity = dlm_tokenizer.get_vocab() == guide_tokenizer.get_vocab()
        table = torch.full((size,), -1, dtype=torch.long)
        if self.identity:
            n = min(size, len(guide_tokenizer))
            table[:n] = torch.arange(n)
        else:
            guide_vocab = {_canonical(tok): i for tok, i in guide_tokenizer.get_vocab().items()}
            specials = set(dlm_tokenizer.all_special_ids)
            for tok, i in dlm_tokenizer.get_vocab().items():
                if i < size and i not in specials and _canonical(tok) in guide_vocab:
                    table[i] = guide_vocab[_canonical(tok)]
            for role in ("eos_token_id", "pad_token_id", "bos_token_id"):
                d, g = getattr(dlm_tokenizer, role), getattr(guide_tokenizer, role)
                if d is not None and g is not None and d < size:
                    table[d] = g
        self.table = table
        self.fallback_id = guide_tokenizer.eos_token_id if guide_tokenizer.eos_token_id is not None else 0

    @property
    def coverage(self) -> float:
        """Fraction of DLM ids with a guide token."""
        return (self.table >= 0).float().mean().item()

    def __call__(self, ids: torch.LongTensor) -> torch.LongTensor:
        """Guide ids for DLM ids (any shape); -1 where there is none."""
        return self.table.to(ids.device)[ids]


class ARGuide:
    """A causal LM that scores DLM drafts left to right, keeping a KV cache of the committed text.

    guide: a model path / hub id, or a loaded `transformers` causal LM (then pass its tokenizer).
    rule: "topk_relative" (accept a draft in the guide's top-`top_k` with p >= `relative` * p_top1,
    the FlashDLM default) or "greedy" (accept only the guide's argmax). chunk_size: drafts scored per
    guide forward (32).

    Per generation: `begin(prompt_ids, mask)` prefills the prompts (in guide ids; rows left-padded) and
    returns a `GuideSession`, whose `verify(tokens, committed, live)` scores the next tokens of every
    row and returns how many it accepts.
    Rows advance independently: rejected entries stay in the KV cache but are masked out, and each
    row's positions count only its accepted tokens, so no per-row host sync is needed.
    """

    def __init__(
        self,
        guide,
        tokenizer: PreTrainedTokenizerBase | None = None,
        rule: str = "topk_relative",
        top_k: int = 2,
        relative: float = 0.5,
        chunk_size: int = 32,
        dtype: torch.dtype | None = None,
    ):
        check_guide_options(rule=rule, top_k=top_k, relative=relative, chunk_size=chunk_size)
        if isinstance(guide, str):
            from .locations import resolve_path

            path = resolve_path(guide)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        else:
            if tokenizer is None:
                raise ValueError("a guide given as a model object needs its tokenizer")
            self.model, self.tokenizer = guide, tokenizer
        self.model.eval()
        self.rule, self.top_k, self.relative, self.chunk_size = rule, top_k, relative, chunk_size
        self.vocab_map: VocabMap | None = None

    def __repr__(self) -> str:
        name = getattr(self.model.config, "_name_or_path", type(self.model).__name__)
        return f"ARGuide({name!r}, rule={self.rule!r}, chunk_size={self.chunk_size})"

    @property
    def device(self) -> torch.device:
        return self.model.device

    def attach(self, dlm_tokenizer: PreTrainedTokenizerBase, dlm_vocab_size: int) -> None:
        """Build the vocabulary map to the DLM's tokenizer."""
        self.vocab_map = VocabMap(dlm_tokenizer, self.tokenizer, dlm_vocab_size)

    def accept(self, logits: torch.Tensor, tokens: torch.LongTensor) -> torch.BoolTensor:
        """The acceptance rule for drafts `tokens` [B, n] (guide ids, -1: no guide token) under guide
        logits [B, n, V]."""
        valid = tokens >= 0
        safe = tokens.clamp(min=0)
        if self.rule == "greedy":
            return valid & (logits.argmax(-1) == safe)
        probs = logits.softmax(-1)
        top = probs.topk(self.top_k, dim=-1)
        in_top = (top.indices == safe[..., None]).any(-1)
        p = probs.gather(-1, safe[..., None]).squeeze(-1)
        return valid & in_top & (p >= self.relative * top.values[..., 0])

    # ------------------------------------------------------------------ per generation

    def begin(self, prompt_ids: torch.LongTensor, prompt_mask: torch.BoolTensor) -> GuideSession:
        """Prefill the prompts: guide ids [B, P] (left-padded) and their mask [B, P]. Returns the state
        of this generation (the guide itself keeps none, so one guide serves concurrent calls)."""
        return self.begin_many([(prompt_ids, prompt_mask)])[0]

    @torch.no_grad()
    def begin_many(self, prompts: list[tuple[torch.LongTensor, torch.BoolTensor]]) -> list[GuideSession]:
        """`begin` of several generations in one forward of the guide: prompts are (ids [B_i, P_i],
        mask [B_i, P_i]) each, left-padded. They are left-padded to the longest and prefilled together;
        each session then keeps its own rows, cut back to its own width, as if prefilled alone."""
        if self.vocab_map is None:
            raise ValueError("the guide has no vocabulary map: attach it to a DLM tokenizer first (attach())")
        if not prompts:
            return []
        longest = max(ids.shape[1] for ids, _ in prompts)
        pad = self.vocab_map.fallback_id
        ids = torch.cat([F.pad(ids, (longest - ids.shape[1], 0), value=pad) for ids, _ in prompts])
        mask = torch.cat([F.pad(mask.long(), (longest - mask.shape[1], 0)) for _, mask in prompts]).to(self.device)
        cache = DynamicCache()
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            **cache_argument(cache),
            use_cache=True,
        )
        last = out.logits[:, -1].float()  # [B, V] each row's prediction for its first generated token
        sessions, row = [], 0
        for prompt_ids, _ in prompts:
            rows, start = slice(row, row + prompt_ids.shape[0]), longest - prompt_ids.shape[1]
            own = cache
            if len(prompts) > 1:
                own = DynamicCache()
                for layer, part in enumerate(cache.layers):
                    own.update(part.keys[rows, :, start:].clone(), part.values[rows, :, start:].clone(), layer)
            sessions.append(GuideSession(self, own, mask[rows, start:], last[rows]))
            row = rows.stop
        return sessions


class GuideSession:
    """One generation's guide state: its KV cache over each row's accepted text, the mask of live
    entries, each row's length and the pending next-token prediction."""

    def __init__(self, guide: ARGuide, cache: DynamicCache, mask: torch.Tensor, next_logits: torch.Tensor):
        """(Made by `ARGuide.begin` / `begin_many`, which prefill the prompts.)"""
        self.guide = guide
        self.cache = cache
        self.forwards = 1  # the prefill
        self.mask = mask  # [B, T] live cache entries
        self.length = mask.sum(-1)  # [B] tokens each row has seen
        self.next_logits = next_logits  # [B, V] prediction for the first generated token

    @torch.no_grad()
    def verify(self, tokens: torch.LongTensor, forced: torch.BoolTensor, live: torch.BoolTensor) -> torch.LongTensor:
        """Score the next `n` tokens of every row and ingest the accepted ones.

        tokens: [B, n] DLM ids following each row's accepted text; forced: [B, n] tokens already
        committed (accepted without a test); live: [B, n] positions that exist (False past the block).
        Returns k [B], the length of the accepted prefix; those tokens are now in the guide's cache.
        """
        guide = self.guide
        guide_ids, feed, positions = self._inputs(tokens)
        out = guide.model(
            input_ids=feed.to(guide.device),
            attention_mask=torch.cat([self.mask, live.long()], dim=1).to(guide.device),
            position_ids=positions.to(guide.device),
            **cache_argument(self.cache),
            use_cache=True,
        )
        return self._ingest(out.logits.float(), guide_ids, forced, live)

    def _inputs(self, tokens: torch.LongTensor):
        """(guide ids [B, n] (-1: none), the ids fed (unmappable ones as the fallback), positions)."""
        vocab_map = self.guide.vocab_map
        guide_ids = vocab_map(tokens)
        feed = torch.where(guide_ids >= 0, guide_ids, vocab_map.fallback_id)
        return guide_ids, feed, self.length[:, None] + torch.arange(tokens.shape[1], device=tokens.device)

    def _ingest(self, logits, guide_ids, forced, live) -> torch.LongTensor:
        """The accepted prefix of every row, given the guide's logits [B, n, V] of the fed tokens (whose
        K/V the cache already holds): masks, lengths and the pending prediction move past it, and the
        entries dead for every row leave the cache."""
        self.forwards += 1
        n = guide_ids.shape[1]
        # The prediction for token j comes from the output after token j-1 (the pending one for j = 0).
        before = torch.cat([self.next_logits[:, None], logits[:, :-1]], dim=1)
        ok = (forced | self.guide.accept(before, guide_ids)) & live
        k = ok.long().cumprod(-1).sum(-1)  # [B] leading accepted run
        keep = torch.arange(n, device=guide_ids.device)[None] < k[:, None]
        self.mask = torch.cat([self.mask, keep.long()], dim=1)
        self.length = self.length + k
        self.next_logits = torch.where(
            (k > 0)[:, None],
            logits.gather(1, (k - 1).clamp(min=0)[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0],
            self.next_logits,
        )
        # Entries past every row's accepted run are dead for all rows: drop them from the cache.
        dead = int(n - k.max())
        if dead:
            self.cache.crop(-dead)  # a negative count removes that many entries (every transformers version)
            self.mask = self.mask[:, :-dead]
        return k


@torch.no_grad()
def verify_many(sessions: list[GuideSession], tokens, forced, live) -> list[torch.LongTensor]:
    """`GuideSession.verify` of several sessions of one guide (one row each, as the batched engine's
    requests hold them) in one forward of the guide: their caches left-padded to the longest and
    stacked, masked where padded; each session then takes its row's new K/V and ingests its own
    result. tokens / forced / live: one [1, n] per session, the same n. Returns each session's k [1]."""
    guide = sessions[0].guide
    if len(sessions) == 1:
        return [sessions[0].verify(tokens[0], forced[0], live[0])]
    longest = max(s.mask.shape[1] for s in sessions)
    pad = [longest - s.mask.shape[1] for s in sessions]
    cache = DynamicCache()
    for layer in range(len(sessions[0].cache.layers)):
        keys = [F.pad(s.cache.layers[layer].keys, (0, 0, p, 0)) for s, p in zip(sessions, pad, strict=True)]
        values = [F.pad(s.cache.layers[layer].values, (0, 0, p, 0)) for s, p in zip(sessions, pad, strict=True)]
        cache.update(torch.cat(keys), torch.cat(values), layer)
    inputs = [s._inputs(t) for s, t in zip(sessions, tokens, strict=True)]
    mask = torch.cat([F.pad(s.mask, (p, 0)) for s, p in zip(sessions, pad, strict=True)])
    out = guide.model(
        input_ids=torch.cat([feed for _, feed, _ in inputs]).to(guide.device),
        attention_mask=torch.cat([mask, torch.cat(live).long()], dim=1).to(guide.device),
        position_ids=torch.cat([positions for _, _, positions in inputs]).to(guide.device),
        **cache_argument(cache),
        use_cache=True,
    )
    logits = out.logits.float()
    ks = []
    for i, s in enumerate(sessions):
        for layer, part in enumerate(cache.layers):  # the row's K/V of the fed tokens join its own cache
            s.cache.update(part.keys[i : i + 1, :, longest:], part.values[i : i + 1, :, longest:], layer)
        ks.append(s._ingest(logits[i : i + 1], inputs[i][0], forced[i], live[i]))
    return ks
