"""The serving engine: many requests, one model, one flattened forward per step.

Requests whose decoding the batched engine runs (the caches none / prefix / dual / FreeCache with an
uncompressed prompt, every scheduler, guided unmasking included) are rows of one
`dlmcache.engine.BatchedDecoder`: each step plans every row at once, runs one forward over all of
their fed tokens with their KV in one paged pool, and commits every row at once. So:

- a new request joins at the next step (when its KV fits in the pool: admission is by free blocks as
  well as by count, and a request bigger than the whole pool is refused at `submit`);
- a finished or cancelled request leaves at once and its pool blocks are free for the next;
- requests with different prompts, lengths, steps, block lengths, schedulers and caches mix freely,
  and each gets exactly the tokens it gets alone (tested against `DLMPipeline`).

The other requests (a compressed prompt) still run the pipeline's own loop in a greenlet of the
engine's thread, their forwards batched together (`forward_together`: each request's
attention through its own cache) until the batched engine runs them too.

The engine owns the compute threads (`ThreadPolicy`); admission is bounded (`max_batch` running,
`max_queue` waiting, `QueueFull` beyond) and `drain()` lets the running and queued requests finish
while refusing new ones.
"""

from __future__ import annotations

import collections
import copy
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from greenlet import greenlet

from dlmcache.engine import BatchedDecoder, Finished, Request
from dlmcache.kernels.ops import dense_attention
from dlmcache.models.layers import DLMModelOutput, default_positions
from dlmcache.threads import ThreadPolicy


class QueueFull(RuntimeError):
    """More requests than `max_batch` running plus `max_queue` waiting."""


class Draining(RuntimeError):
    """The engine is draining (shutting down): it takes no new request."""


class Cancelled(Exception):
    """The request was cancelled (by its client, a timeout or a stop sequence)."""


@dataclass
class Job:
    """One request: `pipe(prompt, **options)` with `on_step(sequences, commit_step)` after every step
    (tensors [1, G], live: copy what you keep) and `on_done(output | exception)` at the end, both called
    from the engine's thread."""

    prompt: Any
    options: dict
    on_done: Any
    on_step: Any = None
    id: str = ""
    tokens: int = 0  # prompt + completion tokens, when known at submit (checked against the KV pool)
    api_key: str | None = None  # the key it was made with: only that key may cancel it
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class ForwardCall:
    """A model call of one request, as `DLMModelMixin.forward` takes it."""

    input_ids: torch.Tensor
    positions: torch.Tensor | None
    attention_mask: torch.Tensor | None
    cache: Any
    logits_index: torch.Tensor | None

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]


class BatchingModel:
    """Stands in for the model in a request's pipeline: a forward switches to the engine's loop, which
    runs it with the other requests' and switches back with its output. Everything else (config,
    device, parameters, ...) is the model's."""

    def __init__(self, model, engine: Engine):
        self._model, self._engine = model, engine

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, input_ids, positions=None, attention_mask=None, cache=None, logits_index=None, **kw):
        if kw.get("output_hidden_states"):
            raise ValueError("the serving engine does not return hidden states")
        job = greenlet.getcurrent().job
        if job.cancelled.is_set():
            raise Cancelled(job.id)
        result = self._engine.hub.switch(ForwardCall(input_ids, positions, attention_mask, cache, logits_index))
        if isinstance(result, BaseException):
            raise result
        return result


class RowAttention:
    """The `KVStore` of a batched forward: each request's rows attend through that request's own cache
    (or, without one, over its own fed tokens with its attention mask); padding attends nowhere."""

    def __init__(self, calls: list[ForwardCall]):
        self.calls = calls
        self.offsets = list(itertools.accumulate([c.rows for c in calls], initial=0))

    def attend(self, layer_idx: int, q, k, v, backend: str):
        out = q.new_zeros(q.shape)
        for call, start in zip(self.calls, self.offsets, strict=False):
            rows, n = slice(start, start + call.rows), call.tokens
            qc, kc, vc = q[rows, :, :n], k[rows, :, :n], v[rows, :, :n]
            if call.cache is not None:
                out[rows, :, :n] = call.cache.attend(layer_idx, qc, kc, vc, backend)
            else:
                mask = None if call.attention_mask is None else call.attention_mask.bool()
                out[rows, :, :n] = dense_attention(qc, kc, vc, mask, backend)
        return out


