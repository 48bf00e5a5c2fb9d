"""The serving engine: many requests, one model, one flattened forward per step.

Every request is a row of one `dlmcache.engine.BatchedDecoder`: each step plans every row at once,
runs one forward over all of their fed tokens with their KV in one paged pool, and commits every row
at once, whatever the request's cache (none / prefix / dual / FreeCache, its prompt compressed or
not), scheduler (guided unmasking included) or model (full attention or block diffusion). So:

- a new request joins at the next step (when its KV fits in the pool: admission is by free blocks as
  well as by count, and a request bigger than the whole pool is refused at `submit`: `NeverFits`);
- a finished or cancelled request leaves at once and its pool blocks are free for the next;
- a request whose step raises fails alone: the others take that step without it (`isolate`);
- requests with different prompts, lengths, steps, block lengths, schedulers and caches mix freely,
  and each gets exactly the tokens it gets alone (tested against `DLMPipeline`'s reference loops).

No request runs a loop of its own: the engine's thread admits, steps the decoder and reports. It
owns the compute threads (`ThreadPolicy`); admission is bounded (`max_batch` running, `max_queue`
waiting, `QueueFull` beyond) and `drain()` lets the running and queued requests finish while
refusing new ones.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dlmcache.engine import BatchedDecoder, Finished, Request
from dlmcache.threads import ThreadPolicy


class QueueFull(RuntimeError):
    """More requests than `max_batch` running plus `max_queue` waiting."""


class NeverFits(ValueError):
    """A request whose KV is larger than the whole pool: no wait would let it in."""


class Draining(RuntimeError):
    """The engine is draining (shutting down): it takes no new request."""


class Cancelled(Exception):
    """The request was cancelled (by its client, a timeout or a stop sequence)."""


@dataclass
class Job:
    """One request: what `pipe(prompt, **options)` decodes, as a row of the engine's decoder, with
    `on_step(sequences, commit_step)` after every step (host tensors [1, G], live: copy what you keep)
    and `on_done(output | exception)` at the end, both called from the engine's thread."""

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
class EngineStats:
    """Counters the metrics endpoint reads (written only by the engine's thread)."""

    forwards: int = 0  # batched forwards run
    forward_rows: int = 0  # request forwards they carried
    forward_tokens: int = 0  # fed tokens (the decoder flattens them: no padding)
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
    longest sequence); block_size: the pool's page size in tokens; graphs: the decoder's static
    shapes ("off", "buckets" or "cuda": `dlmcache.engine.graphs`).
    `submit(job)` returns at once (raises `QueueFull`, `NeverFits` or `Draining`); the job's callbacks report.
    """

    def __init__(self, pipe, max_batch: int = 16, max_queue: int = 64,
                 threads: ThreadPolicy | int | str | None = "auto", kv_bytes: int | None = None,
                 block_size: int = 16, graphs: str = "off"):  # fmt: skip
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
            block_size=block_size, graphs=graphs, isolate=True,
        )  # fmt: skip
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._rows: dict[str, Job] = {}  # the batched decoder's requests by request key
        self._starting = 0  # jobs taken from the queue and not placed yet (still running, for drain)
        self._draining = self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the caller's side

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dlmcache-engine", daemon=True)
            self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        capacity = self.decoder.pool.capacity
        if job.tokens > capacity:
            raise NeverFits(
                f"the request needs {job.tokens} tokens of KV (prompt + max_tokens); the server's KV pool holds "
                f"{capacity} in all (--kv-cache-gb)"
            )
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
        return len(self._rows) + self._starting

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
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                admitted = self._admissions()
                if not self._rows and not admitted:
                    if self._stopping:
                        return
                    self._lock.wait()
                    continue
            for job in admitted:
                self._admit(job)
            with self._lock:
                self._starting = 0
            self._drop_cancelled()
            if self._rows:
                self._decode_step()

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

    def _admit(self, job: Job) -> None:
        """Start `job`: a row of the batched decoder from the next step (or its error, reported)."""
        job.started = time.perf_counter()
        try:
            if job.cancelled.is_set():
                raise Cancelled(job.id)
            request = self._request(job)
            self.decoder.add(request)
            self._rows[request.id] = job
        except Exception as e:  # reported to the request; the engine goes on
            self._finish(job, e)

    def _request(self, job: Job) -> Request:
        """The batched decoder's request for `job` (its options checked as `DLMPipeline` checks them)."""
        (request,) = self.pipe.make_requests(job.prompt, **job.options)
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
        except Exception as e:  # (the decoder isolates a request's failure: this is every request's)
            for request in self.decoder.cancel(set(self._rows)):
                self._finish(self._rows.pop(request.id), e)
            return
        finally:
            self.stats.forward_seconds += time.perf_counter() - t0
        self.stats.forwards += 1
        self.stats.forward_rows += len(self._rows)
        fed = self.decoder.fed_tokens - tokens
        self.stats.forward_tokens += fed
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
