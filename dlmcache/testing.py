"""Random-weight models built from configs, for tests and benchmarks (one place for all of them).

No diffusion-LM weights can be downloaded on the machines this package is developed on, so tests
and CPU benchmarks run the real architectures with random weights:

- `tiny_llada` / `tiny_dream` / `tiny_llama`: a few hundred thousand parameters over a given
  tokenizer's vocabulary, for tests (the bundled tokenizer by default).
- `llada_135m`: d_model 768, 12 layers, 12 heads, SwiGLU 2048, vocab 32768 (135M parameters), the
  model of the decoding-speed benchmarks, with `synthetic_tokenizer` so random ids decode offline.
- `random_guide`: a 10M-parameter Llama causal LM over a tokenizer's vocabulary (about 1/13 of
  `llada_135m`, the ratio of a 0.5B guide to a 7B DLM).

The tiny random vision-language models live in `dlmcache.vlm.tiny` (the VLM side imports nothing of
the diffusion-LM stack).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer over "t0".."tN" (specials: 0 EOS, 1 pad, 2 mask) so random ids decode."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>", "<|mdm_mask|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", mask_token="<|mdm_mask|>"
    )


def llada_135m(vocab_size: int = 32768, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LLaDAModelLM:
    """The benchmarks' LLaDA-architecture model (seed 0; mask id 2, EOS 0, pad 1 as in
    `synthetic_tokenizer`)."""
    torch.manual_seed(0)
    config = LLaDAConfig(
        d_model=768,
        n_layers=12,
        n_heads=12,
        mlp_hidden_size=2048,
        vocab_size=vocab_size,
        embedding_size=vocab_size,
        max_sequence_length=16384,
        rope_theta=500000.0,
        mask_token_id=2,
        eos_token_id=0,
        pad_token_id=1,
    )
    return LLaDAModelLM(config).to(dtype=dtype, device=device).eval()


def random_guide(tokenizer, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A random-weight Llama causal LM over `tokenizer`'s vocabulary (4 layers, hidden 256)."""
    model = tiny_llama(
        seed=1,
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_key_value_heads=4,
        max_position_embeddings=16384,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.to(dtype=dtype, device=device)


def bundled_tokenizer():
    from transformers import AutoTokenizer

    from .locations import resolve_path

    return AutoTokenizer.from_pretrained(resolve_path("dlmcache/tiny"))


def tiny_llama(seed: int = 0, **overrides):
    """A random 3-layer GQA Llama (transformers) for the KV-policy tests: vocab 200, hidden 128, 4 / 2
    heads; no EOS, so generate runs to max_new_tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = dict(
        vocab_size=200,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(LlamaConfig(**(config | overrides))).eval()


def tiny_llada(tokenizer=None, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LLaDAModelLM:
    """A random 2-layer LLaDA (d 64, 4 heads) over `tokenizer`'s vocabulary and special ids."""
    tokenizer = tokenizer or bundled_tokenizer()
    kw = dict(
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,
        mlp_hidden_size=96,
        vocab_size=len(tokenizer),
        embedding_size=len(tokenizer),
        rope_theta=10000.0,
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_sequence_length=512,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    return LLaDAModelLM(LLaDAConfig(**kw)).to(dtype).eval()


def tiny_dream(tokenizer=None, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> DreamModel:
    """A random 2-layer Dream (d 64, GQA 4 / 2, random QKV biases) over `tokenizer`'s vocabulary."""
    tokenizer = tokenizer or bundled_tokenizer()
    kw = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        max_position_embeddings=512,
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = DreamModel(DreamConfig(**kw)).to(dtype).eval()
    with torch.no_grad():  # random biases so the QKV-bias path is exercised
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    return model


class DispatchCount(TorchDispatchMode):
    """Counts the ATen ops dispatched inside `with DispatchCount() as count:` (`count.ops`): the
    engine's ops-per-step test and benchmark."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))
