"""Several operator replicas: one leads through a Lease, the others stand by and take over.

The session's operator is paused for this module (``no_operator``): only the
replicas started here act. FineTunes are created suspended, so their Jobs
prove which replica reconciled without running a trainer.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster
from tests.e2e.helpers import HostOperator, apply, example, get, jobs, status, wait_for

LEASE = "kubetune-operator"
pytestmark = [pytest.mark.usefixtures("crds", "seeded_s3", "no_operator"), pytest.mark.exclusive]


def lease(cluster: Cluster, namespace: str) -> dict[str, Any] | None:
    found = get(cluster, namespace, "lease", LEASE)
    if found is None:
        return None
    spec: dict[str, Any] = found["spec"]
    return spec


def holder(cluster: Cluster, namespace: str) -> str:
    return str((lease(cluster, namespace) or {}).get("holderIdentity") or "")


def replica(cluster: Cluster, workdir: Path, name: str, namespace: str) -> HostOperator:
    workdir.mkdir()
    return HostOperator(
        cluster,
        workdir,
        args=["--leader-elect", "--leader-election-namespace", namespace, "--leader-election-lease-seconds", "3"],
        env={"POD_NAME": name},
    )


def healthz(op: HostOperator) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{op.health_port}/healthz", timeout=5) as response:
        body: dict[str, Any] = json.loads(response.read() or b"{}")
        return body


def suspended_finetune(name: str) -> dict[str, Any]:
    return example(name, runPolicy={"suspend": True}, training={"epochs": 1})


def test_one_replica_leads_and_a_standby_takes_over(cluster: Cluster, tenant: str, tmp_path: Path) -> None:
    ns = tenant
    a = replica(cluster, tmp_path / "a", "replica-a", ns)
    b = replica(cluster, tmp_path / "b", "replica-b", ns)
    a.start()
    try:
        wait_for("replica-a to lead", lambda: holder(cluster, ns).startswith("replica-a_"), timeout=30)
        b.start()  # healthy while it stands by
        assert healthz(b) == {"standby": True}
        wait_for("replica-b to stand by", lambda: "standing by" in b.log(), timeout=30)

        apply(cluster, ns, suspended_finetune("first"))
        wait_for("the first Job", lambda: [j for j in jobs(cluster, ns) if j["metadata"]["name"] == "first-train"])
        wait_for("Suspended", lambda: status(cluster, ns, "first").get("phase") == "Suspended")
        time.sleep(1)
        assert "first: created Job" in a.log()
        assert "created Job" not in b.log(), "the standby reconciled"
        transitions = int((lease(cluster, ns) or {}).get("leaseTransitions") or 0)

        a.stop(signal.SIGKILL)  # no clean release: replica-b waits out the Lease
        killed = time.monotonic()
        apply(cluster, ns, suspended_finetune("second"))
        wait_for("replica-b to lead", lambda: holder(cluster, ns).startswith("replica-b_"), timeout=30)
        took_over = time.monotonic() - killed
        wait_for("the second Job", lambda: [j for j in jobs(cluster, ns) if j["metadata"]["name"] == "second-train"])
        assert "second: created Job" in b.log()
        assert int((lease(cluster, ns) or {}).get("leaseTransitions") or 0) == transitions + 1
        assert 1.5 <= took_over <= 20.0, f"took over after {took_over:.1f}s with a 3 s Lease"
        wait_for("b's own /healthz", lambda: healthz(b) != {"standby": True}, timeout=30)

        b.stop(signal.SIGTERM)  # a clean stop hands the Lease back
        assert holder(cluster, ns) == ""
        assert "released the Lease" in b.log()
    finally:
        a.stop()
        b.stop()
