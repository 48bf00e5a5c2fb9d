"""`DLMPipeline`: block-wise masked-diffusion decoding for LLaDA and Dream, in diffusers' conventions."""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .cache import BlockCache, DenoisingCache, FreeCache, KVReuseCache, make_cache
from .engine import Finished, Request
from .locations import json_object, read_json, resolve_path
from .models import model_class
from .schedulers import (
    DLMScheduler,
    DreamScheduler,
    GuidedScheduler,
    LowConfidenceScheduler,
    ThresholdScheduler,
    TokenEditingScheduler,
)
from .settings import DecodeSettings

#: The model's own sampler by model_type. SDAR's release decodes with low_confidence_dynamic at 0.85
#: (commit what is above the threshold, at least the step's quota): `ThresholdScheduler(0.85)`, greedy.
DEFAULT_SCHEDULERS = {
    "llada": LowConfidenceScheduler,
    "Dream": DreamScheduler,
    "sdar": functools.partial(ThresholdScheduler, threshold=0.85),
    "sdar_moe": functools.partial(ThresholdScheduler, threshold=0.85),
    # LLaDA2's generate commits every token above 0.95 each step, at least one
    "llada2_moe": functools.partial(ThresholdScheduler, threshold=0.95),
    # Fast-dLLM v2's released chat example decodes its sub-blocks at threshold 0.9
    "Fast_dLLM_Qwen": functools.partial(ThresholdScheduler, threshold=0.9),
}
SCHEDULERS = {
    "low_confidence": LowConfidenceScheduler,
    "dream": DreamScheduler,
    "threshold": ThresholdScheduler,
    "token_editing": TokenEditingScheduler,  # LLaDA2.1's M2T + T2T (block diffusion models)
}
CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class DLMPipelineOutput(BaseOutput):
    """texts: decoded answers (cut at the first EOS); sequences: generated ids [B, max_new_tokens];
    nfe: model forwards; commit_step: the step (0-based, counted over the whole call) at which each
    generated token was committed [B, max_new_tokens]; stats: steps, tokens per forward, cache counts,
    timings."""

    texts: list[str]
    sequences: torch.LongTensor
    nfe: int
    commit_step: torch.LongTensor
    stats: dict = field(default_factory=dict)


