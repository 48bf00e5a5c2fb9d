"""The golden cases: every architecture of `dlmcache.models.ARCHITECTURES` (tiny random models in
float64, fixed seeds) crossed with every cache, scheduler, schedule and stop rule of the engine tests.

`tests/golden/<arch>.json` holds what the package decoded for each case when it was recorded
(`python -m tests.golden.record`): the sequence, each token's commit step, and the counters (forwards,
full forwards, fed tokens, refreshes, edits). `tests/dlmcache/test_golden.py` decodes every case again
and compares token for token. A case is named `cache/scheduler/schedule/stop`.

Cases are decoded as requests of one `BatchedDecoder` per (architecture, cache): several schedulers and
schedules side by side, so the golden test also checks that a batch gives each request what it got
alone (the recorder decodes each case alone). A few cases go through `DLMPipeline.__call__` itself
(`PIPELINE_CASES`): classifier-free guidance, guided unmasking, a batch sampled from one generator.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dlmcache import DLMPipeline, DreamScheduler, LowConfidenceScheduler, ThresholdScheduler
from dlmcache.cache import make_cache
from dlmcache.pipeline import DEFAULT_SCHEDULERS
from dlmcache.schedulers import TokenEditingScheduler
from dlmcache.testing import (
    bundled_tokenizer,
    run_requests,
    tiny_dream,
    tiny_fast_dllm_v2,
    tiny_llada,
    tiny_llada2,
    tiny_llada_moe,
    tiny_sdar,
    tiny_sdar_moe,
)

HERE = Path(__file__).parent

#: architecture name (`ARCHITECTURES`) -> a float64 tiny random model over the bundled tokenizer. The
#: block diffusion models' weights are 10x the usual scale (`initializer_range=0.2`): confident
#: enough that thresholds commit several tokens a step and EOS gets predicted.
BUILDERS = {
    "LLaDAModelLM": lambda tok: tiny_llada(tok),
    "DreamModel": lambda tok: tiny_dream(tok),
    "LLaDAMoEModelLM": lambda tok: tiny_llada_moe(tok),
    "SDARForCausalLM": lambda tok: tiny_sdar(tok, initializer_range=0.2),
    "SDARMoeForCausalLM": lambda tok: tiny_sdar_moe(tok, initializer_range=0.2),
    "LLaDA2MoeModelLM": lambda tok: tiny_llada2(tok, initializer_range=0.2),
    "Fast_dLLM_QwenForCausalLM": lambda tok: tiny_fast_dllm_v2(tok, initializer_range=0.2),
}

PROMPTS = [
    "Mia has 3 pens.",
    "Tom has 10 eggs. He buys 4 more eggs. How many eggs does Tom have now?",
    "Hi",
    "Compute 45+38-27.",
    "A farmer had 17 sheep and bought 5 more.",
    "What is 7*8?",
]

#: Full-attention caches, each with every option spelled out where a default may change.
FULL_CACHES = {
    "none": ("none", {}),
    "prefix": ("prefix", {}),
    "dual": ("dual", {}),
    "block_drift": ("freecache", dict(suffix_window=None, freeze="block", refresh_drift=0.02)),
    "token_window0": ("freecache", dict(freeze="token", suffix_window=0, refresh_drift=0.02)),
    "flashdlm": ("freecache", dict(flashdlm=True)),
    "every2_drop": (
        "freecache",
        dict(freeze="block", refresh_every=2, refresh_drift=None, suffix_window=2, beyond_window="drop"),
    ),  # fmt: skip
    "token_every3": (
        "freecache",
        dict(suffix_window=None, freeze="token", refresh_every=3, refresh_drift=0.02, probe_tokens=2),
    ),
    "canvas_drift": ("freecache", dict(suffix_window=None, freeze="block", refresh_drift=1e-3, refresh_prompt=False)),
    "canvas_token_every2": (
        "freecache",
        dict(freeze="token", suffix_window=None, refresh_every=2, refresh_drift=0.02, refresh_prompt=False),
    ),  # fmt: skip
    "canvas_dual": ("dual", dict(refresh_prompt=False)),
    "token_canvas": ("freecache", dict(suffix_window=None, freeze="token", refresh_drift=0.02, refresh_prompt=False)),
    "snapkv": ("freecache", dict(suffix_window=None, freeze="block", refresh_drift=0.02, policy="snapkv", budget=0.5)),
    "token_maskkv": (
        "freecache",
        dict(freeze="token", suffix_window=0, refresh_drift=0.02, policy="maskkv", budget=0.5),
    ),  # fmt: skip
    "dual_h2o_pyramid_refresh_prompt": (
        "dual",
        dict(policy="h2o", budget=0.5, allocator="pyramid", refresh_prompt=True),
    ),  # fmt: skip
}
#: Block diffusion caches: "none" recomputes the prefix every step; the others cache the finished
#: blocks exactly ("dual" is Fast-dLLM v2's sub-block cache on that model); a compressed prefix.
BLOCK_CACHES = {
    "none": ("none", {}),
    "prefix": ("freecache", dict(suffix_window=None, freeze="block", refresh_drift=0.02)),
    "dual": ("dual", {}),
    "snapkv": ("freecache", dict(suffix_window=None, freeze="block", refresh_drift=0.02, policy="snapkv", budget=0.5)),
}

#: name -> (scheduler factory, whether it samples: its request gets a seeded generator)
SCHEDULERS = {
    "low_confidence": (lambda: LowConfidenceScheduler(), False),
    "threshold": (lambda: ThresholdScheduler(threshold=0.1), False),
    "sampled": (lambda: LowConfidenceScheduler(temperature=0.8), True),
    "dream_origin": (lambda: DreamScheduler(alg="origin", temperature=0.5), True),
    "dream_maskgit": (lambda: DreamScheduler(alg="maskgit_plus", temperature=0.0), False),
    "dream_entropy_topk": (lambda: DreamScheduler(alg="entropy", temperature=0.7, top_k=20, alg_temp=0.5), True),
    "random_remask": (lambda: LowConfidenceScheduler(remasking="random"), True),
    "editing": (lambda: TokenEditingScheduler(threshold=0.5, edit_threshold=0.3, max_post_steps=2), False),
    "editing_sampled": (lambda: TokenEditingScheduler(threshold=0.5, edit_threshold=0.3, temperature=0.7), True),
}
FULL_SCHEDULERS = ["low_confidence", "threshold", "sampled", "dream_origin", "dream_maskgit", "dream_entropy_topk",
                   "random_remask"]  # fmt: skip
BLOCK_SCHEDULERS = ["low_confidence", "threshold", "sampled", "dream_maskgit", "editing", "editing_sampled"]

#: (max_new_tokens, block_length, steps): full attention; block diffusion decodes in the model's
#: own blocks (None: its `default_block_length`), steps spread over its blocks.
FULL_SCHEDULES = [(24, 8, 12), (16, 16, 16), (24, 12, 6), (16, 4, 8)]
BLOCK_SCHEDULES = [(16, None, 16), (24, None, 12), (12, None, 6), (8, None, 8)]


def block_diffusion(arch: str) -> bool:
    return arch in ("SDARForCausalLM", "SDARMoeForCausalLM", "LLaDA2MoeModelLM", "Fast_dLLM_QwenForCausalLM")


def caches(arch: str) -> dict:
    return BLOCK_CACHES if block_diffusion(arch) else FULL_CACHES


def cases(arch: str, cache: str) -> list[dict]:
    """The requests of one (architecture, cache): each scheduler once, with rotating prompts, schedules
    and stop rules, so that every cache meets every scheduler and every schedule."""
    names = BLOCK_SCHEDULERS if block_diffusion(arch) else FULL_SCHEDULERS
    schedules = BLOCK_SCHEDULES if block_diffusion(arch) else FULL_SCHEDULES
    offset = list(caches(arch)).index(cache)
    out = []
    for i, name in enumerate(names):
        j = i + offset
        g, b, s = schedules[j % len(schedules)]
        stop = bool(j % 2)
        out.append(dict(
            name=f"{cache}/{name}/{g}-{b}-{s}/{'eos' if stop else 'full'}", prompt=PROMPTS[j % len(PROMPTS)],
            scheduler=name, max_new_tokens=g, block_length=b, steps=s, stop_at_eos=stop, seed=100 + j,
        ))  # fmt: skip
    return out


def build_pipe(arch: str) -> DLMPipeline:
    tokenizer = bundled_tokenizer()
    model = BUILDERS[arch](tokenizer).double()
    scheduler = DEFAULT_SCHEDULERS[model.config.model_type]()  # the model's own sampler
    pipe = DLMPipeline(model=model, tokenizer=tokenizer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_requests(pipe: DLMPipeline, arch: str, cache: str, items: list[dict]) -> list:
    """The engine's requests of `items` (cases of one cache), ids their index."""
    name, options = caches(arch)[cache]
    requests = []
    for i, case in enumerate(items):
        factory, samples = SCHEDULERS[case["scheduler"]]
        generator = torch.Generator().manual_seed(case["seed"]) if samples else None
        (request,) = pipe.make_requests(
            case["prompt"], case["max_new_tokens"], case["block_length"], case["steps"], generator=generator,
            stop_at_eos=case["stop_at_eos"], scheduler=factory(), cache=make_cache(name, **options),
        )  # fmt: skip
        request.id = str(i)
        requests.append(request)
    return requests


