"""Every architecture the package lists loads from a hub-layout checkpoint and decodes with every
cache, a batch exactly as its prompts one by one."""

import json

import pytest
import torch

from dlmcache import DLMPipeline
from dlmcache.models import ARCHITECTURES, model_class
from dlmcache.testing import HUB_FIELDS, random_checkpoint

PROMPTS = ["Mia has 3 pens.", "Tom has 10 eggs. He buys 4 more eggs. How many eggs does Tom have now?", "Hi"]


def test_every_listed_architecture_has_a_test_checkpoint():
    assert set(ARCHITECTURES) == set(HUB_FIELDS)
    for name, cls in ARCHITECTURES.items():
        assert HUB_FIELDS[name]["architectures"] == [name]
        assert model_class(HUB_FIELDS[name]) is cls


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_a_random_checkpoint_loads_and_decodes_with_every_cache(architecture, tmp_path):
    path = random_checkpoint(architecture, tmp_path / architecture, n_shards=2)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [architecture]
    pipe = DLMPipeline.from_pretrained(path)
    assert type(pipe.model) is ARCHITECTURES[architecture] and pipe.model.dtype == torch.float32
    # Exactness in float64: a random model's near-tied logits would turn float32 GEMM rounding, which
    # depends on how many rows a matmul has, into different tokens.
    pipe = DLMPipeline.from_pretrained(path, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(max_new_tokens=16, block_length=8, steps=8)
    for cache in ("none", "dual", "freecache"):
        pipe.set_cache(cache)
        batch = pipe(PROMPTS, **kw)
        assert batch.sequences.shape == (len(PROMPTS), 16)
        for i, prompt in enumerate(PROMPTS):
            assert torch.equal(pipe(prompt, **kw).sequences[0], batch.sequences[i]), (cache, i)


def test_an_unknown_architecture_names_the_supported_ones(tmp_path):
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    supported = ", ".join(ARCHITECTURES)
    named = rf"architectures=\['GPT2LMHeadModel'\].*supported architectures: {supported}"
    with pytest.raises(ValueError, match=named):
        DLMPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="architectures='DreamModel' must be a list"):
        model_class({"architectures": "DreamModel"})
    with pytest.raises(ValueError, match="not a diffusion LM"):
        model_class({"architectures": ["LlamaForCausalLM"], "model_type": "Dream"})  # the list decides
    with pytest.raises(ValueError, match="architecture='SDAR'"):
        random_checkpoint("SDAR", tmp_path / "x")


# Dream-Coder-v0-Instruct-7B (Dream-org) and DiffuCoder-7B-Base / -Instruct / -cpGRPO (apple) ship the
# Dream release's own configuration_dream.py (model_type "Dream", the same DreamConfig fields) and
# load as `DreamModel`. What differs from Dream-v0 is values: they adapt Qwen2.5-Coder-7B (GQA 28 / 4
# heads, rope_theta 1e6, a sliding window configured but off) and their sampling defaults (Dream-Coder's
# card: alg "entropy", temperature 0.1, alg_temp 0.0).
CODER_CONFIGS = {
    "dream-coder": dict(num_attention_heads=7, num_key_value_heads=1, hidden_size=112, rope_theta=1e6,
                        use_sliding_window=False, sliding_window=32768, max_window_layers=28),
    "diffucoder": dict(num_attention_heads=14, num_key_value_heads=2, hidden_size=112, rope_theta=1e6,
                       max_position_embeddings=4096, use_sliding_window=False, sliding_window=4096),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CODER_CONFIGS))
def test_dream_architecture_fine_tunes_load_and_decode_as_dream(name, tmp_path):
    path = random_checkpoint("DreamModel", tmp_path / name, **CODER_CONFIGS[name])
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "Dream" and config["rope_theta"] == 1e6 and not config["use_sliding_window"]
    generation = {"alg": "entropy", "temperature": 0.1, "top_p": 1.0, "alg_temp": 0.0, "steps": 512}
    (path / "generation_config.json").write_text(json.dumps(generation))
    pipe = DLMPipeline.from_pretrained(path, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.model.num_kv_heads == config["num_key_value_heads"] and pipe.model.logit_shift == 1
    assert pipe.scheduler.config.alg == "entropy" and pipe.scheduler.config.temperature == 0.1  # the card's
    kw = dict(max_new_tokens=16, block_length=8, steps=8, scheduler=type(pipe.scheduler)(alg="entropy"))
    reference = None
    for cache in ("none", "dual", "freecache"):
        pipe.set_cache(cache)
        batch = pipe(PROMPTS, **kw)
        for i, prompt in enumerate(PROMPTS):
            assert torch.equal(pipe(prompt, **kw).sequences[0], batch.sequences[i]), (cache, i)
        if cache == "none":
            reference = batch.sequences
    # FreeCache with a refresh every step recomputes everything: it equals no cache
    pipe.set_cache("freecache", refresh_every=1, refresh_drift=None)
    assert torch.equal(pipe(PROMPTS, **kw).sequences, reference)
