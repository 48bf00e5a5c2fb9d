"""evaluate metric: pass@1 of generated programs, each run with its tests in the sandbox of
`dlmcache.evals.sandbox` (subprocess, wall-clock timeout, memory / CPU / process / file-size
limits, a fresh temporary directory, no network, no writes elsewhere); never in this process."""

from concurrent.futures import ThreadPoolExecutor

import datasets
import evaluate

from dlmcache.evals.sandbox import Limits, run_program


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
        programs = [f"{p}\n\n{r}" for p, r in zip(predictions, references, strict=True)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda src: run_program(src, limits), programs))
        passed = [r.passed for r in results]
        return {
            "pass@1": sum(passed) / max(len(passed), 1),
            "accuracy": sum(passed) / max(len(passed), 1),
            "correct": passed,
            "status": [r.status for r in results],
        }
