"""The batched engine in-process against `DLMPipeline`, on a bundled model (--threads, default 1).

    python scripts/bench_engine.py --out results/bench_engine.json
    python scripts/bench_engine.py --model dlmcache/tiny-block      # block diffusion
    python scripts/bench_engine.py --guide dlmcache/tiny-guide      # guided unmasking (FreeCache + guide)

One run, ratios within it, medians of `--repeats`:
- one request at a time: ms per request through `DLMPipeline.__call__` and through a `BatchedDecoder`
  directly (R = 1; the difference is the call's own work: encoding, requests, outputs), interleaved
  request by request, the median of the per-request ratios, and the check that both give the same
  tokens;
- all `--requests` at once through the engine: answer tokens per second against one at a time;
- dispatched ops per step at R = 1 and R = `--requests` (a dispatch counter), and host reads per step;
  `DLMPipeline`'s ops per step for one request beside them.
The cache is the server's default (FreeCache token mode, suffix window 0, drift refresh); for a block
diffusion model, its block cache; the scheduler and block length are the model's defaults. With
`--guide`, every request is guided, and the guide's forwards of the batched run are counted (the
requests share them) against the forwards each request took part in.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dlmcache import DLMPipeline, tinytask
from dlmcache.cache import make_cache
from dlmcache.engine import BatchedDecoder
from dlmcache.testing import DispatchCount


def pipeline_ops_per_step(pipe, ids, max_new_tokens, cache) -> int:
    """Dispatched ops of `DLMPipeline`'s 4th denoising step for one request (counted between the
    step callbacks of steps 3 and 4)."""
    count = DispatchCount()

    def callback(_, step, state):
        if step == 3:
            count.__enter__()
        elif step == 4:
            count.__exit__(None, None, None)

    pipe([ids], max_new_tokens=max_new_tokens, cache=cache, stop_at_eos=True, callback_on_step_end=callback)
    return count.ops


class GuideCalls:
    """Counts the guide model's forwards inside `with` (none without a guide) and the rows they carry,
    and times the shared verify rounds (`guidance.verify_many`): in all, and in the guide's forwards
    (the rest is stacking the sessions' caches, handing each its rows back and the acceptance rule)."""

    def __init__(self, pipe):
        guide = getattr(pipe.scheduler, "guide", None)
        self.model = None if guide is None else guide.model
        self.forwards, self.rows = 0, 0
        self.verify_seconds, self.verify_forward_seconds, self._in_verify = 0.0, 0.0, False

    @property
    def rows_per_forward(self) -> float:
        return self.rows / max(self.forwards, 1)

    def __enter__(self):
        if self.model is not None:
            from dlmcache import guidance

            original, verify_many = self.original, self.verify_many = self.model.forward, guidance.verify_many

            def counted(*args, **kwargs):
                self.forwards += 1
                self.rows += kwargs["input_ids"].shape[0]
                start = time.perf_counter()
                out = original(*args, **kwargs)
                if self._in_verify:
                    self.verify_forward_seconds += time.perf_counter() - start
                return out

            def timed(*args, **kwargs):
                self._in_verify, start = True, time.perf_counter()
                try:
                    return verify_many(*args, **kwargs)
                finally:
                    self.verify_seconds += time.perf_counter() - start
                    self._in_verify = False

            self.model.forward, guidance.verify_many = counted, timed
        return self

    def __exit__(self, *exc):
        if self.model is not None:
            from dlmcache import guidance

            self.model.forward, guidance.verify_many = self.original, self.verify_many


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dlmcache/tiny", help="dlmcache/tiny or dlmcache/tiny-block")
    ap.add_argument("--guide", default=None, help="a guide (dlmcache/tiny-guide): every request guided")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for everything (one run, one count)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.threads < 1:
        ap.error(f"--threads {args.threads}: must be at least 1")
    torch.set_num_threads(args.threads)
    pipe = DLMPipeline.from_pretrained(args.model, guide=args.guide)
    pipe.set_progress_bar_config(disable=True)
    cache = make_cache("freecache", freeze="token", suffix_window=0)
    prompts = [pipe.encode_prompts([tinytask.messages(p)])[0] for p in tinytask.test_problems(args.requests)]
    g = args.max_new_tokens

    def request(ids, i):
        (r,) = pipe.make_requests([ids], max_new_tokens=g, cache=cache, stop_at_eos=True)
        r.id = str(i)
        return r

    def decode(decoder, requests) -> dict:
        for r in requests:
            decoder.add(r)
        out = {}
        while len(decoder):
            out.update({f.request.id: f.sequence for f in decoder.step()})
        return out

    rows = []
    one = BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id)
    for _ in range(args.repeats):
        # One request at a time, the pipeline and the engine interleaved request by request, so a
        # drift in the machine's speed hits both alike.
        t_pipe, t_one, seqs, same = [], [], [], True
        for i, ids in enumerate(prompts):
            t = time.perf_counter()
            seqs.append(pipe([ids], max_new_tokens=g, cache=cache, stop_at_eos=True).sequences[0])
            t_pipe.append(time.perf_counter() - t)
            t = time.perf_counter()
            same &= torch.equal(decode(one, [request(ids, i)])[str(i)], seqs[-1])
            t_one.append(time.perf_counter() - t)
        t = time.perf_counter()
        with GuideCalls(pipe) as guide_calls:
            batched = decode(
                BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id), [request(p, i) for i, p in enumerate(prompts)]
            )
        t_all = [time.perf_counter() - t]
        same &= all(torch.equal(batched[str(i)], s) for i, s in enumerate(seqs))
        answer = sum(int((s != pipe.tokenizer.eos_token_id).cumprod(0).sum()) for s in seqs)
        rows.append({
            "pipeline_ms_per_request": 1e3 * statistics.median(t_pipe),
            "engine_ms_per_request": 1e3 * statistics.median(t_one),
            "engine_over_pipeline": statistics.median(e / p for e, p in zip(t_one, t_pipe, strict=True)),
            "one_at_a_time_answer_tokens_per_s": answer / sum(t_pipe),
            "batched_answer_tokens_per_s": answer / sum(t_all),
            "batched_over_one_at_a_time": sum(t_pipe) / sum(t_all),
            "same_tokens": same,
            "guide_forwards_batched": guide_calls.forwards, "guide_rows_per_forward": guide_calls.rows_per_forward,
            "verify_ms": 1e3 * guide_calls.verify_seconds,
            "verify_outside_guide_forward_share": 1 - guide_calls.verify_forward_seconds / guide_calls.verify_seconds
            if guide_calls.verify_seconds else None,
        })  # fmt: skip
        print(rows[-1], flush=True)
    ops = {}
    for batch in (1, len(prompts)):
        decoder = BatchedDecoder(pipe.model, pipe.tokenizer.eos_token_id)
        for i in range(batch):
            decoder.add(request(prompts[i], i))
        for _ in range(3):
            decoder.step()
        if not len(decoder):  # (a guided batch may be done in three steps: no fourth to count)
            ops[batch] = None
            continue
        reads = decoder.batch.host_reads
        with DispatchCount() as count:
            decoder.step()
        ops[batch] = {"ops_per_step": count.ops, "host_reads_per_step": decoder.batch.host_reads - reads}
    ops["pipeline_one_request"] = {"ops_per_step": pipeline_ops_per_step(pipe, prompts[0], g, cache) or None}
    result = {
        "medians": {k: statistics.median(r[k] for r in rows) if rows[0][k] is not None else None
                    for k in rows[0] if k != "same_tokens"},
        "same_tokens": all(r["same_tokens"] for r in rows), "ops": ops, "runs": rows, "args": vars(args) | {
            "out": str(args.out)},
    }  # fmt: skip
    print(json.dumps({k: result[k] for k in ("medians", "same_tokens", "ops")}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
