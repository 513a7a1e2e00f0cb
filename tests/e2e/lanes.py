"""The end-to-end suite on two workers (pytest-xdist) against one cluster.

``make test-e2e`` runs ``pytest -n 2 --dist loadscope --no-loadscope-reorder``. The controller process
starts the cluster once (``start_for_workers``) and stops it after the last
test; each worker attaches to it (``Cluster.attach``). Half of the suite's wall
time is spent waiting (pods starting, probes, backoffs, a Job's next pod), so a
second test running meanwhile uses CPU that would idle.

What runs beside what is decided by markers:

- ``exclusive``: stops, restarts or replaces the session's operator (or needs the
  node's GPUs to itself). It runs alone: no other test runs meanwhile, except
  ``standalone`` ones.
- ``standalone``: uses neither kubetune's CRDs nor its operator (the node, the
  trainer against S3). It runs beside anything.
- every other test shares the operator: it runs beside any test that is not
  ``exclusive``.

The rule is a readers-writer lock on a file (``flock``) that each test takes for
its whole run (setup, call, teardown), held across the tests of a module that is
exclusive as a whole (its module fixtures stop the operator). A writer first
takes a turnstile, so that a stream of readers cannot starve it.

``loadscope`` keeps a module's tests on one worker (module fixtures are set up
once), and hands the modules out in ``ORDER``.
Session resources that both workers need (the CRDs, the seeded buckets, the
chart's operator, Kueue, the quickstart FineTune) are made by whichever worker
asks first (``once``); the other finds them made.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

Mode = Literal["exclusive", "shared"]

# The order in which the modules are handed out (xdist gives a worker the next one when it has two
# tests left): the exclusive modules early, beside the standalone ones, which they do not hold up;
# then the modules sharing the operator, the longest first, the SmolLM2 run (CPU-bound) beside the
# AdapterDeployment story (mostly waiting for pods). Measured: docs/testing.md.
ORDER = (
    "test_faults",
    "test_cluster",
    "test_trainer_storage",
    "test_rbac",
    "test_leader_election",
    "test_crds",
    "test_node",
    "test_adapterdeployment_controller",
    "test_pretrained_model",
    "test_finetune_controller",
    "test_scheduling",
    "test_docs",
)


class Lane:
    """This worker's hold on the suite's readers-writer lock."""

    def __init__(self, folder: Path) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self._rw = os.open(folder / "lane.lock", flags, 0o644)
        self._turnstile = os.open(folder / "turnstile.lock", flags, 0o644)
        self.held: Mode | None = None

    def hold(self, mode: Mode | None) -> None:
        """Hold the lock in ``mode`` (None: not at all), waiting as long as it takes."""
        if self.held == mode:
            return
        self.release()
        if mode is None:
            return
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._rw, fcntl.LOCK_EX if mode == "exclusive" else fcntl.LOCK_SH)
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        self.held = mode

    def release(self) -> None:
        if self.held is not None:
            fcntl.flock(self._rw, fcntl.LOCK_UN)
            self.held = None


@dataclass
class Worker:
    """This process's part in a parallel run (``configure_worker``); both None in a run on one process."""

    lane: Lane | None = None
    shared: Path | None = None  # the folder the workers share (locks, ``once`` results)


WORKER = Worker()


def configure_worker(config: pytest.Config) -> None:
    folder = getattr(config, "workerinput", {}).get("kubetune_shared")
    if folder:
        WORKER.shared = Path(folder)
        WORKER.lane = Lane(WORKER.shared)


def mode_of(item: pytest.Item) -> Mode | None:
    """The test's own marker, else its module's: ``exclusive``, ``shared`` or None (standalone)."""
    for mark in item.iter_markers():  # the closest first
        if mark.name == "standalone":
            return None
        if mark.name == "exclusive":
            return "exclusive"
    return "shared"


def keeps_hold(item: pytest.Item, nextitem: pytest.Item | None) -> bool:
    """Whether the next test continues this one's exclusive hold (a module exclusive as a whole)."""
    return (
        nextitem is not None
        and mode_of(item) == "exclusive"
        and mode_of(nextitem) == "exclusive"
        and nextitem.module is getattr(item, "module", None)
    )


def in_order(items: list[pytest.Item]) -> list[pytest.Item]:
    """The items, their modules in ``ORDER`` (others after), each module's own order kept."""

    def rank(item: pytest.Item) -> int:
        stem = item.path.stem
        return ORDER.index(stem) if stem in ORDER else len(ORDER)

    return sorted(items, key=rank)


def once(name: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``make()`` in the first worker that asks (the others wait for it and get its result); in a run
    on one process, simply ``make()``. The result is kept as JSON in the run's shared folder."""
    if WORKER.shared is None:
        return make()
    done = WORKER.shared / f"{name}.json"
    lock = os.open(WORKER.shared / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            found: dict[str, Any] = json.loads(done.read_text())
            return found
        made = make()
        done.write_text(json.dumps(made))
        return made
    finally:
        os.close(lock)
