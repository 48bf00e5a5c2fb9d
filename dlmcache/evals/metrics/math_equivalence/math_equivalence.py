"""evaluate metric: the completion's final answer is mathematically equivalent to the reference
(MATH / MATH-500), decided by `math-verify` (HuggingFace, Apache-2.0): both sides are parsed
(\\boxed{} answers, LaTeX, plain expressions) and compared symbolically."""

import datasets
import evaluate


class MathEquivalence(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Hendrycks et al., Measuring Mathematical Problem Solving With the MATH Dataset, arXiv:2103.03874",
            inputs_description="predictions: completions (str); references: gold answers in LaTeX (str)",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        from math_verify import parse, verify

        correct = []
        for p, r in zip(predictions, references, strict=True):
            gold = parse(f"${r}$")
            try:
                correct.append(bool(gold) and bool(verify(gold, parse(p))))
            except Exception:  # math-verify raises on some malformed LaTeX: that answer is wrong
                correct.append(False)
        return {"accuracy": sum(correct) / max(len(correct), 1), "correct": correct}
