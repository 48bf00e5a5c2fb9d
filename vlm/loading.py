"""Loading a Qwen2-VL / Qwen2.5-VL checkpoint (local directory or hub id) with a processor that works
without torchvision."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Qwen2VLProcessor


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor slot (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


def load_vlm(path: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"):
    """(model, processor) of a checkpoint in the hub layout. transformers' own `AutoProcessor` needs
    torchvision for Qwen2-VL's video processor (and returns only the tokenizer for a processor saved
    without one), so when it does not give an image processor this builds the image-only processor
    from the checkpoint's tokenizer, image-processor config and chat template."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, Qwen2VLImageProcessorPil

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, AttributeError, ImportError, ValueError):
        processor = None
    if hasattr(processor, "image_processor"):
        return model, processor
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        images = Qwen2VLImageProcessorPil.from_pretrained(path)
    except OSError:
        images = Qwen2VLImageProcessorPil()
    template = tokenizer.chat_template or _local_chat_template(Path(path))
    if template is None:
        raise ValueError(f"{path}: no chat template in the tokenizer, chat_template.jinja or chat_template.json")
    return model, ImageOnlyQwen2VLProcessor(image_processor=images, tokenizer=tokenizer, chat_template=template)


def _local_chat_template(directory: Path) -> str | None:
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    if (directory / "chat_template.json").is_file():
        return json.loads((directory / "chat_template.json").read_text())["chat_template"]
    return None