def decode(pipe: DLMPipeline, requests: list) -> dict[str, dict]:
    """Run `requests` in one `BatchedDecoder`; each one's recorded outputs by id."""
    done, _ = run_requests(pipe.model, pipe.tokenizer.eos_token_id, requests)
    return {key: record(f.sequence, f.commit_step, f.stats) for key, f in done.items()}


COUNTERS = ("steps", "full_forwards", "fed_tokens", "reused_tokens", "canvas_refreshes", "drift_refreshes",
            "edited_tokens", "accepted_drafts", "guide_forwards")  # fmt: skip


def record(sequence, commit_step, stats: dict) -> dict:
    return {
        "sequence": [int(t) for t in sequence.tolist()],
        "commit_step": [int(t) for t in commit_step.tolist()],
        **{key: stats[key] for key in COUNTERS if key in stats},
    }


#: Cases through `DLMPipeline.__call__` (name -> the call's keyword arguments besides the prompts), on
#: the full-attention models: what only a pipeline call does.
PIPELINE_CASES = {
    "cfg/low_confidence/freecache": dict(
        cfg_scale=1.5,
        cache=("freecache", dict(suffix_window=None, freeze="block")),
        steps=16,
        max_new_tokens=16,
        block_length=8,
    ),  # fmt: skip
    "cfg/threshold/token": dict(
        cfg_scale=0.5,
        cache=("freecache", dict(freeze="token", suffix_window=0)),
        scheduler="threshold",
        max_new_tokens=16,
        block_length=8,
    ),  # fmt: skip
    "shared_generator/sampled/dual": dict(
        cache=("dual", {}), scheduler="sampled", seed=7, max_new_tokens=16, block_length=8
    ),  # fmt: skip
    "guided/freecache": dict(
        cache=("freecache", dict(suffix_window=None, freeze="block")), guide=True, max_new_tokens=24, block_length=8
    ),  # fmt: skip
    "guided/none": dict(cache=("none", {}), guide=True, max_new_tokens=16, block_length=16),
    "eos/threshold/prefix": dict(
        cache=("prefix", {}), scheduler="threshold", stop_at_eos=True, max_new_tokens=24, block_length=8
    ),  # fmt: skip
}


