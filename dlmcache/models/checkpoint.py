"""Strict loading: a checkpoint must describe exactly the model its config builds.

Before any weight is allocated, `check_checkpoint` reads config.json and the safetensors headers
(names, shapes, dtypes; no tensor data) and compares them with the parameters of the model the config
describes, built on the meta device. Missing or unexpected tensors, shape mismatches, weights that
are not floating point, a config whose fields belong to another architecture than its `model_type`,
and special token ids outside the vocabulary are `ValueError`s naming the tensor or field, instead of
a randomly initialised layer, a warning, or a 7B-parameter model built from defaults.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..locations import json_object

_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


def local_checkpoint(name_or_path, subfolder: str | None = None) -> Path:
    """The checkpoint's local directory: a bundled name, a local directory, or a hub repo id whose
    config, tokenizer and safetensors files are downloaded (or found in the hub cache)."""
    from ..locations import resolve_path

    path = resolve_path(name_or_path)
    directory = Path(path)
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py"]
        directory = Path(
            snapshot_download(path, allow_patterns=[f"{subfolder}/{p}" if subfolder else p for p in patterns])
        )
    directory = directory / subfolder if subfolder else directory
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory}: no config.json")
    return directory


def read_tensor_headers(directory: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) of every tensor in the checkpoint's safetensors files."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: expected a 'weight_map' object of tensor name -> file name")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory}: no safetensors weights (model.safetensors or an index of shards)")
    headers = {}
    for name in files:
        if not (directory / name).is_file():
            raise ValueError(f"{index}: names the shard {name}, which is missing")
        try:
            with safe_open(str(directory / name), framework="pt") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    if key in headers:
                        raise ValueError(f"{directory}: tensor {key!r} appears in two files")
                    headers[key] = (tuple(part.get_shape()), part.get_dtype())
        except ValueError:
            raise
        except Exception as e:  # safetensors' own errors (a truncated or garbled file) name no file
            raise ValueError(f"{directory / name}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return headers


#: Integer fields of the native configs that size the model (at least 1; None where a config defaults
#: it), and counts that may be 0. Checked in config.json itself, before a config class divides by one.
SIZE_FIELDS = {
    "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size", "embedding_size",
    "max_sequence_length", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "max_position_embeddings", "dense_intermediate_size", "expert_intermediate_size",
    "moe_intermediate_size", "num_experts", "num_experts_per_tok", "head_dim", "block_size", "bd_size",
    "small_block_size", "n_group", "topk_group", "decoder_sparse_step",
}  # fmt: skip
COUNT_FIELDS = {"num_shared_experts", "first_k_dense_replace"}
#: The largest size a field may hold (2^40: more than any model's; a larger one is a corrupt file).
MAX_SIZE = 2**40


def check_raw_sizes(raw: dict, where: str) -> None:
    """config.json's sizing fields (`SIZE_FIELDS`, `COUNT_FIELDS`) are integers in range."""
    for field, value in raw.items():
        low = 1 if field in SIZE_FIELDS else 0 if field in COUNT_FIELDS else None
        if low is None or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_SIZE:
            raise ValueError(f"{where}: {field}={value!r} must be an integer in [{low}, 2^40]")


def check_counts(config, headers: dict, where: str) -> None:
    """The config's layer and expert counts are the checkpoint's (counted in its tensor names), checked
    before a model of that many modules is built."""
    import re

    layers = {m.group(1) for name in headers if (m := re.search(r"\.(?:layers|blocks)\.(\d+)\.", name))}
    if layers and config.num_hidden_layers != len(layers):
        raise ValueError(f"{where}: num_hidden_layers={config.num_hidden_layers}, but the checkpoint holds "
                         f"{len(layers)} layers")  # fmt: skip
    experts = getattr(config, "num_experts", None)
    if experts is not None:
        held = {m.group(1) for name in headers if (m := re.search(r"\.experts\.(\d+)\.", name))}
        if experts != len(held):
            raise ValueError(f"{where}: num_experts={experts}, but the checkpoint holds {len(held)} experts")


