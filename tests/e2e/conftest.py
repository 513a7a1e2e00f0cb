"""Fixtures of the end-to-end tests that need kubetune's own objects on the cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster
from tests.conftest import SUPPORT_DATA
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


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> None:
    """The generated CRDs, installed and Established."""
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(ROOT / "crds"))


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
