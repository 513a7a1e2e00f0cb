"""Progress reporting: ``progress.json`` in the artifact store, and a bar on a terminal.

The operator cannot see into the pod; it reads ``<run>/progress.json`` on a
timer and mirrors it into ``status.progress``. Writes are throttled to one per
``interval`` seconds (plus one at every stage change and at the end) so a
fast loop never hammers the store. A failed write is logged and skipped:
progress is advisory and must never fail a training run. Periodic writes try
once (not the storage call's ~15 s of retries) and, while the store is down,
back off to one try a minute, so an outage barely slows training.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any

from kubetune_trainer import storage
from kubetune_trainer.contract import Progress

log = logging.getLogger(__name__)


class ProgressReporter:
    """Throttled writer of progress.json; also drives a tqdm bar when stderr is a terminal."""

    def __init__(
        self,
        uri: str | None,
        settings: storage.S3Settings | None,
        *,
        interval: float = 5.0,
        bar: bool | None = None,
    ) -> None:
        self.uri = uri
        self.settings = settings
        self.interval = interval
        self.state = Progress()
        self._last_write = 0.0
        self._failures = 0
        self._once = dataclasses.replace(settings, attempts=1) if settings is not None else None
        self._bar: Any = None
        self._want_bar = sys.stderr.isatty() if bar is None else bar

    def stage(self, name: str, message: str = "") -> None:
        self.state.stage = name
        self.state.message = message
        log.info("stage %s %s", name, message)
        self.flush()

    def update(self, **fields: Any) -> None:
        for key, value in fields.items():
            setattr(self.state, key, value)
        if self._want_bar and self.state.total_steps:
            self._update_bar()
        wait = self.interval if not self._failures else min(self.interval * 2**self._failures, 60.0)
        if time.monotonic() - self._last_write >= wait:
            self.flush(once=True)

    def record(self, **point: Any) -> None:
        """Append a point to the loss history kept in progress.json (bounded)."""
        self.state.history.append(point)
        del self.state.history[:-200]

    def _update_bar(self) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.state.total_steps, desc="train", unit="step", dynamic_ncols=True)
        self._bar.n = self.state.step
        postfix = {}
        if self.state.loss is not None:
            postfix["loss"] = f"{self.state.loss:.3f}"
        if self.state.eval_loss is not None:
            postfix["val"] = f"{self.state.eval_loss:.3f}"
        if self.state.tokens_per_second:
            postfix["tok/s"] = f"{self.state.tokens_per_second:.0f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()

    def flush(self, *, once: bool = False) -> None:
        """Write progress.json now (``once``: a single try, for the periodic writes)."""
        self._last_write = time.monotonic()
        if self.uri is None:
            return
        try:
            storage.write_json(self.uri, self.state.as_json(), self._once if once else self.settings)
        except storage.StorageError as e:
            self._failures += 1
            log.warning("could not write progress to %s: %s", self.uri, e)
        else:
            self._failures = 0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.flush()
