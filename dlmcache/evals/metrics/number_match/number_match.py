"""evaluate metric: the completion's final number equals the reference number (GSM8K, the tiny task).

The final number is the last one inside \\boxed{}, else the first after '####' or 'answer is', else
the last number of the text (`dlmcache.evals.answers.final_number`)."""

import datasets
import evaluate

from dlmcache.evals.answers import same_number


class NumberMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Cobbe et al., Training Verifiers to Solve Math Word Problems, arXiv:2110.14168",
            inputs_description="predictions: completions (str); references: the reference numbers (str)",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        correct = [same_number(p, r) for p, r in zip(predictions, references, strict=True)]
        return {"accuracy": sum(correct) / max(len(correct), 1), "correct": correct}
