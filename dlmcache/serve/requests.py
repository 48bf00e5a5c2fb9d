"""OpenAI request bodies -> the engine's jobs, validated field by field.

Every invalid field raises `ApiError(400, message, param)` naming the field, before anything is
queued. Supported: `model`, `prompt` (completions: a string or token ids, one prompt) / `messages`
(chat), `max_tokens` (`max_completion_tokens`), `temperature`, `seed`, `stop`, `n` (1), `stream`,
`stream_options.include_usage`, `user`; the diffusion knobs as extra body fields: `steps`,
`block_length`, `threshold` (parallel decoding: commit every token above it), `cache` (a cache by
name, with options after a colon as in run configs: "freecache:suffix_window=0"), `stream_every`
("step": whenever the committed prefix grows, the default; "block": when a block is finished).
OpenAI fields this server does not implement are refused when set to anything but their default.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from dlmcache.cache import make_cache
from dlmcache.run_config import RunConfig
from dlmcache.schedulers import GuidedScheduler, ThresholdScheduler, TokenEditingScheduler
from dlmcache.settings import DecodeSettings, SettingsError

#: OpenAI fields accepted only at their default (None = absent or null).
UNSUPPORTED = {
    "logprobs": (None, False),
    "top_logprobs": (None,),
    "echo": (None, False),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "suffix": (None,),
    "top_p": (None, 1, 1.0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}
COMMON = {
    "model", "max_tokens", "temperature", "seed", "stop", "n", "stream", "stream_options", "user", "steps",
    "block_length", "threshold", "edit_threshold", "cache", "stream_every",
} | set(UNSUPPORTED)  # fmt: skip
FIELDS = {"completions": COMMON | {"prompt"}, "chat": COMMON | {"messages", "max_completion_tokens"}}


#: The most characters of an error message (a message quoting a huge value is cut, saying so).
MAX_MESSAGE = 500


class ApiError(Exception):
    """An HTTP error with OpenAI's error body; messages longer than `MAX_MESSAGE` are cut."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        if len(message) > MAX_MESSAGE:
            message = f"{message[:MAX_MESSAGE]}... ({len(message)} characters in all)"
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


@dataclass
class ParsedRequest:
    kind: str  # "completions" | "chat"
    prompt: object  # what the pipeline takes: a string, token ids or a chat
    chat_template: bool
    prompt_tokens: int
    max_tokens: int
    block_length: int
    steps: int
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    scheduler: object = None
    cache: object = None
    stream_every: str = "step"

    def options(self) -> dict:
        """The pipeline call's keyword arguments."""
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        return dict(
            max_new_tokens=self.max_tokens, block_length=self.block_length, steps=self.steps, generator=generator,
            chat_template=self.chat_template, stop_at_eos=True, scheduler=self.scheduler, cache=self.cache,
        )  # fmt: skip


