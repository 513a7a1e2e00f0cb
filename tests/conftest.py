"""Shared fixtures: the test cluster (started once per session) and a namespace per test.

Tests under tests/e2e are marked ``e2e`` here, so ``-m "not e2e"`` runs the fast
suite without starting the cluster.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tests.cluster import Cluster, NodeKind
from tests.cluster.s3 import S3Server

E2E_DIR = Path(__file__).parent / "e2e"

# The node behind the session's ``cluster``: "real" (kubelet + containerd running the images
# `make images` builds), or "fake" (tests/cluster/kubelet.py runs pods' commands as local
# processes): a fast lane for changes that need no pod, which no must-show test depends on.
TEST_NODE: NodeKind = "fake" if os.environ.get("KUBETUNE_TEST_NODE", "real") == "fake" else "real"


ROOT = Path(__file__).resolve().parents[1]
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
SUPPORT_DATA = ROOT / "docs" / "examples" / "data" / "support"


def run_trainer(
    config: str, tmp: Path, name: str = "config.json", env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], str]:
    """Run ``kubetune-trainer run`` on a config (JSON text) as a pod would: (exit code, termination summary, output)."""
    path = tmp / name
    path.write_text(config)
    termination = tmp / (name + ".termination")
    command = [sys.executable, "-m", "kubetune_trainer.cli", "run", "--config", str(path)]
    result = subprocess.run(
        [*command, "--termination-log", str(termination)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    summary = json.loads(termination.read_text()) if termination.exists() else {}
    return result.returncode, summary, result.stdout + result.stderr


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_configure(config: pytest.Config) -> None:
    # Here rather than in pyproject.toml: that file is part of the images' build key.
    config.addinivalue_line("markers", "real_node: needs the real node's pods (skipped in the fake-kubelet lane)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (runs on the device machine)")
    fake = pytest.mark.skip(reason="needs the real node (the fast lane KUBETUNE_TEST_NODE=fake runs no images)")
    has_gpu = None
    for item in items:
        if item.path.is_relative_to(E2E_DIR):
            item.add_marker(pytest.mark.e2e)
        if TEST_NODE == "fake" and item.get_closest_marker("real_node") is not None:
            item.add_marker(fake)
        if item.get_closest_marker("gpu") is not None:
            has_gpu = _cuda_available() if has_gpu is None else has_gpu
            if not has_gpu:
                item.add_marker(no_gpu)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, say where the cluster's logs are (pods/, logs/ of the workdir)."""
    report = yield
    funcargs = getattr(item, "funcargs", {})
    cluster = funcargs.get("cluster") or funcargs.get("real_cluster")
    if report.failed and isinstance(cluster, Cluster):
        report.sections.append(
            ("test cluster", f"workdir (component logs in logs/, pod logs in pods/): {cluster.workdir}")
        )
    return report


def start_session_cluster(workdir: Path) -> Cluster:
    """etcd + kube-apiserver + kube-controller-manager + a node (``KUBETUNE_TEST_NODE``) + S3.

    A real node gets the operator and trainer images (built by ``make images``; built here
    if missing) imported into its containerd, unless its kept image store has them already.
    """
    archives = []
    if TEST_NODE == "real":
        from tests.cluster import images

        archives = [built.archive for built in images.build().values()]
    started = Cluster.start(workdir, node=TEST_NODE, images=archives)
    IMPORTED.update(started.imported)
    return started


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The session's cluster (``start_session_cluster``); in a worker of the parallel e2e suite, the
    one the controller started (tests/e2e/lanes.py)."""
    described = getattr(request.config, "workerinput", {}).get("kubetune_cluster")
    if described:
        yield Cluster.attach(json.loads(described))
        return
    started = start_session_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield started
    finally:
        started.stop()


IMPORTED: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How long the session's image imports took (0 s: the node's kept store had them)."""
    if IMPORTED:
        took = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in IMPORTED.items())
        terminalreporter.write_line(f"test node image imports: {took}")


@pytest.fixture(scope="module")
def real_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A cluster with a real node (kubelet, containerd, kube-proxy, CoreDNS).

    The session's ``cluster`` when that runs on a real node; otherwise one for the
    requesting module, stopped at its end (so two control planes never idle side by side).
    """
    if TEST_NODE == "real":
        session_cluster: Cluster = request.getfixturevalue("cluster")
        yield session_cluster
        return
    started = Cluster.start(tmp_path_factory.mktemp("real-cluster"), node="real")
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def kueue_system(real_cluster: Cluster) -> None:
    """Kueue installed on the real node. It stays (its webhooks only act on queued Jobs): a second
    install, by another module on the same cluster, finds everything in place within seconds."""
    from tests.cluster import kueue
    from tests.e2e import lanes

    def install() -> dict[str, Any]:
        kueue.install(real_cluster)
        return {}

    lanes.once("kueue", install)  # by one worker of a parallel run; the other finds it installed


@pytest.fixture(scope="session")
def s3(cluster: Cluster) -> S3Server:
    """The loopback S3 server (moto in server mode) that the cluster fixture runs."""
    return cluster.s3


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama base model, briefly pretrained on the support-ticket corpus (~10 s on 2 cores)."""
    from kubetune_trainer.evaluate import general_text_sample
    from kubetune_trainer.tiny import build_tiny_model, corpus_from_jsonl

    texts = corpus_from_jsonl(SUPPORT_DATA / "train.jsonl") + general_text_sample().split("\n\n")
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), texts, pretrain_steps=200)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test, whose default ServiceAccount exists (pods need it).

    It enforces the restricted Pod Security profile, as a hardened cluster's tenant namespaces do.
    """
    cluster.ensure_running()
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    name = f"{slug[:50].rstrip('-')}-{secrets.token_hex(3)}"
    with cluster.api_client() as api:
        core = k8s.CoreV1Api(api)
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name, labels=RESTRICTED)))
        deadline = time.monotonic() + 30
        while not core.list_namespaced_service_account(name, field_selector="metadata.name=default").items:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the default ServiceAccount of namespace {name} did not appear")
            time.sleep(0.05)
        yield name
        try:
            core.delete_namespace(name, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:  # the test deleted it itself
                raise
