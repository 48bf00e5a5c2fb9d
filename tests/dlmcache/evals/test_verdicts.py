"""Verdicts judged outside the program's process (`dlmcache.evals.verdicts`): the real MBPP
solutions still pass, wrong ones and forged values fail, and tests of other shapes get no plan."""

import json
import sys
from pathlib import Path

import pytest

from dlmcache.evals import verdicts
from dlmcache.evals.sandbox import Limits, run_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")
MBPP = Path(__file__).parents[3].parent / "shared" / "data" / "mbpp_sanitized_test.jsonl"


def judged(program: str, test: str) -> tuple[bool, str]:
    plan = verdicts.plan(test, program)
    assert plan is not None
    result = run_program(f"{program}\n\n{verdicts.runner(plan)}", Limits(timeout=10))
    return verdicts.judge(plan, result.stdout)


@pytest.mark.skipif(not MBPP.is_file(), reason="the offline MBPP file is not here")
def test_real_mbpp_solutions_pass_when_judged_outside():
    """Every 16th problem of MBPP (sanitized test): its reference solution against its tests (all 257
    pass without the stride: 29 s here)."""
    rows = [json.loads(line) for line in MBPP.read_text().splitlines()][::16]
    for row in rows:
        test = "\n".join(row.get("test_imports") or []) + "\n" + "\n".join(row["test_list"]) + "\n"
        assert judged(row["code"], test) == (True, ""), row["test_list"][0]


def test_values_cross_as_plain_data():
    subclass = "class L(list):\n    def __eq__(self, other):\n        return True\n"
    assert judged(f"{subclass}def f(x):\n    return L([x])\n", "assert f(1) == [2]\n")[0] is False
    assert judged(f"{subclass}def f(x):\n    return L([x])\n", "assert f(2) == [2]\n") == (True, "")
    counter = "import collections\ndef f(s):\n    return collections.Counter(s)\n"
    assert judged(counter, "assert f('aab') == {'a': 2, 'b': 1}\n") == (True, "")
    generator = "def f(n):\n    return (i * i for i in range(n))\n"
    assert judged(generator, "assert list(f(3)) == [0, 1, 4]\n") == (True, "")
    nan = "def f():\n    return float('nan')\n"
    assert judged(nan, "import math\nassert math.isnan(f())\n") == (True, "")
    raises = "def f(x):\n    raise ValueError(x)\n"
    assert judged(raises, "assert f(1) == 1\n") == (False, "assert f(1) == 1: raised ValueError")
    assert judged("def sum(a, b):\n    return a * b\n", "assert sum(2, 3) == 6\n") == (True, "")  # (its own sum)


def test_the_expected_values_never_enter_the_programs_process():
    plan = verdicts.plan("assert abs(f(3) - 2.5) < 1e-6\nassert g(f(1), 'x') == 'secret'\n", "")
    runner = verdicts.runner(plan)
    assert "2.5" not in runner and "secret" not in runner and "1e-06" not in runner
    assert [c.holes for c in plan.checks] == [["f(3)"], ["g(f(1), 'x')"]]


def test_humaneval_checks_are_planned_and_other_shapes_are_not():
    humaneval = (
        "METADATA = {'author': 'x'}\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n"
        "    assert abs(candidate(0.5, 0.25) - 0.75) < 1e-6\n\ncheck(add)\n"
    )
    plan = verdicts.plan(humaneval, "def add(a, b):\n    return a + b\n")
    assert [c.holes for c in plan.checks] == [["add(1, 2)"], ["add(0.5, 0.25)"]]
    assert judged("def add(a, b):\n    return a + b\n", humaneval) == (True, "")
    for other in ("for x in range(3):\n    assert f(x) == x\n", "assert [f(x) for x in (1, 2)] == [1, 2]\n",
                  "x = f(1)\nassert x == 1\n", "import math\n", "assert f(1) == 1, 'message'\n"):  # fmt: skip
        assert verdicts.plan(other, "def f(x):\n    return x\n") is None, other


def test_garbled_values_lines_fail_cleanly():
    plan = verdicts.plan("assert f(1) == 1\n", "")
    lines = ["not json", "[1, 2]", '[["list", 3]]', "[" * 100_000 + "]" * 100_000, '[["Yes", null]]']
    for stdout in ["", *(verdicts.MARKER + line for line in lines)]:
        holds, why = verdicts.judge(plan, stdout)
        assert holds is False and why, stdout[:40]