def check_config_fields(config_class, raw: dict, where: str) -> None:
    """config.json must hold the fields that define `config_class`'s architecture, and none of the
    fields that define the other native architecture."""
    from . import CONFIG_CLASSES

    if raw.get("model_type") != config_class.model_type:
        raise ValueError(
            f"{where}: config.json has model_type={raw.get('model_type')!r}, not {config_class.model_type!r}"
        )
    missing = [f for f in config_class.architecture_fields if f not in raw]
    others = {f for cls in CONFIG_CLASSES.values() if cls is not config_class for f in cls.architecture_fields}
    foreign = sorted((others - set(config_class.architecture_fields)) & set(raw))
    if missing or foreign:
        detail = f"lacks {missing}" if missing else ""
        if foreign:
            detail += (" and " if detail else "") + f"has fields of another architecture {foreign}"
        raise ValueError(f"{where}: config.json with model_type={raw.get('model_type')!r} {detail}")


def check_tensors(model_class, config, directory: Path, headers: dict | None = None) -> None:
    """The checkpoint's tensors (`headers`, read when not given) must be exactly the parameters of
    `model_class(config)`, in shape, and floating point."""
    headers = read_tensor_headers(directory) if headers is None else headers
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_class(config).state_dict().items()}
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = set(getattr(model_class, "_tied_weights_keys", None) or {})
    missing = sorted(set(expected) - set(headers) - tied)
    unexpected = sorted(set(headers) - set(expected))
    if missing:
        raise ValueError(f"{directory}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise ValueError(
            f"{directory}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
            f"(not parameters of {model_class.__name__} with this config)"
        )
    for name, (shape, dtype) in headers.items():
        if shape != expected[name]:
            raise ValueError(
                f"{directory}: tensor {name!r} has shape {list(shape)}, the config needs {list(expected[name])}"
            )
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{directory}: tensor {name!r} is {dtype}, weights must be floating point")


#: Fields whose values must be positive integers / positive finite numbers, by their standard names.
_POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
_POSITIVE_NUMBERS = ("rope_theta", "rms_norm_eps")


def check_config_values(config, where: str) -> None:
    """Architecture values in range, before anything is built: positive sizes, heads that divide the
    width and KV heads that divide the heads, a positive finite RoPE base and norm epsilon, and an
    MLP width and a context length that are positive."""
    fields = _POSITIVE_INTS + tuple(
        f for f in ("mlp_hidden_size", "intermediate_size", "max_sequence_length", "max_position_embeddings")
        if getattr(config, f, None) is not None
    )  # fmt: skip
    for field in fields:
        value = getattr(config, field, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {field}={value!r} must be a positive integer")
    for field in _POSITIVE_NUMBERS:
        value = getattr(config, field, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{where}: {field}={value!r} must be a finite number > 0")
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if config.hidden_size % heads:
        raise ValueError(f"{where}: hidden size {config.hidden_size} is not divisible by {heads} heads")
    if heads % kv:
        raise ValueError(f"{where}: {heads} attention heads are not a multiple of {kv} KV heads")


def check_finite(model, where: str) -> None:
    """Every parameter finite (one pass over the weights as loaded): a NaN or an infinity, as in a
    corrupted safetensors file, is named instead of decoding to garbage."""
    for name, p in model.named_parameters():
        bad = ~torch.isfinite(p)
        if bool(bad.any()):
            raise ValueError(
                f"{where}: tensor {name!r} has {int(bad.sum())} non-finite values of {p.numel()} "
                "(a corrupted checkpoint? from_pretrained(..., verify=False) loads it anyway)"
            )


def check_token_ids(config, vocab: int, where: str) -> None:
    """Special token ids must index the embedding (mask id: required)."""
    for field in ("mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(config, field, None)
        if value is None and field != "mask_token_id":
            continue
        ids = value if isinstance(value, list) else [value]
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab:
                raise ValueError(f"{where}: {field}={value!r} is outside the vocabulary of {vocab} tokens")


def check_positive_ints(config, where: str, names) -> None:
    """Each of the config's fields `names` a positive integer (a bool is not), or a ValueError naming it."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {name}={value!r} must be a positive integer")


def check_activation_and_rope(where: str, hidden_act: str, rope_scaling) -> None:
    """The configs of the Qwen-style models (Dream, SDAR, LLaDA-MoE) take SwiGLU and plain RoPE only."""
    if hidden_act != "silu":
        raise ValueError(f"{where}: hidden_act={hidden_act!r} is not supported (expected 'silu')")
    if rope_scaling not in (None, {}):
        raise ValueError(f"{where}: rope_scaling={rope_scaling!r} is not supported")


def check_kv_heads_and_ids(config, where: str) -> None:
    """The query heads share the KV heads evenly, and the special token ids index the vocabulary."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % kv:
        raise ValueError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    check_token_ids(config, config.vocab_size, where)
