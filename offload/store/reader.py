"""The expert store's disk reader: one thread that runs reads into host slots in priority order."""

from __future__ import annotations

import atexit
import itertools
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future


class Reader:
    """The disk reader: one thread running reads in priority order, so a read the model waits for now
    (priority 0) goes before reads ahead for later layers (priority = how many layers ahead), and a
    queued read-ahead that becomes wanted now moves up (`promote`). The thread starts with the first read
    and ends at `shutdown`, or when the reader is collected (it holds only the queue, not the reader), or
    at interpreter exit (`_stop_readers`)."""

    def __init__(self) -> None:
        self.queue: queue.PriorityQueue = queue.PriorityQueue()
        self.order = itertools.count()  # equal priorities run in submission order
        self.waiting: dict[Future, tuple[int, Callable, tuple]] = {}  # queued, not started: priority, call
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def submit(self, priority: int, fn: Callable, *args) -> Future:
        fut: Future = Future()
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=_read_in_order, args=(self.queue, self.waiting, self.lock),
                                               name="expert-reader", daemon=True)
                self.thread.start()
                weakref.finalize(self, self.queue.put, (float("inf"), -1, None))
                _running.add(self)
            self.waiting[fut] = (priority, fn, args)
            self.queue.put((priority, next(self.order), fut))
        return fut

    def promote(self, fut: Future, priority: int) -> None:
        """Queue `fut`'s read again at `priority` if that is sooner; whichever entry comes up first runs it."""
        with self.lock:
            queued = self.waiting.get(fut)
            if queued is None or queued[0] <= priority:
                return
            self.waiting[fut] = (priority, *queued[1:])
            self.queue.put((priority, next(self.order), fut))

    def shutdown(self, drop_queued: bool = False, timeout: float | None = None) -> None:
        """Run what is queued (or, with `drop_queued`, only the read in progress), then stop the thread;
        `timeout`: wait at most that long for it."""
        if self.thread is not None:
            self.queue.put((-float("inf") if drop_queued else float("inf"), next(self.order), None))
            self.thread.join(timeout)
            if self.thread.is_alive():
                return
            self.thread = None  # a later read starts another
        _running.discard(self)


_running: weakref.WeakSet[Reader] = weakref.WeakSet()


@atexit.register
def _stop_readers() -> None:
    """At exit (Ctrl-C included), end every reader thread still running before the interpreter finalizes.
    A daemon thread still inside torch's C++ when that happens is torn down there, which aborts the process
    ("terminate called without an active exception") instead of letting it exit with its status."""
    for reader in list(_running):
        reader.shutdown(drop_queued=True, timeout=10.0)  # a read stuck on a dead disk must not hang the exit


def _read_in_order(jobs: queue.PriorityQueue, waiting: dict, lock: threading.Lock) -> None:
    """The reader thread's loop: the next read by priority, until a None job. It keeps nothing of a read
    once it is done, so an unclosed store can still be collected (and this thread ended with it)."""
    while True:
        fut = jobs.get()[2]
        if fut is None:
            return
        with lock:
            queued = waiting.pop(fut, None)
        # None: an earlier entry of this read (it was promoted) ran it already.
        if queued is not None and fut.set_running_or_notify_cancel():
            try:
                fut.set_result(queued[1](*queued[2]))
            except BaseException as exc:  # the thread that waits for it re-raises it
                fut.set_exception(exc)
                del exc
        del fut, queued
