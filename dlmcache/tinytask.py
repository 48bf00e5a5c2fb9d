"""The task the bundled tiny models solve: arithmetic chains with worked solutions.

A problem is a chain of 2-4 operations on one running value (add, subtract, add a product, multiply
everything so far), written as an expression; the solution writes every intermediate computation in
order and ends with "The answer is N.":

    Q: Compute (45-34)*3+5*17.
    A: 45-34=11. 11*3=33. 5*17=85. 33+85=118. The answer is 118.

Solutions are 19-63 tokens with the bundled tokenizer (one token per digit), so decoding takes many
denoising steps, and the final number makes accuracy checkable. Chains of carries and products keep
a few-MB model well below a perfect score, so acceleration that costs accuracy shows up.

(A story-problem wording of the same chains was tried first: a 5M-parameter masked-diffusion model had
not learned to locate the operands in the story after 48k training problems, so the expression form
is used; the arithmetic is the same.)
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


def _op_add(rng, value, expr):
    b = rng.randint(2, 99)
    return value + b, f"{expr}+{b}", [f"{value}+{b}={value + b}"]


def _op_sub(rng, value, expr):
    if value < 3:
        return None
    b = rng.randint(2, min(value, 99))
    return value - b, f"{expr}-{b}", [f"{value}-{b}={value - b}"]


def _op_groups(rng, value, expr):
    k, m = rng.randint(2, 9), rng.randint(2, 19)
    return value + k * m, f"{expr}+{k}*{m}", [f"{k}*{m}={k * m}", f"{value}+{k * m}={value + k * m}"]


def _op_times(rng, value, expr):
    if value > 250:
        return None
    k = rng.randint(2, 4)
    wrapped = expr if expr.isdigit() else f"({expr})"
    return value * k, f"{wrapped}*{k}", [f"{value}*{k}={value * k}"]


OPERATIONS = [_op_add, _op_sub, _op_groups, _op_times]


MAX_COMPUTATIONS = 5
MAX_SOLUTION_CHARS = 74  # = 63 tokens of the bundled tokenizer: solution + EOS fit in 64 new tokens


def make_problem(rng: random.Random) -> Problem:
    """One random problem with 2-4 operations, at most `MAX_COMPUTATIONS` written computations and
    a solution of at most `MAX_SOLUTION_CHARS` characters (intermediate values stay in 0..999)."""
    while True:
        problem = _draw_problem(rng)
        if len(problem.solution) <= MAX_SOLUTION_CHARS:
            return problem


def _draw_problem(rng: random.Random) -> Problem:
    value = rng.randint(5, 99)
    expr = str(value)
    steps: list[str] = []
    n_ops = rng.randint(2, 4)
    done = 0
    while done < n_ops and len(steps) < MAX_COMPUTATIONS:
        result = rng.choice(OPERATIONS)(rng, value, expr)
        if result is None or not 0 <= result[0] <= 999 or len(steps) + len(result[2]) > MAX_COMPUTATIONS:
            continue
        value, expr, computations = result
        steps.extend(computations)
        done += 1
    solution = " ".join(f"{s}." for s in steps) + f" The answer is {value}."
    return Problem(question=f"Compute {expr}.", solution=solution, answer=value)


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


_ANSWER = re.compile(r"answer is (-?\d+)")


def extract_answer(text: str) -> int | None:
    """The final number after "The answer is", or None when the text has none."""
    m = _ANSWER.search(text)
    return int(m.group(1)) if m else None


def is_correct(text: str, problem: Problem) -> bool:
    return extract_answer(text) == problem.answer


def messages(problem: Problem | str) -> list[dict]:
    """The chat the tiny models were trained on."""
    q = problem.question if isinstance(problem, Problem) else problem
    return [{"role": "user", "content": q}]


def evaluate(pipe, problems: list[Problem], batch_size: int = 50, **generate_kwargs) -> dict:
    """Accuracy and speed of `pipe` on `problems` (greedy unless the kwargs say otherwise).

    Returns accuracy, tokens_per_second (answer tokens, i.e. before the first EOS, per second of
    decoding; the EOS fill a diffusion LM also denoises is not counted),
    forwards_per_token (model forwards each row went through, per token of its answer before EOS)
    and the per-problem completions.
    """
    import time

    correct, forwards, row_forwards, seconds, answer_tokens, generated = 0, 0, 0, 0.0, 0, 0
    completions = []
    eos = pipe.tokenizer.eos_token_id
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        t0 = time.perf_counter()
        out = pipe([messages(p) for p in chunk], **generate_kwargs)
        seconds += time.perf_counter() - t0
        forwards += out.nfe
        row_forwards += out.nfe * len(chunk)
        generated += out.sequences.numel()
        for p, text, row in zip(chunk, out.texts, out.sequences.tolist(), strict=True):
            ok = is_correct(text, p)
            correct += ok
            answer_tokens += row.index(eos) if eos in row else len(row)
            completions.append({"question": p.question, "answer": p.answer, "completion": text, "correct": ok})
    return {
        "accuracy": correct / len(problems),
        "n": len(problems),
        "tokens_per_second": answer_tokens / seconds,
        "canvas_tokens_per_second": generated / seconds,
        "seconds": seconds,
        "forwards": forwards,
        "forwards_per_token": row_forwards / max(answer_tokens, 1),
        "completions": completions,
    }
