"""Byte-budget presets land on their budget, and the policy evaluation measures what it says."""

import pytest
import torch
from dlmcache.kernels import evaluation
from dlmcache.kernels.cache import CompressedCache
from dlmcache.kernels.policies import presets

from tests.helpers import tiny_llama

CONTEXT = 1383  # the GSM8K contexts' mean length in bench_policies.py


def _fraction(settings: dict) -> float:
    """Bytes (as a 16-bit cache) after compressing a CONTEXT-token prefill, over the full cache's."""
    model = tiny_llama(max_position_embeddings=2048)
    ids = torch.randint(1, 200, (1, CONTEXT))
    pre = evaluation.prefill_kv(model, ids)
    cache = CompressedCache(model=model, **settings)
    for i, (k, v) in enumerate(pre.kv):
        cache.load_prefill(i, k, v, queries=pre.queries[i])
    cache.detach()
    return cache.nbytes_as(2) / pre.full_bytes


# how far above the target a method's measured bytes may land: eviction is exact; quantizers carry
# scales and zeros and a 16-bit residual window (KIVI), or codes for the important tokens too
# (MiKV), and GEAR a low-rank and an outlier part, which their recipes do not count.
SLACK = {"kivi": 0.05, "mikv": 0.08, "gear": 0.12}
# the recipe does not apply: too few bits for the budget, or every token already fits
NOT_APPLICABLE = {("kivi", 0.1), ("mikv", 0.1), ("gear", 0.1), ("snapkv+int4", 0.5)}


@pytest.mark.parametrize(
    "name", ["snapkv", "pyramidkv", "h2o_mean", "kivi", "mikv", "gear", "snapkv+int4", "tova+int8"]
)
@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.1])
def test_presets_land_on_their_byte_budget(name, fraction):
    settings = presets.at_bytes(name, fraction, CONTEXT)
    assert (settings is None) == ((name, fraction) in NOT_APPLICABLE)
    if settings is not None:
        got = _fraction(settings)
        assert fraction / 2 <= got <= fraction + SLACK.get(name, 0.005), (name, fraction, got)


def test_unknown_presets_and_bad_budgets_are_named():
    with pytest.raises(ValueError, match="unknown preset 'snapkvv'"):
        presets.at_bytes("snapkvv", 0.25, 100)
    with pytest.raises(ValueError, match="bit width after '\\+int' must be 2, 4 or 8"):
        presets.at_bytes("snapkv+int3", 0.25, 100)
    with pytest.raises(ValueError, match="fraction=0"):
        presets.at_bytes("snapkv", 0, 100)
    assert "snapkv" in presets.names() and "d2o" in presets.names()


def test_full_settings_give_the_plain_forward_nll():
    model = tiny_llama()
    ctx, cont = torch.randint(1, 200, (1, 40)), torch.randint(1, 200, (1, 9))
    pre = evaluation.prefill_kv(model, ctx)
    nll, nbytes, _ = evaluation.continuation_nll(model, pre, cont, {})
    with torch.no_grad():
        logits = model(torch.cat([ctx, cont], 1)).logits[0, 39:-1]
    assert nll == pytest.approx(torch.nn.functional.cross_entropy(logits, cont[0]).item(), abs=1e-5)
    assert nbytes == pre.full_bytes


def test_passkey_prompt_hides_the_needle_at_its_depth(tiny_tokenizer):
    early, late = (
        evaluation.passkey_prompt(tiny_tokenizer, 0.1, 600),
        evaluation.passkey_prompt(tiny_tokenizer, 0.9, 600),
    )
    text_early, text_late = tiny_tokenizer.decode(early[0]), tiny_tokenizer.decode(late[0])
    assert evaluation.PASSKEY in text_early and text_early.endswith(evaluation.PASSKEY_QUESTION)
    assert text_early.index(evaluation.PASSKEY) < text_late.index(evaluation.PASSKEY)
