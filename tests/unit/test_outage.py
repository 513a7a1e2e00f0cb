"""Storage outages, without a store: waiting them out with back-off, and background checkpoint uploads.

The waits run against a fake clock; the uploader runs its real thread against
an upload function that fails while ``Store.down`` is set. What the same
code does against a real S3 server going down is in tests/e2e/test_trainer_storage.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kubetune_trainer import outage, storage


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def flaky(failures: int, error: Exception | None = None) -> tuple[list[int], Callable[[], str]]:
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise error or storage.StorageError("s3://b/k: gave up after 6 attempts: 503 SlowDown")
        return "ok"

    return calls, fn


@pytest.mark.parametrize(
    ("failures", "budget", "outcome", "sleeps"),
    [
        (0, 600, "ok", []),
        (3, 600, "ok", [1.0, 2.0, 4.0]),
        (7, 600, "ok", [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]),  # waits double up to 30 s
        (100, 10, "too long", [1.0, 2.0, 4.0, 3.0]),  # the last wait ends exactly at the budget
        (1, 0, "too long", []),  # no waiting at all
    ],
)
def test_ride_out_waits_with_backoff_within_the_budget(
    failures: int, budget: float, outcome: str, sleeps: list[float]
) -> None:
    clock = FakeClock()
    calls, fn = flaky(failures)
    recovered: list[float] = []
    if outcome == "ok":
        result = outage.ride_out(
            fn, what="x", budget=budget, clock=clock, sleep=clock.sleep, on_recover=recovered.append
        )
        assert result == "ok"
        assert len(calls) == failures + 1
        assert recovered == ([sum(sleeps)] if failures else [])
    else:
        with pytest.raises(outage.OutageTooLong, match=rf"x: the store did not answer for {budget} s"):
            outage.ride_out(fn, what="x", budget=budget, clock=clock, sleep=clock.sleep)
    assert clock.sleeps == sleeps


def test_ride_out_is_a_storage_error_so_the_run_exits_storage_unavailable() -> None:
    assert issubclass(outage.OutageTooLong, storage.StorageError)


@pytest.mark.parametrize("error", [storage.NotFoundError("gone"), storage.WriteOnceError("differs"), ValueError("x")])
def test_ride_out_does_not_wait_on_answers(error: Exception) -> None:
    clock = FakeClock()
    calls, fn = flaky(1, error)
    with pytest.raises(type(error)):
        outage.ride_out(fn, what="x", budget=600, clock=clock, sleep=clock.sleep)
    assert len(calls) == 1
    assert clock.sleeps == []


class Store:
    """Where the uploader puts checkpoints; ``down`` makes every upload fail like an unreachable S3."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.uploaded: list[int] = []
        self.failed: list[int] = []

    def upload(self, local: Path, step: int) -> str:
        assert local.is_dir(), "the local checkpoint was deleted before it was uploaded"
        if self.down.is_set():
            self.failed.append(step)
            raise storage.StorageError(f"step {step}: connection refused")
        self.uploaded.append(step)
        return f"s3://b/checkpoints/step-{step}"


def checkpoint(tmp_path: Path, step: int) -> Path:
    local = tmp_path / f"step-{step}"
    local.mkdir()
    (local / "weights.safetensors").write_bytes(b"w" * step)
    return local


def test_uploader_keeps_the_newest_checkpoint_through_an_outage(tmp_path: Path) -> None:
    store = Store()
    uploader = outage.CheckpointUploader(store.upload, first_wait=0.05, longest_wait=0.2)
    uploader.submit(checkpoint(tmp_path, 10), 10)
    assert uploader.drain(5)
    assert uploader.uploaded == outage.Uploaded(10, "s3://b/checkpoints/step-10")
    assert not (tmp_path / "step-10").exists(), "an uploaded checkpoint stays on local disk"

    store.down.set()
    uploader.submit(checkpoint(tmp_path, 20), 20)
    deadline = time.monotonic() + 5
    while len(store.failed) < 2:  # retried while down
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert uploader.failing_since is not None
    assert uploader.waiting == 20
    uploader.submit(checkpoint(tmp_path, 30), 30)  # training went on; the newer one replaces step 20
    assert not uploader.drain(0.3), "drain returned while the store was down"
    assert uploader.superseded == [20]
    assert not (tmp_path / "step-20").exists()
    assert (tmp_path / "step-30").is_dir()

    store.down.clear()
    assert uploader.drain(5)
    assert store.uploaded == [10, 30]
    assert uploader.uploaded == outage.Uploaded(30, "s3://b/checkpoints/step-30")
    assert uploader.failing_since is None
    assert not (tmp_path / "step-30").exists()
    uploader.close()


def test_uploader_drain_counts_only_time_without_an_answer(tmp_path: Path) -> None:
    started = threading.Event()

    def slow_upload(local: Path, step: int) -> str:
        started.set()
        time.sleep(0.5)  # a large upload making progress
        return "s3://b/x"

    uploader = outage.CheckpointUploader(slow_upload)
    uploader.submit(checkpoint(tmp_path, 1), 1)
    assert started.wait(5)
    assert uploader.drain(0.01), "a slow upload with the store up is not an outage"
    uploader.close()


def test_uploader_hands_other_errors_to_the_training_thread(tmp_path: Path) -> None:
    def broken(local: Path, step: int) -> str:
        raise OSError(28, "No space left on device")

    uploader = outage.CheckpointUploader(broken)
    uploader.submit(checkpoint(tmp_path, 1), 1)
    with pytest.raises(RuntimeError, match=r"checkpoint upload failed: .*No space left"):
        uploader.drain(5)
    with pytest.raises(RuntimeError, match="No space left"):
        uploader.submit(checkpoint(tmp_path, 2), 2)
