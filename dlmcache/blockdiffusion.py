"""Block diffusion decoding (SDAR, arXiv 2510.06303; the family of Arriola et al., "Block Diffusion",
arXiv 2503.09573): attention is causal across blocks of `block_length` absolute positions and
bidirectional inside one, and the sequence is denoised one block at a time.

Because a query in block b sees only blocks 0..b, the KV of a finished block never changes again: it
is cached exactly, like an autoregressive prefix (no approximation, nothing to refresh). Per step the
model is fed the active block alone, plus, at the first step of a block, the blocks finished since the
last forward (so their final KV is written with the same forward, instead of the release's extra
"store" forward per block). The schedulers choose which of the block's masked positions to commit, as
they do for the full-attention models.

The layout follows the release's generate: blocks are aligned to absolute positions, the prompt's
complete blocks are prefilled in one forward, and the block holding the prompt's end is decoded with
its masks (its prompt tokens are given, never overwritten). Rows of a batch are right-padded (column
= position) and each moves through its blocks at its own pace in the shared forwards, so each row
gets the tokens it gets alone, and a row whose threshold commits a block in one step does not wait
for the others.

One difference from the release's loop, where its rule is ill-defined: it asks for a fixed number of
tokens per step computed from the block length, and where fewer masks are left (the block holding the
prompt's end, or a threshold step that committed more) its top-k picks already-decoded positions and
overwrites them. Here a step commits only masked positions, its count spread over the masks left
(`transfer_quota`). With one token per step (steps = max_new_tokens, the default) the two agree.
Also, the release decodes the last block to its end even past `gen_length`; here the canvas ends at
prompt + `max_new_tokens`, so the last block may be shorter (equal outputs when prompt +
`max_new_tokens` is a multiple of the block length).
"""

from __future__ import annotations

import torch

from dlmcache.batching import after_eos
from dlmcache.cache.store import evict_prompt, pack_prompts
from dlmcache.kernels.ops import dense_attention
from dlmcache.kernels.ops.attention import masked_attention, merge_attention
from dlmcache.schedulers.editing import block_ends


