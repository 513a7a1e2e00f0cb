"""Where training runs: across two pods, and when a queue says so.

- Multi-node: a FineTune with ``resources.nodes: 2`` becomes an Indexed Job of two
  pods and a headless Service; rank 1 finds rank 0 by its DNS name through CoreDNS
  (torchrun's rendezvous), and gloo carries the gradients between the pods on CPU.
- Kueue (built from the Go module proxy, installed with upstream's manifests): two
  FineTunes in one LocalQueue whose ClusterQueue has one GPU of quota are admitted by
  Kueue itself, one after the other; the test never touches a Job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from tests.cluster import Cluster
from tests.e2e.helpers import (
    Operator,
    WatchedRun,
    apply,
    condition,
    create_tenant,
    delete_namespace,
    example,
    get,
    jobs,
    phase_in,
    pods,
    quick,
    status,
    wait_for,
)

pytestmark = pytest.mark.real_node

# ----------------------------------------------------------------------------- two pods, one run


@pytest.fixture(scope="module")
def pair(cluster: Cluster, operator: Operator) -> Iterator[str]:
    """The quickstart's FineTune across two pods (the session's ``quickstart`` is the same on one)."""
    ns = create_tenant(cluster, "multi-node")
    apply(cluster, ns, example("two-pods", resources={"nodes": 2}))
    yield ns
    delete_namespace(cluster, ns)


def finished(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    st = wait_for(f"{name} to finish", phase_in(cluster, ns, name, "Succeeded", "Failed"), timeout=600)
    assert st["phase"] == "Succeeded", st
    return st


def test_a_two_node_finetune_trains_across_two_pods_found_by_dns(cluster: Cluster, pair: str) -> None:
    ns = pair
    st = finished(cluster, ns, "two-pods")
    job = get(cluster, ns, "job", st["jobName"])
    assert job is not None
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 2, 2)
    service = get(cluster, ns, "service", st["jobName"])
    assert service is not None
    assert service["spec"]["clusterIP"] == "None"
    index = "batch.kubernetes.io/job-completion-index"
    ranks = sorted(pods(cluster, ns, st["jobName"]), key=lambda p: int(p["metadata"]["labels"][index]))
    assert [p["status"]["phase"] for p in ranks] == ["Succeeded", "Succeeded"]
    assert ranks[0]["status"]["podIP"] != ranks[1]["status"]["podIP"]
    # The only address of rank 0 the pods are given is its name in the headless Service's DNS.
    env = {e["name"]: e.get("value") for e in ranks[1]["spec"]["containers"][0]["env"]}
    assert env["MASTER_ADDR"] == f"{st['jobName']}-0.{st['jobName']}.{ns}.svc"
    logs = [cluster.pod_log(ns, p["metadata"]["name"], "trainer") for p in ranks]
    rank0 = [(int(a), int(b)) for a, b in re.findall(r"kubetune_trainer\.train: step (\d+)/(\d+) loss", logs[0])]
    rank1 = [(int(a), int(b)) for a, b in re.findall(r"kubetune_trainer\.train: rank 1/2 step (\d+)/(\d+) ", logs[1])]
    assert rank0, logs[0][-3000:]
    total = rank0[-1][1]
    # Both ranks trained every step of one world of two, each in its own pod, and said so in its log.
    assert rank0[-1][0] == total, logs[0][-3000:]
    assert rank1, logs[1][-3000:]
    assert rank1[-1] == (total, total), logs[1][-3000:]
    assert "stage publish" in logs[0]
    assert "stage publish" not in logs[1], "only rank 0 publishes"
    assert st["progress"]["percent"] == 100


def test_the_two_node_adapter_is_as_good_as_the_one_pod_adapter(
    cluster: Cluster, pair: str, quickstart: WatchedRun
) -> None:
    one, two = quickstart.finished(cluster), finished(cluster, pair, "two-pods")
    assert one["phase"] == "Succeeded", one
    assert two["evaluation"]["passed"] is True, two["evaluation"]
    assert [g["passed"] for g in two["evaluation"]["gates"]] == [True, True]
    # Without adapter dropout (the example has none) two ranks take the same optimizer steps with the same
    # gradients as one pod, up to the order of float sums: the adapters score alike, and their loss on the
    # held-out responses is the same to a fraction of a percent (measured: equal to 4 digits after 64 steps).
    metrics_one, metrics_two = (s["evaluation"]["metrics"] for s in (one, two))
    examples = 24  # evaluation.maxExamples of the example: one example is 1/24 of the score
    assert abs(float(metrics_two["exact_match"]) - float(metrics_one["exact_match"])) <= 1 / examples, (one, two)
    loss_one, loss_two = float(metrics_one["loss"]), float(metrics_two["loss"])
    assert abs(loss_two - loss_one) <= 0.01 * loss_one, (loss_one, loss_two)


# ----------------------------------------------------------------------------- Kueue


@pytest.fixture(scope="module")
def queue(cluster: Cluster, operator: Operator, kueue_system: None) -> Iterator[str]:
    """A namespace whose LocalQueue ``team`` feeds a ClusterQueue with one GPU of quota."""
    ns = create_tenant(cluster, "queued")
    cluster_queue = f"gpus-{ns}"
    quota = {"cpu": "2", "memory": "16Gi", "nvidia.com/gpu": "1"}
    objects = [
        {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "ResourceFlavor", "metadata": {"name": "default"}},
        {
            "apiVersion": "kueue.x-k8s.io/v1beta1",
            "kind": "ClusterQueue",
            "metadata": {"name": cluster_queue},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                "resourceGroups": [
                    {
                        "coveredResources": list(quota),
                        "flavors": [
                            {"name": "default", "resources": [{"name": k, "nominalQuota": v} for k, v in quota.items()]}
                        ],
                    }
                ],
            },
        },
    ]
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    local = {
        "apiVersion": "kueue.x-k8s.io/v1beta1",
        "kind": "LocalQueue",
        "metadata": {"name": "team"},
        "spec": {"clusterQueue": cluster_queue},
    }
    apply(cluster, ns, local)
    yield ns
    delete_namespace(cluster, ns)
    cluster.kubectl("delete", "clusterqueue", cluster_queue, "--wait=false", check=False)


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@pytest.mark.exclusive  # the node's GPUs to itself (test_node has GPU tests too)
def test_kueue_admits_two_queued_finetunes_one_after_the_other(cluster: Cluster, queue: str) -> None:
    ns = queue
    queued = {"runPolicy": {"queueName": "team"}, "resources": {"gpus": 1}, "training": {"epochs": 2}}
    apply(cluster, ns, *(quick(name, **queued) for name in ("first", "second")))

    def one_trains_one_waits() -> dict[str, dict[str, Any]] | None:
        seen = {name: status(cluster, ns, name) for name in ("first", "second")}
        phases = sorted(s.get("phase", "") for s in seen.values())
        return seen if phases[1] == "Queued" and phases[0] in ("Preparing", "Training", "Evaluating") else None

    seen = wait_for("one FineTune admitted while the other waits in the queue", one_trains_one_waits, timeout=300)
    waiting = next(s for s in seen.values() if s["phase"] == "Queued")
    assert condition(waiting, "Queued")["status"] == "True", waiting
    for name in ("first", "second"):
        st = wait_for(f"{name} to finish", phase_in(cluster, ns, name, "Succeeded", "Failed"), timeout=600)
        assert st["phase"] == "Succeeded", st
        assert condition(st, "Queued")["status"] == "False"
    finished_jobs = sorted(jobs(cluster, ns), key=lambda j: _time(j["status"]["startTime"]))
    assert len(finished_jobs) == 2
    earlier, later = finished_jobs
    # One GPU of quota: Kueue unsuspended the later Job only once the earlier one had completed.
    assert _time(later["status"]["startTime"]) >= _time(earlier["status"]["completionTime"])
    for job in finished_jobs:
        assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    workloads = json.loads(cluster.kubectl("get", "workloads", "-n", ns, "-o", "json").stdout)["items"]
    admitted = {w["metadata"]["ownerReferences"][0]["name"]: w["status"]["admission"] for w in workloads}
    assert set(admitted) == {j["metadata"]["name"] for j in finished_jobs}
    assert {a["clusterQueue"] for a in admitted.values()} == {f"gpus-{ns}"}
