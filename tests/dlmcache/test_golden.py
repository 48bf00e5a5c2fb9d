"""The one decoding loop against the golden outputs (`tests/golden/`): every architecture x cache x
scheduler x schedule x stop rule decodes token for token, commit step for commit step and counter for
counter as recorded (float64, each case alone); here the cases of one cache run as one batch."""

import pytest
import torch

from tests.golden import cases as golden

PAIRS = [(arch, cache) for arch in golden.BUILDERS for cache in golden.caches(arch)]


@pytest.fixture(scope="module")
def pipes():
    built = {}

    def get(arch):
        if arch not in built:
            built[arch] = golden.build_pipe(arch)
        return built[arch]

    return get


def assert_same(got: dict, want: dict, name: str) -> None:
    assert got["sequence"] == want["sequence"], name
    assert got["commit_step"] == want["commit_step"], name
    counters = {k: v for k, v in want.items() if k not in ("sequence", "commit_step", "recorded_at")}
    assert {k: got.get(k) for k in counters} == pytest.approx(counters), name


@pytest.mark.parametrize("arch, cache", PAIRS, ids=[f"{a}-{c}" for a, c in PAIRS])
def test_a_batch_of_cases_decodes_as_recorded(pipes, arch, cache):
    pipe, recorded = pipes(arch), golden.load(arch)["cases"]
    items = golden.cases(arch, cache)
    done = golden.decode(pipe, golden.make_requests(pipe, arch, cache, items))
    for i, case in enumerate(items):
        assert_same(done[str(i)], recorded[case["name"]], case["name"])


FULL = [arch for arch in golden.BUILDERS if not golden.block_diffusion(arch)]
CALLS = [(arch, name) for arch in FULL for name in golden.PIPELINE_CASES]


@pytest.mark.parametrize("arch, name", CALLS, ids=[f"{a}-{n}" for a, n in CALLS])
def test_pipeline_calls_decode_as_recorded(pipes, arch, name):
    rows = golden.pipeline_call(pipes(arch), golden.PIPELINE_CASES[name])
    recorded = golden.load(arch)["cases"][f"pipeline/{name}"]
    assert rows["call"] == pytest.approx(recorded["call"]), name
    for i in range(len(rows) - 1):
        assert_same(rows[str(i)], recorded[str(i)], f"{name}[{i}]")


def test_the_golden_files_cover_every_architecture():
    from dlmcache.models import ARCHITECTURES

    assert set(golden.BUILDERS) == set(ARCHITECTURES)
    for arch in ARCHITECTURES:
        data = golden.load(arch)
        assert data["dtype"] == "float64"
        names = {case["name"] for cache in golden.caches(arch) for case in golden.cases(arch, cache)}
        assert names <= set(data["cases"]), sorted(names - set(data["cases"]))
    assert torch.get_default_dtype() == torch.float32  # (the cases build their models in float64 themselves)