def _int(body: dict, name: str, low: int = 1, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ApiError(400, f"{name}={value!r} must be an integer >= {low}", name)
    return value


def _number(body: dict, name: str, low: float, high: float, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name}={value!r} must be a number", name)
    if not low <= value <= high:
        raise ApiError(400, f"{name}={value!r} must be in [{low}, {high}]", name)
    return float(value)


def parse(kind: str, body, pipe, model_name: str, defaults: dict) -> ParsedRequest:
    """Validate an OpenAI request body for `kind` ("completions" / "chat") against the served pipeline.
    `defaults`: max_tokens, block_length, max_prompt_chars (a prompt longer than this many characters
    is refused before it is tokenized) and longest_token (the most characters of one token: a prompt
    that must have more tokens than the model takes is refused before it is tokenized too)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS[kind])
    if unknown:
        raise ApiError(400, f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])
    for name, allowed in UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise ApiError(400, f"{name}={body[name]!r} is not supported by this server", name)
    if body.get("model") != model_name:
        raise ApiError(400, f"model={body.get('model')!r}: this server serves {model_name!r}", "model")
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, f"n={n!r}: only n=1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream={stream!r} must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, f"stream_options={options!r}: only include_usage is supported", "stream_options")
    if not isinstance(body.get("user", ""), str):
        raise ApiError(400, "user must be a string", "user")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop={body.get('stop')!r} must be a non-empty string or up to 4 of them", "stop")
    stream_every = body.get("stream_every", "step")
    if stream_every not in ("step", "block"):
        raise ApiError(400, f"stream_every={stream_every!r}: expected 'step' or 'block'", "stream_every")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise ApiError(400, f"seed={seed!r} must be a non-negative integer", "seed")

    prompt, chat_template, param = _prompt(kind, body)
    chars = _characters(prompt)
    limit_chars = defaults.get("max_prompt_chars")
    if limit_chars is not None and chars > limit_chars:
        raise ApiError(400, f"the prompt has {chars} characters; this server takes at most {limit_chars} "
                       "(--max-prompt-chars)", param)  # fmt: skip
    limit, longest = pipe.model.max_length, defaults.get("longest_token")
    if limit is not None and longest and chars > limit * longest:  # (no token is longer: it cannot fit)
        raise ApiError(400, f"the prompt has {chars} characters, so at least {-(-chars // longest)} tokens (none "
                       f"is longer than {longest} characters); the model's limit is {limit}", param)  # fmt: skip
    try:
        requests = pipe._prompt_requests(prompt, chat_template)
    except (ValueError, TypeError) as e:
        raise ApiError(400, str(e).replace("prompt[0]", param), param) from None
    prompt_tokens = len(requests[0][0])

    max_name = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _int(body, max_name, default=defaults["max_tokens"])
    limit = pipe.model.max_length
    if limit is not None and prompt_tokens >= limit:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens; the model's limit is {limit}", param)
    block_length = _int(body, "block_length", default=None)
    if block_length is None:  # a block diffusion model's own block length, else the server's default
        default = pipe.default_block_length if pipe.model.block_diffusion else defaults["block_length"]
        block_length = default if max_tokens % default == 0 else max_tokens
    steps = _int(body, "steps", default=max_tokens)
    scheduler, cache = _scheduler(body, pipe), _cache(body)
    try:  # the checks every generation passes (`DecodeSettings`), fields named as this API names them
        DecodeSettings.resolve(
            pipe.model, pipe.scheduler if scheduler is None else scheduler, pipe.cache if cache is None else cache,
            max_tokens, block_length, steps, stop_at_eos=True, prompt_len=prompt_tokens,
        )  # fmt: skip
    except SettingsError as e:
        field = max_name if e.field == "max_new_tokens" else e.field
        raise ApiError(400, str(e).replace("max_new_tokens", max_name), field) from None

    return ParsedRequest(
        kind=kind, prompt=prompt, chat_template=chat_template, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
        block_length=block_length, steps=steps, stream=stream, include_usage=bool(options.get("include_usage")),
        stop=stop, seed=seed, scheduler=scheduler, cache=cache, stream_every=stream_every,
    )  # fmt: skip


def _prompt(kind: str, body: dict):
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ApiError(400, f"messages[{i}] must be an object with role and content", "messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: only text
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):  # fmt: skip
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
                content = "".join(p["text"] for p in content)
            chat.append({"role": m.get("role"), "content": content})
        return chat, True, "messages"
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, f"prompt: {len(prompt)} prompts in one request; send one per request", "prompt")
    if not (isinstance(prompt, str) and prompt) and not (
        isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)
    ):
        raise ApiError(400, "prompt must be a non-empty string or a list of token ids", "prompt")
    return prompt, False, "prompt"


def prompt_size(kind: str, body) -> int:
    """The characters of a body's prompt, before it is validated (0 where it is malformed: `parse`
    refuses it)."""
    if not isinstance(body, dict):
        return 0
    prompt = body.get("messages" if kind == "chat" else "prompt")
    if isinstance(prompt, str):
        return len(prompt)
    if not isinstance(prompt, list):
        return 0
    size = 0
    for item in prompt:
        content = item.get("content") if isinstance(item, dict) else item
        if isinstance(content, str):
            size += len(content)
        elif isinstance(content, list):  # content parts, or token ids
            size += sum(len(p.get("text", "")) if isinstance(p, dict) and isinstance(p.get("text"), str) else 1
                        for p in content)  # fmt: skip
        else:
            size += 1
    return size


def _characters(prompt) -> int:
    """Characters of a prompt (a string, a chat's contents, or token ids: one each)."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(m["content"]) if isinstance(m, dict) and isinstance(m.get("content"), str) else 1 for m in prompt)


def _scheduler(body: dict, pipe):
    """The request's scheduler: the pipeline's, with its temperature, a threshold rule or (block
    diffusion) LLaDA2.1's token editing at `edit_threshold` if asked."""
    threshold = _number(body, "threshold", 0.0, 1.0)
    edit_threshold = _number(body, "edit_threshold", 0.0, 1.0)
    temperature = _number(body, "temperature", 0.0, 2.0)
    if threshold is None and temperature is None and edit_threshold is None:
        return None
    scheduler = pipe.scheduler
    guided = isinstance(scheduler, GuidedScheduler)
    base = scheduler.base if guided else scheduler
    if edit_threshold is not None and not pipe.model.block_diffusion:
        raise ApiError(
            400, "edit_threshold: token editing is for block diffusion models; this model is full attention",
            "edit_threshold",
        )  # fmt: skip
    editing = getattr(base, "edits", False)  # (a threshold keeps an editing scheduler editing)
    if edit_threshold is not None or (threshold is not None and editing):
        config = {k: v for k, v in base.config.items() if not k.startswith("_")} if editing else {}
        settings = {"threshold": threshold, "edit_threshold": edit_threshold}
        base = TokenEditingScheduler(**{**config, **{k: v for k, v in settings.items() if v is not None}})
    elif threshold is not None:
        base = ThresholdScheduler(threshold=threshold)
    if temperature is not None:
        if "temperature" not in base.config:
            raise ApiError(400, f"temperature: the {type(base).__name__} samples greedily", "temperature")
        base = type(base).from_config({**base.config, "temperature": temperature})
    if guided:
        scheduler = copy.copy(scheduler)
        scheduler.base = base
        return scheduler
    return base


def _cache(body: dict):
    text = body.get("cache")
    if text is None:
        return None
    if not isinstance(text, str):
        raise ApiError(400, f"cache={text!r} must be a string such as 'freecache:suffix_window=0'", "cache")
    try:
        cfg = RunConfig.parse(text)
        if cfg.guide or cfg.threshold is not None or cfg.edit_threshold is not None:
            raise ValueError("only a cache and its options")
        return make_cache(cfg.cache, **cfg.cache_options)
    except (ValueError, TypeError) as e:
        raise ApiError(400, f"cache={text!r}: {e}", "cache") from None
