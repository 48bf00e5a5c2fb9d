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
= position, so every row's blocks are the same columns) and move through the blocks together; a row
with nothing masked in a block does not change, so each row gets the tokens it gets alone.

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

from dlmcache.kernels.ops import dense_attention


class BlockCausalStore:
    """The KV of a batch of canvases [B, W] (column = position) for a block-causal model: one buffer
    [B, Hkv, W, D] per layer. `begin(start, end)` sets up a forward that feeds columns [start, end)
    of every row: their K/V are written in place and each fed query attends the keys of its own block
    and of every block before it, among the row's real positions (`valid` [B, W])."""

    def __init__(self, model, valid: torch.BoolTensor, block_length: int):
        self.valid, self.block_length = valid, block_length
        dtype = next(model.parameters()).dtype
        shape = (valid.shape[0], model.num_kv_heads, valid.shape[1], model.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=valid.device) for _ in range(model.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=valid.device) for _ in range(model.num_layers)]
        self.start = self.end = 0
        self.mask: torch.BoolTensor | None = None

    def begin(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.mask = block_causal_mask(start, end, self.block_length, self.valid[:, :end])

    def attend(self, layer_idx: int, q, k, v, backend: str = "auto"):
        start, end = self.start, self.end
        self.k[layer_idx][:, :, start:end] = k
        self.v[layer_idx][:, :, start:end] = v
        keys, values = self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]
        return dense_attention(q, keys, values, self.mask, backend)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def block_causal_mask(start: int, end: int, block_length: int, valid: torch.BoolTensor) -> torch.BoolTensor:
    """[B, end - start, end]: query column q (start <= q < end) may attend key column j when j's block
    is not after q's and j is a real position of the row (`valid` [B, end])."""
    device = valid.device
    query_block = torch.arange(start, end, device=device) // block_length
    key_block = torch.arange(end, device=device) // block_length
    return (key_block[None, :] <= query_block[:, None])[None] & valid[:, None, :]


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
) -> dict:
    """Decode `max_new_tokens` tokens after each prompt (lists of ids) with a block-causal `model`.

    block_length: the blocks' length in absolute positions; steps_per_block: the most forwards a block
    takes (the scheduler's `num_steps`: its last step commits every mask left); cached: reuse the
    finished blocks' KV (False: every step recomputes positions [0, block end), the reference);
    stop_at_eos: once a row's text up to an EOS is committed, its later positions become EOS and
    need no forward. on_step(nfe, sequences [B, G], commit_step [B, G]) after every step.

    Returns {"sequences": [B, G], "commit_step": [B, G], "nfe": denoising forwards, "stats": {...}}.
    """
    if model.logit_shift:
        raise ValueError(f"{type(model).__name__}: block diffusion decoding needs unshifted logits")
    device, mask_id = model.device, model.mask_token_id
    bs, g = block_length, max_new_tokens
    prompt_lens = torch.tensor([len(p) for p in prompts], device=device)
    lengths = prompt_lens + g
    width = -(-int(lengths.max()) // bs) * bs
    columns = torch.arange(width, device=device)
    canvas = torch.full((len(prompts), width), mask_id, dtype=torch.long, device=device)
    for r, ids in enumerate(prompts):
        canvas[r, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
    valid = columns[None] < lengths[:, None]
    generated = valid & (columns[None] >= prompt_lens[:, None])
    gen_index = prompt_lens[:, None] + torch.arange(g, device=device)  # [B, G] each row's generated columns
    commit_step = torch.full_like(canvas, -1)
    store = BlockCausalStore(model, valid, bs)
    stats = {"steps": 0, "prefill_forwards": 0, "fed_tokens": 0, "blocks": 0}

    def forward(start: int, end: int, targets: torch.LongTensor) -> torch.Tensor:
        """Feed columns [start, end) (writing their KV); the logits [B, len(targets), V] of `targets`."""
        store.begin(start, end)
        positions = columns[start:end].expand(canvas.shape[0], -1)
        out = model(canvas[:, start:end], positions=positions, cache=store, logits_index=targets - start)
        stats["fed_tokens"] += (end - start) * canvas.shape[0]
        return out.logits

    first = int(prompt_lens.min()) // bs  # the first block holding a generated position
    cached_end = 0  # columns [0, cached_end) hold final KV
    if cached and first > 0:  # the prompts' complete blocks (of the shortest prompt) in one forward
        forward(0, first * bs, columns[:0])
        stats["prefill_forwards"] += 1
        cached_end = first * bs
    nfe = 0
    for block in range(first, width // bs):
        start, end = block * bs, (block + 1) * bs
        for i in range(steps_per_block):
            masked = (canvas[:, start:end] == mask_id) & generated[:, start:end]
            cols = masked.any(0).nonzero().flatten()  # one host read per step
            if cols.numel() == 0:
                break
            if i == 0:
                stats["blocks"] += 1
            targets = start + cols
            feed_from = cached_end if cached else 0
            logits = forward(feed_from, end, targets)
            if cached:
                cached_end = start  # the blocks before this one were fed with their final tokens
            if not bool(torch.isfinite(logits).all()):
                raise FloatingPointError(f"the model's logits at step {nfe} are not finite")
            out = scheduler.step(logits, canvas[:, targets], masked[:, cols], i, steps_per_block, generator=generator)
            canvas[:, targets] = out.prev_sample
            commit_step[:, targets] = commit_step[:, targets].masked_fill(out.transfer_index, nfe)
            if stop_at_eos and eos_token_id is not None:
                fill_after_eos(canvas, commit_step, generated, mask_id, eos_token_id, nfe)
            nfe += 1
            if on_step is not None:
                on_step(nfe, canvas.gather(1, gen_index), commit_step.gather(1, gen_index))
    stats["steps"] = nfe
    stats["tokens_per_step"] = g / max(nfe, 1)
    stats["kv_bytes"] = store.nbytes
    return {
        "sequences": canvas.gather(1, gen_index),
        "commit_step": commit_step.gather(1, gen_index),
        "nfe": nfe,
        "stats": stats,
    }


def fill_after_eos(canvas, commit_step, generated, mask_id: int, eos_id: int, step: int) -> None:
    """Rows whose text up to an EOS is committed get EOS in every masked position after it (in place)."""
    masked = (canvas == mask_id) & generated
    clean_eos = (canvas == eos_id) & generated & (masked.long().cumsum(-1) == 0)
    fill = (clean_eos.long().cumsum(-1) > 0) & masked
    canvas.masked_fill_(fill, eos_id)
    commit_step.masked_fill_(fill, step)