def forward_together(model, calls: list[ForwardCall]) -> list[DLMModelOutput]:
    """The forwards of several requests as one: their fed tokens right-padded to the longest, the
    layers run on the batch with `RowAttention`, the LM head on every request's requested rows at once."""
    n = max(c.tokens for c in calls)
    device = calls[0].input_ids.device
    ids = torch.zeros(sum(c.rows for c in calls), n, dtype=torch.long, device=device)
    positions = torch.zeros_like(ids)
    gathered, start = [], 0
    for c in calls:
        rows = slice(start, start + c.rows)
        ids[rows, : c.tokens] = c.input_ids
        positions[rows, : c.tokens] = (
            c.positions if c.positions is not None else default_positions(c.input_ids, c.attention_mask)
        )
        index = c.logits_index if c.logits_index is not None else torch.arange(c.tokens, device=device)
        gathered.append((rows, model.logit_rows(index)))
        start += c.rows
    x = model.hidden_states(ids, positions, cache=RowAttention(calls))
    picked = torch.cat([x[rows, index].flatten(0, 1) for rows, index in gathered])
    logits = model.get_output_embeddings()(picked)
    outputs, at = [], 0
    for c, (_, index) in zip(calls, gathered, strict=True):
        size = c.rows * index.numel()
        # (the vocabulary size spelled out: a call may ask for no logits, as a block diffusion prefill does)
        outputs.append(DLMModelOutput(logits=logits[at : at + size].view(c.rows, index.numel(), logits.shape[-1])))
        at += size
    return outputs


def size_groups(calls: list, slack: float = 1.25, extra: int = 32) -> list[list]:
    """Calls grouped so that padding every call of a group to its longest costs at most `slack` times
    the group's real tokens (+ `extra`): refreshes of whole canvases go apart from cached steps."""
    groups = []
    for c in sorted(calls, key=lambda c: -c.tokens):
        if groups:
            g = groups[-1]
            rows = sum(x.rows for x in g) + c.rows
            real = sum(x.rows * x.tokens for x in g) + c.rows * c.tokens
            if rows * g[0].tokens <= slack * real + extra:
                g.append(c)
                continue
        groups.append([c])
    return groups


@dataclass
class EngineStats:
    """Counters the metrics endpoint reads (written only by the engine's thread)."""

    forwards: int = 0  # batched forwards run
    forward_rows: int = 0  # request forwards they carried
    forward_tokens: int = 0  # fed tokens (padding excluded)
    padded_tokens: int = 0  # fed tokens including padding
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    forward_seconds: float = 0.0