class BlockCausalStore:
    """The KV of a batch of canvases [B, W] (column = position) for a block-causal model: one buffer
    [B, Hkv, W, D] per layer. `begin(rows, cols, key_end)` sets up a forward that feeds columns
    `cols` [R, n] of `rows` (None: every row): their K/V are written in place, and each fed query
    attends, among the keys before `key_end`, those of its own block and of every block before it that
    are real positions of its row (`valid` [B, W])."""

    def __init__(self, model, valid: torch.BoolTensor, block_length: int, compression=None,
                 prefix: torch.LongTensor | None = None):  # fmt: skip
        self.valid, self.block_length = valid, block_length
        # A compressed prefix (`compression`; each row's first `prefix` [B] positions): compressed at the
        # forward whose rows `begin` names in `compress`, read from its segment by every later one.
        self.compression, self.prefix = compression, prefix
        self.num_layers = model.num_layers
        self.segments: dict[int, list] = {}  # batch row -> its segment per layer
        self.compress: list[int] = []
        dtype = next(model.parameters()).dtype
        shape = (valid.shape[0], model.num_kv_heads, valid.shape[1], model.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=valid.device) for _ in range(model.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=valid.device) for _ in range(model.num_layers)]
        self.rows: torch.LongTensor | None = None
        self.cols: torch.LongTensor | None = None
        self.mask: torch.BoolTensor | None = None
        self.key_end = 0

    def begin(self, rows: torch.LongTensor | None, cols: torch.LongTensor, key_end: int,
              compress: list[int] = (), write: torch.BoolTensor | None = None) -> None:  # fmt: skip
        """`write` [R, n]: which fed columns write their K/V (None: all); the others attend and are
        attended with the K/V the store holds (a sub-block cache's stale ones)."""
        self.rows, self.cols, self.key_end, self.compress = rows, cols, key_end, list(compress)
        self.write = None if write is None else write[:, :, None, None]
        valid = self.valid if rows is None else self.valid[rows]
        self.mask = block_causal_mask(cols, self.block_length, valid[:, :key_end])
        index = torch.arange(cols.shape[0], device=cols.device) if rows is None else rows
        self._index = index[:, None]
        if self.compression is not None:  # the same for every layer of this forward
            self._batch_rows = index.tolist()
            # the fed rows whose prefix earlier forwards compressed: their keys start after it
            self._ready = [i for i, row in enumerate(self._batch_rows) if row in self.segments]
            self._after_prefix = self.mask.clone()
            for i in self._ready:
                self._after_prefix[i, :, : int(self.prefix[self._batch_rows[i]])] = False

    def attend(self, layer_idx: int, q, k, v, backend: str = "auto"):
        end = self.key_end
        keys, values = self.k[layer_idx], self.v[layer_idx]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [R, n, Hkv, D] at each row's columns
        if self.write is not None:
            k = torch.where(self.write, k, keys[self._index, :, self.cols])
            v = torch.where(self.write, v, values[self._index, :, self.cols])
        keys[self._index, :, self.cols] = k
        values[self._index, :, self.cols] = v
        if self.rows is None:
            keys, values = keys[:, :, :end], values[:, :, :end]
        else:
            keys, values = keys[self.rows, :, :end], values[self.rows, :, :end]
        if self.compression is None:
            return dense_attention(q, keys, values, self.mask, backend)
        out = self._attend_compressed(layer_idx, q, keys, values)
        for row in self.compress:  # its prefix, fed whole at this forward (from column 0), compressed
            i, p = self._batch_rows.index(row), int(self.prefix[row])
            segment = evict_prompt(self.compression, q[i : i + 1, :, :p], keys[i : i + 1, :, :p],
                                   values[i : i + 1, :, :p], p, q.new_zeros(0, dtype=torch.bool), layer_idx,
                                   self.num_layers)  # fmt: skip
            self.segments.setdefault(row, [None] * self.num_layers)[layer_idx] = pack_prompts(
                self.compression, [segment]
            )
        return out

    def _attend_compressed(self, layer_idx: int, q, keys, values):
        """The reference with compressed prefixes: a row whose prefix is compressed attends its segment
        and its keys after the prefix, merged by log-sum-exp (the segment's part first)."""
        out, lse = masked_attention(q, keys, values, self._after_prefix[:, None])
        for i in self._ready:
            part = self.segments[self._batch_rows[i]][layer_idx].attend(q[i : i + 1])
            out[i : i + 1] = merge_attention([part, (out[i : i + 1], lse[i : i + 1])])[0].to(out.dtype)
        return out

    @property
    def nbytes(self) -> int:
        segments = sum(s.nbytes_as(None) for each in self.segments.values() for s in each if s is not None)
        return sum(t.numel() * t.element_size() for t in self.k + self.v) + segments


@torch.no_grad()
def block_causal_logits(model, ids: torch.Tensor, block: int) -> torch.Tensor:
    """Logits [B, n, V] of a block-causal `model` over ids [B, n] (blocks of `block` absolute
    positions), in one forward from position 0: what the releases' full recompute gives (tests and
    `scripts/check_official.py` compare against it)."""
    b, n = ids.shape
    positions = torch.arange(n, device=ids.device).expand(b, -1)
    store = BlockCausalStore(model, torch.ones(b, n, dtype=torch.bool, device=ids.device), block)
    store.begin(None, positions, n)
    return model(ids, positions=positions, cache=store).logits


