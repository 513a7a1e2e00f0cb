"""What the end-to-end tests share: waiting, applying and reading objects, the operator process, credentials.

Test modules import from here, never from each other, so any one of them (or any
one test) runs on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kubetune_trainer import storage
from tests.cluster import Cluster
from tests.conftest import ROOT

EXAMPLE = ROOT / "docs" / "examples" / "finetune-support-router.yaml"
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 240, interval: float = 0.25) -> T:
    """Poll ``probe`` until it returns something truthy (returned); fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def example(name: str, **spec_changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"]["name"] = name
    for key, value in spec_changes.items():
        if isinstance(value, dict) and isinstance(doc["spec"].get(key), dict):
            doc["spec"][key] = {**doc["spec"][key], **value}
        else:
            doc["spec"][key] = value
    return doc


def adapter_deployment(
    name: str, adapter: dict[str, Any], *, served: str | None = None, deadline: int = 90
) -> dict[str, Any]:
    """An AdapterDeployment on the tiny base model, served by the reference server (one replica, a canary)."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny-llama/"},
            "adapter": adapter,
            "servedModelName": served or name,
            "runtime": {"type": "kubetune", "replicas": 1},
            "rollout": {"strategy": "Canary", "canary": {"replicas": 1}, "progressDeadlineSeconds": deadline},
        },
    }


def apply(cluster: Cluster, namespace: str, *docs: dict[str, Any]) -> None:
    """``kubectl apply`` of one or more objects, as a user would."""
    # JSON, not YAML: PyYAML writes "3e-3" unquoted, and kubectl reads that back as a number.
    payload = docs[0] if len(docs) == 1 else {"apiVersion": "v1", "kind": "List", "items": list(docs)}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(payload))


def get(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    obj: dict[str, Any] = json.loads(result.stdout)
    return obj


def status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    obj = get(cluster, namespace, "finetune", name) or {}
    found: dict[str, Any] = obj.get("status") or {}
    return found


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == type_), {})


def phase_in(cluster: Cluster, namespace: str, name: str, *phases: str) -> Callable[[], dict[str, Any] | None]:
    def probe() -> dict[str, Any] | None:
        st = status(cluster, namespace, name)
        return st if st.get("phase") in phases else None

    return probe


def jobs(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(cluster.kubectl("get", "jobs", "-n", namespace, "-o", "json").stdout)[
        "items"
    ]
    return items


def pods(cluster: Cluster, namespace: str, job: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", f"batch.kubernetes.io/job-name={job}", "-o", "json")
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return items


def running_pod(cluster: Cluster, namespace: str, job: str) -> str | None:
    for pod in pods(cluster, namespace, job):
        if pod["status"].get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp"):
            return str(pod["metadata"]["name"])
    return None


def s3_settings(cluster: Cluster) -> storage.S3Settings:
    return storage.S3Settings(
        endpoint=cluster.s3.endpoint_url, region=cluster.s3.region, access_key=ACCESS_KEY, secret_key=SECRET_KEY
    )


# Distinctive credentials: the leak test greps ConfigMaps, status, events and logs for them.
# (The loopback S3 server accepts any key.)
ACCESS_KEY = "AKIAKUBETUNETEST0001"
SECRET_KEY = "kt-secret-never-to-be-seen-9f3a7c"


RUNNING: list[Operator] = []


class Operator:
    """``kubetune operator`` as a subprocess against the test cluster; restartable mid-test."""

    def __init__(
        self, cluster: Cluster, workdir: Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None
    ) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.args = list(args)
        self.extra_env = dict(env or {})
        self.log_path = workdir / "operator.log"
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ["PATH"],
            "HOME": str(self.workdir),
            "KUBECONFIG": str(self.cluster.kubeconfig),
            "KUBETUNE_DEFAULT_STORAGE_ENDPOINT": self.cluster.s3.endpoint_url,
            "KUBETUNE_DEFAULT_STORAGE_SECRET": "s3-credentials",
            "KUBETUNE_DEFAULT_OUTPUT_URI": "s3://adapters/",
            "KUBETUNE_TRAINER_IMAGE": "kubetune-trainer:test",
            "KUBETUNE_STATUS_INTERVAL_SECONDS": "1",
            "KUBETUNE_PROGRESS_INTERVAL_SECONDS": "0.5",
            "KUBETUNE_ROLLOUT_INTERVAL_SECONDS": "1",
            "KUBETUNE_METRICS_PORT": str(self.metrics_port),
            "KUBETUNE_HEALTH_PORT": str(self.health_port),
            **self.extra_env,
        }

    def start(self) -> None:
        log = self.log_path.open("ab")
        RUNNING.append(self)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune.cli", "operator", "--log-level", "INFO", *self.args],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the operator never became healthy:\n{self.log()[-4000:]}") from None
                time.sleep(0.2)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self in RUNNING:
            RUNNING.remove(self)
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop(signal.SIGKILL)
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
