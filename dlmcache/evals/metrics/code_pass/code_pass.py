"""evaluate metric: pass@1 of generated programs, run in the sandbox of `dlmcache.evals.sandbox`
(subprocess, wall-clock timeout, memory / CPU / process / file-size limits, a fresh temporary
directory, no network, no writes elsewhere); never in this process.

Tests made of asserts (MBPP, HumanEval) are judged here, not in the program's process
(`dlmcache.evals.verdicts`): the sandbox computes the values the asserts compare, this process
compares them with the expected ones. A test of another shape runs after the program in its
process, where the program could forge its verdict: a pass there is reported as "unverified" and
not counted in pass@1."""

from concurrent.futures import ThreadPoolExecutor

import datasets
import evaluate

from dlmcache.evals import verdicts
from dlmcache.evals.sandbox import Limits, run_program


def judge(program: str, test: str, limits: Limits) -> tuple[str, str]:
    """(status, reason) of one program: "passed" / "failed" (judged here), "unverified" (passed in
    its own process), or the sandbox's "timeout" / "error"."""
    plan = verdicts.plan(test, program)
    if plan is None:
        result = run_program(f"{program}\n\n{test}", limits)
        return ("unverified" if result.passed else result.status), result.reason
    result = run_program(f"{program}\n\n{verdicts.runner(plan)}", limits)
    if result.status in ("timeout", "error"):
        return result.status, result.reason
    holds, why = verdicts.judge(plan, result.stdout)
    return ("passed" if holds else "failed"), why or "every assert holds"


class CodePass(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Chen et al., Evaluating Large Language Models Trained on Code, arXiv:2107.03374",
            inputs_description="predictions: programs (str); references: test code run after them (str)",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, timeout=10.0, workers=2):
        limits = Limits(timeout=timeout)
        pairs = list(zip(predictions, references, strict=True))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda pair: judge(*pair, limits), pairs))
        passed = [status == "passed" for status, _ in results]
        return {
            "pass@1": sum(passed) / max(len(passed), 1),
            "accuracy": sum(passed) / max(len(passed), 1),
            "correct": passed,
            "status": [status for status, _ in results],
            "unverified": sum(status == "unverified" for status, _ in results),
        }
