"""Every script in scripts/ runs: the benchmarks and evaluations on the smallest settings they take
(in this process, so the imports are paid once), the ones that need what this machine lacks (a GPU,
another package's virtualenv, the official code) say so in one sentence. Their numbers are not
checked here (timings are not tests); their correctness checks are (same tokens, exact kernels)."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_script

ROOT = Path(__file__).resolve().parents[2]


def test_bench_dlm(tmp_path):
    out = tmp_path / "dlm.json"
    run_script("bench_dlm.py", "--model", "dlmcache/tiny", "--prompt-len", "16", "--max-new-tokens", "16",
               "--block-length", "16", "--repeats", "1", "--threads", "1", "--modes", "none;freecache",
               "--out", str(out))  # fmt: skip
    rows = json.loads(out.read_text())["modes"]
    assert set(rows) == {"none", "freecache"} and rows["freecache"]["nfe"] == 16


def test_bench_engine(tmp_path):
    out = tmp_path / "engine.json"
    run_script("bench_engine.py", "--requests", "1,2", "--repeats", "1", "--calls", "1", "--max-new-tokens", "16",
               "--block-length", "16", "--out", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert result["batches"]["2"]["same_tokens"] and result["batches"]["1"]["host_reads"] == 1


def test_eval_tiny(tmp_path, capsys):
    run_script("eval_tiny.py", "--n", "2", "--batch-size", "2", "--threads", "1", "--configs", "none;freecache")
    assert "| freecache |" in capsys.readouterr().out


def test_bench_linear(capsys):
    run_script(
        "bench_linear.py", "--models", "tiny", "--rows", "16", "--no-compile", "--repeats", "1", "--threads", "1"
    )
    assert "onednn" in capsys.readouterr().out


def test_bench_serve(tmp_path):
    out = tmp_path / "serve.json"
    run_script("bench_serve.py", "--models", "tiny", "--concurrency", "1,2", "--requests", "2", "--max-tokens", "16",
               "--out", str(out))  # fmt: skip
    (rows,) = json.loads(out.read_text())["models"].values()
    assert [row["concurrency"] for row in rows] == [1, 2] and all(row["same_answers_as_one_at_a_time"] for row in rows)


def test_train_tiny(tmp_path):
    run_script("train_tiny.py", "tokenizer", "--out", str(tmp_path))
    run_script("train_tiny.py", "dlm", "--out", str(tmp_path), "--steps", "2", "--batch-size", "2")
    from dlmcache import DLMPipeline

    pipe = DLMPipeline.from_pretrained(tmp_path)
    assert pipe(["Compute 1+2."], max_new_tokens=8, block_length=8).sequences.shape == (1, 8)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["check_official.py"], "give at least one official code directory"),
        (["kvpress_reference.py", "samples.pt"], "kvpress is not installed here"),
        (["bench_kernels.py", "--help"], "Correctness, then speed, of the Triton kernels"),
        (["bench_batch_invariant.py", "--help"], "Batch-invariant mode"),
    ],
)
def test_what_needs_another_machine_says_so(argv, says, capsys):
    """check_official needs the releases' code, kvpress_reference kvpress's own virtualenv; the
    kernel and batch-invariance benchmarks time a GPU (their checks are tests/kernels' and
    test_batch_invariant's): their help at least loads."""
    with pytest.raises(SystemExit) as stop:
        run_script(*argv)
    printed = capsys.readouterr()
    assert says in f"{stop.value.code}{printed.out}{printed.err}"


def test_gpu_checks_is_valid_bash():
    assert subprocess.run(["bash", "-n", "scripts/gpu_checks.sh"], cwd=ROOT).returncode == 0


def test_demo(capsys):
    run_script("demo.py", "--n", "1", "--show", "0")
    assert "speedup" in capsys.readouterr().out.lower()
