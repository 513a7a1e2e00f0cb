"""Riding out storage outages: GPU work is never thrown away because the store is down for a while.

Every storage call already retries for ~15 s (``S3Settings.attempts``). An
outage longer than that is handled here, at two levels:

- :class:`CheckpointUploader` uploads checkpoints on a background thread, so
  training never waits for the store. When an upload fails the checkpoint stays
  on the local disk and is retried with back-off; a newer checkpoint replaces
  an older one still waiting (resuming needs only the newest).
- :func:`ride_out` retries an operation through an outage with exponential
  back-off, for at most ``storage.outage_wait_seconds`` without an answer, and
  logs every wait. The trainer uses it for what must reach the store after
  training (the final checkpoint, the eval report, the adapter and manifest).

When the wait runs out the trainer exits ``STORAGE_UNAVAILABLE`` (75); the
next pod resumes from the newest checkpoint that did reach the store.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kubetune_trainer import storage

log = logging.getLogger(__name__)

_T = TypeVar("_T")

FIRST_WAIT = 1.0
"""Seconds before the first retry after a failed call (which itself retried for ~15 s)."""
LONGEST_WAIT = 30.0
"""Waits double up to this."""


class OutageTooLong(storage.StorageError):
    """The store did not answer within ``storage.outage_wait_seconds``."""


def ride_out(
    fn: Callable[[], _T],
    *,
    what: str,
    budget: float,
    on_recover: Callable[[float], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> _T:
    """``fn()``, retried with back-off while it raises ``StorageError``, for up to ``budget`` seconds.

    ``NotFoundError`` is an answer, not an outage: it propagates at once.
    ``on_recover(seconds waited)`` runs when the store answers after a wait.
    """
    started: float | None = None
    delay = FIRST_WAIT
    while True:
        try:
            result = fn()
        except storage.NotFoundError:
            raise
        except storage.StorageError as e:
            now = clock()
            started = now if started is None else started
            waited = now - started
            if waited >= budget:
                raise OutageTooLong(
                    f"{what}: the store did not answer for {waited:.0f} s "
                    f"(storage.outageWaitSeconds is {budget:.0f}): {e}"
                ) from e
            pause = min(delay, budget - waited)
            log.warning(
                "storage unavailable while %s (%s); waited %.0f of %.0f s, next try in %.1f s",
                what,
                e,
                waited,
                budget,
                pause,
            )
            sleep(pause)
            delay = min(delay * 2, LONGEST_WAIT)
            continue
        if started is not None:
            waited = clock() - started
            log.info("storage answered again while %s, after %.0f s", what, waited)
            if on_recover is not None:
                on_recover(waited)
        return result


@dataclass(frozen=True)
class Uploaded:
    step: int
    uri: str


_LIVE: weakref.WeakSet[CheckpointUploader] = weakref.WeakSet()


def finish_uploads(budget: float) -> None:
    """Let checkpoint uploads still in flight finish (a run that fails keeps its newest checkpoint)."""
    for uploader in list(_LIVE):
        with contextlib.suppress(RuntimeError):  # the upload itself failed; the run's own error is reported
            uploader.drain(budget)
        uploader.close()


class CheckpointUploader:
    """Uploads local checkpoint folders on one background thread, keeping only the newest one waiting.

    ``upload(local, step)`` returns the checkpoint's URI and raises
    ``StorageError`` when the store is unreachable; the folder is deleted once
    uploaded or replaced by a newer one. Any other error stops the uploader and
    is raised again in the training thread by :meth:`submit` or :meth:`drain`.
    """

    def __init__(
        self,
        upload: Callable[[Path, int], str],
        *,
        first_wait: float = FIRST_WAIT,
        longest_wait: float = LONGEST_WAIT,
    ) -> None:
        self._upload = upload
        self._first_wait = first_wait
        self._longest_wait = longest_wait
        self._cond = threading.Condition()
        self._pending: tuple[Path, int] | None = None
        self._busy = False
        self._closed = False
        self._error: BaseException | None = None
        self.uploaded: Uploaded | None = None
        self.failing_since: float | None = None
        self.last_failure: str | None = None
        self.superseded: list[int] = []
        self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    def submit(self, local: Path, step: int) -> None:
        """Queue ``local`` for upload; a checkpoint still waiting is dropped for it."""
        with self._cond:
            self._raise_error()
            if self._pending is not None:
                self._drop(self._pending)
            self._pending = (local, step)
            self._cond.notify_all()

    def drain(self, budget: float) -> bool:
        """Wait until everything submitted is uploaded; False once the store has failed ``budget`` seconds of the wait.

        Only time without an answer counts: a large upload that is making progress is waited for.
        """
        started = time.monotonic()
        with self._cond:
            while self._pending is not None or self._busy:
                self._raise_error()
                if self.failing_since is None:
                    self._cond.wait(5.0)
                    continue
                failing = time.monotonic() - max(self.failing_since, started)
                if failing >= budget:
                    return False
                self._cond.wait(min(budget - failing, 5.0))
            self._raise_error()
            return True

    def close(self) -> None:
        """Stop the thread once idle (what is still waiting stays on the local disk)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        _LIVE.discard(self)

    @property
    def waiting(self) -> int | None:
        """The step of the checkpoint waiting for the store, if one is."""
        with self._cond:
            return self._pending[1] if self._pending is not None else None

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"checkpoint upload failed: {self._error}") from self._error

    def _drop(self, item: tuple[Path, int]) -> None:
        local, step = item
        log.warning("checkpoint step %d was never uploaded; a newer one replaces it", step)
        self.superseded.append(step)
        shutil.rmtree(local, ignore_errors=True)

    def _take(self) -> tuple[Path, int] | None:
        with self._cond:
            while self._pending is None and not self._closed:
                self._cond.wait()
            item, self._pending = self._pending, None
            self._busy = item is not None
            return item

    def _run(self) -> None:
        delay = self._first_wait
        while (item := self._take()) is not None:
            local, step = item
            try:
                uri = self._upload(local, step)
            except storage.StorageError as e:
                delay = self._failed(item, e, delay)
                continue
            except BaseException as e:  # handed to the training thread
                with self._cond:
                    self._error, self._busy = e, False
                    self._cond.notify_all()
                return
            shutil.rmtree(local, ignore_errors=True)
            with self._cond:
                self.uploaded = Uploaded(step, uri)
                self.failing_since = self.last_failure = None
                self._busy = False
                self._cond.notify_all()
            delay = self._first_wait

    def _failed(self, item: tuple[Path, int], error: Exception, delay: float) -> float:
        """Keep the checkpoint for another try (unless a newer one came), wait, return the next wait."""
        with self._cond:
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            self.last_failure = str(error)
            if self._closed:
                log.warning("checkpoint step %d was not uploaded (%s); it stays on local disk only", item[1], error)
            elif self._pending is None:
                self._pending = item
                log.warning(
                    "checkpoint step %d kept on local disk: the store did not answer (%s); next try in %.0f s",
                    item[1],
                    error,
                    delay,
                )
            else:
                self._drop(item)
            self._busy = False
            self._cond.notify_all()
            # A newer checkpoint does not cut the wait short (the store is still down); closing does.
            end = time.monotonic() + delay
            while not self._closed and (left := end - time.monotonic()) > 0:
                self._cond.wait(left)
        return min(delay * 2, self._longest_wait)
