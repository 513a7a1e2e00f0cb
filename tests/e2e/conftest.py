"""Fixtures of the end-to-end tests that need kubetune's own objects on the cluster."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.conftest import SUPPORT_DATA

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> None:
    """The generated CRDs, installed and Established."""
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(ROOT / "crds"))


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


@pytest.fixture(scope="module")
def no_operator() -> Iterator[None]:
    """Tests of the bare API (schema, status subresource) run with no operator acting on their objects."""
    paused = list(RUNNING)
    for op in paused:
        op.stop()
    yield
    for op in paused:
        op.start()


@pytest.fixture(scope="session")
def seeded_s3(cluster: Cluster, tiny_model: Path) -> Cluster:
    """Buckets models/, datasets/ and adapters/ with the tiny model and the support-ticket data."""
    from kubetune_trainer import storage

    s3 = cluster.s3
    for bucket in ("models", "datasets", "adapters"):
        s3.create_bucket(bucket)
    client = s3.client()
    for path in sorted(tiny_model.iterdir()):
        client.upload_file(
            str(path),
            "models",
            f"tiny-llama/{path.name}",
            ExtraArgs={"Metadata": {"sha256": storage.sha256_file(path)}},
        )
    for name in ("train.jsonl", "val.jsonl", "heldout.jsonl"):
        client.upload_file(str(SUPPORT_DATA / name), "datasets", f"support/{name}")
    return cluster


@pytest.fixture(scope="session")
def operator(
    cluster: Cluster, crds: None, seeded_s3: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    op = Operator(cluster, tmp_path_factory.mktemp("operator"))
    op.start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture
def tenant(cluster: Cluster, namespace: str) -> str:
    """A namespace with the storage credentials Secret the operator's defaults name."""
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "s3-credentials",
        "-n",
        namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={ACCESS_KEY}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={SECRET_KEY}",
    )
    return namespace
