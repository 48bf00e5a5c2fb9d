import pytest

from dlmcache import LowConfidenceScheduler, ThresholdScheduler, TokenEditingScheduler
from dlmcache.cache import FreeCache, NoCache
from dlmcache.run_config import RunConfig, split_configs
from tests.dlmcache.test_pipeline import make_pipe


def test_parse():
    cfg = RunConfig.parse("freecache:suffix_window=0,beyond_window=drop,refresh_every=none+threshold=0.9")
    assert cfg.cache == "freecache" and cfg.threshold == 0.9
    assert cfg.cache_options == {"suffix_window": 0, "beyond_window": "drop", "refresh_every": None}
    g = RunConfig.parse("dual+guide:path=dlmcache/tiny-guide,rule=greedy,chunk_size=16")
    assert (g.cache, g.guide, g.guide_options) == ("dual", "dlmcache/tiny-guide", {"rule": "greedy", "chunk_size": 16})
    assert RunConfig.parse("none+guide=some/path").guide == "some/path"
    editing = RunConfig.parse("freecache+edit_threshold=0.5").scheduler()
    assert isinstance(editing, TokenEditingScheduler) and editing.config.threshold == 0.95
    editing = RunConfig.parse("freecache+threshold=0.7+edit_threshold=0.5").scheduler()
    assert (editing.config.threshold, editing.config.edit_threshold) == (0.7, 0.5)


@pytest.mark.parametrize(
    "text, match",
    [
        ("fast", "unknown part 'fast'"),
        ("guide:rule=greedy", "need path"),
        ("dual:abc", "'abc' is not k=v"),
        ("threshold", "unknown part"),
        ("edit_threshold", "unknown part"),
    ],
)
def test_parse_errors(text, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.parse(text)


def test_apply(tiny_tokenizer):
    pipe = make_pipe(tiny_tokenizer)
    default = pipe.scheduler
    RunConfig.parse("freecache:suffix_window=4+threshold=0.8").apply(pipe, default)
    assert isinstance(pipe.cache, FreeCache) and pipe.cache.suffix_window == 4
    assert isinstance(pipe.scheduler, ThresholdScheduler) and pipe.scheduler.config.threshold == 0.8
    RunConfig.parse("none").apply(pipe, default)
    assert isinstance(pipe.cache, NoCache) and isinstance(pipe.scheduler, LowConfidenceScheduler)


def test_split_configs():
    assert split_configs("none,prefix, dual") == ["none", "prefix", "dual"]
    with_options = "none;freecache:suffix_window=0,refresh_every=4;guide:path=g,top_k=3"
    assert split_configs(with_options) == ["none", "freecache:suffix_window=0,refresh_every=4", "guide:path=g,top_k=3"]
    cfg = RunConfig.parse(split_configs(with_options)[2])
    assert cfg.guide == "g" and cfg.guide_options == {"top_k": 3}