class DLMPipeline(DiffusionPipeline):
    """Masked-diffusion generation: a canvas of `max_new_tokens` masks after the prompt is filled in
    block by block (semi-autoregressively), `steps // num_blocks` denoising steps per block; the
    scheduler picks the positions to commit at each step, the cache strategy decides what the model
    recomputes.

    Components: `model` (a native `LLaDAModelLM` / `DreamModel`), `tokenizer`, `scheduler` (a
    `DLMScheduler`). `cache` ("none" | ... or a `DenoisingCache`) is a runtime setting, not saved.

    Threads: one pipeline may be called from several threads at once. Each call works on its own
    copies of the cache strategy and the scheduler (and its own guide session), so no per-call state
    is shared; the model's weights are only read. `set_cache` / `set_guide` affect the calls that
    start after them.
    """

    model_cpu_offload_seq = "model"

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, scheduler: DLMScheduler):
        super().__init__()
        self.register_modules(model=model, tokenizer=tokenizer, scheduler=scheduler)
        self.cache: DenoisingCache = make_cache("none")
        self.default_scheduler = scheduler  # what `set_scheduler(None)` restores

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        cache: str | DenoisingCache = "none",
        cache_options: dict | None = None,
        guide=None,
        guide_options: dict | None = None,
        scheduler: DLMScheduler | str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        **kwargs,
    ) -> DLMPipeline:
        """Load a pipeline from a saved pipeline directory (`model_index.json`), a model checkpoint
        directory in the hub layout of LLaDA / Dream (`config.json` + safetensors + tokenizer), a hub
        id of either (needs network), or a bundled name ("dlmcache/tiny").

        The model class comes from `config.json`'s `architectures` (`dlmcache.models.ARCHITECTURES`;
        its `model_type` when it lists none); no remote code runs. `torch_dtype` defaults to float32;
        `cache` / `cache_options` pick the KV-reuse strategy; `guide` (a causal-LM path / hub id,
        "dlmcache/tiny-guide", or an `ARGuide`) switches to guided unmasking, with `guide_options`
        passed to `ARGuide` (rule, top_k, chunk_size, ...).
        `scheduler`: a `DLMScheduler`, or the name of one built with its defaults ("low_confidence",
        "dream", "threshold", "token_editing"); default: the model's own sampler.
        """
        path = resolve_path(pretrained_model_name_or_path)
        dtype = kwargs.pop("dtype", None) or torch_dtype or torch.float32
        index = read_json(path, "model_index.json")
        if index is not None:
            if index.get("_class_name") != cls.__name__:
                raise ValueError(
                    f"{Path(path) / 'model_index.json'}: _class_name={index.get('_class_name')!r}, expected "
                    f"{cls.__name__!r} (a pipeline saved by {cls.__name__}.save_pretrained)"
                )
            pipe = super().from_pretrained(path, dtype=dtype, **kwargs)
        else:
            config = read_json(path, "config.json")
            if config is None:
                raise ValueError(f"{pretrained_model_name_or_path!r} has neither model_index.json nor config.json")
            model_cls = model_class(config, f"{pretrained_model_name_or_path!r}")
            model_type = model_cls.config_class.model_type
            model = model_cls.from_pretrained(path, dtype=dtype, **kwargs)
            tokenizer = load_tokenizer(path, model.config)
            pipe = cls(model=model, tokenizer=tokenizer, scheduler=default_scheduler(path, model_type))
        pipe.model.eval()
        if scheduler is not None:
            pipe.set_scheduler(scheduler)
            pipe.default_scheduler = pipe.scheduler
        if device is not None:
            pipe.to(device)
        pipe.set_cache(cache, **(cache_options or {}))
        if guide is not None:
            pipe.set_guide(guide, torch_dtype=dtype, **(guide_options or {}))
        return pipe

    def set_cache(self, cache: str | DenoisingCache = "none", **options) -> None:
        """Choose the KV-reuse strategy for the following calls."""
        self.cache = make_cache(cache, **options)

    def set_scheduler(self, scheduler: DLMScheduler | str | None = None) -> None:
        """The unmasking rule of the following calls: a `DLMScheduler`, a name ("low_confidence",
        "dream", "threshold", "token_editing", built with its defaults) or None for the scheduler the
        pipeline was built with. A guide, if set, stays and wraps the new scheduler."""
        if scheduler is None:
            scheduler = self.default_scheduler
        elif isinstance(scheduler, str):
            if scheduler not in SCHEDULERS:
                raise ValueError(f"scheduler={scheduler!r}: expected a DLMScheduler or one of {sorted(SCHEDULERS)}")
            scheduler = SCHEDULERS[scheduler]()
        elif not isinstance(scheduler, DLMScheduler) or isinstance(scheduler, GuidedScheduler):
            raise TypeError(f"scheduler must be a DLMScheduler (not a guided one) or a name, got {scheduler!r}")
        if isinstance(self.scheduler, GuidedScheduler):
            self.scheduler.base = scheduler
        else:
            self.scheduler = scheduler

    def set_guide(self, guide, torch_dtype: torch.dtype | None = None, **options) -> None:
        """Decode with guided unmasking: `guide` is an `ARGuide`, or a causal-LM path / hub id /
        bundled name from which one is built with `options` (rule, top_k, relative, chunk_size).
        The guided scheduler wraps the current one; `set_guide(None)` puts that one back."""
        from .guidance import ARGuide

        base = self.scheduler.base if isinstance(self.scheduler, GuidedScheduler) else self.scheduler
        if guide is None:
            if options:
                raise ValueError(f"guide options {sorted(options)} given without a guide")
            self.scheduler = base
            return
        if not isinstance(guide, ARGuide):
            guide = ARGuide(guide, dtype=torch_dtype, **options)
        elif options:
            raise ValueError(f"guide options {sorted(options)} given with a ready ARGuide {guide!r}")
        guide.model.to(self.model.device)
        scheduler = GuidedScheduler()
        scheduler.set_guide(guide, self.tokenizer, self.model.get_input_embeddings().num_embeddings, base=base)
        self.scheduler = scheduler

    # ------------------------------------------------------------------ inputs

    @property
    def mask_token_id(self) -> int:
        return self.model.mask_token_id

    def encode_prompts(self, prompt, chat_template: bool | None = None) -> list[list[int]]:
        """Token ids of each prompt. `prompt`: a string, a chat (list of {"role", "content"} dicts),
        token ids (list of ints or a 1-D tensor), or a list / 2-D tensor of any of these.
        Strings go through the tokenizer's chat template as one user turn when it has one (or when
        `chat_template=True`)."""
        return [ids for ids, _ in self._prompt_requests(prompt, chat_template)]

    def _prompt_requests(self, prompt, chat_template: bool | None) -> list[tuple[list[int], list[dict] | str]]:
        """(DLM ids, the request as a chat or a plain text) per prompt; a guide with another
        vocabulary re-reads the request with its own tokenizer."""
        if isinstance(prompt, torch.Tensor):
            if prompt.dtype not in (torch.int32, torch.int64) or prompt.dim() not in (1, 2):
                raise TypeError(
                    f"prompt tensor must be 1-D or 2-D integer ids, got {prompt.dtype} {tuple(prompt.shape)}"
                )
            prompt = prompt.tolist() if prompt.dim() == 2 else [prompt.tolist()]
        elif isinstance(prompt, str) or _is_chat(prompt) or _is_ids(prompt):
            prompt = [prompt]
        if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
            raise ValueError(f"prompt must be a non-empty string, chat, id list or a batch of them, got {prompt!r}")
        use_template = chat_template if chat_template is not None else bool(self.tokenizer.chat_template)
        vocab = self.model.get_input_embeddings().num_embeddings
        requests = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                if not p:
                    raise ValueError(f"prompt[{i}] is an empty string")
                if use_template:
                    request = [{"role": "user", "content": p}]
                    ids = self._apply_template(request)
                else:
                    request, ids = p, self.tokenizer(p)["input_ids"]
            elif _is_chat(p):
                _check_chat(p, i)
                request, ids = list(p), self._apply_template(p)
            elif _is_ids(p):
                ids = list(p)
                _check_ids(ids, vocab, i)
                request = self.tokenizer.decode(ids, skip_special_tokens=True)
            else:
                raise TypeError(f"prompt[{i}] must be a string, a chat or a list of token ids, got {type(p).__name__}")
            if len(ids) == 0:
                raise ValueError(f"prompt[{i}] encodes to no tokens")
            _check_ids(ids, vocab, i)
            if self.mask_token_id in ids:
                raise ValueError(f"prompt[{i}] contains the mask token id {self.mask_token_id}")
            requests.append((ids, request))
        return requests

    def _apply_template(self, chat: list[dict]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise ValueError("a chat prompt needs a tokenizer with a chat template")
        return chat_template_ids(self.tokenizer, chat)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def __call__(
        self,
        prompt,
        max_new_tokens: int = 128,
        block_length: int | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        chat_template: bool | None = None,
        stop_at_eos: bool | None = None,
        cfg_scale: float = 0.0,
        return_dict: bool = True,
        callback_on_step_end=None,
        scheduler: DLMScheduler | None = None,
        cache: DenoisingCache | None = None,
    ) -> DLMPipelineOutput | tuple:
        """Generate `max_new_tokens` tokens after each prompt.

        block_length: the blocks' length (default `default_block_length`: a block diffusion model's
        own, else 32). steps: total denoising steps (default `max_new_tokens`, one token per step),
        split evenly over the `max_new_tokens // block_length` blocks. stop_at_eos: once a row's text up
        to an EOS is fully committed, fill the rest of the row with EOS instead of denoising it
        (default: on for the guided scheduler and for block diffusion models, whose release stops at
        the block holding EOS; off otherwise, as in the reference samplers). cfg_scale:
        classifier-free guidance as LLaDA writes it: an extra forward of the canvas with the prompt
        masked each step, logits uncond + (cfg_scale + 1) * (cond - uncond); 0 turns it off.
        callback_on_step_end: `fn(pipe, step, {"sequences": [B, G], "commit_step": [B, G]})` after
        every denoising step (masked positions hold the mask token; commit_step is -1 there); the host
        tensors are updated in place after each step, so copy what you keep. Used by the demo's live
        view.
        scheduler / cache: this call's own (instead of the pipeline's), e.g. a server's per-request
        settings; the pipeline is left as it is.

        Every prompt is a request of the batched engine (`dlmcache.engine`): all of them decode in one
        flattened forward per step, their KV in one paged pool, and each gets the tokens it gets
        alone. A `generator` is shared by the prompts of a sampling scheduler: each request draws from
        it in turn.
        """
        # 1. Check the inputs and build the requests. Per-call state lives on each request's own copy
        # of the scheduler, so one pipeline may serve several threads (and `set_cache` during a call
        # changes later calls).
        requests = self.make_requests(
            prompt, max_new_tokens, block_length, steps, generator, chat_template, stop_at_eos, cfg_scale,
            scheduler, cache,
        )  # fmt: skip
        # 2. Decode them, one engine step at a time.
        return self._decode(requests, callback_on_step_end, return_dict)

    @property
    def default_block_length(self) -> int:
        """`block_length` when a call gives none: a block diffusion model's own block size, else 32."""
        return self.model.block_size if self.model.block_diffusion else 32

    def make_requests(
        self,
        prompt,
        max_new_tokens: int = 128,
        block_length: int | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        chat_template: bool | None = None,
        stop_at_eos: bool | None = None,
        cfg_scale: float = 0.0,
        scheduler: DLMScheduler | None = None,
        cache: DenoisingCache | None = None,
    ) -> list[Request]:
        """The batched engine's requests (`dlmcache.engine`, one per prompt, each with its own copy of
        the scheduler) for what `__call__` with these arguments decodes, checked as `__call__` checks
        them. A generator is shared by the prompts' requests (each draws on its own, in turn). Run them
        with `dlmcache.engine.BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id)`. A block
        diffusion model's requests run its cache as a `BlockCache`."""
        prompts = self._prompt_requests(prompt, chat_template)
        if self.tokenizer.pad_token_id == self.mask_token_id:
            raise ValueError(f"the tokenizer's pad token id equals the mask token id {self.mask_token_id}")
        for name, value, cls in (("scheduler", scheduler, DLMScheduler), ("cache", cache, DenoisingCache)):
            if value is not None and not isinstance(value, cls):
                raise TypeError(f"{name} must be a {cls.__name__} or None, got {type(value).__name__}: {value!r}")
        scheduler = self.scheduler if scheduler is None else scheduler
        settings = DecodeSettings.resolve(
            self.model, scheduler, self.cache if cache is None else cache, max_new_tokens, block_length, steps,
            cfg_scale, stop_at_eos, prompt_len=max(len(ids) for ids, _ in prompts),
        )  # fmt: skip
        return [self._request(ids, chat, str(i), settings, generator) for i, (ids, chat) in enumerate(prompts)]

    def _request(self, ids: list[int], chat, request_id: str, settings: DecodeSettings, generator) -> Request:
        """The engine's request of one prompt (its own copy of the scheduler)."""
        model, cache = self.model, settings.cache
        block = dict(attention_block=model.attention_block, first_token_ar=model.first_token_autoregressive)
        return Request(
            ids, settings.max_new_tokens, settings.block_length, settings.steps, copy.copy(settings.scheduler),
            BlockCache(cache) if model.block_diffusion else cache, stop_at_eos=settings.stop_at_eos,
            generator=generator, cfg_scale=settings.cfg_scale, chat=chat, id=request_id,
            **(block if model.block_diffusion else {}),  # a model attending in blocks of its own (Fast-dLLM v2's 32)
        )  # fmt: skip

    def _decode(self, requests: list[Request], callback, return_dict: bool):
        """Decode `requests` on the batched engine: every prompt a row, all added before the first
        step, so a row's step count is the call's and commit steps count over the whole call."""
        from .engine import BatchedDecoder

        batch, g, steps = len(requests), requests[0].max_new_tokens, requests[0].steps
        decoder = BatchedDecoder.for_requests(self.model, self.tokenizer.eos_token_id, requests)
        if callback is not None:  # the callback sees every row's canvas after each step (host copies)
            live = torch.full((batch, g), self.mask_token_id, dtype=torch.long)
            live_commit = torch.full((batch, g), -1, dtype=torch.long)
            for i, request in enumerate(requests):
                request.on_step = functools.partial(_copy_row, live[i], live_commit[i])
        for request in requests:
            decoder.add(request)
        done: list[Finished | None] = [None] * batch
        start_time = time.perf_counter()
        with self.progress_bar(total=steps) as bar:
            while len(decoder):
                for f in decoder.step():
                    if f.error is not None:
                        raise FloatingPointError(non_finite_message(decoder.forwards - 1)) from f.error
                    done[int(f.request.id)] = f
                if callback is not None:
                    callback(self, decoder.forwards, {"sequences": live, "commit_step": live_commit})
                bar.update(min(1, steps - bar.n))
            bar.update(steps - bar.n)
        elapsed = time.perf_counter() - start_time
        device = self.model.device
        sequences = torch.stack([f.sequence for f in done]).to(device)
        commit_step = torch.stack([f.commit_step for f in done]).to(device)
        nfe = decoder.forwards

        rows = sum(r.rows for r in requests)  # per sequence: CFG's unconditional rows are sequences too

        def mean(key: str) -> float:
            return sum(f.stats[key] for f in done) / rows

        cache_stats = {
            "forwards": nfe, "full_forwards": mean("full_forwards"), "fed_tokens": mean("fed_tokens"),
            "reused_tokens": mean("reused_tokens"), "kv_bytes": decoder.peak_kv_bytes,
        }  # fmt: skip
        if any(isinstance(r.rule, KVReuseCache) for r in requests):  # counts its canvas-only refreshes
            cache_stats["canvas_refreshes"] = mean("canvas_refreshes")
        if any(isinstance(r.rule, FreeCache) for r in requests):  # FreeCache counts its drift refreshes
            cache_stats["drift_refreshes"] = sum(f.stats["drift_refreshes"] for f in done)
        if self.model.block_diffusion:
            cache_stats["block_diffusion"] = True
        if "edited_tokens" in done[0].stats:
            cache_stats["edited_tokens"] = sum(f.stats["edited_tokens"] for f in done)
        # the schedulers' own counters (a guide's accepted drafts and forwards), summed over the requests
        scheduler_stats = {key: sum(r.scheduler.stats[key] for r in requests) for key in requests[0].scheduler.stats}
        cache_name = requests[0].rule.name
        return self._output(sequences, nfe, commit_step, elapsed, cache_name, cache_stats, scheduler_stats, return_dict)

    def _output(self, sequences, nfe, commit_step, elapsed, cache_name, cache_stats, scheduler_stats, return_dict):
        texts = self.decode(sequences)
        batch, max_new_tokens = sequences.shape
        is_eos = sequences == self.tokenizer.eos_token_id
        answer_tokens = int(torch.where(is_eos.any(-1), is_eos.float().argmax(-1), max_new_tokens).sum())
        stats = {
            "steps": nfe,
            "tokens_per_step": max_new_tokens / max(nfe, 1),
            "answer_tokens": answer_tokens,
            "seconds": elapsed,
            "tokens_per_second": batch * max_new_tokens / elapsed if elapsed > 0 else float("inf"),
            "answer_tokens_per_second": answer_tokens / elapsed if elapsed > 0 else float("inf"),
            "cache": cache_name,
            **cache_stats,
            **scheduler_stats,
        }
        if not return_dict:
            return texts, sequences, nfe, commit_step, stats
        return DLMPipelineOutput(texts=texts, sequences=sequences, nfe=nfe, commit_step=commit_step, stats=stats)

    def decode(self, sequences: torch.LongTensor) -> list[str]:
        """Text of each row up to its first EOS (masks left over, if any, are dropped)."""
        eos = self.tokenizer.eos_token_id
        texts = []
        for row in sequences.tolist():
            if eos in row:
                row = row[: row.index(eos)]
            texts.append(self.tokenizer.decode([t for t in row if t != self.mask_token_id], skip_special_tokens=True))
        return texts


def chat_template_ids(tokenizer, chat: list[dict]) -> list[int]:
    """The token ids of `chat` through the tokenizer's chat template, with the generation prompt
    (transformers 5 returns a `BatchEncoding`, a mapping whose len() counts its keys, not a list)."""
    out = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    return list(out if isinstance(out, list) else out["input_ids"])


def _copy_row(sequence: torch.Tensor, commit_step: torch.Tensor, seq: torch.Tensor, commit: torch.Tensor) -> None:
    sequence.copy_(seq)
    commit_step.copy_(commit)


def non_finite_message(step: int) -> str:
    return (
        f"the model's logits at denoising step {step} are not finite (NaN or infinity): broken weights, "
        "or an overflow in this dtype"
    )


def load_tokenizer(path: str, config) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer; its JSON files checked first, and any failure a `ValueError` naming
    the directory (a garbled tokenizer.json otherwise gives a bare JSONDecodeError)."""
    local = Path(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (local / name).is_file():
            json_object(local / name)
    try:
        return AutoTokenizer.from_pretrained(path, config=config)
    except Exception as e:  # (a third-party loader: whatever it raises, the file is named)
        raise ValueError(f"{path}: the tokenizer does not load ({type(e).__name__}: {e})") from None


def default_scheduler(path: str, model_type: str) -> DLMScheduler:
    """The model's own sampler as its reference code runs it by default: Dream's from the
    checkpoint's generation_config.json when it has one (`DreamScheduler.from_generation_config`),
    otherwise the scheduler class's defaults."""
    if model_type == "Dream":
        generation_config = read_json(path, "generation_config.json")
        if generation_config is not None:
            return DreamScheduler.from_generation_config(generation_config)
    return DEFAULT_SCHEDULERS[model_type]()


def _check_ids(ids: list[int], vocab: int, i: int) -> None:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt[{i}] has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")


def _check_chat(chat, i: int) -> None:
    for j, message in enumerate(chat):
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"prompt[{i}][{j}]: role={role!r}, expected one of {CHAT_ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"prompt[{i}][{j}]: content must be a string, got {content!r}")


def _is_chat(p) -> bool:
    return isinstance(p, (list, tuple)) and len(p) > 0 and all(isinstance(m, dict) for m in p)


def _is_ids(p) -> bool:
    return isinstance(p, (list, tuple)) and len(p) > 0 and all(type(t) is int for t in p)