def block_causal_mask(cols: torch.LongTensor, block_length: int, valid: torch.BoolTensor) -> torch.BoolTensor:
    """[R, n, L]: the query at column cols[r, q] may attend key column j < L when j's block is not after
    the query's and j is a real position of the row (`valid` [R, L])."""
    key_block = torch.arange(valid.shape[1], device=valid.device) // block_length
    return (key_block[None, None, :] <= (cols // block_length)[:, :, None]) & valid[:, None, :]


@torch.no_grad()
def decode_blocks(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    block_length: int,
    steps_per_block: int,
    scheduler,
    cached: bool = True,
    stop_at_eos: bool = False,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    on_step=None,
    attention_block: int | None = None,
    first_token_autoregressive: bool = False,
    compression=None,
    sub_block_cache: bool = False,
) -> dict:
    """Decode `max_new_tokens` tokens after each prompt (lists of ids) with a block-causal `model`.

    block_length: the blocks' length in absolute positions; steps_per_block: the most forwards a block
    takes (the scheduler's `num_steps`: its last step commits every mask left); cached: reuse the
    finished blocks' KV (False: every step recomputes positions [0, block end), the reference);
    stop_at_eos: once a row's text up to an EOS is committed, its later positions become EOS and
    need no forward. on_step(nfe, sequences [B, G], commit_step [B, G]) after every step.

    attention_block: the block the model attends in, a multiple of `block_length` (None: the same).
    The blocks decoded in turn are then sub-blocks of it (Fast-dLLM v2's): each step feeds the whole
    attention block, and the cache holds the attention blocks before it. A model whose logits are
    shifted (`logit_shift`, the state at i - 1 predicts token i) also feeds the position before the
    attention block. first_token_autoregressive: a step whose attention block's first position is
    masked commits that position alone, as the argmax of its logits (Fast-dLLM v2's autoregressive
    step between blocks). compression: a `Compression` of each row's prefix, its complete prompt
    attention blocks (needs `cached`): the first forward feeds it whole (no separate prefill) and
    attends it so, then keeps it compressed with the prefix's own queries, as the engine does.
    sub_block_cache: Fast-dLLM v2's `use_block_cache` (approximate; needs `cached`): a step whose
    sub-block's first position is already committed feeds that sub-block alone and attends the rest
    of its attention block with the KV the store holds from the last step that fed it (the block's
    first step, or one whose sub-block's first position was masked, feeds the whole block).

    Each row moves through its blocks at its own pace (a row whose block is done starts its next one
    at the next step, while the others go on), and a finished row is no longer fed. Per step, a row
    feeds its active block and the blocks finished since its last forward (or, without the cache,
    everything before its block's end); rows feeding less are aligned on their block's end, so their
    window starts earlier, on blocks already final (recomputed to the same values).

    Returns {"sequences": [B, G], "commit_step": [B, G], "nfe": forwards after the prefill, "stats"}.
    """
    device, mask_id, shift = model.device, model.mask_token_id, model.logit_shift
    bs, g = block_length, max_new_tokens
    attn = bs if attention_block is None else attention_block
    if attn % bs:
        raise ValueError(f"attention_block={attn} is not a multiple of block_length={bs}")
    if sub_block_cache and (not cached or compression is not None):
        raise ValueError("sub_block_cache needs the cache (cached=True) and no prefix compression")
    prompt_lens = torch.tensor([len(p) for p in prompts], device=device)
    lengths = prompt_lens + g
    width = -(-int(lengths.max()) // attn) * attn
    columns = torch.arange(width, device=device)
    canvas = torch.full((len(prompts), width), mask_id, dtype=torch.long, device=device)
    for r, ids in enumerate(prompts):
        canvas[r, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
    valid = columns[None] < lengths[:, None]
    generated = valid & (columns[None] >= prompt_lens[:, None])
    gen_index = prompt_lens[:, None] + torch.arange(g, device=device)  # [B, G] each row's generated columns
    commit_step = torch.full_like(canvas, -1)
    compressed_len = prompt_lens // attn * attn
    compression = compression if cached else None
    store = BlockCausalStore(model, valid, attn, compression, compressed_len)
    stats = {"steps": 0, "prefill_forwards": 0, "fed_tokens": 0}
    in_block = torch.arange(bs, device=device)

    block = prompt_lens // bs  # each row's active block (the first holding a generated position)
    steps_in = torch.zeros_like(block)  # steps the active block has taken (with masks left, when editing)
    # A scheduler that edits (LLaDA2.1's T2T) keeps a row in its block after its last mask for post
    # steps (`post`: how many; `hold`: the row stays) until one edits nothing or they run out.
    editing = getattr(scheduler, "edits", False)
    post = torch.zeros_like(block)
    hold = torch.zeros_like(block, dtype=torch.bool)
    cached_end = torch.zeros_like(block)  # columns [0, cached_end) of the row hold final KV
    # Fast-dLLM v2's sub-block cache: the attention block start each row last fed whole (-1: none)
    refreshed_at = torch.full_like(block, -1)
    prefill = int(prompt_lens.min()) // attn * attn  # every row's complete prompt attention blocks
    if cached and prefill and compression is None:  # in one forward
        cols = columns[:prefill].expand(len(prompts), -1)
        store.begin(None, cols, prefill)
        model(canvas[:, :prefill], positions=cols, cache=store, logits_index=columns[:0])
        stats["prefill_forwards"] += 1
        stats["fed_tokens"] += cols.numel()
        cached_end = torch.full_like(block, prefill)
    nfe = 0
    while True:
        # A row's active block is its first with a mask left from its current one on (a block's last
        # step commits every mask; one whose steps ran out with masks left, as when the model predicts
        # the mask token itself, is left behind as the release's loop leaves it).
        masked_all = (canvas == mask_id) & generated
        ahead = masked_all & (columns[None] >= (block * bs)[:, None])
        left = ahead.any(1) | hold
        active = left.nonzero().flatten()  # one host read per step
        if active.numel() == 0:
            break
        first = ahead.int().argmax(1) // bs
        moved = left & ~hold & (first != block)
        steps_in = torch.where(moved, 0, steps_in)
        block = torch.where(left & ~hold, first, block)

        rows = None if active.numel() == len(prompts) else active
        blk = block[active]
        attn_start = blk * bs // attn * attn  # the attention block holding the active block
        end = attn_start + attn  # where each row's feed ends
        feed_from = (cached_end[active] - shift).clamp(min=0) if cached else torch.zeros_like(end)
        key_end = end
        if sub_block_cache:  # feed the sub-block alone unless its first position is masked (or new block)
            sub_start = blk * bs
            whole = (refreshed_at[active] != attn_start) | (canvas[active, sub_start] == mask_id)
            refreshed_at[active] = torch.where(whole, attn_start, refreshed_at[active])
            end, feed_from = torch.where(whole, end, sub_start + bs), torch.where(whole, feed_from, sub_start)
        span = torch.stack([(end - feed_from).max(), key_end.max()]).tolist()  # one host read
        n, key_end = span
        start = (end - n).clamp(min=0)
        cols = start[:, None] + torch.arange(n, device=device)
        offset = blk * bs - start  # where each row's block sits in its window
        lo, hi = torch.stack([offset.min(), offset.max()]).tolist()
        compress = []
        if compression is not None and nfe == 0:  # every row's first forward: its prefix is fed whole
            compress = [r for r in active.tolist() if int(compressed_len[r])]
        # (a sub-block row aligned left of its feed must not overwrite the stale KV it attends)
        write = (cols >= feed_from[:, None]) & (cols < end[:, None]) if sub_block_cache else None
        store.begin(rows, cols, key_end, compress, write)
        ids = canvas[active].gather(1, cols)
        logits = model(ids, positions=cols, cache=store, logits_index=torch.arange(lo, hi + bs, device=device)).logits
        pick = (offset - lo)[:, None] + in_block  # [R, bs]
        logits = logits.gather(1, pick[..., None].expand(-1, -1, logits.shape[-1]))
        stats["fed_tokens"] += cols.numel()
        if cached:
            cached_end[active] = attn_start  # the attention blocks before each row's were fed final

        block_cols = (blk * bs)[:, None] + in_block
        sample = canvas[active[:, None], block_cols]
        masked = masked_all[active[:, None], block_cols]
        read = generated[active[:, None], block_cols] if editing else masked  # the logits the rule reads
        if not bool(torch.isfinite(logits[read]).all()):
            raise FloatingPointError(f"the model's logits at step {nfe} are not finite")
        # (a post step has no mask and may come after the last step: its index is clamped)
        steps_now = steps_in[active].clamp(max=steps_per_block - 1)
        if editing:  # M2T among the masks, T2T among the block's committed generated positions
            editable = ~masked & generated[active[:, None], block_cols]
            x0, transfer, edited = _select_edits(scheduler, logits, masked, editable, sample, steps_now,
                                                 steps_per_block, generator)  # fmt: skip
        else:
            x0, transfer = _select(scheduler, logits, masked, steps_now, steps_per_block, generator)
        if first_token_autoregressive:  # an attention block's first token: the argmax, committed alone
            first = (blk * bs == attn_start) & masked[:, 0]
            alone = torch.zeros_like(transfer)
            alone[:, 0] = True
            transfer = torch.where(first[:, None], alone, transfer)
            x0[:, 0] = torch.where(first, logits[:, 0].argmax(-1), x0[:, 0])
        transfer &= masked
        if editing:
            transfer |= edited
            stats["edited_tokens"] = stats.get("edited_tokens", 0) + edited.sum()
        canvas[active[:, None], block_cols] = torch.where(transfer, x0, sample)
        commit_step[active[:, None], block_cols] = torch.where(transfer, nfe, commit_step[active[:, None], block_cols])
        eos_rows = generated
        if editing:
            began_empty = post[active] > 0
            steps_in[active] += (~began_empty).long()
            ended, post[active], hold[active] = block_ends(
                began_empty, edited.any(1), ~(masked & ~transfer).any(1), post[active], scheduler.config.max_post_steps
            )
            # EOS fills only after a row's block ended (an EOS inside it may still be edited away)
            eos_rows = generated & torch.zeros_like(hold).index_fill_(0, active[ended], True)[:, None]
        else:
            steps_in[active] += 1
        spent = (steps_in >= steps_per_block) & ~hold  # the block's steps ran out: the row goes on to its next
        block, steps_in = torch.where(spent, block + 1, block), torch.where(spent, 0, steps_in)
        if stop_at_eos and eos_token_id is not None:
            fill_after_eos(canvas, commit_step, eos_rows, mask_id, eos_token_id, nfe)
        nfe += 1
        if on_step is not None:
            on_step(nfe, canvas.gather(1, gen_index), commit_step.gather(1, gen_index))
    stats["steps"] = nfe
    if editing:
        stats["edited_tokens"] = int(stats.get("edited_tokens", 0))
    stats["tokens_per_step"] = g / max(nfe, 1)
    stats["kv_bytes"] = store.nbytes
    return {
        "sequences": canvas.gather(1, gen_index),
        "commit_step": commit_step.gather(1, gen_index),
        "nfe": nfe,
        "stats": stats,
    }


def _select(scheduler, logits, masked, steps_in, num_steps: int, generator):
    """(x0, transfer) [R, bs] of the rows' blocks: one call with per-row steps where the scheduler is
    vectorised over them and draws nothing, else row by row on the row's masked positions alone (as
    the step loop gives one row), each with the generator in turn."""
    if scheduler.batched:
        x0, _, transfer = scheduler._select(logits, masked, steps_in, num_steps, None, None)
        return x0, transfer
    x0 = torch.zeros(masked.shape, dtype=torch.long, device=masked.device)
    transfer = torch.zeros_like(masked)
    for i, step in enumerate(steps_in.tolist()):
        cols = masked[i].nonzero().flatten()
        out = scheduler.step(
            logits[i : i + 1, cols], x0[i : i + 1, cols], masked[i : i + 1, cols], step, num_steps, generator
        )
        x0[i, cols], transfer[i, cols] = out.x0[0], out.transfer_index[0]
    return x0, transfer


def _select_edits(scheduler, logits, masked, editable, tokens, steps_in, num_steps: int, generator):
    """An editing scheduler's (x0, transfer, edited) [R, bs]: one call where it is vectorised and
    draws nothing, else row by row on the row's masked and editable positions alone (as the engine
    gives one row), each with the generator in turn."""
    if scheduler.batched:
        return scheduler.select_edits(logits, masked, editable, tokens, steps_in, num_steps)
    x0 = torch.zeros(masked.shape, dtype=torch.long, device=masked.device)
    transfer, edited = torch.zeros_like(masked), torch.zeros_like(masked)
    for i, step in enumerate(steps_in.tolist()):
        cols = (masked[i] | editable[i]).nonzero().flatten()
        rows = (logits[i : i + 1, cols], masked[i : i + 1, cols], editable[i : i + 1, cols], tokens[i : i + 1, cols])
        gx, gt, ge = scheduler.select_edits(*rows, step, num_steps, generator)
        x0[i, cols], transfer[i, cols], edited[i, cols] = gx[0], gt[0], ge[0]
    return x0, transfer, edited


def fill_after_eos(canvas, commit_step, generated, mask_id: int, eos_id: int, step: int) -> None:
    """Rows whose text up to an EOS is committed get EOS in every masked position after it (in place)."""
    fill = after_eos(canvas, mask_id, eos_id, generated)
    canvas.masked_fill_(fill, eos_id)
    commit_step.masked_fill_(fill, step)
