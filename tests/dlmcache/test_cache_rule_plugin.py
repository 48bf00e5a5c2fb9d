"""A new cache rule is one class: the worked example of docs/engine.md, decoding through the pipeline
and in a batch beside the package's own rules."""

import re
from pathlib import Path

import pytest
import torch

from dlmcache import DLMPipeline, LowConfidenceScheduler
from dlmcache.cache import DenoisingCache, FreeCache, make_cache
from tests.helpers import tiny_llada, trace


def rule_of_the_docs() -> type:
    """The `EveryOther` rule as docs/engine.md writes it (one copy: what the docs show is what runs here)."""
    engine = (Path(__file__).resolve().parents[2] / "docs" / "engine.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", engine, re.S) if "class EveryOther" in b)
    namespace: dict = {}
    exec(compile(block[: block.index("\n\n\npipe =")], "docs/engine.md", "exec"), namespace)
    return namespace["EveryOther"]


EveryOther = rule_of_the_docs()


@pytest.fixture(scope="module")
def pipe(tiny_tokenizer):
    pipe = DLMPipeline(model=tiny_llada(tiny_tokenizer).double(), tokenizer=tiny_tokenizer,
                       scheduler=LowConfidenceScheduler())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPTS = ["Mia has 3 pens.", "Tom has 10 eggs. He buys 4 more eggs. How many eggs does Tom have now?", "Hi"]


def test_a_rule_of_a_dozen_lines_decodes_as_it_says(pipe):
    """What it feeds, step by step: everything at even steps, the block alone at odd ones; its
    refreshes give the cache-free logits of the canvas they see."""
    kw = dict(max_new_tokens=16, block_length=8, steps=8)
    p = len(pipe.encode_prompts(PROMPTS[0])[0])
    steps = trace(pipe, PROMPTS[0], EveryOther(), **kw)
    for i, step in enumerate(steps):
        start = p + i // 4 * 8
        assert step["fed"] == (list(range(p + 16)) if i % 2 == 0 else list(range(start, start + 8))), i
        if i % 2 == 0:
            full = pipe.model(step["canvas"][None]).logits[0]
            masked = (step["canvas"] == pipe.mask_token_id).nonzero().flatten()
            torch.testing.assert_close(step["logits"], full[masked[masked < start + 8]])
    out = pipe(PROMPTS[0], cache=EveryOther(), **kw)
    assert out.stats["cache"] == "every_other" and out.stats["full_forwards"] == 4 and out.nfe == 8


def test_its_rows_share_a_batch_with_the_packages_rules(pipe):
    """A batch mixing the new rule with FreeCache and dual gives every request its tokens alone."""
    from dlmcache.engine import BatchedDecoder

    caches = [EveryOther, lambda: FreeCache(freeze="token"), lambda: make_cache("dual")]
    kw = dict(max_new_tokens=24, block_length=8, steps=12)
    requests = []
    for i in range(6):
        (r,) = pipe.make_requests(PROMPTS[i % 3], cache=caches[i % 3](), **kw)
        r.id = str(i)
        requests.append(r)
    decoder = BatchedDecoder.for_requests(pipe.model, pipe.tokenizer.eos_token_id, requests)
    for r in requests:
        decoder.add(r)
    done = {}
    while len(decoder):
        done.update({f.request.id: f for f in decoder.step()})
    for i in range(6):
        alone = pipe(PROMPTS[i % 3], cache=caches[i % 3](), **kw)
        assert torch.equal(done[str(i)].sequence, alone.sequences[0]), i


def test_a_cache_class_without_a_rule_is_refused_by_name(pipe):
    class Unruled(DenoisingCache):
        name = "unruled"

    with pytest.raises(ValueError, match="a Unruled has no rule for the engine"):
        pipe("Hi", max_new_tokens=8, block_length=8, cache=Unruled())
