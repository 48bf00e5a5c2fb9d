"""Broken checkpoints are refused at load with the file or tensor named (issue 24's reproductions):
non-finite weights, corrupted safetensors data, out-of-range config values, malformed JSON, a file
where a directory belongs; and logits that turn non-finite stop decoding with a clear error."""

import json
import re

import pytest
import torch

from dlmcache import DLMPipeline, LowConfidenceScheduler
from dlmcache.cache import FreeCache
from dlmcache.engine import BatchedDecoder, Request
from dlmcache.models import LLaDAModelLM
from tests.helpers import tiny_dream, tiny_llada, write_hub_checkpoint


@pytest.fixture
def checkpoint(tmp_path, tiny_tokenizer):
    return write_hub_checkpoint(tiny_llada(tiny_tokenizer), tmp_path / "ckpt", tiny_tokenizer, n_shards=2)


def edit_config(directory, **fields):
    config = json.loads((directory / "config.json").read_text())
    config.update(fields)
    (directory / "config.json").write_text(json.dumps(config))


def test_nan_weights_are_named_and_verify_false_opts_out(tmp_path, tiny_tokenizer):
    model = tiny_llada(tiny_tokenizer)
    with torch.no_grad():
        model.model.transformer.blocks[1].q_proj.weight[0, 3] = float("nan")
    directory = write_hub_checkpoint(model, tmp_path / "nan", tiny_tokenizer)
    with pytest.raises(ValueError, match=r"blocks\.1\.q_proj\.weight.*1 non-finite"):
        DLMPipeline.from_pretrained(directory)
    assert LLaDAModelLM.from_pretrained(directory, verify=False) is not None


def test_safetensors_data_overwritten_with_ff_is_refused(checkpoint):
    shard = sorted(checkpoint.glob("*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header + 64 : header + 64 + 256] = b"\xff" * 256  # float32 0xffffffff is NaN
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="non-finite"):
        DLMPipeline.from_pretrained(checkpoint)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"rope_theta": -1}, "rope_theta=-1 must be a finite number > 0"),
        ({"rms_norm_eps": "abc"}, "rms_norm_eps='abc' must be a finite number > 0"),
        ({"n_heads": 3}, "d_model=64 is not divisible by n_heads=3"),
        ({"n_layers": 0}, "n_layers=0 must be an integer in [1, 2^40]"),
    ],
)
def test_config_values_are_range_checked_at_load(checkpoint, fields, message):
    edit_config(checkpoint, **fields)
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint / 'config.json'}: ") + ".*" + re.escape(message)):
        DLMPipeline.from_pretrained(checkpoint)


ABSURD = [  # issue 37, case 6: these hung the loader (10^9 experts) or crashed it (a division by 0, a
    # negative size), for the architectures that have each field
    ("num_attention_heads", 0, "num_attention_heads=0 must be an integer in [1, 2^40]"),
    ("n_heads", 0, "n_heads=0 must be an integer in [1, 2^40]"),
    ("num_experts", 10**9, "num_experts=1000000000, but the checkpoint holds"),
    ("num_shared_experts", -1, "num_shared_experts=-1 must be an integer in [0, 2^40]"),
    ("num_hidden_layers", 10**9, "1000000000"),  # (the checkpoint holds 2 or 3 layers)
    ("hidden_size", 2**50, "hidden_size=1125899906842624 must be an integer in [1, 2^40]"),
    ("intermediate_size", "12", "intermediate_size='12' must be an integer"),
    ("n_layers", 10**9, "1000000000"),
    ("mlp_hidden_size", -4, "mlp_hidden_size=-4 must be an integer in [1, 2^40]"),
]


@pytest.mark.parametrize("architecture", sorted(__import__("dlmcache.models", fromlist=["x"]).ARCHITECTURES))
def test_absurd_sizes_are_refused_before_anything_is_built(architecture, tmp_path):
    import time

    from dlmcache.testing import random_checkpoint

    directory = random_checkpoint(architecture, tmp_path / "base")
    fields = json.loads((directory / "config.json").read_text())
    tried = 0
    for field, value, message in ABSURD:
        if field not in fields:
            continue
        edit_config(directory, **{**fields, field: value})
        t = time.perf_counter()
        with pytest.raises(ValueError, match=re.escape(f"{directory / 'config.json'}: ") + ".*" + re.escape(message)):
            DLMPipeline.from_pretrained(directory)
        assert time.perf_counter() - t < 10, field
        tried += 1
    edit_config(directory, **fields)
    assert tried >= 2 and DLMPipeline.from_pretrained(directory) is not None


