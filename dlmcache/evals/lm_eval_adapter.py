"""An lm-evaluation-harness model for `DLMPipeline`, as LLaDA / Dream users evaluate today.

    dlmcache-lm-eval --model dlmcache \\
        --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,cache=freecache,max_new_tokens=256 \\
        --tasks gsm8k --apply_chat_template --batch_size 8
    python -m dlmcache.evals.lm_eval_adapter ...        # the same, without the console script

Both register the model name "dlmcache" and then run lm-eval's own command line with the same
arguments. (lm-eval 0.4 resolves `--model` only from its built-in table, `lm_eval.models.MODEL_MAPPING`,
with no plugin entry points, so the bare `lm_eval` command cannot see a model another package
registers; importing the adapter first is what LLaDA's and Dream's evaluation scripts do too.)
From Python, import this module and call
`lm_eval.simple_evaluate(model="dlmcache", model_args="pretrained=...,cache=freecache", ...)`.

Model args: pretrained (required), cache (none | prefix | dual | freecache, with options as in
`dlmcache.run_config`, e.g. `cache=freecache:suffix_window=0` is not allowed by lm-eval's comma
syntax, so cache options go in `cache_options="k=v;k=v"`), threshold, guide, max_new_tokens (256),
block_length (32), steps (default max_new_tokens), dtype (float32), device, batch_size.

Only generation tasks (`generate_until`) are supported: a diffusion LM has no exact per-token
log-likelihood (LLaDA estimates it by Monte Carlo over masks), so loglikelihood requests raise.
"""

from __future__ import annotations

import warnings

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from dlmcache import DLMPipeline
from dlmcache.run_config import RunConfig


@register_model("dlmcache")
class DLMCacheLM(LM):
    def __init__(
        self,
        pretrained: str,
        cache: str = "none",
        cache_options: str = "",
        threshold: float | None = None,
        guide: str | None = None,
        max_new_tokens: int = 256,
        block_length: int = 32,
        steps: int | None = None,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int | str = 1,
        **unused,
    ):
        super().__init__()
        if not hasattr(torch, str(dtype)) or not isinstance(getattr(torch, str(dtype)), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype name (float32, bfloat16, float16)")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval passes device="cuda" by default, also on machines without CUDA
            if device is not None:
                warnings.warn(f"device={device!r} but CUDA is not available: running on CPU", stacklevel=2)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = DLMPipeline.from_pretrained(pretrained, torch_dtype=getattr(torch, dtype), device=device)
        self.pipe.set_progress_bar_config(disable=True)
        config = cache + (":" + cache_options.replace(";", ",") if cache_options else "")
        if threshold is not None:
            config += f"+threshold={threshold}"
        if guide:
            config += f"+guide={guide}"
        RunConfig.parse(config).apply(self.pipe, self.pipe.scheduler)
        self.config = config
        self.max_new_tokens, self.block_length, self.steps = int(max_new_tokens), int(block_length), steps
        self.batch_size = 1 if str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    @property
    def tokenizer_name(self) -> str:
        return self.pipe.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.pipe.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request is (context, {"until": [...], "max_gen_toks": N, ...}); the context is already
        formatted (lm-eval applied the chat template when asked), so it is tokenized as is."""
        out = []
        tok = self.pipe.tokenizer
        for i in tqdm(range(0, len(requests), self.batch_size), disable=disable_tqdm, desc="dlmcache generate"):
            batch = requests[i : i + self.batch_size]
            contexts = [r.args[0] for r in batch]
            ids = [tok(c, add_special_tokens=False)["input_ids"] for c in contexts]
            kwargs = batch[0].args[1]
            new_tokens = int(kwargs.get("max_gen_toks", self.max_new_tokens))
            new_tokens += (-new_tokens) % self.block_length  # whole blocks
            texts = self.pipe(
                ids, max_new_tokens=new_tokens, block_length=min(self.block_length, new_tokens), steps=self.steps
            ).texts
            for text, req in zip(texts, batch, strict=True):
                until = req.args[1].get("until") or []
                until = [until] if isinstance(until, str) else until
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                out.append(text)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "dlmcache: a diffusion LM has no exact log-likelihood; use generation tasks (generate_until)"
        )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self.loglikelihood(requests, disable_tqdm)


def main() -> None:
    """`dlmcache-lm-eval`: lm-eval's command line with the "dlmcache" model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
