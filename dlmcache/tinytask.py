"""The task the bundled tiny models solve: arithmetic word problems with worked solutions.

A problem is a short story of 2-4 operations (add, remove, buy groups of items, multiply) on one
quantity; the solution writes every intermediate computation and ends with "The answer is N.":

    Q: Mia has 23 pens. She buys 4 packs of 7 pens. She gives 15 pens to Sam. How many pens does
       Mia have now?
    A: 4*7=28. 23+28=51. 51-15=36. The answer is 36.

Solutions are 19-63 tokens with the bundled tokenizer (one token per digit), so decoding takes many
denoising steps, and the final number makes accuracy checkable. Chains of carries and products keep
a few-MB model well below a perfect score, so acceleration that costs accuracy shows up.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = [
    "Mia",
    "Sam",
    "Ana",
    "Leo",
    "Ivy",
    "Tom",
    "Zoe",
    "Max",
    "Eva",
    "Ben",
    "Lily",
    "Omar",
    "Nina",
    "Raj",
    "Kim",
    "Paul",
    "Sara",
    "Yuki",
    "Liam",
    "Noah",
    "Emma",
    "Finn",
    "Rosa",
    "Hugo",
]
PRONOUN = {
    "Mia": "She",
    "Ana": "She",
    "Ivy": "She",
    "Zoe": "She",
    "Eva": "She",
    "Lily": "She",
    "Nina": "She",
    "Kim": "She",
    "Sara": "She",
    "Yuki": "She",
    "Emma": "She",
    "Rosa": "She",
}
ITEMS = [
    ("apple", "bags"),
    ("pen", "packs"),
    ("coin", "jars"),
    ("card", "decks"),
    ("egg", "cartons"),
    ("book", "boxes"),
    ("shell", "buckets"),
    ("stamp", "albums"),
    ("marble", "bags"),
    ("cookie", "tins"),
    ("sticker", "sheets"),
    ("candle", "crates"),
]


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str
    answer: int


def _op_add(rng, value, name, pron, item, group):
    b = rng.randint(2, 99)
    verb = rng.choice(["buys", "finds", "gets", "wins"])
    return value + b, f"{pron} {verb} {b} more {item}s.", [f"{value}+{b}={value + b}"]


def _op_sub(rng, value, name, pron, item, group):
    if value < 3:
        return None
    b = rng.randint(2, min(value, 99))
    friend = rng.choice([n for n in NAMES if n != name])
    verb = rng.choice([f"gives {b} {item}s to {friend}", f"loses {b} {item}s", f"sells {b} {item}s"])
    return value - b, f"{pron} {verb}.", [f"{value}-{b}={value - b}"]


def _op_groups(rng, value, name, pron, item, group):
    k, m = rng.randint(2, 9), rng.randint(2, 19)
    verb = rng.choice(["buys", "gets", "receives"])
    sentence = f"{pron} {verb} {k} {group} with {m} {item}s each."
    return value + k * m, sentence, [f"{k}*{m}={k * m}", f"{value}+{k * m}={value + k * m}"]


def _op_times(rng, value, name, pron, item, group):
    if value > 250:
        return None
    k = rng.randint(2, 4)
    word = {2: "doubles", 3: "triples", 4: "quadruples"}[k]
    return value * k, f"{pron} {word} the {item}s.", [f"{value}*{k}={value * k}"]


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
    name = rng.choice(NAMES)
    pron = PRONOUN.get(name, "He")
    item, group = rng.choice(ITEMS)
    value = rng.randint(5, 99)
    sentences = [f"{name} has {value} {item}s."]
    steps: list[str] = []
    n_ops = rng.randint(2, 4)
    while len(sentences) - 1 < n_ops and len(steps) < MAX_COMPUTATIONS:
        result = rng.choice(OPERATIONS)(rng, value, name, pron, item, group)
        if result is None or not 0 <= result[0] <= 999 or len(steps) + len(result[2]) > MAX_COMPUTATIONS:
            continue
        value, sentence, computations = result
        sentences.append(sentence)
        steps.extend(computations)
    question = " ".join(sentences) + f" How many {item}s does {name} have now?"
    solution = " ".join(f"{s}." for s in steps) + f" The answer is {value}."
    return Problem(question=question, solution=solution, answer=value)


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
