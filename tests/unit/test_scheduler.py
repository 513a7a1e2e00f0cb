"""The controllers' scheduler: keyed delayed work on one thread and a small pool."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest

from kubetune.controllers.scheduler import Scheduler


@pytest.fixture
def scheduler() -> Iterator[Scheduler]:
    s = Scheduler(workers=4)
    s.start()
    yield s
    s.stop()


def wait(event: threading.Event, timeout: float = 5.0) -> None:
    assert event.wait(timeout), "the scheduled work never ran"


def test_runs_after_the_delay(scheduler: Scheduler) -> None:
    done = threading.Event()
    ran_at: list[float] = []
    began = time.monotonic()

    def work() -> None:
        ran_at.append(time.monotonic())
        done.set()

    scheduler.call_later("k", 0.3, work)
    assert scheduler.scheduled("k")
    wait(done)
    assert ran_at[0] - began >= 0.3
    assert not scheduler.scheduled("k")


def test_scheduling_a_key_again_replaces_its_work(scheduler: Scheduler) -> None:
    calls: list[str] = []
    done = threading.Event()
    scheduler.call_later("k", 0.2, lambda: calls.append("first"))
    scheduler.call_later("k", 0.3, lambda: (calls.append("second"), done.set()))
    wait(done)
    time.sleep(0.2)
    assert calls == ["second"]


def test_keep_earlier_keeps_the_earlier_due_time_with_the_new_work(scheduler: Scheduler) -> None:
    calls: list[tuple[str, float]] = []
    done = threading.Event()
    began = time.monotonic()
    scheduler.call_later("k", 0.2, lambda: calls.append(("old", 0)))

    def new() -> None:
        calls.append(("new", time.monotonic() - began))
        done.set()

    scheduler.call_later("k", 5.0, new, keep_earlier=True)
    wait(done)
    assert [c[0] for c in calls] == ["new"]
    assert calls[0][1] < 2.0, "the later due time replaced the earlier one"


def test_cancel(scheduler: Scheduler) -> None:
    calls: list[int] = []
    scheduler.call_later("k", 0.1, lambda: calls.append(1))
    scheduler.cancel("k")
    marker = threading.Event()
    scheduler.call_later("other", 0.3, marker.set)
    wait(marker)
    assert calls == []
    assert len(scheduler) == 0


def test_a_key_never_runs_twice_at_once(scheduler: Scheduler) -> None:
    active = 0
    most = 0
    runs = 0
    lock = threading.Lock()
    finished = threading.Event()

    def work() -> None:
        nonlocal active, most, runs
        with lock:
            active += 1
            most = max(most, active)
        time.sleep(0.3)
        with lock:
            active -= 1
            runs += 1
            if runs == 2:
                finished.set()

    scheduler.call_later("k", 0.0, work)
    time.sleep(0.1)  # the first run is under way
    scheduler.call_later("k", 0.0, work)  # due at once, but waits for the first to end
    wait(finished)
    assert most == 1
    assert runs == 2


def test_independent_keys_run_in_parallel(scheduler: Scheduler) -> None:
    barrier = threading.Barrier(3, timeout=5)
    done = threading.Event()
    count = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal count
        barrier.wait()  # only passes if three runs are under way at the same time
        with lock:
            count += 1
            if count == 3:
                done.set()

    for key in ("a", "b", "c"):
        scheduler.call_later(key, 0.0, work)
    wait(done)


def test_work_that_raises_is_logged_and_the_scheduler_goes_on(
    scheduler: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> None:
        raise RuntimeError("boom")

    done = threading.Event()
    scheduler.call_later("bad", 0.0, boom)
    scheduler.call_later("good", 0.2, done.set)
    wait(done)
    assert "scheduled work 'bad' failed" in caplog.text


def test_work_can_reschedule_itself(scheduler: Scheduler) -> None:
    ticks: list[float] = []
    done = threading.Event()

    def tick() -> None:
        ticks.append(time.monotonic())
        if len(ticks) < 3:
            scheduler.call_later("poll", 0.1, tick)
        else:
            done.set()

    scheduler.call_later("poll", 0.0, tick)
    wait(done)
    assert len(ticks) == 3
    assert all(b - a >= 0.1 for a, b in itertools.pairwise(ticks))


def test_stop_drops_pending_work() -> None:
    s = Scheduler()
    s.start()
    calls: list[int] = []
    s.call_later("k", 0.3, lambda: calls.append(1))
    s.stop()
    time.sleep(0.5)
    assert calls == []
