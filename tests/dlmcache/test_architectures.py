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
    config = {"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    supported = ", ".join(ARCHITECTURES)
    named = rf"architectures=\['LLaDA2MoeModelLM'\].*supported architectures: {supported}"
    with pytest.raises(ValueError, match=named):
        DLMPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="architectures='DreamModel' must be a list"):
        model_class({"architectures": "DreamModel"})
    with pytest.raises(ValueError, match="not a diffusion LM"):
        model_class({"architectures": ["LlamaForCausalLM"], "model_type": "Dream"})  # the list decides
    with pytest.raises(ValueError, match="architecture='SDAR'"):
        random_checkpoint("SDAR", tmp_path / "x")