class Engine:
    """Continuous batching over one pipeline (see the module docstring).

    pipe: a `DLMPipeline` (its model, tokenizer, default scheduler and cache); max_batch: requests
    decoding at once; max_queue: requests waiting beyond them; threads: the model's `ThreadPolicy` (or
    its `threads`: a count, None or "auto", the default: per forward, from its FLOPs);
    kv_bytes: the KV pool's size in bytes (default: room for `max_batch` requests of the model's
    longest sequence); block_size: the pool's page size in tokens.
    `submit(job)` returns at once (raises `QueueFull` or `Draining`); the job's callbacks report.
    """

    def __init__(self, pipe, max_batch: int = 16, max_queue: int = 64,
                 threads: ThreadPolicy | int | str | None = "auto", kv_bytes: int | None = None,
                 block_size: int = 16):  # fmt: skip
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        self.pipe = pipe
        self.model = pipe.model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.threads = threads if isinstance(threads, ThreadPolicy) else ThreadPolicy(threads)
        pipe.model.thread_policy = self.threads
        self.stats = EngineStats()
        longest = self.model.max_length or 4096
        self.decoder = BatchedDecoder(
            self.model, pipe.tokenizer.eos_token_id, kv_bytes=kv_bytes, max_tokens=max_batch * longest,
            block_size=block_size,
        )  # fmt: skip
        # The pipeline the fallback requests run: the same components, with the batching stand-in as model.
        self._pipe = copy.copy(pipe)
        object.__setattr__(self._pipe, "model", BatchingModel(pipe.model, self))
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: set[greenlet] = set()
        self._rows: dict[str, Job] = {}  # the batched decoder's requests by request key
        self._starting = 0  # jobs taken from the queue and not placed yet (still running, for drain)
        self._draining = self._stopping = False
        self._thread: threading.Thread | None = None
        self.hub: greenlet | None = None

    # ------------------------------------------------------------------ the caller's side

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dlmcache-engine", daemon=True)
            self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        capacity = self.decoder.pool.capacity
        if job.tokens > capacity:
            raise QueueFull(f"the request needs {job.tokens} tokens of KV; the pool holds {capacity} in all")
        with self._lock:
            if self._draining:
                raise Draining("the server is shutting down")
            if self.running + len(self._waiting) >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self.max_batch} requests running and {len(self._waiting)} waiting (--max-queue)")
            self._waiting.append(job)
            self._lock.notify()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running) + len(self._rows) + self._starting

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests and wait until the running and queued ones are done (True) or
        `timeout` seconds have passed (False)."""
        with self._lock:
            self._draining = True
            return self._lock.wait_for(lambda: not self.running and not self._waiting, timeout)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------------ the engine's thread

    def _loop(self) -> None:
        self.hub = greenlet.getcurrent()
        torch.set_grad_enabled(False)
        resume: dict[greenlet, Any] = {}
        while True:
            with self._lock:
                admitted = self._admissions()
                if not resume and not self._rows and not admitted:
                    if self._stopping:
                        return
                    self._lock.wait()
                    continue
            for job in admitted:
                self._admit(job, resume)
            with self._lock:
                self._starting = 0
            self._drop_cancelled()
            if self._rows:
                self._decode_step()
            calls = {}
            for g, value in resume.items():
                out = g.switch(value)
                if isinstance(out, ForwardCall):
                    calls[g] = out
                else:
                    with self._lock:
                        self._running.discard(g)
                        self._lock.notify_all()
            resume = self._forward(calls) if calls else {}

    def _admissions(self) -> list[Job]:
        """The waiting jobs that start now, in order, while there is room (called under the lock)."""
        admitted = []
        free = self.decoder.pool.free_blocks
        while self._waiting and self.running + len(admitted) < self.max_batch:
            job = self._waiting[0]
            need = self.decoder.pool.blocks_for(job.tokens)
            if need > free:  # its KV does not fit yet: it waits for finished requests' blocks
                break
            free -= need
            admitted.append(self._waiting.popleft())
        self._starting = len(admitted)
        return admitted

    def _admit(self, job: Job, resume) -> None:
        """Start `job`: a row of the batched decoder, or the pipeline's loop in a greenlet."""
        job.started = time.perf_counter()
        try:
            if job.cancelled.is_set():
                raise Cancelled(job.id)
            request = self._request(job)
            if request is not None:
                self.decoder.add(request)
                self._rows[request.id] = job
                return
        except Exception as e:  # reported to the request; the engine goes on
            self._finish(job, e)
            return
        g = greenlet(self._run_job)
        g.job = job
        with self._lock:
            self._running.add(g)
        resume[g] = job

    def _request(self, job: Job) -> Request | None:
        """The batched decoder's request for `job`, or None when only the pipeline's loop runs it."""
        requests = self.pipe.make_requests(job.prompt, **job.options)
        if requests is None:
            return None
        (request,) = requests
        request.id = f"{id(job)}"
        if job.on_step is not None:
            request.on_step = lambda seq, commit: job.on_step(seq[None], commit[None])
        return request

    def _drop_cancelled(self) -> None:
        gone = {key for key, job in self._rows.items() if job.cancelled.is_set()}
        if gone:
            for request in self.decoder.cancel(gone):
                job = self._rows.pop(request.id)
                self._finish(job, Cancelled(job.id))

    def _decode_step(self) -> None:
        t0 = time.perf_counter()
        tokens = self.decoder.fed_tokens
        try:
            finished = self.decoder.step()
        except Exception as e:  # every request of the step fails with it; the engine goes on
            for request in self.decoder.cancel(set(self._rows)):
                self._finish(self._rows.pop(request.id), e)
            return
        finally:
            self.stats.forward_seconds += time.perf_counter() - t0
        self.stats.forwards += 1
        self.stats.forward_rows += len(self._rows)
        fed = self.decoder.fed_tokens - tokens
        self.stats.forward_tokens += fed
        self.stats.padded_tokens += fed
        for f in finished:
            self._finish(self._rows.pop(f.request.id), f.error or self._output(f))

    def _output(self, f: Finished):
        from dlmcache.pipeline import DLMPipelineOutput

        seq = f.sequence[None].to(self.model.device)
        stats = {**f.stats, "forwards": f.stats["steps"], "cache": "batched"}
        return DLMPipelineOutput(
            texts=self.pipe.decode(seq), sequences=seq, nfe=f.stats["steps"], commit_step=f.commit_step[None],
            stats=stats,
        )  # fmt: skip

    def _finish(self, job: Job, result) -> None:
        if isinstance(result, Cancelled):
            self.stats.cancelled += 1
        elif isinstance(result, Exception):
            self.stats.failed += 1
        else:
            self.stats.finished += 1
        try:
            job.on_done(result)
        except Exception:  # a callback's failure must not stop the engine
            pass
        with self._lock:
            self._lock.notify_all()

    def _forward(self, calls: dict[greenlet, ForwardCall]) -> dict[greenlet, Any]:
        owner = {id(c): g for g, c in calls.items()}
        results = {}
        for group in size_groups(list(calls.values())):
            t0 = time.perf_counter()
            try:
                outputs = forward_together(self.model, group)
            except Exception as e:  # every request of the group fails with it; the others go on
                outputs = [e] * len(group)
            self.stats.forward_seconds += time.perf_counter() - t0
            self.stats.forwards += 1
            self.stats.forward_rows += sum(c.rows for c in group)
            self.stats.forward_tokens += sum(c.rows * c.tokens for c in group)
            self.stats.padded_tokens += sum(c.rows for c in group) * group[0].tokens
            for c, out in zip(group, outputs, strict=True):
                results[owner[id(c)]] = out
        return results

    def _run_job(self, job: Job):
        result: Any
        try:
            result = self._pipe(job.prompt, callback_on_step_end=self._step_callback(job), **job.options)
        except Exception as e:  # reported to the request (Cancelled included); the engine goes on
            result = e
        self._finish(job, result)
        return None

    @staticmethod
    def _step_callback(job: Job):
        def callback(pipe, step, state):
            if job.cancelled.is_set():
                raise Cancelled(job.id)
            if job.on_step is not None:
                job.on_step(state["sequences"], state["commit_step"])

        return callback