def test_a_truncated_shard_and_a_garbled_tokenizer_name_their_file(checkpoint):
    """Issue 37, case 5: safetensors' 'incomplete metadata' and a bare JSONDecodeError named no file."""
    shard = sorted(checkpoint.glob("*.safetensors"))[0]
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=re.escape(str(shard)) + ": not a readable safetensors file"):
        DLMPipeline.from_pretrained(checkpoint)
    shard.write_bytes(whole[:20])  # inside its header
    with pytest.raises(ValueError, match=re.escape(str(shard))):
        DLMPipeline.from_pretrained(checkpoint)
    shard.write_bytes(whole)
    (checkpoint / "tokenizer.json").write_text("{garbage")
    with pytest.raises(ValueError, match=re.escape(str(checkpoint / "tokenizer.json")) + ": not valid JSON"):
        DLMPipeline.from_pretrained(checkpoint)


def test_file_errors_name_the_file(checkpoint, tmp_path):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        DLMPipeline.from_pretrained(checkpoint)
    (checkpoint / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object, found list"):
        DLMPipeline.from_pretrained(checkpoint)
    with pytest.raises(NotADirectoryError, match="is a file; a checkpoint is a directory"):
        DLMPipeline.from_pretrained(checkpoint / "config.json")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "model_index.json").write_text(json.dumps({"model": ["x", "y"]}))
    with pytest.raises(ValueError, match=r"model_index\.json: _class_name=None"):
        DLMPipeline.from_pretrained(saved)


def test_index_errors_name_the_index(checkpoint):
    index = checkpoint / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = sorted(checkpoint.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ValueError, match=rf"index\.json: names the shard {shard.name}, which is missing"):
        DLMPipeline.from_pretrained(checkpoint)
    index.write_text(json.dumps({"metadata": data["metadata"]}))
    with pytest.raises(ValueError, match=r"index\.json: expected a 'weight_map' object"):
        DLMPipeline.from_pretrained(checkpoint)


@pytest.mark.parametrize("build", [tiny_llada, tiny_dream])
def test_non_finite_logits_stop_decoding_with_a_clear_error(build, tiny_tokenizer):
    model = build(tiny_tokenizer)
    with torch.no_grad():
        model.get_output_embeddings().weight[7] = float("inf")
    pipe = DLMPipeline(model=model, tokenizer=tiny_tokenizer, scheduler=LowConfidenceScheduler())
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(FloatingPointError, match="not finite"):
        pipe("Hi", max_new_tokens=8, block_length=8)


def test_the_engine_fails_only_the_request_whose_logits_are_not_finite(tiny_tokenizer):
    """A request whose logits turn non-finite finishes with an error; the others decode on, and every
    pool block comes back."""
    model = tiny_llada(tiny_tokenizer).double()
    pipe = DLMPipeline(model=model, tokenizer=tiny_tokenizer, scheduler=LowConfidenceScheduler())
    pipe.set_progress_bar_config(disable=True)
    decoder = BatchedDecoder(model, tiny_tokenizer.eos_token_id)
    good, bad = pipe.encode_prompts(["Mia has 3 pens.", "Hi"])
    poison = next(t for t in bad if t not in good)  # a token only the second prompt has
    decoder.add(Request(good, 8, 8, 8, LowConfidenceScheduler(), FreeCache(), id="ok"))
    decoder.add(Request(bad, 8, 8, 8, LowConfidenceScheduler(), FreeCache(), id="bad"))
    embed = model.get_input_embeddings().weight
    saved = embed[poison].clone()
    with torch.no_grad():
        embed[poison] = float("nan")
    done = {}
    try:
        while len(decoder):
            for f in decoder.step():
                done[f.request.id] = f
    finally:
        with torch.no_grad():
            embed[poison] = saved
    assert isinstance(done["bad"].error, FloatingPointError) and done["ok"].error is None
    assert torch.equal(done["ok"].sequence, pipe("Mia has 3 pens.", max_new_tokens=8, block_length=8,
                                                 cache=FreeCache()).sequences[0])  # fmt: skip
    assert decoder.pool.free_blocks == decoder.pool.num_blocks
