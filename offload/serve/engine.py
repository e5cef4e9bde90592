"""One model, one generation at a time: the server's requests share the runtime's KV cache, so a single
worker thread runs them in turn, and a bounded number wait for it (`max_queue`; past that, `Busy`).

The HTTP side (asyncio) and the worker (a thread, because a generation is blocking torch work) meet in a
`Job`: the worker pushes text pieces and the end into the job's asyncio queue on the event loop's thread;
the HTTP side sets the job's `cancelled` event when its client goes away, and the worker, which asks
after every token, stops within one."""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..generate import Sampling
from ..runtime import Runtime
from .completion import Completion
from .metrics import Metrics

log = logging.getLogger("moe_offload.serve")


class Busy(Exception):
    """The queue is full; `retry_after` (seconds) is a guess at when a place frees up."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy (one generation runs and the queue is full); retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Finished:
    """How a job ended: the fields of an OpenAI response's choice, usage and statistics."""

    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    stats: dict = field(default_factory=dict)


class Job:
    """One request's generation. Created on the event loop (its events queue belongs to that loop)."""

    def __init__(self, prompt_ids: list[int], max_tokens: int, sampling: Sampling, stop: list[str] = ()):
        self.prompt_ids, self.max_tokens, self.sampling, self.stop = prompt_ids, max_tokens, sampling, list(stop)
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()  # ("text", str), then ("done", Finished) or ("error", exc)
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """The client is gone (or the server stops): the worker skips the job or stops it within one token."""
        self.cancelled.set()

    async def next_event(self) -> tuple[str, object]:
        return await self.events.get()

    def _emit(self, kind: str, value: object) -> None:
        """From the worker thread: hand an event to the loop's thread (asyncio queues are not thread-safe)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed: the server is shutting down, nobody is listening
            self.cancel()


class Engine:
    """Runs jobs on `rt` one at a time in a worker thread; at most `max_queue` wait behind the running one."""

    def __init__(self, rt: Runtime, max_queue: int = 16, threads: int | None = None):
        self.rt, self.max_queue, self.threads = rt, max_queue, threads
        self.metrics = Metrics()
        self.lock = threading.Lock()  # guards admitted, running, closing and job_s
        self.closing = False
        self.admitted = 0  # jobs accepted and not yet finished: the running one and those waiting
        self.running: Job | None = None
        self.job_s = 1.0  # a running mean of a job's seconds, for Retry-After
        self.jobs: queue.Queue[Job | None] = queue.Queue()  # bounded by `admitted`, not by the queue itself
        self.worker = threading.Thread(target=self._work, name="moe-offload-generate", daemon=True)
        self.worker.start()

    @property
    def waiting(self) -> int:
        with self.lock:
            return self.admitted - (self.running is not None)

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise Busy when one runs and `max_queue` wait already."""
        with self.lock:
            if self.admitted >= 1 + self.max_queue:
                retry = max(1, min(60, math.ceil(self.job_s * (self.admitted - 1) / max(1, self.max_queue))))
                self.metrics.count("rejected")
                raise Busy(retry)
            self.admitted += 1
        self.jobs.put(job)

    def metrics_text(self) -> str:
        with self.lock:
            queued, generating = self.admitted - (self.running is not None), self.running is not None
        return self.metrics.render(queued, generating)

    def close(self) -> None:
        """Stop the running job within a token, drop the waiting ones, end the worker, close the runtime."""
        with self.lock:
            self.closing = True  # the worker cancels each job still queued as it comes to it
            if self.running is not None:
                self.running.cancel()
        self.jobs.put(None)
        self.worker.join(timeout=30)
        self.rt.close()

    def _work(self) -> None:
        if self.threads:
            # Per thread: OpenMP's thread count set in the main thread does not carry over to this one.
            torch.set_num_threads(self.threads)
        while (job := self.jobs.get()) is not None:
            with self.lock:
                self.running = job
                if self.closing:
                    job.cancel()
            t0 = time.perf_counter()
            outcome, stats, end = "cancelled", None, None
            try:
                if not job.cancelled.is_set():  # else its client left while it waited, or the server is stopping
                    completion = Completion(self.rt, job.prompt_ids, job.max_tokens, job.sampling, job.stop)
                    for piece in completion.pieces(job.cancelled.is_set):
                        job._emit("text", piece)
                    outcome, stats = completion.finish_reason, completion.stats
                    end = ("done", Finished(outcome, len(job.prompt_ids), completion.completion_tokens, stats))
                else:
                    end = ("done", Finished("cancelled", len(job.prompt_ids), 0))
            except Exception as exc:  # a bug or a device error: the client gets a 500, the log the traceback
                log.exception("generation failed")
                outcome, end = "error", ("error", exc)
            finally:
                # Free the place before telling the client: its next request must find the queue shorter.
                with self.lock:
                    self.running = None
                    self.admitted -= 1
                    if stats is not None:  # a job that ran: skipped ones say nothing about the wait
                        self.job_s = 0.8 * self.job_s + 0.2 * (time.perf_counter() - t0)
                self.metrics.count(outcome, stats)
                if end is not None:
                    job._emit(*end)
        # The server is stopping: whoever still waits hears that its job was cancelled.
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job._emit("done", Finished("cancelled", len(job.prompt_ids), 0))
