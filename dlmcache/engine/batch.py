"""The state of every running generation, planned and committed on the host in plain arrays.

A request is data: its canvas, its place in the schedule, its scheduler and its cache rule's state
are rows of `GenerationBatch`'s numpy arrays (row r = request r, canvas column p = its position p; a
request never shares a row, so no left padding), as vLLM v1 keeps its persistent batch. Per step:

- `plan()` -> `StepInput`: every row's cache rule (`dlmcache.cache`, one call per rule for all of
  its rows) says which rows refresh and what each feeds; the rows' fed positions are flattened into
  one list of tokens with their pool slots and the keys each row attends, and copied to the model's
  device at once;
- the runner computes the logits of the rows' still-masked block positions in one forward;
- `commit(logits, values)` runs the schedulers on the device (one `select` per scheduler
  configuration, rows padded to the widest block), reads the chosen tokens back in one copy, and on
  the host writes them, fills after EOS, moves rows to their next block and returns the finished
  rows.

The device work per step does not depend on the number of rows, and the device-to-host copies are
counted (`host_reads`): one per step (plus one per step where a scheduler must run row by row and
read the canvas on the device). Membership changes (`add`, `remove`) rebuild the arrays; they
happen between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dlmcache.batching import after_eos
from dlmcache.cache import DenoisingCache, refreshes_prompt
from dlmcache.schedulers import DLMScheduler, GuidedScheduler
from dlmcache.schedulers.base import StepContext
from dlmcache.schedulers.editing import block_ends


@dataclass
class Request:
    """One generation: prompt ids, the schedule, and this request's own scheduler and cache rule.

    rule: the `DenoisingCache` the engine runs for it (for a block diffusion model, the cache as a
    `BlockCache`). on_step(sequence, commit_step): after each of its steps, with host
    tensors [G] of its generated region (masks where nothing is committed yet) and of each token's
    commit step (-1: not yet), live: copy what you keep. cfg_scale: classifier-free guidance as LLaDA
    writes it (0: off). The request then has a second, unconditional row: the same canvas with the
    prompt masked, its own KV; every step the logits are uncond + (cfg_scale + 1) * (cond - uncond),
    and the two rows commit the same tokens.
    """

    prompt: list[int]
    max_new_tokens: int
    block_length: int
    steps: int
    scheduler: DLMScheduler
    rule: DenoisingCache
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
    def block_causal(self) -> bool:
        from dlmcache.cache.block import BlockCache

        return isinstance(self.rule, BlockCache)

    @property
    def compressed_len(self) -> int:
        """The prompt positions its cache compresses: the whole prompt, or for block diffusion its
        complete attention blocks (the block holding the prompt's end is still decoded); 0 without
        compression."""
        if self.rule.compression is None:
            return 0
        if self.block_causal:
            attn = self.attention_block or self.block_length
            return len(self.prompt) // attn * attn
        return len(self.prompt)

    @property
    def refreshes_prompt(self) -> bool:
        """Whether its refreshes after the first forward recompute its prompt too: its rule's scope, or
        where the rule leaves it to the request (None, FreeCache's default), whether its prompt is no
        longer than its answer (`refreshes_prompt`)."""
        if self.rule.refresh_prompt is None:
            return refreshes_prompt(len(self.prompt), self.max_new_tokens)
        return self.rule.refresh_prompt

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
class Detached:
    """Rows taken out of a `GenerationBatch` with their state (`detach`, `attach`)."""

    requests: list[Request]  # each request once
    rows: list[tuple[Request, bool]]  # per row: its request, and whether it is the unconditional row
    state: dict[str, np.ndarray]
    device_state: dict[str, torch.Tensor]


@dataclass
class StepInput:
    """One flattened forward for every running request (tensors on the model's device).

    input_ids, positions, slots, query_row, query_rank: [T], one entry per fed token (row-major:
    row by row, positions ascending); max_queries: the most tokens an attention row feeds (a host
    int); key_slots, key_valid: [R, W] the pool slots of each attention row's positions and which it
    attends (every_key: a host flag, all of them: one row, attending all its positions; fresh_keys:
    one row that feeds every position, so its keys are the fed tokens themselves; write_kv: False
    when no later step reads this step's KV: one row without a cache, feeding everything);
    logit_index: [M] the fed token whose hidden state predicts each target (row `target_row` [M],
    block column `target_col` [M])."""

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
    keys by log-sum-exp), compress (host) the rows that compute their prompt at this forward and
    compress it, row_start [R] where each row's tokens begin in the flattened order, masked (host,
    per compressing row) which of its generation positions are still masked (a policy scoring by the
    masked positions reads them); a row's segment attention lays its queries out by row and rank
    (`token_row`, `token_rank`, `most_tokens`), so a block diffusion row's attention rows share it."""

    merge: torch.BoolTensor
    compress: list[int]
    row_start: torch.LongTensor
    masked: dict[int, torch.BoolTensor]
    token_row: torch.LongTensor  # [T] each fed token's row (its request's, not its attention row)
    token_rank: torch.LongTensor  # [T] its place among its row's fed tokens
    most_tokens: int  # the most tokens a row feeds


#: The batch's own state per row: name -> the value a row starts with (its dtype follows).
ROW_STATE = {
    "length": 0, "prompt_len": 0, "origin": 0, "block_len": 1, "steps_per_block": 1, "block": 0,
    "step_in_block": 0, "forwards": 0, "fed": 0, "attended": 0, "full_forwards": 0, "canvas_refreshes": 0,
    "drift_refreshes": 0, "edited": 0, "stop_at_eos": False, "last_start": -1, "refresh_prompt": True, "lead": 0,
    "compressed_len": 0, "attn_block": 1, "ar_first": False, "edit": False, "max_post": 0, "post": 0,
}  # fmt: skip
#: ... per canvas position: name -> (the value a position starts with, None: the mask token; dtype)
COLUMN_STATE = {"canvas": (None, np.int64), "commit": (-1, np.int64), "key_slots": (0, np.int64)}
DTYPES = {bool: np.bool_, int: np.int64, float: np.float64}


class GenerationBatch:
    """Every running generation of one model (see the module docstring).

    mask_token_id, eos_token_id: the model's; shift: its logit shift (Dream 1, LLaDA 0); kv_heads,
    head_dim, dtype: the shape of the rules' device state (the drift test's reference values);
    device: the model's. What a cache rule reads (`dlmcache.cache.base`): `state`, `pos`, `start`,
    `end`, `in_len`, `mask_id`, `shift`, and after a forward `refresh`, `fed_row`, `fed_col`.
    """

    def __init__(self, mask_token_id: int, eos_token_id: int | None, shift: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):  # fmt: skip
        self.mask_id, self.eos_id, self.shift = mask_token_id, eos_token_id, shift
        self.kv_heads, self.head_dim, self.dtype, self.device = kv_heads, head_dim, dtype, torch.device(device)
        self.requests: list[Request] = []  # per row (a request with CFG: twice, its unconditional row next)
        self._uncond: list[bool] = []  # per row: the unconditional row of the request before it
        self.width = 1
        self.host_reads = 0  # device-to-host copies made by plan / commit, for tests and metrics
        self.state = {name: np.zeros(0, DTYPES[type(v)]) for name, v in ROW_STATE.items()}
        self.state |= {name: np.zeros((0, 1), dtype) for name, (_, dtype) in COLUMN_STATE.items()}
        self.columns = dict(COLUMN_STATE)
        self.device_state: dict[str, torch.Tensor] = {}
        self.scratch: dict = {}  # a rule's notes from plan to commit
        self._regroup()

    def __len__(self) -> int:
        """Running requests (a request with CFG has two rows in `requests`, one per row)."""
        return self._running

    # ------------------------------------------------------------------ membership

    def add(self, request: Request, slots: torch.LongTensor) -> None:
        """Start `request`, whose positions [0, length) live at pool `slots` [length] (with CFG
        [2 * length]: the unconditional row's follow, and that row follows the request's)."""
        prompt_len, length = len(request.prompt), request.length
        causal = request.block_causal
        if self.requests and causal != self.block_causal:
            raise ValueError(
                f"request {request.id!r}: block diffusion and full-attention requests do not share a batch (its "
                f"rule {request.rule!r}; the running rows are {'' if self.block_causal else 'not '}block diffusion)"
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
                f"blocks; its rule {request.rule!r} is full attention"
            )
        if causal and request.cfg_scale:
            raise ValueError(
                f"request {request.id!r}: cfg_scale={request.cfg_scale!r} is not built for block diffusion"
            )
        canvas = np.array(request.prompt + [self.mask_id] * request.max_new_tokens, dtype=np.int64)
        slots = slots.cpu().numpy()
        self._add_row(request, canvas, slots[:length])
        if request.cfg_scale:
            unconditional = canvas.copy()
            unconditional[:prompt_len] = self.mask_id
            self._add_row(request, unconditional, slots[length : 2 * length], uncond=True)
        request.scheduler.begin([request.prompt], [request.chat], torch.from_numpy(canvas)[None].to(self.device),
                                prompt_len)  # fmt: skip
        self._regroup()

    def _add_row(self, request: Request, canvas: np.ndarray, slots: np.ndarray, uncond=False) -> None:
        g, p, rule = request.max_new_tokens, len(request.prompt), request.rule
        row = {
            "length": request.length, "prompt_len": p, "block_len": request.block_length,
            "compressed_len": request.compressed_len, "refresh_prompt": request.refreshes_prompt,
            "lead": rule.refresh_lead, "attn_block": request.attention_block or request.block_length,
            "ar_first": request.first_token_ar,
            # where block 0 starts: after the prompt, or for block diffusion at the absolute block
            # holding the prompt's end (its prompt tokens are given, its masks decoded)
            "origin": p // request.block_length * request.block_length if request.block_causal else p,
            "steps_per_block": request.steps // (g // request.block_length), "stop_at_eos": request.stop_at_eos,
            **rule.row(request),
        }  # fmt: skip
        if getattr(request.scheduler, "edits", False):  # LLaDA2.1's token editing (`TokenEditingScheduler`)
            row.update(edit=True, max_post=request.scheduler.config.max_post_steps)
        for name, default in type(rule).row_state.items():  # a rule first seen: its state for every row
            if name not in self.state:
                self.state[name] = np.full(len(self.requests), default, DTYPES[type(default)])
        self.columns |= type(rule).column_state
        for name in getattr(type(rule), "device_state", ()):
            if name not in self.device_state:
                shape = (len(self.requests), self.width, self.kv_heads, self.head_dim)
                self.device_state[name] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # Wide enough that every row's block columns (start + j, j < the widest block) are in the canvas.
        everyone = self.requests + [request]
        width = max(self.width, max(r.length for r in everyone) + max(r.block_length for r in everyone))
        s = self.state
        for name in list(s):
            if name in self.columns:
                continue
            if name in row:
                value = row[name]
            elif name in ROW_STATE:
                value = ROW_STATE[name]
            else:  # another rule's field
                value = _rule_default(everyone, name)
            s[name] = np.append(s[name], np.array([value], s[name].dtype))
        values = {"canvas": canvas, "key_slots": slots}
        for name, (default, dtype) in self.columns.items():
            fill = self.mask_id if default is None else default
            old = s.get(name, np.full((len(self.requests), self.width), fill, dtype))
            new = np.full((1, width), fill, dtype)
            given = values.get(name)
            if given is not None:
                new[0, : len(given)] = given
            s[name] = np.concatenate([_pad_cols(old, width, fill), new])
        for name, t in self.device_state.items():
            t = torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1], *t.shape[2:])], 1)
            self.device_state[name] = torch.cat([t, t.new_zeros(1, *t.shape[1:])])
        self.width = width
        self.requests.append(request)
        self._uncond.append(uncond)

    def remove(self, rows: list[int]) -> list[Request]:
        """Drop `rows` (finished or cancelled; a request's unconditional row goes with it, given or not);
        returns their requests."""
        if not rows:
            return []
        return self.detach(rows).requests

    def detach(self, rows: list[int]) -> Detached:
        """Take `rows` out of the batch with their state (a request's unconditional row goes with it);
        `attach` puts them back, as they were."""
        gone = set(rows) | {i + 1 for i in rows if i + 1 < len(self._uncond) and self._uncond[i + 1]}
        keep = [i for i in range(len(self.requests)) if i not in gone]
        taken = sorted(gone)
        part = Detached(
            requests=[self.requests[i] for i in taken if not self._uncond[i]],
            rows=[(self.requests[i], self._uncond[i]) for i in taken],
            state={name: a[taken] for name, a in self.state.items()},
            device_state={name: t[taken] for name, t in self.device_state.items()},
        )  # fmt: skip
        self.state = {name: a[keep] for name, a in self.state.items()}
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.device_state = {name: t.index_select(0, index) for name, t in self.device_state.items()}
        self.requests = [self.requests[i] for i in keep]
        self._uncond = [self._uncond[i] for i in keep]
        self._regroup()
        return part

    def attach(self, part: Detached) -> None:
        """Put `detach`ed rows back (after the others; the batch's width has not changed since)."""
        self.state = {name: np.concatenate([a, part.state[name]]) for name, a in self.state.items()}
        self.device_state = {name: torch.cat([t, part.device_state[name]]) for name, t in self.device_state.items()}
        self.requests += [r for r, _ in part.rows]
        self._uncond += [u for _, u in part.rows]
        self._regroup()

    def save(self) -> dict[str, np.ndarray]:
        """A copy of the host state, for `restore` after a step that failed (a rule's device state
        changes only in `commit`, at rows whose next step, replanned the same, writes it again)."""
        return {name: a.copy() for name, a in self.state.items()}

    def restore(self, saved: dict[str, np.ndarray]) -> None:
        self.state = saved
        self.scratch.clear()
        self._regroup()

    def _regroup(self) -> None:
        """What membership decides, known on the host: the rows of each cache rule and of each
        scheduler configuration, and the masks that change only with membership."""
        n = len(self.requests)
        by_rule: dict[type, list[int]] = {}
        for i, req in enumerate(self.requests):
            by_rule.setdefault(type(req.rule), []).append(i)
        whole = len(by_rule) == 1
        self._rules = [(cls, slice(None) if whole else np.array(rows)) for cls, rows in by_rule.items()]
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
        self._groups = [(s, np.array(rows)) for s, rows in groups.values()]
        self._one_group = len(self._groups) == 1 and not self._alone and len(self._groups[0][1]) == n
        uncond = [i for i, u in enumerate(self._uncond) if u]
        self._cfg = None
        if uncond:  # (conditional rows, their unconditional rows, cfg_scale + 1 [P, 1, 1] on the device)
            scale = torch.tensor([self.requests[i].cfg_scale + 1 for i in uncond], device=self.device)
            self._cfg = (np.array(uncond) - 1, np.array(uncond), scale[:, None, None])
        self.block_causal = any(r.block_causal for r in self.requests)
        self._compressed = any(r.compressed_len > 0 for r in self.requests)
        self._editing = any(getattr(r.scheduler, "edits", False) for r in self.requests)
        self._stop_at_eos = any(r.stop_at_eos for r in self.requests)
        self._reads_pool = any(r.rule.reads_pool for r in self.requests)
        self._drop_beyond = bool(self.state.get("drop_beyond", np.zeros(0, bool)).any())
        self._longest = max((r.length for r in self.requests), default=1)  # keys past it: nobody's
        s = self.state
        self.pos = np.arange(self.width)
        self.in_len = self.pos < s["length"][:, None]
        self._generated = (self.pos >= s["prompt_len"][:, None]) & self.in_len
        widest_block = max((r.block_length for r in self.requests), default=1)
        self._block_j = np.arange(widest_block)
        self._in_block = self._block_j < s["block_len"][:, None]
        self._rows = np.arange(n)
        self._running = n - sum(self._uncond)
        self._ar_first = s["ar_first"].copy()
        self._uncond_rows = np.array(self._uncond, dtype=bool)
        self._reports = np.array([r.on_step is not None for r in self.requests], dtype=bool)

    # ------------------------------------------------------------------ one step

    def plan(self) -> StepInput:
        """Decide every row's step and flatten it (see the module docstring)."""
        s, pos, mask_id = self.state, self.pos, self.mask_id
        canvas, length = s["canvas"], s["length"]
        self.start = s["origin"] + s["block"] * s["block_len"]
        self.end = self.start + s["block_len"]
        first = s["forwards"] == 0
        if self.block_causal:
            self.refresh = np.zeros_like(first)
            self.prompt_fresh = first  # a row's first forward computes its prompt
            need, attend_end = self._feed()
        else:
            need, attend_end = self._full_attention_feed(first)
        counts = need.sum(-1)
        rows, start = self._rows, self.start
        block_cols = start[:, None] + self._block_j  # [R, Bmax] the active block's canvas columns
        targets = (canvas[rows[:, None], block_cols] == mask_id) & self._in_block  # still masked
        masked = targets
        if self.block_causal:  # an attention row per fed attention block, each with its own key limit
            targets = masked = targets & (block_cols < length[:, None])  # (a row's last block may be short)
            if self._editing:  # an editing row reads every generated position of its block
                generated = (block_cols >= s["prompt_len"][:, None]) & (block_cols < length[:, None])
                targets = masked | (s["edit"][:, None] & self._in_block & generated)
        per_row = targets.sum(-1)

        # Flatten: row-major, each row's positions ascending.
        row, col = np.nonzero(need)
        total = len(row)
        self.fed_row, self.fed_col = row, col
        flat = np.full(canvas.shape, -1)
        flat[row, col] = np.arange(total)
        longest = self._longest
        row_start = np.cumsum(counts) - counts  # where each row's tokens begin in the flattened order
        skip = None
        if self._compressed:
            compressed = s["compressed_len"] > 0
            # a compressed prompt is read from its segment, except at a forward that recomputes it: the
            # pool's keys of such a row begin after it (its attention spans the canvas alone)
            skip = np.where(compressed & ~self.prompt_fresh, s["compressed_len"], 0)
        key_slots = s["key_slots"]
        if self.block_causal:
            # Fed blocks in order, each its queries contiguous: the query in block j of a row's fed range
            # attends the row's keys before the end of that block.
            attn = s["attn_block"]
            feed_from = np.where(counts > 0, need.argmax(-1), 0)
            first_block = feed_from // attn
            segments = (feed_from + counts - 1) // attn - first_block + 1
            seg_row = np.repeat(rows, segments)
            seg_j = np.arange(len(seg_row)) - np.repeat(np.cumsum(segments) - segments, segments)
            col_block = col // attn[row]
            query_row = (np.cumsum(segments) - segments)[row] + col_block - first_block[row]
            rank = col - np.maximum(feed_from[row], col_block * attn[row])  # (the first may start mid-block)
            seg_end = np.minimum((first_block[seg_row] + seg_j + 1) * attn[seg_row], length[seg_row])
            # a key after the block's end may hold anything: it reads the null block
            step_slots, key_valid = _key_window(key_slots, seg_row, seg_end, None if skip is None else skip[seg_row])
            widest = int(np.minimum(counts, attn).max())
        else:
            query_row = row
            rank = np.arange(total) - row_start[row]
            if skip is None:
                key_valid = pos[:longest] < attend_end[:, None]
                step_slots = key_slots[:, :longest]
            else:
                step_slots, key_valid = _key_window(key_slots, rows, attend_end, skip)
            widest = int(counts.max())
        t_row, t_col = np.nonzero(targets)
        t_rank = np.arange(len(t_row)) - (np.cumsum(per_row) - per_row)[t_row]
        predictor = np.maximum(block_cols[t_row, t_col] - self.shift, 0)
        s["fed"] += counts
        s["attended"] += attend_end
        self._step = dict(
            targets=targets, masked=masked, block_cols=block_cols, target_row=t_row, target_col=t_col,
            target_rank=t_rank, most_targets=int(per_row.max()),
        )  # fmt: skip
        one = len(self.requests) == 1 and not self.block_causal  # one row attending without a mask of its own
        arrays = {
            "input_ids": canvas[row, col], "positions": col, "slots": key_slots[row, col], "query_row": query_row,
            "query_rank": rank, "key_slots": step_slots, "key_valid": key_valid, "logit_index": flat[t_row, predictor],
            "target_row": t_row, "target_col": t_col,
        }  # fmt: skip
        prompts = None
        if self._compressed:
            compress = np.nonzero(compressed & self.prompt_fresh)[0].tolist()
            arrays |= {"merge": compressed & ~self.prompt_fresh, "row_start": row_start, "token_row": row,
                       # (a full-attention row's attention row is its request's: the same rank)
                       "token_rank": np.arange(total) - row_start[row] if self.block_causal else rank}  # fmt: skip
        tensors = self._upload(arrays)
        if self._compressed:
            masked_rows = {}
            for i in compress:  # the generation positions the compressing row feeds with it, still masked
                p = int(s["compressed_len"][i])
                end = p if self.block_causal else int(length[i])  # (block diffusion: the prefix alone)
                masked_rows[i] = self.to_device(canvas[i, p:end] == mask_id)
            prompts = PromptStep(
                merge=tensors.pop("merge"), compress=compress, row_start=tensors.pop("row_start"),
                masked=masked_rows, token_row=tensors.pop("token_row"), token_rank=tensors.pop("token_rank"),
                most_tokens=int(counts.max()),
            )  # fmt: skip
        self._targets = tensors  # (the commit's target rows and columns, on the device)
        return StepInput(
            **{k: v for k, v in tensors.items()}, max_queries=widest,
            every_key=one and not self._drop_beyond and not self._compressed, fresh_keys=one and total == longest,
            write_kv=not (one and not self._reads_pool), prompts=prompts,
        )  # fmt: skip

    def _feed(self) -> tuple[np.ndarray, np.ndarray]:
        """Every rule's (positions fed [R, W], where the keys end [R]) for its rows, refreshing or not."""
        need = np.zeros((len(self.requests), self.width), dtype=bool)
        attend_end = self.state["length"].copy()
        for cls, rows in self._rules:
            need[rows], attend_end[rows] = cls.feed(self, rows, self.refresh[rows])
        return need, attend_end

    def _full_attention_feed(self, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Full attention: which rows refresh (a row's first forward, and where its rule says), then
        what each feeds: a refreshing row everything (its prompt too at its first forward or where
        its scope says), or its canvas from its lead (the position predicting its first answer token,
        and its rule's `refresh_lead` before it); the others what their rule says."""
        s, pos = self.state, self.pos
        refresh = first.copy()
        for cls, rows in self._rules:
            refresh[rows] |= cls.refresh(self, rows)
        self.refresh = refresh
        need, attend_end = self._feed()
        whole = refresh & (first | s["refresh_prompt"])
        partial = refresh & ~whole
        self.prompt_fresh = whole  # the rows that compute their prompt's KV now
        s["full_forwards"] += whole
        s["canvas_refreshes"] += partial
        if refresh.any():
            lead = np.where(partial, np.maximum(s["prompt_len"] - self.shift - s["lead"], 0), 0)
            need = np.where(refresh[:, None], self.in_len & (pos >= lead[:, None]), need)
            attend_end = np.where(refresh, s["length"], attend_end)
        return need, attend_end

    def to_device(self, a: np.ndarray) -> torch.Tensor:
        """A host array as a tensor on the model's device (a view of it on the CPU)."""
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)

    def _upload(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The step's host arrays on the model's device: views on the CPU; elsewhere one copy of them
        all, as int64, split there (bool arrays come back as bool)."""
        if self.device.type == "cpu":
            return {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in arrays.items()}
        flat = np.concatenate([np.asarray(a, np.int64).ravel() for a in arrays.values()])
        device = torch.from_numpy(flat).pin_memory().to(self.device, non_blocking=True)
        out, at = {}, 0
        for k, a in arrays.items():
            t = device[at : at + a.size].view(a.shape)
            out[k] = t.bool() if a.dtype == np.bool_ else t
            at += a.size
        return out

    def commit(self, logits: torch.Tensor, values: torch.Tensor | None) -> list[Finished]:
        """Apply the step's logits [M, V] (and the last layer's fresh values [T, Hkv, D] of the fed
        tokens, for the rules that observe them); returns the rows that finished (still in the batch:
        `remove` them)."""
        s, step = self.state, self._step
        x0p, transferp, edits, finite, observed = self._select(logits, values)
        if edits is not None:  # T2T: the edits join the commits
            transferp |= edits
        if self._cfg is not None:  # the unconditional row commits what its request's row commits
            cond, uncond, _ = self._cfg
            x0p[uncond], transferp[uncond] = x0p[cond], transferp[cond]

        # Back to the block's columns.
        canvas, rows, block_cols = s["canvas"], self._rows[:, None], step["block_cols"]
        t_row, t_col, t_rank = step["target_row"], step["target_col"], step["target_rank"]
        sample = canvas[rows, block_cols]
        x0, transfer = sample.copy(), np.zeros_like(step["targets"])
        x0[t_row, t_col] = x0p[t_row, t_rank]
        transfer[t_row, t_col] = transferp[t_row, t_rank]
        transfer &= step["targets"]
        new = np.where(transfer, x0, sample)
        canvas[rows, block_cols] = new
        forwards = s["forwards"]
        s["commit"][rows, block_cols] = np.where(transfer, forwards[:, None], s["commit"][rows, block_cols])

        generated = self._generated
        hold = None
        if self._editing:  # an editing row's block ends as `block_ends` says; until then it holds it
            edited = np.zeros_like(transfer)
            edited[t_row, t_col] = edits[t_row, t_rank]
            s["edited"] += edited.sum(-1)
            began_empty = s["post"] > 0
            empty = ~((new == self.mask_id) & step["masked"]).any(-1)
            ended, post, hold = block_ends(began_empty, edited.any(-1), empty, s["post"], s["max_post"])
            s["post"] = np.where(s["edit"], post, 0)
            hold &= s["edit"]
        if self._stop_at_eos:
            # Rows whose text up to an EOS is committed get EOS in every masked position after it (an
            # editing row's only once its block ended: an EOS inside it may still be edited away).
            eos_rows = s["stop_at_eos"] if hold is None else s["stop_at_eos"] & (~s["edit"] | ended)
            fill = after_eos(canvas, self.mask_id, self.eos_id, generated) & eos_rows[:, None]
            canvas[fill] = self.eos_id
            s["commit"] = np.where(fill, forwards[:, None], s["commit"])
        s["last_start"] = self.start
        s["forwards"] += 1
        # (an editing row's post steps are not the block's steps)
        s["step_in_block"] += 1 if hold is None else ~(s["edit"] & began_empty)

        # Next block: the first with a masked position (blocks fill in order). A block diffusion row
        # whose block's steps ran out with masks left (the model predicted the mask token) leaves it
        # behind, as the release's loop does: its next is the first masked block after it.
        masked = (canvas == self.mask_id) & generated
        if self.block_causal:
            spent = s["step_in_block"] >= s["steps_per_block"]
            spent = spent if hold is None else spent & ~hold
            masked &= self.pos >= (s["origin"] + (s["block"] + spent) * s["block_len"])[:, None]
        left = masked.any(-1)
        first_masked = np.where(left, masked.argmax(-1), s["length"])
        block = (first_masked - s["origin"]) // s["block_len"]
        moved = left & (block > s["block"])
        if hold is not None:
            left, moved = left | hold, moved & ~hold
        s["block"] = np.where(moved, block, s["block"])
        s["step_in_block"] = np.where(moved, 0, s["step_in_block"])
        for (cls, rule_rows), result in zip(self._rules, observed, strict=True):
            if result is not None:
                cls.observed(self, rule_rows, result)
        return self._finished(finite, ~left)

    def _select(self, logits: torch.Tensor, values: torch.Tensor | None):
        """The schedulers' choices on the device, read back in one copy: (x0, transfer, edits) [R, N]
        at each row's targets in order, whether each row's logits were finite [R], and each rule's
        `observe` result (None where it has none)."""
        s, step, rows_n = self.state, self._step, len(self.requests)
        t_row, t_rank = self._targets["target_row"], self.to_device(step["target_rank"])
        n, device = step["most_targets"], logits.device
        target_masked = self.to_device(step["masked"][step["target_row"], step["target_col"]])
        # The schedulers see each row's still-masked positions packed to the left, rows padded to the
        # most any row has (what a row alone has: its masked columns, no others), and rows of one
        # configuration are selected together. (An editing row's targets also hold its block's
        # committed positions: masked only where masked.)
        if rows_n == 1:
            packed, packed_targets = logits[None], target_masked[None]
        else:
            packed = logits.new_zeros(rows_n, n, logits.shape[-1])
            packed[t_row, t_rank] = logits
            packed_targets = target_masked.new_zeros(rows_n, n)
            packed_targets[t_row, t_rank] = target_masked
        if self._cfg is not None:  # classifier-free guidance: the request's row gets the combined logits
            cond, uncond, scale = self._cfg
            c, u = packed[self.to_device(cond)], packed[self.to_device(uncond)]
            packed[self.to_device(cond)] = u + scale.to(u.dtype) * (c - u)
        steps_in, steps_per = s["step_in_block"], s["steps_per_block"]
        edit = None
        if self._editing:  # an editing row's committed generated block positions, packed as its targets
            steps_in = np.minimum(steps_in, steps_per - 1)  # (a post step may come after the last step)
            t_row_h, t_col_h, t_rank_h = step["target_row"], step["target_col"], step["target_rank"]
            tokens = np.zeros((rows_n, n), np.int64)
            tokens[t_row_h, t_rank_h] = s["canvas"][t_row_h, step["block_cols"][t_row_h, t_col_h]]
            editable = np.zeros((rows_n, n), bool)
            editable[t_row_h, t_rank_h] = (~step["masked"] & s["edit"][:, None])[t_row_h, t_col_h]
            edits = torch.zeros(rows_n, n, dtype=torch.bool, device=device)
            edit = (self.to_device(tokens), self.to_device(editable), edits)
        steps_in_t, steps_per_t = self.to_device(steps_in), self.to_device(steps_per)

        def select(scheduler, rows=None):
            """One configuration's rows (None: every row) selected at once; an editing scheduler's
            M2T and T2T from one proposal (its edits go to `edit[2]`)."""
            index = None if rows is None else self.to_device(rows)

            def take(t):
                return t if index is None else t[index]

            args = (take(packed), take(packed_targets))
            if not getattr(scheduler, "edits", False):
                gx, _, gt = scheduler.select(*args, take(steps_in_t), take(steps_per_t), None, None)
                return gx, gt
            gx, gt, ge = scheduler.select_edits(*args, take(edit[1]), take(edit[0]), take(steps_in_t),
                                                take(steps_per_t))  # fmt: skip
            edit[2][slice(None) if index is None else index] = ge
            return gx, gt

        if self._one_group:  # one configuration for every row: no row gathers
            x0p, transferp = select(self._groups[0][0])
        else:
            x0p = torch.zeros(packed_targets.shape, dtype=torch.long, device=device)
            transferp = torch.zeros_like(packed_targets)
            for scheduler, rows in self._groups:
                x0p[self.to_device(rows)], transferp[self.to_device(rows)] = select(scheduler, rows)
            if self._alone:
                self._select_alone(packed, x0p, transferp, edit, steps_in)
        first = self._ar_first & (self.start % s["attn_block"] == 0) if self._ar_first.any() else self._ar_first
        first = first & (s["canvas"][self._rows, self.start] == self.mask_id) if first.any() else first
        if first.any():  # an attention block's first token: the argmax of its logits, committed alone
            at = self.to_device(first)
            alone = torch.zeros_like(transferp)
            alone[:, 0] = True
            transferp = torch.where(at[:, None], alone, transferp)
            x0p[:, 0] = torch.where(at, packed[:, 0].argmax(-1), x0p[:, 0])
        # One host read: the choices, which rows' logits were finite, what the rules observed.
        # (a non-finite logit makes its row's sum non-finite; float32, so no half-precision sum overflows)
        finite = torch.isfinite(logits.sum(-1, dtype=torch.float32))
        observed = [cls.observe(self, rules_rows, values) for cls, rules_rows in self._rules]
        x0p_h, transfer_h, edits_h, finite_h, *results = self._download(
            [x0p, transferp, None if edit is None else edit[2], finite, *observed]
        )
        finite_rows = np.ones(rows_n, dtype=bool)
        finite_rows[step["target_row"][~finite_h]] = False
        return x0p_h, transfer_h, edits_h, finite_rows, results

    def _download(self, tensors: list[torch.Tensor | None]) -> list[np.ndarray | None]:
        """The step's results on the host, in one copy: views of the tensors on the CPU; elsewhere
        one int64 buffer (float results carried as float64 bits), split on the host."""
        self.host_reads += 1
        if self.device.type == "cpu":
            return [None if t is None else t.numpy() for t in tensors]
        given = [t for t in tensors if t is not None]
        parts = [t.double().view(torch.long) if t.is_floating_point() else t.long() for t in given]
        host = torch.cat([p.flatten() for p in parts]).cpu().numpy()
        out, at = [], 0
        for t in tensors:
            if t is None:
                out.append(None)
                continue
            a = host[at : at + t.numel()].reshape(t.shape)
            at += t.numel()
            out.append(a.view(np.float64) if t.is_floating_point() else a.astype(bool) if t.dtype == torch.bool else a)
        return out

    def _select_alone(self, packed, x0, transfer, edit, steps_in) -> None:
        """Rows whose scheduler draws random numbers (or is not vectorised): each alone, on exactly the
        logits it would get alone (its still-masked positions; an editing row's committed generated
        block positions too, `edit` as `_select` packs them), with its own generator."""
        s, step = self.state, self._step
        guided: dict = {}  # guided rows by guide and chunk limit: their guide forwards are shared
        for i in self._alone:
            req = self.requests[i]
            cols = step["target_col"][step["target_row"] == i]  # its targets' block columns, in order
            n, start = len(cols), int(self.start[i])
            context = StepContext(
                x=self.to_device(s["canvas"][i : i + 1, : req.length]), targets=self.to_device(start + cols),
                start=start, end=start + req.block_length, prompt_len=len(req.prompt), mask_token_id=self.mask_id,
            )  # fmt: skip
            logits = packed[i : i + 1, :n]
            mask_index = torch.ones(1, n, dtype=torch.bool, device=packed.device)
            step_index, num_steps = int(steps_in[i]), int(s["steps_per_block"][i])
            if isinstance(req.scheduler, GuidedScheduler):
                key = (id(req.scheduler.guide), req.scheduler.config.max_chunks_per_step)
                guided.setdefault(key, []).append((i, n, (req.scheduler, logits, mask_index, context)))
                continue
            if getattr(req.scheduler, "edits", False):  # a sampling editing row: M2T and T2T from one draw
                masked = self.to_device(step["masked"][i, cols])[None]
                row = (logits, masked, edit[1][i : i + 1, :n], edit[0][i : i + 1, :n])
                gx, gt, ge = req.scheduler.select_edits(*row, step_index, num_steps, req.generator)
                x0[i, :n], transfer[i, :n], edit[2][i, :n] = gx[0], gt[0], ge[0]
                continue
            gx, _, gt = req.scheduler.select(logits, mask_index, step_index, num_steps, req.generator, context)
            x0[i, :n], transfer[i, :n] = gx[0], gt[0]
        for group in guided.values():
            selected = GuidedScheduler.select_many([item for _, _, item in group])
            for (i, n, _), (gx, _, gt) in zip(group, selected, strict=True):
                x0[i, :n], transfer[i, :n] = gx[0], gt[0]

    def _finished(self, finite: np.ndarray, done: np.ndarray) -> list[Finished]:
        """Report each request's step (`on_step`) and collect the finished and failed ones."""
        s = self.state
        finished = []
        if self._cfg is not None:  # a request fails with its unconditional row
            finite[self._cfg[0]] &= finite[self._cfg[1]]
        # (only the rows with something to do: a callback, a finish, a failure)
        attend = done | ~finite | self._reports
        for i in np.nonzero(attend & ~self._uncond_rows)[0].tolist():
            req = self.requests[i]
            both = [i, i + 1] if req.cfg_scale else [i]  # (the counters of both rows)
            forwards = int(s["forwards"][i])
            if not finite[i]:
                error = FloatingPointError(f"the model's logits at step {forwards - 1} are not finite")
                empty = torch.zeros(0, dtype=torch.long)
                finished.append((i, Finished(req, empty, empty, error=error)))
                continue
            p, length = len(req.prompt), req.length
            seq = torch.from_numpy(s["canvas"][i, p:length])
            commit = torch.from_numpy(s["commit"][i, p:length])
            if req.on_step is not None:
                req.on_step(seq, commit)
            if done[i]:
                counts = {k: int(s[k][both].sum()) for k in ("fed", "attended", "full_forwards", "canvas_refreshes",
                                                            "drift_refreshes")}  # fmt: skip
                stats = {
                    "steps": forwards, "full_forwards": counts["full_forwards"], "fed_tokens": counts["fed"],
                    "reused_tokens": counts["attended"] - counts["fed"], "canvas_refreshes": counts["canvas_refreshes"],
                    "drift_refreshes": counts["drift_refreshes"],
                    "tokens_per_step": req.max_new_tokens / max(forwards, 1), **req.scheduler.stats,
                }  # fmt: skip
                if getattr(req.scheduler, "edits", False):
                    stats["edited_tokens"] = int(s["edited"][i])
                finished.append((i, Finished(req, seq.clone(), commit.clone(), stats)))
        self.finished_rows = [i for i, _ in finished]
        return [f for _, f in finished]


def _key_window(key_slots: np.ndarray, rows: np.ndarray, end: np.ndarray, skip: np.ndarray | None):
    """(slots, valid) [A, K] of the keys each attention row attends: its request's (`rows`) positions
    from `skip` (default 0) to `end`, left-aligned; the rest point at the null block, invalid."""
    start = np.zeros_like(end) if skip is None else skip
    width = max(int((end - start).max()), 1)
    cols = start[:, None] + np.arange(width)
    valid = cols < end[:, None]
    cols = np.minimum(cols, key_slots.shape[1] - 1)
    return np.where(valid, key_slots[rows[:, None], cols], 0), valid


def _pad_cols(a: np.ndarray, width: int, value) -> np.ndarray:
    """a [R, w] padded with `value` to [R, width]."""
    if a.shape[1] >= width:
        return a[:, :width]
    return np.concatenate([a, np.full((a.shape[0], width - a.shape[1]), value, a.dtype)], 1)


def _rule_default(requests: list[Request], name: str):
    """The starting value of a rule's row field `name` (from whichever rule of `requests` declares it)."""
    for cls in {type(r.rule) for r in requests}:
        if name in cls.row_state:
            return cls.row_state[name]
    raise KeyError(name)


__all__ = ["Finished", "GenerationBatch", "PromptStep", "Request", "StepInput"]