def pipeline_call(pipe: DLMPipeline, options: dict) -> dict[str, dict]:
    """One `pipe(PROMPTS[:3], ...)` call; each prompt's recorded outputs by index, and the call's nfe."""
    options = dict(options)
    name, cache_options = options.pop("cache")
    scheduler = options.pop("scheduler", None)
    guide = options.pop("guide", False)
    seed = options.pop("seed", None)
    kw = dict(cache=make_cache(name, **cache_options), **options)
    if scheduler is not None:
        kw["scheduler"] = SCHEDULERS[scheduler][0]()
    if seed is not None:
        kw["generator"] = torch.Generator().manual_seed(seed)
    if guide:
        from dlmcache.guidance import ARGuide

        pipe.set_guide(ARGuide("dlmcache/tiny-guide", dtype=torch.float64))
    try:
        out = pipe(PROMPTS[:3], **kw)
    finally:
        pipe.set_guide(None)
    stats = out.stats
    rows = {str(i): record(out.sequences[i], out.commit_step[i], {}) for i in range(len(out.texts))}
    rows["call"] = {key: stats[key] for key in ("steps", "full_forwards", "fed_tokens", "accepted_drafts",
                                                 "guide_forwards") if key in stats}  # fmt: skip
    return rows


def path(arch: str) -> Path:
    return HERE / f"{arch}.json"


def load(arch: str) -> dict:
    return json.loads(path(arch).read_text())
