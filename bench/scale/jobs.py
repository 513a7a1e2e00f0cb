"""Watching the Jobs of a namespace: when each one first appeared."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch as k8s_watch

# ---------------------------------------------------------------------------------------------- watching Jobs


class JobWatch(threading.Thread):
    """Arrival time (monotonic) of the first event of each Job in a namespace."""

    def __init__(self, api: k8s.ApiClient, namespace: str) -> None:
        super().__init__(daemon=True, name="job-watch")
        self.batch = k8s.BatchV1Api(api)
        self.namespace = namespace
        self.first_seen: dict[str, tuple[float, dict[str, Any]]] = {}
        self.events: Counter[str] = Counter()
        self.restarts = 0
        self.error: str | None = None
        self.ready = threading.Event()
        self.changed = threading.Condition()
        self._stopping = threading.Event()
        self._watch: k8s_watch.Watch | None = None

    def run(self) -> None:
        try:
            resource_version = self.batch.list_namespaced_job(self.namespace).metadata.resource_version
            self.ready.set()
            while not self._stopping.is_set():
                self._watch = k8s_watch.Watch()
                stream = self._watch.stream(
                    self.batch.list_namespaced_job,
                    self.namespace,
                    resource_version=resource_version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=60,
                    deserialize=False,
                )
                for event in stream:
                    arrived = time.monotonic()
                    kind, obj = event["type"], event["object"]
                    self.events[kind] += 1
                    if kind == "ERROR":
                        raise RuntimeError(f"watch error: {obj}")
                    resource_version = obj["metadata"]["resourceVersion"]
                    if kind == "BOOKMARK":
                        continue
                    name = obj["metadata"]["name"]
                    if kind in ("ADDED", "MODIFIED") and name not in self.first_seen:
                        with self.changed:
                            self.first_seen[name] = (arrived, obj)
                            self.changed.notify_all()
                self.restarts += 1
        except Exception as e:  # reported in the output: a broken watch makes the latencies meaningless
            if self._stopping.is_set():
                return
            self.error = f"{type(e).__name__}: {e}"
            self.ready.set()
            with self.changed:
                self.changed.notify_all()

    def wait_count(self, count: int, timeout: float, alive: Callable[[], bool]) -> bool:
        """Wait until ``count`` Jobs were seen; False on timeout, a broken watch or ``alive()`` turning False."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.first_seen) < count and self.error is None and alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 1.0))
        return len(self.first_seen) >= count

    def stop(self) -> None:
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()
