"""The task the bundled tiny models solve: two-step arithmetic with a worked solution.

A problem chains two additions / subtractions of two-digit numbers whose intermediate value and
result are two-digit too; the solution writes both computations and ends with "The answer is N.":

    Q: Compute 45+38-27.
    A: 45+38=83. 83-27=56. The answer is 56.

Every question and every solution has the same token layout (one token per digit with the bundled
tokenizer), so each operand sits at a fixed distance from where it is copied to. The solution is 26
tokens; the demo decodes 64 new tokens, so the rest is EOS fill that a diffusion LM must also
denoise, as real ones do.

Why this form (measured while building the bundled model, `scripts/train_tiny.py`): a 5M-parameter
masked diffusion LM had not learned to find operands after 48k story problems, nor in free-form
expression chains with 1-3 digit numbers, where an operand's distance to its copy varies with the
lengths of everything before it. With fixed distances a 1M-parameter model learns to copy in a few
hundred steps and the remaining difficulty is the arithmetic (carries and borrows), which keeps it
below a perfect score, so acceleration that costs accuracy shows up.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str
    answer: int


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def make_problem(rng: random.Random) -> Problem:
    """One random problem: a OP1 b OP2 c with OP in {+, -}; a, b, c, a OP1 b and the answer all
    in 10..99."""
    while True:
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
        op1, op2 = rng.choice("+-"), rng.choice("+-")
        mid = _apply(a, op1, b)
        value = _apply(mid, op2, c)
        if 10 <= mid <= 99 and 10 <= value <= 99:
            break
    solution = f"{a}{op1}{b}={mid}. {mid}{op2}{c}={value}. The answer is {value}."
    return Problem(question=f"Compute {a}{op1}{b}{op2}{c}.", solution=solution, answer=value)


def make_problems(n: int, seed: int, exclude: set[str] | None = None) -> list[Problem]:
    """`n` distinct problems from `seed`, skipping questions in `exclude` (e.g. the test set)."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out = []
    while len(out) < n:
        p = make_problem(rng)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


TEST_SEED = 1_000_003


def test_problems(n: int = 500) -> list[Problem]:
    """The held-out problems every accuracy number of the tiny models is measured on."""
    return make_problems(n, TEST_SEED)


DISTRACTOR_SEED = 2_000_003


def long_context_problems(n: int = 500, distractors: tuple[int, int] = (0, 12)) -> list[tuple[Problem, list[Problem]]]:
    """The long-prompt task: each held-out problem of `test_problems(n)` preceded by k solved
    distractor problems as earlier chat turns (k uniform in `distractors`, seeded): 19 prompt tokens
    at k = 0 (the question alone), ~490 at k = 12 (up to ~580). The answer needs only the last
    question, wherever the KV of the distractors goes; a compressed prompt must keep it, and the
    worked solutions around it, full of the same kind of numbers, must not mislead.
    `dlmcache/tiny-long` is trained for it."""
    problems = test_problems(n)
    rng = random.Random(DISTRACTOR_SEED)
    pool = make_problems(n * distractors[1] + 1, DISTRACTOR_SEED, exclude={p.question for p in problems})
    out = []
    for p in problems:
        k = rng.randint(*distractors)
        out.append((p, [pool[rng.randrange(len(pool))] for _ in range(k)]))
    return out


_ANSWER = re.compile(r"answer is (-?\d+)")


def extract_answer(text: str) -> int | None:
    """The final number after "The answer is", or None when the text has none."""
    m = _ANSWER.search(text)
    return int(m.group(1)) if m else None


def is_correct(text: str, problem: Problem) -> bool:
    return extract_answer(text) == problem.answer


def messages(problem: Problem | str, shots: list[Problem] = ()) -> list[dict]:
    """The chat the tiny models were trained on: one user turn, after `shots` solved problems as
    earlier turns (the tiny AR model also saw such few-shot chats in training)."""
    q = problem.question if isinstance(problem, Problem) else problem
    chat = []
    for shot in shots:
        chat += [{"role": "user", "content": shot.question}, {"role": "assistant", "content": shot.solution}]
    return chat + [{"role": "user", "content": q}]


def evaluate(generate, problems: list, batch_size: int = 50, max_new_tokens: int = 64, shots=()) -> dict:
    """Accuracy and speed of a generator on `problems`: `generate(chats, max_new_tokens) ->
    [Generation]`, any generator of `dlmcache.evals.harness` (a `DLMGenerator` over a pipeline, an
    `ARGenerator` over a causal LM, with or without a compressed cache). `shots`: solved problems
    shown before each question (`messages`); a problem given as a pair (problem, its own shots), as
    `long_context_problems` makes them, brings its own.

    Returns accuracy, tokens_per_second (answer tokens, i.e. before the first EOS, per second of
    decoding; the EOS fill a diffusion LM also denoises is not counted), forwards_per_token (model
    forwards each row went through, per token of its answer) and the per-problem completions.
    """
    import time

    correct, row_forwards, seconds, answer_tokens = 0, 0, 0.0, 0
    completions = []
    for i in range(0, len(problems), batch_size):
        chunk = [item if isinstance(item, tuple) else (item, shots) for item in problems[i : i + batch_size]]
        t0 = time.perf_counter()
        generations = generate([messages(p, own) for p, own in chunk], max_new_tokens)
        seconds += time.perf_counter() - t0
        for (p, _), g in zip(chunk, generations, strict=True):
            ok = is_correct(g.text, p)
            correct += ok
            answer_tokens += g.answer_tokens
            row_forwards += g.forwards
            completions.append({"question": p.question, "answer": p.answer, "completion": g.text, "correct": ok})
    return {
        "accuracy": correct / len(problems),
        "n": len(problems),
        "tokens_per_second": answer_tokens / seconds,
        "seconds": seconds,
        "forwards_per_token": row_forwards / max(answer_tokens, 1),
        "completions": completions,
    }
