"""Fixtures of the end-to-end tests that need kubetune's own objects on the cluster."""

from __future__ import annotations

import json
import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster
from tests.conftest import SUPPORT_DATA, TEST_NODE, start_session_cluster
from tests.e2e import lanes
from tests.e2e.helpers import (
    ACCESS_KEY,
    FAST_SETTINGS,
    RUNNING,
    SECRET_KEY,
    ChartOperator,
    HostOperator,
    Operator,
    WatchedRun,
    apply,
    create_tenant,
    delete_namespace,
    example,
    image_refs,
)

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- two workers (lanes.py)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "exclusive: stops, restarts or replaces the session's operator; runs alone (tests/e2e/lanes.py)"
    )
    config.addinivalue_line(
        "markers", "standalone: uses neither kubetune's CRDs nor its operator; runs beside any test (lanes.py)"
    )
    lanes.configure_worker(config)


def _parallel_controller(config: pytest.Config) -> bool:
    """The controller of a ``pytest -n N`` run (it runs no test; its workers do)."""
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", 0))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """A parallel run's controller starts the cluster its workers attach to (and stops it at the end)."""
    config = session.config
    if not _parallel_controller(config):
        return
    if TEST_NODE != "real":
        raise pytest.UsageError("the fake-kubelet lane runs on one process: leave out -n")
    if config.getoption("dist") != "loadscope":
        raise pytest.UsageError("the e2e suite on several workers needs --dist loadscope (tests/e2e/lanes.py)")
    factory: pytest.TempPathFactory = config._tmp_path_factory  # type: ignore[attr-defined]
    config.stash[_SHARED] = factory.mktemp("shared")
    config.stash[_CLUSTER] = start_session_cluster(factory.mktemp("cluster"))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """What each worker gets from the controller: the cluster to attach to, the folder they share."""
    config = node.config
    node.workerinput["kubetune_cluster"] = json.dumps(config.stash[_CLUSTER].describe())
    node.workerinput["kubetune_shared"] = str(config.stash[_SHARED])


def pytest_unconfigure(config: pytest.Config) -> None:
    started = config.stash.get(_CLUSTER, None)
    if started is not None:
        started.stop()


_CLUSTER = pytest.StashKey[Cluster]()
_SHARED = pytest.StashKey[Path]()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """On two workers: the modules in ``lanes.ORDER`` (``--dist loadscope`` hands out whole modules)."""
    if lanes.WORKER.shared is not None:
        items[:] = lanes.in_order(items)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    """Hold the suite's lock for the test's whole run (outside its timeout: waiting is not running)."""
    lane = lanes.WORKER.lane
    if lane is None:
        yield
        return
    lane.hold(lanes.mode_of(item))
    try:
        yield
    finally:
        if not lanes.keeps_hold(item, nextitem):
            lane.release()


# ----------------------------------------------------------------------------- kubetune on the cluster


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> None:
    """The generated CRDs, installed and Established."""

    def install() -> dict[str, Any]:
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(ROOT / "crds"))
        return {}

    lanes.once("crds", install)


@pytest.fixture(scope="module")
def no_operator(operator: Operator) -> Iterator[None]:
    """Tests of the bare API (schema, status subresource) run with no operator acting on their objects.

    It asks for the session's operator so that there is one to stop, whichever worker installed it."""
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

    def seed() -> dict[str, Any]:
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
        return {}

    lanes.once("seeded-s3", seed)  # once: a second upload would replace files a trainer may be reading
    return cluster


def chart_values(cluster: Cluster) -> dict[str, Any]:
    """The chart's values for the suite: the built trainer image, the test S3 server, short polls."""
    return {
        "trainerImage": image_refs()["trainer"],
        "defaultOutputUri": "s3://adapters/",
        "storage": {"endpoint": cluster.s3.endpoint_url, "secretName": "s3-credentials"},
        "extraEnv": [{"name": name, "value": value} for name, value in FAST_SETTINGS.items()],
    }


@pytest.fixture(scope="session")
def operator(
    cluster: Cluster, crds: None, seeded_s3: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    """The session's operator: installed with the chart on a real node (once), a local process on the fake one."""
    workdir = tmp_path_factory.mktemp("operator")
    if cluster.node is None:
        host = HostOperator(cluster, workdir)
        host.start()
        try:
            yield host
        finally:
            host.stop()
        return
    chart = ChartOperator(cluster, workdir, image_refs()["operator"], chart_values(cluster))
    if lanes.WORKER.shared is not None:
        # Two workers: installed by the first that asks, never uninstalled (the other may still
        # use it; the controller stops the whole cluster).
        installed = lanes.once("operator", lambda: {"installer": os.getpid(), **chart.install_once()})
        if installed["installer"] != os.getpid():
            chart.attach()
        yield chart
        return
    chart.install()
    try:
        yield chart
    finally:
        chart.uninstall()


@pytest.fixture(scope="session")
def quickstart(cluster: Cluster, operator: Operator) -> Iterator[WatchedRun]:
    """The docs' support-router FineTune, trained once a session (the suite's longest run) and read by
    several modules: its status and log (the FineTune controller), the adapter it serves (the
    AdapterDeployment story, in its namespace), the single-pod run a two-node one must match."""
    if lanes.WORKER.shared is not None:
        # Two workers: started by the first that asks, left for the cluster's end (the other may read it).
        mine: list[WatchedRun] = []

        steps = lanes.WORKER.shared / "quickstart-steps.json"

        def create() -> dict[str, Any]:
            run = WatchedRun(create_tenant(cluster, "quickstart"), "support-router", record=steps)
            apply(cluster, run.ns, example(run.name))
            mine.append(run.start(cluster))
            return {"ns": run.ns, "name": run.name}

        made = lanes.once("quickstart", create)
        yield mine[0] if mine else WatchedRun(made["ns"], made["name"]).follow(steps)
        return
    run = WatchedRun(create_tenant(cluster, "quickstart"), "support-router")
    apply(cluster, run.ns, example(run.name))
    yield run.start(cluster)
    delete_namespace(cluster, run.ns)


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
