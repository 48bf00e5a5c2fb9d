"""Generate with each decoding config on the same problems, store as results arrive, score, report.

Results go to `out/<task>/<config>.rank<R>.jsonl`, one line per problem, written and flushed (and
fsynced) as each batch finishes. A rerun reads every rank's file, skips what is there and appends
the rest, so a run killed at any point (even by SIGKILL mid-line: a torn last line is cut off before
appending) resumes without losing or duplicating a problem. Problems are sharded by index
(`problem i` belongs to rank `i % world`), which stays disjoint across reruns.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dlmcache.kernels.cache import cache_argument

from .tasks import Sample, Task

METRICS_DIR = Path(__file__).parent / "metrics"


@dataclass
class Generation:
    """One completion: `answer_tokens` counts tokens before the first EOS, `forwards` the model
    forwards its row went through (DLM denoising steps, or AR decoding steps)."""

    text: str
    answer_tokens: int
    forwards: int


class ARGenerator:
    """Greedy decoding of any transformers causal LM with `generate` (the autoregressive baseline).
    `cache`: a factory of the KV cache each batch decodes with (e.g. a `CompressedCache`; default:
    transformers' own)."""

    kind = "ar"

    def __init__(self, model, tokenizer, cache=None):
        self.model, self.tokenizer, self.cache = model, tokenizer, cache
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"

    @torch.no_grad()
    def __call__(self, chats: list[list[dict]], max_new_tokens: int) -> list[Generation]:
        tok = self.tokenizer
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        cache = {} if self.cache is None else cache_argument(self.cache())
        out = self.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, **cache
        )
        new = out[:, enc["input_ids"].shape[1] :]
        stops = {tok.eos_token_id, tok.pad_token_id} | set(
            _ids(getattr(self.model.generation_config, "eos_token_id", None))
        )
        gens = []
        for row in new.tolist():
            n = next((i for i, t in enumerate(row) if t in stops), len(row))
            gens.append(Generation(tok.decode(row[:n], skip_special_tokens=True), n, new.shape[1]))
        return gens


def _ids(value) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


class Pipelines:
    """`DLMPipeline`s by model name, each loaded once with its progress bar off, for run configs that
    may name their model: `MODEL@CONFIG` (a plain CONFIG runs on `default_model`)."""

    def __init__(self, default_model: str):
        self.default_model, self.loaded = default_model, {}

    def split(self, text: str):
        """(the pipeline of the config's model, the config without its `MODEL@` prefix)."""
        from dlmcache import DLMPipeline

        model, _, config = text.rpartition("@")
        model = model or self.default_model
        if model not in self.loaded:
            self.loaded[model] = DLMPipeline.from_pretrained(model)
            self.loaded[model].set_progress_bar_config(disable=True)
        return self.loaded[model], config


class DLMGenerator:
    """A `DLMPipeline` with one decoding config applied (`RunConfig.apply`)."""

    kind = "dlm"

    def __init__(self, pipe, block_length: int | None = 32, steps: int | None = None):
        """block_length None: the pipeline's default (a block diffusion model's own)."""
        self.pipe, self.block_length, self.steps = pipe, block_length, steps

    def __call__(self, chats: list[list[dict]], max_new_tokens: int) -> list[Generation]:
        # One token per step unless `steps` says otherwise; schedulers such as the threshold rule or
        # a guide commit more where they can.
        block = min(self.block_length or self.pipe.default_block_length, max_new_tokens)
        out = self.pipe(chats, max_new_tokens=max_new_tokens, block_length=block, steps=self.steps)
        eos = self.pipe.tokenizer.eos_token_id
        gens = []
        for text, row in zip(out.texts, out.sequences.tolist(), strict=True):
            n = row.index(eos) if eos in row else len(row)
            gens.append(Generation(text, n, out.nfe))
        return gens


class ResultStore:
    """Append-only JSONL of finished problems for one (task, config, rank)."""

    def __init__(self, directory: Path, config: str, rank: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.path = self.directory / f"{slug(config)}.rank{rank}.jsonl"

    def shard_files(self) -> list[Path]:
        return sorted(self.directory.glob(f"{slug(self.config)}.rank*.jsonl"))

    def done(self) -> dict[str, dict]:
        """Every record of this config in any rank's file, first one per id."""
        records = {}
        for path in self.shard_files():
            for rec in read_records(path):
                records.setdefault(rec["id"], rec)
        return records

    def append(self, records: list[dict]) -> None:
        _cut_torn_tail(self.path)
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())


