"""GUIAgentSession: a multi-turn screenshot loop over a Qwen2-VL / Qwen2.5-VL model that keeps the
KV cache across turns and compresses it when a new screenshot arrives.

Each `step(screenshot, instruction)` appends one user turn (the screenshot and the instruction) to
the conversation and greedily decodes the agent's action. With `reuse_cache=True` (the default) only
the new turn is fed: the KV of earlier turns, and of the actions the model generated, stays in the
cache. Agents today re-prefill the whole history every step instead (`reuse_cache=False`, kept as the
baseline; GUI-KV's own code does this too).

Positions: Qwen2-VL's M-RoPE gives visual tokens 3-D (time, row, column) positions and continues text
after an image at the largest position used so far plus one. A new turn's positions are therefore
`get_rope_index` of the turn alone, shifted by the conversation's next position; decoded tokens
continue from there. Compression never renumbers positions (RoPE is applied before caching).

Compression: any eviction policy (GUI-KV, PrefixKV, SnapKV, StreamingLLM, ...) with a budget (the
fraction of everything seen that stays cached); it runs after each turn's prefill over everything
stored, with the new turn's queries and attention inputs. Every stored token carries the index of the
screenshot it came from (-1 for text), which GUI-KV reads and `max_screenshots` uses: when more than
that many screenshots are in context, the oldest one's tokens are dropped entirely (its turn's text
stays), as UI-TARS (5) and OpenCUA (3) bound their history.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from dlmcache.kernels.cache import CompressedCache, cache_argument
from dlmcache.kernels.policies.base import BudgetAllocator, EvictionPolicy


@dataclass
class TurnStats:
    """One step: tokens fed (prefill), generated, kept in the cache (mean over layers) and seen; KV
    bytes after the turn; prefill seconds and seconds per decoded token."""

    prefill_tokens: int
    generated_tokens: int
    kept_tokens: float
    seen_tokens: int
    kv_bytes: int
    prefill_seconds: float
    decode_seconds_per_token: float
    screenshots_in_context: int


class GUIAgentSession:
    """A screenshot loop over `model` (Qwen2VLForConditionalGeneration or
    Qwen2_5_VLForConditionalGeneration) with its `processor`.

    compression: None (full cache), a `GUIKV` / `PrefixKV` (their own budget), or any eviction policy
    with `budget=` (fraction kept). max_screenshots: keep at most this many screenshots in context
    (None: all). system: an optional system prompt. Batch size is 1 (one agent per session).
    """

    def __init__(
        self,
        model,
        processor,
        compression=None,
        budget: float | None = None,
        max_screenshots: int | None = None,
        max_new_tokens: int = 32,
        reuse_cache: bool = True,
        system: str | None = None,
    ):
        if not hasattr(model, "model") or not hasattr(model.model, "get_rope_index"):
            raise TypeError(f"{type(model).__name__} is not a Qwen2-VL / Qwen2.5-VL model (no get_rope_index)")
        if max_screenshots is not None and (not isinstance(max_screenshots, int) or max_screenshots < 1):
            raise ValueError(f"max_screenshots={max_screenshots!r} must be None or a positive integer")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        self.model, self.processor = model, processor
        self.policy, self.allocator, self.budget = _compression_parts(compression, budget)
        self.max_screenshots, self.max_new_tokens = max_screenshots, max_new_tokens
        self.reuse_cache, self.system = reuse_cache, system
        tok = processor.tokenizer
        self.im_end = tok.convert_tokens_to_ids("<|im_end|>")
        self.eos_ids = {self.im_end, tok.eos_token_id} - {None}
        self.image_token_id = model.config.image_token_id
        self.turn_break = tok("\n", add_special_tokens=False)["input_ids"]
        self.reset()

    # ------------------------------------------------------------------ public

    def reset(self) -> None:
        """Forget the conversation and the cache."""
        if getattr(self, "cache", None) is not None:
            self.cache.detach()
        self.cache: CompressedCache | None = None
        self.next_position = 0
        self.screenshots = 0
        self.history: list[dict] = []  # per turn: ids, tags, pixel_values, grid (for re-prefilling)
        self.visual_tokens: dict[int, torch.Tensor] = {}  # screenshot -> arrival indices in the cache
        self.stats: list[TurnStats] = []
        self.last_logits: torch.Tensor | None = None  # [V] first-token logits of the last step
        self.last_agreement = 1.0  # teacher forcing: share of forced tokens greedy decoding agreed with

    @torch.no_grad()
    def step(self, screenshot, instruction: str, action_ids: list[int] | None = None) -> str:
        """Show the agent `screenshot` (a PIL image) with `instruction`; returns its action text.

        action_ids: teacher forcing: feed these tokens as the action instead of the greedy ones, and
        set `last_agreement` to the fraction of them that greedy decoding would have produced (how
        fidelity to a reference session is measured).

        A step that fails (bad input, or an error inside the model) leaves the session exactly as it
        was before the call: its conversation, cache, positions and statistics."""
        self._check_step(screenshot, instruction, action_ids)
        saved = self._save()
        try:
            return self._step(screenshot, instruction, action_ids)
        except BaseException:
            self._restore(saved)
            raise

    def _check_step(self, screenshot, instruction, action_ids) -> None:
        from PIL import Image

        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"instruction must be a non-empty string, got {instruction!r}")
        if not isinstance(screenshot, Image.Image):
            raise TypeError(f"screenshot must be a PIL image, got {type(screenshot).__name__}")
        if min(screenshot.size) < 1:
            raise ValueError(f"screenshot has size {screenshot.size[0]}x{screenshot.size[1]}: it must be at least 1x1")
        if action_ids is not None:
            vocab = self.model.get_input_embeddings().num_embeddings
            if not isinstance(action_ids, (list, tuple)) or not action_ids:
                raise ValueError(f"action_ids must be a non-empty list of token ids, got {action_ids!r}")
            bad = [t for t in action_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"action_ids has ids outside the vocabulary [0, {vocab}): {bad[:5]}")

    def _save(self) -> dict:
        """What a step changes, to put back if it fails: the session's fields and, per cache layer, its
        fields and a snapshot of its stored segment."""
        cache = self.cache
        state = {k: v for k, v in self.__dict__.items() if k != "cache"}
        state["history"], state["visual_tokens"], state["stats"] = (
            list(self.history),
            dict(self.visual_tokens),
            list(self.stats),
        )
        layers = None if cache is None else [_layer_state(layer) for layer in cache.layers]
        return {"session": state, "cache": cache, "layers": layers}

    def _restore(self, saved: dict) -> None:
        if self.cache is not saved["cache"]:  # a re-prefill made a new cache: drop it
            self.cache.detach()
            self.cache = saved["cache"]
        if self.cache is not None:
            del self.cache.layers[len(saved["layers"]) :]
            for layer, fields in zip(self.cache.layers, saved["layers"], strict=True):
                layer.__dict__.clear()
                layer.__dict__.update(fields)
            self.cache.token_tags = None
        self.__dict__.update(saved["session"])

    def _step(self, screenshot, instruction: str, action_ids: list[int] | None) -> str:
        turn = self._encode_turn(screenshot, instruction)
        self.history.append(turn)
        self.screenshots += 1
        t0 = time.perf_counter()
        fresh = not (self.reuse_cache and self.cache is not None)
        saved_cache = self.cache
        if fresh:
            segment = self._whole_history()
        else:
            # the previous action's last token was sampled but never fed: it opens this segment
            last = self.history[-2]["generated"][-1]
            segment = dict(turn, ids=[last] + turn["ids"], tags=torch.cat([torch.tensor([-1]), turn["tags"]]))
        logits = self._prefill(segment, fresh)
        self._forget_old_screenshots()
        prefill_s = time.perf_counter() - t0
        self.last_logits = logits.float().cpu()
        t0 = time.perf_counter()
        ids = self._decode(logits, action_ids)
        decode_s = time.perf_counter() - t0
        turn["generated"] = ids
        kept = self.cache.stored_tokens()
        self.stats.append(TurnStats(
            prefill_tokens=len(segment["ids"]), generated_tokens=len(ids), kept_tokens=sum(kept) / len(kept),
            seen_tokens=self.cache.get_seq_length(), kv_bytes=self.cache.nbytes, prefill_seconds=prefill_s,
            decode_seconds_per_token=decode_s / max(len(ids), 1),
            screenshots_in_context=min(self.screenshots, self.max_screenshots or self.screenshots),
        ))  # fmt: skip
        if fresh and saved_cache is not None:
            saved_cache.detach()  # the step succeeded: the re-prefilled cache replaces it
        return self.processor.tokenizer.decode([t for t in ids if t not in self.eos_ids], skip_special_tokens=True)

    # ------------------------------------------------------------------ internals

    def _encode_turn(self, screenshot, instruction: str) -> dict:
        """The new user turn as tokens (after closing the previous assistant turn), with its screenshot's
        pixels, patch grid and per-token tags (the screenshot's index on its visual tokens, else -1)."""
        messages = [
            {"role": "user", "content": [{"type": "image", "image": screenshot}, {"type": "text", "text": instruction}]}
        ]
        if not self.history and self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        enc = self.processor.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
        )
        ids = enc["input_ids"][0].tolist()
        prefix = []
        if self.history:  # close the previous assistant turn exactly as the chat template would
            last = self.history[-1]["generated"]
            prefix = ([] if last and last[-1] in self.eos_ids else [self.im_end]) + self.turn_break
        ids = prefix + ids
        is_image = torch.tensor(ids) == self.image_token_id
        tags = torch.where(is_image, torch.tensor(self.screenshots), torch.tensor(-1))
        return {"ids": ids, "tags": tags, "pixel_values": enc["pixel_values"], "grid": enc["image_grid_thw"]}

    def _positions(self, ids: list[int], grid: torch.Tensor) -> torch.Tensor:
        """[3, 1, n] M-RoPE positions of a segment starting at the conversation's next position."""
        input_ids = torch.tensor([ids])
        mm_types = (input_ids == self.image_token_id).int()
        pos, _ = self.model.model.get_rope_index(input_ids, mm_types, grid, None, torch.ones_like(input_ids))
        return pos + self.next_position

    def _whole_history(self) -> dict:
        """Every turn so far (prompts and generated actions) as one segment, screenshots that fell out
        of the history removed."""
        first_kept = self.screenshots - (self.max_screenshots or self.screenshots)
        ids, tags, pixels, grids = [], [], [], []
        for i, turn in enumerate(self.history):
            keep = turn["tags"] < 0 if i < first_kept else torch.ones_like(turn["tags"], dtype=torch.bool)
            ids += [t for t, k in zip(turn["ids"], keep.tolist(), strict=True) if k]
            tags.append(turn["tags"][keep])
            if i >= first_kept:
                pixels.append(turn["pixel_values"])
                grids.append(turn["grid"])
            if "generated" in turn:
                ids += turn["generated"]
                tags.append(torch.full((len(turn["generated"]),), -1))
        return {"ids": ids, "tags": torch.cat(tags), "pixel_values": torch.cat(pixels), "grid": torch.cat(grids)}

    def _new_cache(self) -> CompressedCache:
        return CompressedCache(
            policy=self.policy,
            budget=self.budget,
            allocator=self.allocator,
            model=self.model,
            compress_segments=True,
        )

    def _prefill(self, segment: dict, fresh: bool) -> torch.Tensor:
        if fresh:
            self.cache = self._new_cache()
            self.next_position = 0
        device = self.model.device
        ids = segment["ids"]
        positions = self._positions(ids, segment["grid"])
        self.cache.token_tags = segment["tags"][None]
        seen = self.cache.get_seq_length()
        for shot in segment["tags"][segment["tags"] >= 0].unique().tolist():
            self.visual_tokens[shot] = seen + (segment["tags"] == shot).nonzero().flatten()
        out = self.model(
            input_ids=torch.tensor([ids], device=device),
            pixel_values=segment["pixel_values"].to(device, self.model.dtype),
            image_grid_thw=segment["grid"].to(device),
            position_ids=positions.to(device),
            **cache_argument(self.cache),
            use_cache=True,
        )
        self.cache.token_tags = None
        self.next_position = int(positions.max()) + 1
        return out.logits[0, -1]

    def _decode(self, logits: torch.Tensor, forced: list[int] | None = None) -> list[int]:
        """Greedy decoding (or teacher forcing of `forced`) until EOS or max_new_tokens."""
        ids, hits = [], []
        device = self.model.device
        limit = len(forced) if forced is not None else self.max_new_tokens
        for i in range(limit):
            greedy = int(logits.argmax())
            token = greedy if forced is None else forced[i]
            hits.append(greedy == token)
            ids.append(token)
            if len(ids) == limit or (forced is None and token in self.eos_ids):
                break
            pos = torch.full((3, 1, 1), self.next_position, device=device)
            out = self.model(
                input_ids=torch.tensor([[token]], device=device),
                position_ids=pos,
                **cache_argument(self.cache),
                use_cache=True,
            )
            self.next_position += 1
            logits = out.logits[0, -1]
        self.last_agreement = sum(hits) / max(len(hits), 1)
        return ids

    def kept_map(self, screenshot: int) -> torch.Tensor:
        """[rows, cols] fraction of (layer, KV head) pairs whose cache still holds each visual token of
        screenshot `screenshot` (0 = the first shown), in the screenshot's merged-patch grid."""
        if screenshot not in self.visual_tokens:
            raise ValueError(f"screenshot {screenshot} is not in this session (shown: {self.screenshots})")
        arrival = self.visual_tokens[screenshot].to(self.model.device)
        kept = torch.zeros(len(arrival), device=arrival.device)
        total = 0
        for layer in self.cache.layers:
            present = (layer.origin[0][..., None] == arrival) & layer.valid[0][..., None]  # [H, S, n]
            kept += present.any(1).float().sum(0)
            total += layer.origin.shape[1]
        t, h, w = self.history[screenshot]["grid"][0].tolist()
        merge = self.model.config.vision_config.spatial_merge_size
        return (kept / total).view(t, h // merge, w // merge)[0].cpu()

    def _forget_old_screenshots(self) -> None:
        if self.max_screenshots is None or self.screenshots <= self.max_screenshots:
            return
        cutoff = self.screenshots - self.max_screenshots
        self.cache.drop_tagged(lambda tags: (tags >= 0) & (tags < cutoff))


def _layer_state(layer) -> dict:
    state = dict(layer.__dict__)
    if layer.segment is not None:
        state["segment"] = layer.segment.snapshot()
    return state


def _compression_parts(compression, budget) -> tuple[EvictionPolicy | None, BudgetAllocator | None, float]:
    """(policy, allocator, budget) from what `GUIAgentSession(compression=...)` accepts."""
    if compression is None:
        if budget not in (None, 1.0):
            raise ValueError(f"budget={budget} without a compression policy")
        return None, None, 1.0
    if hasattr(compression, "allocator") and hasattr(compression, "policy"):  # PrefixKV
        return compression.policy, compression.allocator, compression.budget
    if not isinstance(compression, EvictionPolicy):
        raise TypeError(f"compression must be an eviction policy (GUIKV, SnapKV, ...) or PrefixKV, got {compression!r}")
    budget = budget if budget is not None else getattr(compression, "budget", None)
    if budget is None:
        raise ValueError(f"{type(compression).__name__} needs budget= (the fraction of the KV kept)")
    return compression, None, budget
