"""Tiny random Qwen2-VL / Qwen2.5-VL models and an offline processor, for tests and CPU benchmarks.

No VLM weights can be downloaded here, so these are built from configs (random weights, the real
architectures: the vision tower, the 2x2 patch merger, M-RoPE) with the bundled tiny BPE tokenizer
plus Qwen2-VL's special tokens, and an image-only processor (transformers' `Qwen2VLProcessor`
insists on a video processor, which needs torchvision).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from dlmcache.locations import resolve_path

from .loading import ImageOnlyQwen2VLProcessor

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_processor(min_pixels: int = 56 * 56, max_pixels: int = 224 * 224) -> ImageOnlyQwen2VLProcessor:
    """The processor: a 224x224 screenshot becomes 16x16 patches, 64 visual tokens after the merge."""
    tok = AutoTokenizer.from_pretrained(resolve_path("dlmcache/tiny"))
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHAT_TEMPLATE
    images = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return ImageOnlyQwen2VLProcessor(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE)


def tiny_vlm(
    processor,
    kind: str = "qwen2_vl",
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    dtype: torch.dtype = torch.float32,
):
    """A random Qwen2-VL (`kind="qwen2_vl"`) or Qwen2.5-VL (`"qwen2_5_vl"`) for `processor`'s tokenizer."""
    tok = processor.tokenizer
    ids = {
        name: tok.convert_tokens_to_ids(t)
        for name, t in (
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
        )
    }
    heads, kv_heads = 4, 2
    head_dim = hidden // heads
    section = [head_dim // 8, 3 * head_dim // 16, head_dim // 2 - head_dim // 8 - 3 * head_dim // 16]
    text = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    if kind == "qwen2_vl":
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=hidden,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
    elif kind == "qwen2_5_vl":
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
        )
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))
    else:
        raise ValueError(f"kind={kind!r}: expected 'qwen2_vl' or 'qwen2_5_vl'")
    return model.to(dtype).eval()
