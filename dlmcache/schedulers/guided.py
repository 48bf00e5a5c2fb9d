"""Guided unmasking (FlashDLM, arXiv 2505.21467): commit the longest prefix of drafts a guide accepts."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config

from ..batching import left_pad
from .base import (
    DLMScheduler,
    SchedulerMixin,  # noqa: F401  (diffusers finds the loadable base class by name in this module)
    StepContext,
    argmax_confidence,
    select_topk,
)


class GuidedScheduler(DLMScheduler):
    """Each step the DLM drafts every masked position of the block (argmax); an `ARGuide` reads the
    canvas left to right from where it stopped (committed tokens are taken as they are, drafts must
    pass its acceptance rule) in chunks of `guide.chunk_size`, and every draft of the accepted prefix
    is committed. A row whose prefix holds no draft commits the DLM's most confident one instead, so
    each step commits at least one token per row. Decoding therefore runs left to right, many tokens
    per forward when the guide agrees with the drafts.

    The guide is a runtime object (`set_guide`), not part of the saved configuration, and so is
    `base`: the scheduler this one wraps, which `DLMPipeline.set_guide(None)` puts back.
    """

    stops_at_eos = True

    @register_to_config
    def __init__(self, max_chunks_per_step: int | None = None):
        if max_chunks_per_step is not None and max_chunks_per_step < 1:
            raise ValueError(f"max_chunks_per_step={max_chunks_per_step} must be None or >= 1")
        self.guide = None
        self.base: DLMScheduler | None = None
        self.session = None  # the guide's state for the current generation (prefilled at its first step)
        self.prompt = None  # (ids, mask) in guide ids, from `begin` until that prefill

    def set_guide(self, guide, dlm_tokenizer, dlm_vocab_size: int, base: DLMScheduler | None = None) -> None:
        """Verify drafts with `guide` (an `ARGuide`, mapped to the DLM's vocabulary here), wrapping
        `base`, the scheduler that decodes when the guide is removed."""
        self.guide, self.base = guide, base
        guide.attach(dlm_tokenizer, dlm_vocab_size)

    def begin(self, prompts, chats, x, prompt_len):
        if self.guide is None:
            raise ValueError("GuidedScheduler has no guide: pass guide= to DLMPipeline.from_pretrained or set_guide()")
        guide = self.guide
        if guide.vocab_map.identity:
            rows = prompts
        else:  # the guide reads the same request in its own vocabulary (and chat template)
            rows = []
            for chat in chats:
                if isinstance(chat, str) or not guide.tokenizer.chat_template:
                    text = chat if isinstance(chat, str) else "\n".join(m["content"] for m in chat)
                    rows.append(guide.tokenizer(text)["input_ids"])
                else:
                    out = guide.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
                    rows.append(list(out["input_ids"] if not isinstance(out, list) else out))
        pad = guide.tokenizer.pad_token_id if guide.tokenizer.pad_token_id is not None else guide.vocab_map.fallback_id
        # The guide prefills at the first step, together with every other scheduler that begins then
        # (`select_many`): requests a batched engine admits in one step share one prefill forward.
        self.session, self.prompt = None, left_pad(rows, pad)
        self.cursor = torch.full((x.shape[0],), prompt_len, dtype=torch.long, device=x.device)
        self.accepted_drafts = 0

    @property
    def stats(self) -> dict:
        """Per generation: drafts accepted by the guide and guide forwards (prefill included)."""
        if getattr(self, "session", None) is None:  # (not begun, or not prefilled yet)
            return {}
        return {"accepted_drafts": self.accepted_drafts, "guide_forwards": self.session.forwards}

    def select(self, logits, mask_index, step_index, num_steps, generator, context: StepContext | None):
        return GuidedScheduler.select_many([(self, logits, mask_index, context)])[0]

    @staticmethod
    def select_many(items: list) -> list[tuple]:
        """`select` of several guided schedulers at once: items are (scheduler, logits, mask_index,
        context), each with its own session and rows, all with one guide. Their drafts are verified
        chunk by chunk in shared guide forwards (`guidance.verify_many` when the sessions differ): a
        scheduler whose rows accepted a whole chunk, with more of the block left and chunks left,
        goes on to the next round, the others stop. Returns each one's (x0, confidence, transfer)."""
        from ..guidance import verify_many

        waiting = [item[0] for item in items if item[0].session is None]
        if waiting:  # the guide's prefill of the schedulers that began since the last step: one forward
            sessions = waiting[0].guide.begin_many([scheduler.prompt for scheduler in waiting])
            for scheduler, session in zip(waiting, sessions, strict=True):
                scheduler.session, scheduler.prompt = session, None
        states = []
        for scheduler, logits, mask_index, context in items:
            if context is None:
                raise ValueError("GuidedScheduler.step needs the step context (it reads the whole canvas)")
            x0, confidence = argmax_confidence(logits)
            confidence = confidence.masked_fill(~mask_index, float("-inf"))
            drafted = context.x.clone()
            drafted[:, context.targets] = torch.where(mask_index, x0, drafted[:, context.targets])
            committed = context.x != context.mask_token_id
            states.append((x0, confidence, drafted, committed, scheduler.cursor.clone()))
        going = list(range(len(items)))
        rounds = 0
        while going:
            inputs = []
            for i in going:
                scheduler, _, _, context = items[i]
                _, _, drafted, committed, _ = states[i]
                pos = scheduler.cursor[:, None] + torch.arange(scheduler.guide.chunk_size, device=drafted.device)
                live = pos < context.end
                pos = pos.clamp(max=drafted.shape[1] - 1)  # [B, chunk] canvas positions to verify
                inputs.append((drafted.gather(1, pos), committed.gather(1, pos), live))
            sessions = [items[i][0].session for i in going]
            if len({id(s) for s in sessions}) == len(sessions) and all(s.mask.shape[0] == 1 for s in sessions):
                ks = verify_many(sessions, *zip(*inputs, strict=True))
            else:  # (rows of one session are already one forward)
                ks = [s.verify(*x) for s, x in zip(sessions, inputs, strict=True)]
            rounds += 1
            left = []
            for i, k in zip(going, ks, strict=True):
                scheduler, _, _, context = items[i]
                scheduler.cursor = scheduler.cursor + k
                limit = scheduler.config.max_chunks_per_step or 1 << 30
                # rows that accepted a whole chunk with more of the block left go on (one sync each)
                more = bool(((k == scheduler.guide.chunk_size) & (scheduler.cursor < context.end)).any())
                if more and rounds < limit:
                    left.append(i)
            going = left
        out = []
        for (scheduler, _, mask_index, context), (x0, confidence, _, _, start) in zip(items, states, strict=True):
            targets = context.targets
            in_prefix = (targets[None] >= start[:, None]) & (targets[None] < scheduler.cursor[:, None]) & mask_index
            scheduler.accepted_drafts += int(in_prefix.sum())
            stuck = ~in_prefix.any(-1)
            fallback = select_topk(confidence, stuck.long())
            out.append((x0, confidence, in_prefix | fallback))
        return out