def slug(config: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", config).strip("_") or "config"


def read_records(path: Path) -> list[dict]:
    """Complete lines of a results file (a torn last line from a killed run is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().split("\n"):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _cut_torn_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def run_config(
    task: Task,
    samples: list[Sample],
    config: str,
    generate,
    out_dir: Path,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> int:
    """Generate this rank's pending problems in batches and append them; returns how many ran."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    store = ResultStore(Path(out_dir) / task.name, config, rank)
    done = store.done()
    mine = [s for i, s in enumerate(samples) if i % world == rank and s.id not in done]
    new_tokens = max_new_tokens or task.max_new_tokens
    bar = tqdm(total=len(mine), desc=f"{task.name} {config} [rank {rank}]", disable=not progress)
    for i in range(0, len(mine), batch_size):
        batch = mine[i : i + batch_size]
        t0 = time.perf_counter()
        gens = generate([s.messages for s in batch], new_tokens)
        seconds = time.perf_counter() - t0
        store.append(
            [
                {
                    "id": s.id,
                    "task": task.name,
                    "config": config,
                    "prompt": s.messages,
                    "completion": g.text,
                    "answer_tokens": g.answer_tokens,
                    "forwards": g.forwards,
                    "seconds": seconds / len(batch),
                    "max_new_tokens": new_tokens,
                }
                for s, g in zip(batch, gens, strict=True)
            ]
        )
        bar.update(len(batch))
    bar.close()
    return len(mine)


def score(task: Task, samples: list[Sample], records: dict[str, dict], code_timeout: float = 10.0) -> dict:
    """Metric over the problems that have a record (via the task's `evaluate` metric module);
    generated programs get `code_timeout` seconds each in the sandbox."""
    import evaluate

    by_id = {s.id: s for s in samples}
    recs = [records[s.id] for s in samples if s.id in records]
    if not recs:
        return {"n": 0}
    metric = evaluate.load(str(METRICS_DIR / task.metric))
    predictions = [task.prediction(by_id[r["id"]], r["completion"]) for r in recs]
    references = [by_id[r["id"]].reference for r in recs]
    kwargs = {"timeout": code_timeout} if task.metric == "code_pass" else {}
    result = metric.compute(predictions=predictions, references=references, **kwargs)
    tokens = sum(r["answer_tokens"] for r in recs)
    seconds = sum(r["seconds"] for r in recs)
    return {
        "n": len(recs),
        "accuracy": result["accuracy"],
        "correct": dict(zip((r["id"] for r in recs), result["correct"], strict=True)),
        "tokens_per_second": tokens / seconds if seconds else 0.0,
        "forwards_per_token": sum(r["forwards"] for r in recs) / max(tokens, 1),
        "answer_tokens": tokens,
        "seconds": seconds,
    }


def summary_table(summary: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per (task, config) with accuracy, tokens/s, forwards/token, speedup vs none."""
    lines = [
        "| task | config | n | accuracy | tokens/s | forwards / token | speedup vs none |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, configs in summary.items():
        base = configs.get("none")
        for config, r in configs.items():
            if not r.get("n"):
                continue
            speed = (
                r["tokens_per_second"] / base["tokens_per_second"] if base and base.get("tokens_per_second") else None
            )
            r["speedup_vs_none"] = speed
            lines.append(
                f"| {task} | {config} | {r['n']} | {100 * r['accuracy']:.1f}% | {r['tokens_per_second']:.1f} | "
                f"{r['forwards_per_token']:.3f} | {f'{speed:.2f}x' if speed else '-'} |"
            )
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, dict]], path: Path) -> bool:
    """Accuracy vs speedup over `none`, one marker per config, one colour per task; False when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for task, configs in summary.items():
        pts = [(r.get("speedup_vs_none") or 1.0, 100 * r["accuracy"], c) for c, r in configs.items() if r.get("n")]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=task)
        for x, y, c in pts:
            ax.annotate(c, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("speedup vs none (tokens/s)")
    ax.set_ylabel("accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def summarize(
    out_dir: Path, task_samples: dict[Task, list[Sample]], configs: list[str], code_timeout: float = 10.0
) -> dict:
    """Score every (task, config) from all ranks' result files; writes summary.json, summary.md and
    accuracy_vs_speedup.png under `out_dir`, returns the summary."""
    out_dir = Path(out_dir)
    summary = {}
    for task, samples in task_samples.items():
        summary[task.name] = {}
        for config in configs:
            records = ResultStore(out_dir / task.name, config, rank=0).done()
            summary[task.name][config] = score(task, samples, records, code_timeout)
    table = summary_table(summary)
    (out_dir / "summary.md").write_text(table + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out_dir / "accuracy_vs_speedup.png")
    return summary
