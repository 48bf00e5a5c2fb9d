"""The state of every running generation as padded tensors, planned and committed in one go.

A request is data: its canvas, its place in the schedule, its scheduler and the state of its cache's
rules are rows of `GenerationBatch`'s tensors (row r = request r, canvas column p = its position p;
a request never shares a row, so no left padding). Per step:

- `plan()` -> `StepInput`: for every row at once, whether it refreshes and which positions it feeds
  (the cache's freeze rules, written as masks over [R, W]), flattened into one list
  of tokens with their pool slots, and the keys each row attends;
- the runner computes the logits of the rows' still-masked block positions in one forward;
- `commit(logits, values)` runs the schedulers (one call per scheduler configuration, rows padded to
  the widest block), writes the committed tokens, fills after EOS, updates the drift test, moves rows
  to their next block and returns the finished rows.

Ops per step do not depend on the number of rows, and the device-to-host copies are counted
(`host_reads`): one in `plan`, one in `commit` (plus one per scheduler that must run row by row).
Membership changes (`add`, `remove`) rebuild the tensors; they happen between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dlmcache.batching import after_eos
from dlmcache.cache.reuse import refreshes_prompt
from dlmcache.schedulers import DLMScheduler, GuidedScheduler
from dlmcache.schedulers.base import StepContext
from dlmcache.schedulers.editing import block_ends

from .rules import BLOCK, CAUSAL, CAUSAL_FULL, DUAL, NONE, PREFIX, TOKEN, CacheRule


@dataclass
class Request:
    """One generation: prompt ids, the schedule, and this request's own scheduler and cache rule.

    on_step(sequence, commit_step): after each of its steps, with host copies [G] of its generated
    region (masks where nothing is committed yet) and of each token's commit step (-1: not yet).
    cfg_scale: classifier-free guidance as LLaDA writes it (0: off). The request then has a second,
    unconditional row: the same canvas with the prompt masked, its own KV; every step the logits
    are uncond + (cfg_scale + 1) * (cond - uncond), and the two rows commit the same tokens.
    """

    prompt: list[int]
    max_new_tokens: int
    block_length: int
    steps: int
    scheduler: DLMScheduler
    rule: CacheRule
    stop_at_eos: bool = False
    generator: torch.Generator | None = None
    on_step: object = None
    id: str = ""
    chat: object = None  # what the prompt came from (a scheduler's `begin` may read it)
    cfg_scale: float = 0.0
    attention_block: int | None = None  # block diffusion: the block attended in (None: block_length)
    first_token_ar: bool = False  # block diffusion: an attention block's first token is its argmax, alone

    @property
    def length(self) -> int:
        return len(self.prompt) + self.max_new_tokens

    @property
    def compressed_len(self) -> int:
        """The prompt positions its cache compresses: the whole prompt, or for block diffusion its
        complete attention blocks (the block holding the prompt's end is still decoded); 0 without
        compression."""
        if self.rule.compression is None:
            return 0
        if self.rule.mode in (CAUSAL, CAUSAL_FULL):
            attn = self.attention_block or self.block_length
            return len(self.prompt) // attn * attn
        return len(self.prompt)

    @property
    def canvas_refresh(self) -> bool:
        """Whether its refreshes after the first forward recompute the canvas alone: its rule's, or where
        the rule leaves it to the request (None, FreeCache's default), whether its prompt is longer
        than its answer (`refreshes_prompt`)."""
        if self.rule.canvas_refresh is None:
            return not refreshes_prompt(len(self.prompt), self.max_new_tokens)
        return self.rule.canvas_refresh

    @property
    def sub_block_cache(self) -> bool:
        """Fast-dLLM v2's sub-block cache: its rule asks for it (`CacheRule.sub_block`) and its decoding
        blocks are sub-blocks of an attention block."""
        return self.rule.sub_block and self.attention_block is not None

    @property
    def rows(self) -> int:
        """Rows of the batch it takes: 2 with classifier-free guidance (its unconditional row)."""
        return 2 if self.cfg_scale else 1

    @property
    def kv_tokens(self) -> int:
        """Pool positions it holds: `length` per row."""
        return self.rows * self.length


@dataclass
class Finished:
    """A finished request: its generated ids [G], commit steps [G] and counters."""

    request: Request
    sequence: torch.LongTensor
    commit_step: torch.LongTensor
    stats: dict = field(default_factory=dict)
    error: Exception | None = None  # set when the request failed (its logits were not finite)


@dataclass
class StepInput:
    """One flattened forward for every running request.

    input_ids, positions, slots, query_row, query_rank: [T], one entry per fed token (row-major:
    row by row, positions ascending); max_queries: the most tokens a row feeds (a host int);
    key_slots, key_valid: [R, W] the pool slots of each row's positions and which it attends
    (every_key: a host flag, all of them: one row, attending all its positions; fresh_keys: one row
    that feeds every position, so its keys are the fed tokens themselves; write_kv: False when no
    later step reads this step's KV: one row without a cache, feeding everything);
    logit_index: [M] the fed token whose hidden state predicts each still-masked block position
    (row `target_row` [M], block column `target_col` [M])."""

    input_ids: torch.LongTensor
    positions: torch.LongTensor
    slots: torch.LongTensor
    query_row: torch.LongTensor
    query_rank: torch.LongTensor
    max_queries: int
    key_slots: torch.LongTensor
    key_valid: torch.BoolTensor
    every_key: bool
    fresh_keys: bool
    write_kv: bool
    logit_index: torch.LongTensor
    target_row: torch.LongTensor
    target_col: torch.LongTensor
    prompts: PromptStep | None = None

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


@dataclass
class PromptStep:
    """What a step does with compressed prompts (rows whose cache compresses its prompt's KV):
    merge [R] the rows whose queries attend their prompt's segment (merged with the pool's canvas
    keys by log-sum-exp), compress (host) the rows that recompute their prompt at this forward and
    compress it again, row_start [R] where each row's tokens begin in the flattened order, canvas
    [R, W] the rows' canvases (a policy scoring by the masked positions reads them); a row's segment
    attention lays its queries out by row and rank (`token_row`, `token_rank`, `most_tokens`), so a
    block diffusion row's attention rows share it."""

    merge: torch.BoolTensor
    compress: list[int]
    row_start: torch.LongTensor
    canvas: torch.LongTensor
    token_row: torch.LongTensor  # [T] each fed token's row (its request's, not its attention row)
    token_rank: torch.LongTensor  # [T] its place among its row's fed tokens
    most_tokens: int  # the most tokens a row feeds


def _pad_cols(t: torch.Tensor, width: int, value) -> torch.Tensor:
    """t [R, w, ...] padded with `value` to [R, width, ...]."""
    if t.shape[1] >= width:
        return t[:, :width]
    pad = t.new_full((t.shape[0], width - t.shape[1], *t.shape[2:]), value)
    return torch.cat([t, pad], 1)


class GenerationBatch:
    """Every running generation of one model (see the module docstring).

    mask_token_id, eos_token_id: the model's; shift: its logit shift (Dream 1, LLaDA 0); kv_heads,
    head_dim, dtype: the shape of the drift test's reference values; device: where the state lives.
    """

    #: Per-row tensors [R] / [R, W, ...] and the value a new row (or a padded column) starts with.
    ROW_STATE = {
        "length": 0, "prompt_len": 0, "origin": 0, "block_len": 1, "steps_per_block": 1, "block": 0,
        "step_in_block": 0, "forwards": 0, "fed": 0, "attended": 0, "full_forwards": 0, "canvas_refreshes": 0,
        "drift_refreshes": 0,
        "stop_at_eos": False,
        "mode": NONE, "suffix_window": -1, "drop_beyond": False, "delay": True, "refresh_every": 0, "drift": 0.0,
        "probe_tokens": 0, "canvas_refresh": False, "last_start": -1, "frozen_end": 0, "stale": False,
        "cached_end": 0, "compressed_len": 0, "attn_block": 1, "ar_first": False,
        "edit": False, "max_post": 0, "post": 0, "edited": 0, "sub_block": False,
        "refreshed_at": -1,
    }  # fmt: skip
    COLUMN_STATE = {"canvas": None, "commit": -1, "final": False, "refreshed_tokens": None, "reference": 0.0}

    def __init__(self, mask_token_id: int, eos_token_id: int | None, shift: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):  # fmt: skip
        self.mask_id, self.eos_id, self.shift = mask_token_id, eos_token_id, shift
        self.kv_heads, self.head_dim, self.dtype, self.device = kv_heads, head_dim, dtype, torch.device(device)
        self.requests: list[Request] = []  # per row (a request with CFG: twice, its unconditional row next)
        self._uncond: list[bool] = []  # per row: the unconditional row of the request before it
        self.key_slots = torch.zeros(0, 1, dtype=torch.long, device=self.device)
        self.width = 1
        self.host_reads = 0  # device-to-host copies made by plan / commit, for tests and metrics
        self._build_rows()

    def __len__(self) -> int:
        """Running requests (a request with CFG has two rows in `requests`, one per row)."""
        return len(self.requests) - sum(self._uncond)

    # ------------------------------------------------------------------ membership

    def add(self, request: Request, slots: torch.LongTensor) -> None:
        """Start `request`, whose positions [0, length) live at pool `slots` [length] (with CFG
        [2 * length]: the unconditional row's follow, and that row follows the request's)."""
        prompt_len, length = len(request.prompt), request.length
        causal = request.rule.mode in (CAUSAL, CAUSAL_FULL)
        if self.requests and causal != self.block_causal:
            raise ValueError(
                f"request {request.id!r}: block diffusion and full-attention requests do not share a batch "
                f"(its rule {request.rule}; the running rows are {'' if self.block_causal else 'not '}block diffusion)"
            )
        attn = request.attention_block
        if attn is not None and (not causal or attn % request.block_length):
            raise ValueError(
                f"request {request.id!r}: attention_block={attn} needs a block diffusion rule and a multiple of "
                f"block_length={request.block_length}"
            )
        if getattr(request.scheduler, "edits", False) and not causal:
            raise ValueError(
                f"request {request.id!r}: {type(request.scheduler).__name__} edits a block diffusion model's "
                f"blocks; its rule {request.rule} is full attention"
            )
        if causal and request.cfg_scale:
            raise ValueError(
                f"request {request.id!r}: cfg_scale={request.cfg_scale!r} is not built for block diffusion"
            )
        canvas = torch.tensor(request.prompt + [self.mask_id] * request.max_new_tokens, device=self.device)
        self._add_row(request, canvas, slots[:length])
        if request.cfg_scale:
            unconditional = canvas.clone()
            unconditional[:prompt_len] = self.mask_id
            self._add_row(request, unconditional, slots[length : 2 * length], uncond=True)
        request.scheduler.begin([request.prompt], [request.chat], canvas[None], prompt_len)
        self._regroup()

    def _add_row(self, request: Request, canvas: torch.LongTensor, slots: torch.LongTensor, uncond=False) -> None:
        g, p = request.max_new_tokens, len(request.prompt)
        rule = request.rule
        causal = rule.mode in (CAUSAL, CAUSAL_FULL)
        row = {
            "length": request.length, "prompt_len": p, "block_len": request.block_length,
            "compressed_len": request.compressed_len,
            "attn_block": request.attention_block or request.block_length, "ar_first": request.first_token_ar,
            # where block 0 starts: after the prompt, or for block diffusion at the absolute block
            # holding the prompt's end (its prompt tokens are given, its masks decoded)
            "origin": p // request.block_length * request.block_length if causal else p,
            "steps_per_block": request.steps // (g // request.block_length), "stop_at_eos": request.stop_at_eos,
            "mode": rule.mode, "suffix_window": rule.suffix_window, "drop_beyond": rule.drop_beyond,
            "delay": rule.delay, "refresh_every": rule.refresh_every, "drift": rule.drift,
            "probe_tokens": rule.probe_tokens, "canvas_refresh": request.canvas_refresh,
            "sub_block": request.sub_block_cache,
        }  # fmt: skip
        if getattr(request.scheduler, "edits", False):  # LLaDA2.1's token editing (`TokenEditingScheduler`)
            config = request.scheduler.config
            row.update(edit=True, max_post=config.max_post_steps)
        old = self._state
        # Wide enough that every row's block columns (start + j, j < the widest block) are in the canvas.
        everyone = self.requests + [request]
        width = max(self.width, max(r.length for r in everyone) + max(r.block_length for r in everyone))
        state = {}
        for name, default in self.ROW_STATE.items():
            value = torch.tensor([row.get(name, default)], device=self.device, dtype=old[name].dtype)
            state[name] = torch.cat([old[name], value])
        for name, default in self.COLUMN_STATE.items():
            fill = self.mask_id if default is None else default
            if name == "canvas":
                new = _pad_cols(canvas[None], width, self.mask_id)
            else:
                new = torch.full((1, width, *old[name].shape[2:]), fill, dtype=old[name].dtype, device=self.device)
            state[name] = torch.cat([_pad_cols(old[name], width, fill), new])
        key_slots = _pad_cols(slots.to(self.device)[None], width, 0)
        self.key_slots = torch.cat([_pad_cols(self.key_slots, width, 0), key_slots])
        self.width, self._state = width, state
        self.requests.append(request)
        self._uncond.append(uncond)

    def remove(self, rows: list[int]) -> list[Request]:
        """Drop `rows` (finished or cancelled; a request's unconditional row goes with it, given or not);
        returns their requests."""
        if not rows:
            return []
        gone = set(rows) | {i + 1 for i in rows if i + 1 < len(self._uncond) and self._uncond[i + 1]}
        rows = sorted(gone)
        keep = [i for i in range(len(self.requests)) if i not in gone]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._state = {name: t.index_select(0, index) for name, t in self._state.items()}
        self.key_slots = self.key_slots.index_select(0, index)
        removed = [self.requests[i] for i in rows if not self._uncond[i]]
        self.requests = [self.requests[i] for i in keep]
        self._uncond = [self._uncond[i] for i in keep]
        self._regroup()
        return removed

    def _build_rows(self) -> None:
        self._state = {}
        for name, default in self.ROW_STATE.items():
            dtype = {bool: torch.bool, float: torch.float64, int: torch.long}[type(default)]
            self._state[name] = torch.zeros(0, dtype=dtype, device=self.device)
        for name in self.COLUMN_STATE:
            dtype = {"final": torch.bool, "reference": self.dtype}.get(name, torch.long)
            shape = (0, 1, self.kv_heads, self.head_dim) if name == "reference" else (0, 1)
            self._state[name] = torch.zeros(shape, dtype=dtype, device=self.device)
        self._regroup()

    def _regroup(self) -> None:
        """Rows by scheduler configuration: batched configurations share one `_select` call."""
        groups: dict = {}
        self._alone = []
        for i, req in enumerate(self.requests):
            s = req.scheduler
            if self._uncond[i]:
                continue  # it commits what its request's row commits
            if s.batched:  # draws nothing: a generator, if any, is unused
                key = (type(s), tuple(sorted((k, repr(v)) for k, v in s.config.items() if not k.startswith("_"))))
                groups.setdefault(key, (s, []))[1].append(i)
            else:
                self._alone.append(i)
        self._groups = [(s, torch.tensor(rows, device=self.device)) for s, rows in groups.values()]
        uncond = [i for i, u in enumerate(self._uncond) if u]
        self._cfg = None
        if uncond:  # (conditional rows, their unconditional rows, cfg_scale + 1 [P, 1, 1])
            scale = torch.tensor([self.requests[i].cfg_scale + 1 for i in uncond], device=self.device)
            index = torch.tensor(uncond, device=self.device)
            self._cfg = (index - 1, index, scale[:, None, None])
        # What the running rows use, known on the host: plan and commit skip the rest.
        self._modes = {r.rule.mode for r in self.requests}
        self.block_causal = bool(self._modes & {CAUSAL, CAUSAL_FULL})  # the rows are block diffusion's
        self._compressed = any(r.compressed_len > 0 for r in self.requests)
        self._ar_first = any(r.first_token_ar for r in self.requests)
        self._editing = any(getattr(r.scheduler, "edits", False) for r in self.requests)
        self._sub_block = any(r.sub_block_cache for r in self.requests)
        self._drift = any(r.rule.drift > 0 for r in self.requests)
        self._every = any(r.rule.refresh_every > 0 for r in self.requests)
        self._canvas_refresh = any(r.canvas_refresh and r.rule.mode != NONE for r in self.requests)
        self._drop_beyond = any(r.rule.drop_beyond and r.rule.mode != NONE for r in self.requests)
        self._stop_at_eos = any(r.stop_at_eos for r in self.requests)
        self._longest = max((r.length for r in self.requests), default=1)  # keys past it: nobody's
        # Masks that change only with membership: each row's positions, generated region, block columns.
        st, pos = self._state, torch.arange(self.width, device=self.device)[None]
        self._positions = pos
        self._in_len = pos < st["length"][:, None]
        self._generated = (pos >= st["prompt_len"][:, None]) & self._in_len
        widest_block = max((r.block_length for r in self.requests), default=1)
        self._block_j = torch.arange(widest_block, device=self.device)
        self._in_block = self._block_j < st["block_len"][:, None]

    # ------------------------------------------------------------------ one step

    def plan(self) -> StepInput:
        """Decide every row's step and flatten it (see the module docstring). The rules that no
        running row uses are skipped (known on the host, from the requests)."""
        s, shift, mask_id = self._state, self.shift, self.mask_id
        canvas, length, pos = s["canvas"], s["length"], self._positions  # pos [1, W]
        start = s["origin"] + s["block"] * s["block_len"]
        end = start + s["block_len"]
        if self.block_causal:
            need, attend_end, feed_from = self._causal_feed(start, end)
            refresh = torch.zeros_like(need[:, 0])
            self._prompt_fresh = s["forwards"] == 0  # a row's first forward computes its prompt
        else:
            need, attend_end, refresh = self._feed(start, end)

        # Flatten: one host read gives the sizes, then everything stays on the device.
        counts = need.sum(-1)
        block_cols = start[:, None] + self._block_j  # [R, Bmax] the active block's canvas columns
        targets = (canvas.gather(1, block_cols) == mask_id) & self._in_block  # still masked
        per_row = targets.sum(-1)
        masked = targets
        if self.block_causal:  # an attention row per fed attention block, each with its own key limit
            targets &= block_cols < length[:, None]  # (a row's last block may end before the block length)
            masked = targets
            if self._editing:  # an editing row reads every generated position of its block
                generated = (block_cols >= s["prompt_len"][:, None]) & (block_cols < length[:, None])
                targets = masked | (s["edit"][:, None] & self._in_block & generated)
            per_row = targets.sum(-1)
            attn = s["attn_block"]
            first_block = torch.div(feed_from, attn, rounding_mode="floor")
            segments = torch.div(feed_from + counts - 1, attn, rounding_mode="floor") - first_block + 1
            sizes = [counts.sum(), torch.minimum(counts, attn).max(), per_row.sum(), per_row.max(), segments.sum()]
        else:  # an attention row per request row
            sizes = [counts.sum(), counts.max(), per_row.sum(), per_row.max()]
        sizes = torch.stack(sizes)
        if self._compressed:
            compressed = s["compressed_len"] > 0
            # a compressed prompt is read from its segment, except at a forward that recomputes it
            in_pool = (~compressed | self._prompt_fresh)[:, None] | (pos >= s["compressed_len"][:, None])
            # which rows compress their prompt at this forward, in the same read
            sizes = torch.cat([sizes, counts.max()[None], (compressed & self._prompt_fresh).long()])
        sizes = sizes.tolist()
        total, widest, n_targets, most_targets = (int(v) for v in sizes[:4])
        extra = 5 if self.block_causal else 4  # where the compressed prompts' values start
        self.host_reads += 1
        row, col = torch.nonzero_static(need, size=total).unbind(1)
        flat = torch.full_like(canvas, -1)
        flat[row, col] = torch.arange(total, device=self.device)
        longest = self._longest
        if self.block_causal:
            # Fed blocks in order, each its queries contiguous: the query in block j of a row's fed range
            # attends the row's keys before the end of that block.
            seg_row, seg_j = torch.nonzero_static(pos < segments[:, None], size=int(sizes[4])).unbind(1)
            col_block = torch.div(col, attn[row], rounding_mode="floor")
            query_row = (segments.cumsum(0) - segments)[row] + col_block - first_block[row]
            rank = col - torch.maximum(feed_from[row], col_block * attn[row])  # (the first may start mid-block)
            seg_end = torch.minimum((first_block[seg_row] + seg_j + 1) * attn[seg_row], length[seg_row])
            key_valid = pos[:, :longest] < seg_end[:, None]
            if self._compressed:
                key_valid &= in_pool[seg_row, :longest]
            # a key after the block's end (or in a compressed prefix) may hold anything: it reads the null block
            key_slots = torch.where(key_valid, self.key_slots[seg_row, :longest], 0)
        else:
            query_row = row
            rank = torch.arange(total, device=self.device) - (counts.cumsum(0) - counts)[row]
            key_valid = pos < attend_end[:, None]
            if self._compressed:
                key_valid = key_valid & in_pool
            key_slots, key_valid = self.key_slots[:, :longest], key_valid[:, :longest]
        t_row, t_col = torch.nonzero_static(targets, size=n_targets).unbind(1)
        t_rank = torch.arange(n_targets, device=self.device) - (per_row.cumsum(0) - per_row)[t_row]
        predictor = (block_cols[t_row, t_col] - shift).clamp(min=0)
        self._step = dict(
            start=start,
            refresh=refresh,
            row=row,
            col=col,
            targets=targets,
            masked=masked,
            block_cols=block_cols,
            target_row=t_row,
            target_col=t_col,
            target_rank=t_rank,
            most_targets=most_targets,
        )
        s["fed"] += counts
        s["attended"] += attend_end
        one = len(self.requests) == 1 and not self.block_causal  # one row attending without a mask of its own
        prompts = None
        if self._compressed:
            row_start = counts.cumsum(0) - counts  # where each row's tokens begin in the flattened order
            prompts = PromptStep(
                merge=compressed & ~self._prompt_fresh,
                compress=[i for i, flag in enumerate(sizes[extra + 1 :]) if flag],
                row_start=row_start,
                canvas=canvas,
                token_row=row,
                # (a full-attention row's attention row is its request's: the same rank)
                token_rank=torch.arange(total, device=self.device) - row_start[row] if self.block_causal else rank,
                most_tokens=int(sizes[extra]),
            )
        return StepInput(
            input_ids=canvas[row, col], positions=col, slots=self.key_slots[row, col], query_row=query_row,
            query_rank=rank, max_queries=widest, key_slots=key_slots, key_valid=key_valid,
            every_key=one and not self._drop_beyond and not self._compressed, fresh_keys=one and total == longest,
            write_kv=not (one and self._modes == {NONE}),
            logit_index=flat[t_row, predictor], target_row=t_row, target_col=t_col, prompts=prompts,
        )  # fmt: skip

    def _causal_feed(self, start, end) -> tuple[torch.BoolTensor, torch.LongTensor, torch.LongTensor]:
        """Block diffusion: (the positions each row feeds [R, W], where its keys end [R], where its feed
        begins [R]). A cached row feeds its active attention block and the blocks finished since its last
        forward (at its first: everything before, its prompt's prefill), whose KV is final from this
        forward on; a row without the cache feeds everything up to its attention block's end. With
        Fast-dLLM v2's sub-block cache (`CacheRule.sub_block`) a row whose sub-block's first position
        is committed, after its attention block's first forward, feeds that sub-block alone: its
        attention row still reaches the attention block's end, over the KV the pool holds there."""
        s = self._state
        attn = s["attn_block"]  # the block attended in: the decoding block, or one it is a sub-block of
        attn_start = torch.div(start, attn, rounding_mode="floor") * attn
        feed_to = keys_end = torch.minimum(attn_start + attn, s["length"])
        cached = s["mode"] == CAUSAL
        # (a model with shifted logits also feeds the position before: it predicts the block's first)
        feed_from = torch.where(cached, (s["cached_end"] - self.shift).clamp(min=0), 0)
        if self._sub_block:  # Fast-dLLM v2's sub-block cache: the sub-block alone, unless it must refresh
            first_masked = s["canvas"].gather(1, start[:, None])[:, 0] == self.mask_id
            whole = (s["refreshed_at"] != attn_start) | first_masked
            alone = s["sub_block"] & cached & ~whole
            s["refreshed_at"] = torch.where(s["sub_block"] & whole, attn_start, s["refreshed_at"])
            feed_from = torch.where(alone, start, feed_from)
            feed_to = torch.where(alone, torch.minimum(end, s["length"]), feed_to)
        s["cached_end"] = torch.where(cached, attn_start, 0)
        s["full_forwards"] += (~cached).long()
        need = (self._positions >= feed_from[:, None]) & (self._positions < feed_to[:, None])
        return need, keys_end, feed_from

    def _feed(self, start, end) -> tuple[torch.BoolTensor, torch.LongTensor, torch.BoolTensor]:
        """Full attention: (the positions each row feeds [R, W], the keys it attends end [R], whether
        it refreshes [R]), by its cache rule."""
        s, mode, modes, length = self._state, self._state["mode"], self._modes, self._state["length"]
        pos, in_len = self._positions, self._in_len  # [1, W], [R, W]
        refresh, refresh_from = self._refresh_rows(start)
        need, attend_end = in_len, length
        if refresh_from is not None:  # a canvas-only refresh feeds the generation region (and its lead)
            need = in_len & (pos >= refresh_from[:, None])
        if modes != {NONE}:
            # What a cached step feeds: a window (prefix, dual, block freeze) or token freeze's positions.
            window_end = torch.where(s["suffix_window"] < 0, length, torch.minimum(length, end + s["suffix_window"]))
            attend_end = torch.where(refresh | ~s["drop_beyond"], length, window_end)
            if modes & {PREFIX, DUAL, BLOCK}:
                need = torch.where(refresh[:, None], need, self._window(start, end, window_end, pos))
            if TOKEN in modes:
                token = self._token_positions(refresh, start, end, window_end, pos)
                need = torch.where((mode == TOKEN)[:, None] & ~refresh[:, None], token, need)
        if self._drift:
            need = need | self._probes(need, refresh, in_len, pos)
        return need, attend_end, refresh

    def _refresh_rows(self, start: torch.LongTensor) -> tuple[torch.BoolTensor, torch.LongTensor | None]:
        """Which rows refresh: every step (none), at a new block (prefix, dual), or FreeCache's refresh
        rule (the first forward, every k-th, or drifted at the last step); and, when a running rule
        refreshes the canvas alone, the first position each row feeds if it refreshes [R] (else None)."""
        s, mode = self._state, self._state["mode"]
        if self._modes == {NONE}:
            s["full_forwards"] += 1
            self._prompt_fresh = torch.ones_like(start, dtype=torch.bool)
            return self._prompt_fresh, None
        freecache = (mode == TOKEN) | (mode == BLOCK)
        periodic = s["forwards"] == 0
        if self._every:
            periodic = periodic | (s["refresh_every"] > 0) & (s["forwards"] % s["refresh_every"].clamp(min=1) == 0)
        refresh = (mode == NONE) | (~freecache & (start != s["last_start"])) | (freecache & (periodic | s["stale"]))
        if self._drift:
            s["drift_refreshes"] += (freecache & s["stale"] & ~periodic).long()
        if not self._canvas_refresh:
            s["full_forwards"] += refresh.long()
            self._prompt_fresh = refresh
            return refresh, None
        # After the first forward, the prompt's KV stays: the rows feed from the probes and the
        # position that predicts the first answer token on.
        partial = refresh & s["canvas_refresh"] & (s["forwards"] > 0)
        self._prompt_fresh = refresh & ~partial  # the rows that recompute their prompt's KV now
        s["full_forwards"] += (refresh & ~partial).long()
        s["canvas_refreshes"] += partial.long()
        lead = (s["prompt_len"] - self.shift - s["probe_tokens"]).clamp(min=0)
        return refresh, torch.where(partial, lead, 0)

    def _window(self, start, end, window_end, pos) -> torch.BoolTensor:
        """The positions a window plan feeds [R, W]: from the block start (prefix: to the end; dual: the
        block), or block freeze's from the frozen boundary through the suffix window."""
        s, mode, shift = self._state, self._state["mode"], self.shift
        is_block = mode == BLOCK
        frozen = torch.where(s["delay"], s["frozen_end"], torch.maximum(s["frozen_end"], start))
        win_start = torch.where(is_block, torch.minimum(frozen, start - shift), start - shift)
        win_end = torch.where(mode == PREFIX, s["length"], torch.where(mode == DUAL, end, window_end))
        # Every position before the active block is final once this forward has run.
        s["frozen_end"] = torch.where(is_block, torch.maximum(s["frozen_end"], start), s["frozen_end"])
        return (pos >= win_start[:, None]) & (pos < win_end[:, None])

    def _token_positions(self, refresh, start, end, window_end, pos) -> torch.BoolTensor:
        """Token freeze [R, W]: the window's positions whose KV is not final, the still-masked block
        positions (and each one's predecessor, for a shifted model); the committed ones among them are
        final after this forward, and a refresh makes every committed position final."""
        s, mask_id = self._state, self.mask_id
        canvas, is_token = s["canvas"], (s["mode"] == TOKEN)[:, None]
        masked = (canvas == mask_id) & (pos >= start[:, None]) & (pos < end[:, None])
        token = ~s["final"] & (pos < window_end[:, None]) | masked
        if self.shift:
            token[:, : -self.shift] |= masked[:, self.shift :]
        committed = (canvas != mask_id) | (pos < s["prompt_len"][:, None])  # a masked prompt (CFG) too
        renewed = refresh[:, None] & is_token
        s["final"] = torch.where(renewed, committed, s["final"] | (token & committed & is_token & ~refresh[:, None]))
        return token

    def _probes(self, need, refresh, in_len, pos) -> torch.BoolTensor:
        """The drift test's probes [R, W]: per cached drift row, its `probe_tokens` positions closest
        before the first it feeds whose tokens were committed at its last refresh."""
        s = self._state
        drift_rows = (s["drift"] > 0) & ~refresh
        row_first = torch.where(need.any(-1), need.int().argmax(-1), 0)
        ready = (s["refreshed_tokens"] != self.mask_id) & in_len & (pos < row_first[:, None])
        rank = ready.flip(-1).cumsum(-1).flip(-1)
        self._probe = ready & (rank <= s["probe_tokens"][:, None]) & drift_rows[:, None]
        return self._probe

    def commit(self, logits: torch.Tensor, values: torch.Tensor | None) -> list[Finished]:
        """Apply the step's logits [M, V] (and the last layer's fresh values [T, Hkv, D] of the fed
        tokens, for the drift test); returns the rows that finished (still in the batch: `remove` them)."""
        s, step = self._state, self._step
        canvas, targets, block_cols = s["canvas"], step["targets"], step["block_cols"]
        if self._drift:
            self._observe_drift(values)

        # The schedulers see each row's still-masked positions packed to the left, rows padded to the
        # most any row has (what a row alone has: its masked columns, no others), and
        # rows of one configuration are selected together.
        # (An editing row's targets also hold its block's committed positions: masked only where masked.)
        rows_n, t_row, t_rank = len(self.requests), step["target_row"], step["target_rank"]
        target_masked = step["masked"][t_row, step["target_col"]]
        if rows_n == 1:
            packed, packed_targets = logits[None], target_masked[None]
        else:
            packed = logits.new_zeros(rows_n, step["most_targets"], logits.shape[-1])
            packed[t_row, t_rank] = logits
            packed_targets = targets.new_zeros(rows_n, step["most_targets"])
            packed_targets[t_row, t_rank] = target_masked
        if self._cfg is not None:  # classifier-free guidance: the request's row gets the combined logits
            cond, uncond, scale = self._cfg
            c, u = packed[cond], packed[uncond]
            packed[cond] = u + scale.to(u.dtype) * (c - u)
        steps_in, steps_per = s["step_in_block"], s["steps_per_block"]
        edit = None
        if self._editing:  # an editing row's committed generated block positions, packed as its targets
            steps_in = torch.minimum(steps_in, steps_per - 1)  # (a post step may come after the last step)
            tokens = torch.zeros_like(packed_targets, dtype=torch.long)
            tokens[t_row, t_rank] = canvas.gather(1, block_cols)[t_row, step["target_col"]]
            editable = torch.zeros_like(packed_targets)
            editable[t_row, t_rank] = ~target_masked & s["edit"][t_row]
            edit = (tokens, editable, torch.zeros_like(packed_targets))  # (the last: the edits made, T2T)

        def select(scheduler, rows=None):
            """One configuration's rows (None: every row) selected at once; an editing scheduler's
            M2T and T2T from one proposal (its edits go to `edit[2]`)."""
            take = (lambda t: t) if rows is None else (lambda t: t[rows])
            args = (take(packed), take(packed_targets))
            if not getattr(scheduler, "edits", False):
                gx, _, gt = scheduler._select(*args, take(steps_in), take(steps_per), None, None)
                return gx, gt
            gx, gt, ge = scheduler.select_edits(*args, take(edit[1]), take(edit[0]), take(steps_in), take(steps_per))
            edit[2][slice(None) if rows is None else rows] = ge
            return gx, gt

        if len(self._groups) == 1 and not self._alone:  # one configuration for every row: no row gathers
            x0p, transferp = select(self._groups[0][0])
        else:
            x0p = torch.zeros(packed_targets.shape, dtype=torch.long, device=self.device)
            transferp = torch.zeros_like(packed_targets)
            for scheduler, rows in self._groups:
                x0p[rows], transferp[rows] = select(scheduler, rows)
            if self._alone:
                self._select_alone(packed, targets, x0p, transferp, edit)
        if self._ar_first:  # an attention block's first token: the argmax of its logits, committed alone
            start, attn = step["start"], s["attn_block"]
            first = s["ar_first"] & (start % attn == 0) & (canvas.gather(1, start[:, None])[:, 0] == self.mask_id)
            alone = torch.zeros_like(transferp)
            alone[:, 0] = True
            transferp = torch.where(first[:, None], alone, transferp)
            x0p[:, 0] = torch.where(first, packed[:, 0].argmax(-1), x0p[:, 0])
        if edit is not None:  # T2T: the edits join the commits
            transferp = transferp | edit[2]
            s["edited"] += edit[2].sum(-1)
            edited = edit[2].any(-1)
        if self._cfg is not None:  # the unconditional row commits what its request's row commits
            cond, uncond, _ = self._cfg
            x0p[uncond], transferp[uncond] = x0p[cond], transferp[cond]
        # Back to the block's columns.
        sample = canvas.gather(1, block_cols)
        x0, transfer = sample.clone(), torch.zeros_like(targets)
        x0[t_row, step["target_col"]] = x0p[t_row, t_rank]
        transfer[t_row, step["target_col"]] = transferp[t_row, t_rank]
        transfer &= targets
        new = torch.where(transfer, x0, sample)
        canvas.scatter_(1, block_cols, new)
        when = torch.where(transfer, s["forwards"][:, None], s["commit"].gather(1, block_cols))
        s["commit"].scatter_(1, block_cols, when)

        generated = self._generated
        hold = None
        if self._editing:  # an editing row's block ends as `block_ends` says; until then it holds it
            began_empty = s["post"] > 0
            empty = ~((new == self.mask_id) & step["masked"]).any(-1)
            ended, post, hold = block_ends(began_empty, edited, empty, s["post"], s["max_post"])
            s["post"] = torch.where(s["edit"], post, 0)
            hold &= s["edit"]
        if self._stop_at_eos:
            # Rows whose text up to an EOS is committed get EOS in every masked position after it (an
            # editing row's only once its block ended: an EOS inside it may still be edited away).
            eos_rows = s["stop_at_eos"] if hold is None else s["stop_at_eos"] & (~s["edit"] | ended)
            fill = after_eos(canvas, self.mask_id, self.eos_id, generated) & eos_rows[:, None]
            canvas.masked_fill_(fill, self.eos_id)
            s["commit"] = torch.where(fill, s["forwards"][:, None], s["commit"])
        s["last_start"] = step["start"]
        s["forwards"] += 1
        # (an editing row's post steps are not the block's steps)
        s["step_in_block"] += 1 if hold is None else (~(s["edit"] & began_empty)).long()

        # Next block: the first with a masked position (blocks fill in order). A block diffusion row
        # whose block's steps ran out with masks left (the model predicted the mask token) leaves it
        # behind, as the release's loop does: its next is the first masked block after it.
        masked = (canvas == self.mask_id) & generated
        if self.block_causal:
            spent = s["step_in_block"] >= s["steps_per_block"]
            spent = (spent if hold is None else spent & ~hold).long()
            masked &= self._positions >= (s["origin"] + (s["block"] + spent) * s["block_len"])[:, None]
        left = masked.any(-1)
        first_masked = torch.where(left, masked.int().argmax(-1), s["length"])
        block = torch.div(first_masked - s["origin"], s["block_len"], rounding_mode="floor")
        moved = left & (block > s["block"])
        if hold is not None:
            left, moved = left | hold, moved & ~hold
        s["block"] = torch.where(moved, block, s["block"])
        s["step_in_block"] = torch.where(moved, 0, s["step_in_block"])

        # One host read: which rows finished or failed, every row's canvas and commit steps.
        finite = torch.ones(rows_n, dtype=torch.long, device=self.device).scatter_reduce(
            0, step["target_row"], torch.isfinite(logits).all(-1).long(), "amin"
        )
        counters = [s["forwards"], s["fed"], s["attended"], s["full_forwards"], s["canvas_refreshes"],
                    s["drift_refreshes"], finite, ~left, s["edited"]]  # fmt: skip
        counters = torch.stack(counters, 1)
        snapshot = torch.cat([canvas, s["commit"], counters.long()], 1).cpu()
        self.host_reads += 1
        info = snapshot[:, 2 * self.width :].tolist()  # per row: forwards, fed, attended, full, canvas, drift, ok, done
        finished = []
        for i, req in enumerate(self.requests):
            if self._uncond[i]:
                continue
            forwards, fed, attended, full, canvas_refreshes, drift, ok, done, edits = info[i]
            if req.cfg_scale:  # the counters of both rows
                both = (a + b for a, b in zip(info[i][1:6], info[i + 1][1:6], strict=True))
                fed, attended, full, canvas_refreshes, drift = both
                ok = ok and info[i + 1][6]
            if not ok:
                error = FloatingPointError(f"the model's logits at step {forwards - 1} are not finite")
                finished.append((i, Finished(req, snapshot[i, :0], snapshot[i, :0], error=error)))
                continue
            p, length = len(req.prompt), req.length
            seq = snapshot[i, p:length]
            commit = snapshot[i, self.width + p : self.width + length]
            if req.on_step is not None:
                req.on_step(seq, commit)
            if done:
                stats = {
                    "steps": forwards, "full_forwards": full, "fed_tokens": fed, "reused_tokens": attended - fed,
                    "canvas_refreshes": canvas_refreshes, "drift_refreshes": drift,
                    "tokens_per_step": req.max_new_tokens / max(forwards, 1), **req.scheduler.stats,
                }  # fmt: skip
                if getattr(req.scheduler, "edits", False):
                    stats["edited_tokens"] = edits
                finished.append((i, Finished(req, seq.clone(), commit.clone(), stats)))
        self.finished_rows = [i for i, _ in finished]
        return [f for _, f in finished]

    def _select_alone(self, packed, targets, x0, transfer, edit) -> None:
        """Rows whose scheduler draws random numbers (or is not vectorised): each alone, on exactly the
        logits it would get alone (its still-masked positions; an editing row's committed generated
        block positions too, `edit` as `commit` packs them), with its own generator."""
        s = self._state
        index = torch.tensor(self._alone, device=self.device)
        info = [s["origin"][index], s["block"][index], s["step_in_block"][index], s["steps_per_block"][index]]
        info = torch.stack(info, 1).tolist()
        self.host_reads += 1
        guided: dict = {}  # guided rows by guide and chunk limit: their guide forwards are shared
        for i, (origin, block, step_index, num_steps) in zip(self._alone, info, strict=True):
            req = self.requests[i]
            cols = targets[i].nonzero().flatten()
            start = origin + block * req.block_length
            context = StepContext(
                x=s["canvas"][i : i + 1, : req.length], targets=start + cols, start=start,
                end=start + req.block_length, prompt_len=len(req.prompt), mask_token_id=self.mask_id,
            )  # fmt: skip
            n = cols.numel()
            logits, mask_index = packed[i : i + 1, :n], targets[i : i + 1, cols]
            if isinstance(req.scheduler, GuidedScheduler):
                key = (id(req.scheduler.guide), req.scheduler.config.max_chunks_per_step)
                guided.setdefault(key, []).append((i, n, (req.scheduler, logits, mask_index, context)))
                continue
            if getattr(req.scheduler, "edits", False):  # a sampling editing row: M2T and T2T from one draw
                row = (logits, self._step["masked"][i : i + 1, cols], edit[1][i : i + 1, :n], edit[0][i : i + 1, :n])
                step_index = min(step_index, num_steps - 1)  # (a post step may come after the last step)
                gx, gt, ge = req.scheduler.select_edits(*row, step_index, num_steps, req.generator)
                x0[i, :n], transfer[i, :n], edit[2][i, :n] = gx[0], gt[0], ge[0]
                continue
            gx, _, gt = req.scheduler._select(logits, mask_index, step_index, num_steps, req.generator, context)
            x0[i, :n], transfer[i, :n] = gx[0], gt[0]
        for group in guided.values():
            selected = GuidedScheduler.select_many([item for _, _, item in group])
            for (i, n, _), (gx, _, gt) in zip(group, selected, strict=True):
                x0[i, :n], transfer[i, :n] = gx[0], gt[0]

    def _observe_drift(self, values: torch.Tensor) -> None:
        """RefreshOnDrift per row: a refreshing row records its fresh last-layer values as the
        reference; a cached row's drift is the largest cosine distance of its probes' fresh values
        from that reference; rows beyond the threshold refresh at their next step."""
        s, step = self._state, self._step
        row, col, refresh = step["row"], step["col"], step["refresh"]
        drift_rows = s["drift"] > 0
        keep = (refresh & drift_rows)[row][:, None, None]
        s["reference"][row, col] = torch.where(keep, values, s["reference"][row, col])
        refreshing = refresh & drift_rows
        s["refreshed_tokens"] = torch.where(refreshing[:, None], s["canvas"], s["refreshed_tokens"])
        probe = self._probe[row, col]
        cos = torch.nn.functional.cosine_similarity(values.float(), s["reference"][row, col].float(), dim=-1)
        distance = ((1 - cos).amax(-1)).masked_fill(~probe, 0)
        drift = torch.zeros(len(self.requests), device=self.device).scatter_reduce(0, row, distance, "amax")
        # compared in float32, as RefreshOnDrift compares its float32 drift with the threshold
        s["stale"] = (drift > s["drift"].float()) & ~refreshing & drift_rows
