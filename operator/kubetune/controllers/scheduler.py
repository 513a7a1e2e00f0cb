"""Delayed work for a controller: retries and periodic polls, one thread for the whole operator.

Why not kopf timers: kopf puts a finalizer on every object that has a timer
(so that it can stop the timer before the object goes), which costs two writes
per object, races with status patches (JSON patches refused with 422), and
leaves objects that cannot be deleted while the operator is down. Why not
``kopf.TemporaryError``: it needs kopf's per-object state (annotations, one
more write per object); level-triggered handlers retry through this instead.

Work is keyed (``("progress", uid)``, ``("retry", uid)``): scheduling a key
again replaces its function, and its due time unless ``keep_earlier``; a key
never runs twice at once. Functions run on a small thread pool and must not
raise (an exception is logged and dropped).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("kubetune.scheduler")


class Scheduler:
    def __init__(self, workers: int = 4, name: str = "kubetune-scheduler") -> None:
        self._name = name
        self._workers = workers
        self._due: dict[Hashable, tuple[float, Callable[[], None]]] = {}
        self._heap: list[tuple[float, int, Hashable]] = []
        self._running: set[Hashable] = set()
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    def call_later(self, key: Hashable, delay: float, fn: Callable[[], None], *, keep_earlier: bool = False) -> None:
        """Run ``fn`` in ``delay`` seconds under ``key`` (replacing what ``key`` had)."""
        due = time.monotonic() + max(0.0, delay)
        with self._cond:
            current = self._due.get(key)
            if keep_earlier and current is not None and current[0] <= due:
                due = current[0]
            self._due[key] = (due, fn)
            # The timer thread wakes by the heap's earliest time at the latest; only an earlier one needs
            # it woken (a poll that schedules its next run would otherwise wake it for nothing each time).
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (due, next(self._seq), key))
            if earliest is None or due < earliest:
                self._cond.notify()

    def cancel(self, key: Hashable) -> None:
        with self._cond:
            self._due.pop(key, None)

    def scheduled(self, key: Hashable) -> bool:
        with self._cond:
            return key in self._due

    def __len__(self) -> int:
        with self._cond:
            return len(self._due)

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix=self._name)
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread, pool = self._thread, self._pool
            self._thread = self._pool = None
        if thread is not None:
            thread.join(timeout=10)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _loop(self) -> None:
        while True:
            with self._cond:
                ready = self._pop_due()
                while not ready and not self._stopping:
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                    ready = self._pop_due()
                if self._stopping:
                    return
                pool = self._pool
            assert pool is not None
            for key, fn in ready:
                pool.submit(self._run, key, fn)

    def _pop_due(self) -> list[tuple[Hashable, Callable[[], None]]]:
        """Keys due now (called with the lock held). A key still running is pushed back a little."""
        now = time.monotonic()
        ready = []
        while self._heap and self._heap[0][0] <= now:
            due, _, key = heapq.heappop(self._heap)
            entry = self._due.get(key)
            if entry is None or entry[0] != due:
                continue  # cancelled or rescheduled: a newer heap entry stands for it
            if key in self._running:
                later = now + 0.2
                self._due[key] = (later, entry[1])
                heapq.heappush(self._heap, (later, next(self._seq), key))
                continue
            del self._due[key]
            self._running.add(key)
            ready.append((key, entry[1]))
        return ready

    def _run(self, key: Hashable, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("scheduled work %r failed", key)
        finally:
            with self._cond:
                self._running.discard(key)


class Backoff:
    """Consecutive failures per key and the wait before the next try: 2 s, doubling, at most ``limit``."""

    def __init__(self, limit: float = 60.0) -> None:
        self.limit = limit
        self._failures: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def failed(self, key: Hashable) -> float:
        """Count a failure of ``key``; the seconds to wait before trying it again."""
        with self._lock:
            count = self._failures[key] = self._failures.get(key, 0) + 1
        return min(self.limit, 2.0**count)

    def succeeded(self, key: Hashable) -> None:
        with self._lock:
            self._failures.pop(key, None)


def why(error: BaseException) -> str:
    """An error in a log line: its type, and the API's reason when it has one."""
    return f"{type(error).__name__}: {getattr(error, 'reason', None) or error}"
