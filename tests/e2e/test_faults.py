"""Nothing lost under faults: the operator and the trainer against a refusing API server and a failing store.

The operator of this module talks to the API server through a :class:`FaultProxy`
and its FineTunes' default store is another; each test spoils what its failure
mode needs (a refused status write, a store that goes away, pods that vanish, an
operator killed at the worst moment) and asserts the outcome a user can rely on:
the FineTune reaches Succeeded with the adapter it would have had, or a terminal
phase with an actionable reason — never a silent hang, never an empty status.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster
from tests.cluster.faults import FaultProxy, Rule, cluster_kubeconfig
from tests.e2e.helpers import (
    ACCESS_KEY,
    SECRET_KEY,
    HostOperator,
    adapter_deployment,
    apply,
    condition,
    example,
    get,
    jobs,
    phase_in,
    quick,
    running_pod,
    status,
    wait_for,
)

# exclusive: the session's operator is stopped for the module (``faulty`` replaces it; tests/e2e/lanes.py)
pytestmark = pytest.mark.exclusive

SHORT = {"epochs": 2, "checkpointEverySteps": 8}


@pytest.fixture(scope="module")
def api_proxy(cluster: Cluster) -> Iterator[FaultProxy]:
    with FaultProxy(cluster.server, ca=cluster.control_plane.ca_file) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def s3_proxy(cluster: Cluster) -> Iterator[FaultProxy]:
    with FaultProxy(cluster.s3.endpoint_url, host=cluster.s3.host) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def faulty(
    cluster: Cluster,
    crds: None,
    seeded_s3: Cluster,
    no_operator: None,
    api_proxy: FaultProxy,
    s3_proxy: FaultProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[HostOperator]:
    """The operator of this module: the API server and the default store reached through fault proxies."""
    workdir = tmp_path_factory.mktemp("faulty-operator")
    kubeconfig = cluster_kubeconfig(workdir / "kubeconfig", api_proxy.url, cluster.token)
    env = {
        "KUBECONFIG": str(kubeconfig),
        "KUBETUNE_DEFAULT_STORAGE_ENDPOINT": s3_proxy.url,
        "KUBETUNE_ARTIFACT_DELETE_TIMEOUT_SECONDS": "20",
        "KUBETUNE_STALLED_AFTER_SECONDS": "30",
    }
    op = HostOperator(cluster, workdir, env=env)
    op.start()
    try:
        yield op
    finally:
        op.stop()
        api_proxy.clear()
        s3_proxy.clear()


@pytest.fixture
def ns(cluster: Cluster, namespace: str) -> str:
    cluster.kubectl(
        "create", "secret", "generic", "s3-credentials", "-n", namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={ACCESS_KEY}", f"--from-literal=AWS_SECRET_ACCESS_KEY={SECRET_KEY}",
    )  # fmt: skip
    return namespace


def uid_of(cluster: Cluster, ns: str, name: str) -> str:
    return str((get(cluster, ns, "finetune", name) or {})["metadata"]["uid"])


def stored_keys(cluster: Cluster, prefix: str) -> list[str]:
    listed = cluster.s3.client().list_objects_v2(Bucket="adapters", Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


def never_empty(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    """The FineTune's status, asserting it says something: a phase and a message or conditions."""
    st = status(cluster, ns, name)
    assert st.get("phase"), f"{name} has an empty status: {st}"
    return st


# ----------------------------------------------------------------------------- 2: a refused status write


def test_a_status_write_refused_when_the_job_completes_is_retried(
    cluster: Cluster, faulty: HostOperator, api_proxy: FaultProxy, ns: str
) -> None:
    apply(cluster, ns, quick("refused", training=SHORT))
    wait_for("training", phase_in(cluster, ns, "refused", "Training"))
    # From here until the Job is complete, every status write of this FineTune is refused.
    with api_proxy.fault(Rule("refuse", verb="PATCH", path=f"/namespaces/{ns}/finetunes/refused/status", status=500)):
        job = wait_for("the Job to complete", lambda: [
            j for j in jobs(cluster, ns) if any(c["type"] == "Complete" for c in j["status"].get("conditions") or [])
        ], timeout=300)  # fmt: skip
        time.sleep(3)
        assert status(cluster, ns, "refused")["phase"] != "Succeeded"
    assert job
    st = wait_for("Succeeded after the refusals", phase_in(cluster, ns, "refused", "Succeeded", "Failed"), timeout=120)
    assert st["phase"] == "Succeeded", st
    assert st["adapter"]["digest"].startswith("sha256:")
    assert api_proxy.injected["refuse"] > 0


# ----------------------------------------------------------------------------- 3: names


def test_a_long_name_whose_cut_ends_in_a_dash_gets_valid_children_and_a_status(
    cluster: Cluster, faulty: HostOperator, ns: str
) -> None:
    name = "a" * 62 + "-bcdefgh"  # 71 characters; cut at 63 it would end in '-'
    doc = example(name, training={"epochs": 1}, runPolicy={"suspend": True})
    apply(cluster, ns, doc)
    st = wait_for("a status", lambda: (s := status(cluster, ns, name)).get("phase") and s, timeout=60)
    assert st["phase"] == "Suspended", st
    (job,) = jobs(cluster, ns)
    assert job["metadata"]["name"] == st["jobName"]
    assert len(job["metadata"]["name"]) <= 60
    assert all(len(v) <= 63 and v[-1].isalnum() for v in job["metadata"]["labels"].values())


def test_a_multi_node_finetune_gets_a_valid_headless_service(cluster: Cluster, faulty: HostOperator, ns: str) -> None:
    name = "team.a.multi-node-" + "x" * 50
    apply(cluster, ns, example(name, resources={"nodes": 2, "gpus": 0}, runPolicy={"suspend": True}))
    st = wait_for("a status", lambda: (s := status(cluster, ns, name)).get("jobName") and s, timeout=60)
    service = get(cluster, ns, "service", st["jobName"])
    assert service is not None, "no headless Service named like the Job"
    assert service["spec"]["clusterIP"] == "None"
    (job,) = jobs(cluster, ns)
    assert job["spec"]["template"]["spec"]["subdomain"] == st["jobName"]


def test_an_adapterdeployment_named_like_a_domain_gets_a_valid_service(
    cluster: Cluster, faulty: HostOperator, ns: str
) -> None:
    name = "1st.support-bot"  # dots and a leading digit: a fine object name, not a Service name
    apply(cluster, ns, adapter_deployment(name, {"fineTuneRef": {"name": "not-there-yet"}}, served="bot"))
    st = wait_for("a status", lambda: ((get(cluster, ns, "adapterdeployment", name) or {}).get("status") or {})
                  .get("endpoint"), timeout=60)  # fmt: skip
    host = st.removeprefix("http://").split(".")[0]
    assert get(cluster, ns, "service", host) is not None, st
    assert host[0].isalpha()


# ----------------------------------------------------------------------------- 4: the summary is lost


def test_a_completed_job_whose_pods_are_gone_succeeds_from_the_manifest(
    cluster: Cluster, faulty: HostOperator, ns: str
) -> None:
    apply(cluster, ns, quick("podless", training=SHORT))
    wait_for("training", phase_in(cluster, ns, "podless", "Training"))
    faulty.stop()  # the operator is away while the Job ends ...
    try:
        job = wait_for("the Job to complete", lambda: next((
            j for j in jobs(cluster, ns) if any(c["type"] == "Complete" for c in j["status"].get("conditions") or [])
        ), None), timeout=300)  # fmt: skip
        # ... and its pods are gone (pod GC, a node drained) with their termination messages.
        cluster.kubectl("delete", "pods", "-n", ns, "-l", f"batch.kubernetes.io/job-name={job['metadata']['name']}",
                        "--wait=true")  # fmt: skip
    finally:
        faulty.start()
    st = wait_for("Succeeded", phase_in(cluster, ns, "podless", "Succeeded", "Failed"), timeout=120)
    assert st["phase"] == "Succeeded", st
    uid = uid_of(cluster, ns, "podless")
    manifest = json.loads(
        cluster.s3.client().get_object(Bucket="adapters", Key=f"{ns}/podless/{uid}/manifest.json")["Body"].read()
    )
    assert st["adapter"]["digest"] == manifest["artifact"]["digest"]
    assert st["evaluation"]["passed"] is True


# ----------------------------------------------------------------------------- 5: publish fails half-way


def test_a_publish_interrupted_by_the_store_is_finished_with_the_same_adapter(
    cluster: Cluster, faulty: HostOperator, s3_proxy: FaultProxy, ns: str
) -> None:
    # The manifest (written last) cannot be stored: the artifact is up, the run is not published.
    refuse = s3_proxy.add(Rule("refuse", verb="PUT", path=r"/manifest\.json$", status=503, times=40))
    try:
        apply(cluster, ns, quick("publish", training=SHORT))
        wait_for("the manifest refused", lambda: refuse.hits >= 1, timeout=400)
    finally:
        s3_proxy.remove(refuse)
    st = wait_for("the end", phase_in(cluster, ns, "publish", "Succeeded", "Failed"), timeout=400)
    assert st["phase"] == "Succeeded", st
    uid = uid_of(cluster, ns, "publish")
    manifest = json.loads(
        cluster.s3.client().get_object(Bucket="adapters", Key=f"{ns}/publish/{uid}/manifest.json")["Body"].read()
    )
    assert st["adapter"]["digest"] == manifest["artifact"]["digest"]
    keys = stored_keys(cluster, f"{ns}/publish/{uid}/")
    assert len([k for k in keys if k.endswith("adapter_model.safetensors")]) == 1


# ----------------------------------------------------------------------------- 12: a Secret deleted mid-run


@pytest.mark.real_node
def test_a_secret_deleted_mid_run_shows_stalled_with_the_pods_reason_and_recovers(
    cluster: Cluster, faulty: HostOperator, ns: str
) -> None:
    """The replacement pod of a killed trainer cannot start without its Secret (CreateContainerConfigError):
    the FineTune says Stalled with that reason, and goes on from its checkpoint once the Secret is back."""
    apply(cluster, ns, quick("orphaned", training={"epochs": 3, "checkpointEverySteps": 8}))
    st = wait_for("a checkpoint", lambda: (s := status(cluster, ns, "orphaned")).get("checkpoint") and s, timeout=300)
    pod = wait_for("the running pod", lambda: running_pod(cluster, ns, st["jobName"]))
    cluster.kubectl("delete", "secret", "s3-credentials", "-n", ns)
    cluster.kill_container(ns, pod, "trainer")  # the pod fails; the Job's next pod needs the Secret
    # Before the replacement pod shows why it cannot start (the Job controller waits ~10 s to create it),
    # the quiet progress alone may say Stalled (ProgressStale); the pod's own reason then replaces it.
    st = wait_for("Stalled with the pod's reason", lambda: (s := never_empty(cluster, ns, "orphaned"))
                  and condition(s, "Stalled").get("status") == "True"
                  and condition(s, "Stalled").get("reason") != "ProgressStale" and s, timeout=180)  # fmt: skip
    stalled = condition(st, "Stalled")
    assert stalled["reason"] == "CreateContainerConfigError", stalled
    assert 'secret "s3-credentials" not found' in stalled["message"], stalled
    assert st["phase"] == "Training", st  # not failed: it can go on once the Secret is back
    assert "stalled: pod orphaned-train-" in st["message"], st["message"]
    cluster.kubectl(
        "create", "secret", "generic", "s3-credentials", "-n", ns,
        f"--from-literal=AWS_ACCESS_KEY_ID={ACCESS_KEY}", f"--from-literal=AWS_SECRET_ACCESS_KEY={SECRET_KEY}",
    )  # fmt: skip
    st = wait_for("the end", phase_in(cluster, ns, "orphaned", "Succeeded", "Failed"), timeout=400)
    assert st["phase"] == "Succeeded", st
    assert st["progress"]["resumedFromStep"] >= 8
    assert condition(st, "Stalled")["status"] == "False"


# ----------------------------------------------------------------------------- 8: artifacts cannot be deleted


def test_retention_delete_with_the_secret_gone_lets_the_finetune_go_in_bounded_time(
    cluster: Cluster, faulty: HostOperator, ns: str
) -> None:
    apply(cluster, ns, quick("doomed", output={"retention": "Delete"}))
    wait_for("Succeeded", phase_in(cluster, ns, "doomed", "Succeeded", "Failed"), timeout=300)
    uid = uid_of(cluster, ns, "doomed")
    cluster.kubectl("delete", "secret", "s3-credentials", "-n", ns)
    started = time.monotonic()
    cluster.kubectl("delete", "finetune", "doomed", "-n", ns, "--wait=false")
    wait_for("the FineTune to go", lambda: get(cluster, ns, "finetune", "doomed") is None or None, timeout=120)
    assert time.monotonic() - started < 90
    events = json.loads(cluster.kubectl("get", "events", "-n", ns, "-o", "json").stdout)["items"]
    retained = [e for e in events if e.get("reason") == "ArtifactsRetained"]
    assert retained, "no Warning Event said where the artifacts stay"
    assert f"{ns}/doomed/{uid}/" in retained[0]["message"]
    assert stored_keys(cluster, f"{ns}/doomed/{uid}/"), "the artifacts were not kept"


# ----------------------------------------------------------------------------- 14: one tenant's store black-holed


def test_a_black_holed_store_of_one_finetune_does_not_hold_up_another(
    cluster: Cluster, faulty: HostOperator, ns: str
) -> None:
    with FaultProxy(cluster.s3.endpoint_url, host=cluster.s3.host) as hole:
        hole.add(Rule("blackhole", seconds=3600))
        stuck = quick("stuck", training=SHORT, storage={"endpoint": hole.url})
        apply(cluster, ns, stuck)
        apply(cluster, ns, quick("unaffected", training=SHORT))
        st = wait_for("the other FineTune", phase_in(cluster, ns, "unaffected", "Succeeded", "Failed"), timeout=400)
        assert st["phase"] == "Succeeded", st
        assert (st.get("progress") or {}).get("step"), "its progress was not mirrored"
        stuck_status = never_empty(cluster, ns, "stuck")
        assert stuck_status["phase"] in ("Pending", "Preparing", "Training"), stuck_status
        cluster.kubectl("delete", "finetune", "stuck", "-n", ns, "--wait=false")


# ----------------------------------------------------------------------------- 9: a leader that cannot renew


def test_a_leader_whose_renewals_hang_stops_before_the_standby_leads(
    cluster: Cluster, crds: None, no_operator: None, namespace: str, tmp_path: Path
) -> None:
    lease_args = ["--leader-elect", f"--leader-election-namespace={namespace}", "--leader-election-lease-seconds=6"]
    with FaultProxy(cluster.server, ca=cluster.control_plane.ca_file) as hung:
        kubeconfig = cluster_kubeconfig(tmp_path / "kubeconfig", hung.url, cluster.token)
        leader = HostOperator(cluster, tmp_path / "a", args=lease_args, env={"KUBECONFIG": str(kubeconfig)})
        (tmp_path / "a").mkdir()
        leader.start()
        try:
            wait_for("a Lease held by the first replica", lambda: (get(cluster, namespace, "lease",
                     "kubetune-operator") or {}).get("spec", {}).get("holderIdentity"), timeout=60)  # fmt: skip
            hung.add(Rule("blackhole", path="/leases/", seconds=600))
            assert leader.proc is not None
            started = time.monotonic()
            wait_for("the leader to stop", lambda: leader.proc is not None and leader.proc.poll() is not None,
                     timeout=30)  # fmt: skip
            assert time.monotonic() - started < 6 + 3, "it kept leading past the renew deadline"
        finally:
            leader.stop(signal.SIGKILL)


# ----------------------------------------------------------------------------- 6 and 7: serving


def serving_doc(name: str, adapter: dict[str, Any], deadline: int = 120) -> dict[str, Any]:
    return adapter_deployment(name, adapter, served="bot", deadline=deadline)


def adep_status(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    return dict(((get(cluster, ns, "adapterdeployment", name) or {}).get("status")) or {})


def test_a_stable_revision_that_cannot_start_goes_degraded_with_the_reason(
    cluster: Cluster, faulty: HostOperator, ns: str
) -> None:
    missing = {"uri": "s3://adapters/nowhere/adapter/", "digest": "sha256:" + "0" * 64}
    apply(cluster, ns, serving_doc("unservable", missing, deadline=20))
    st = wait_for("Degraded", lambda: (s := adep_status(cluster, ns, "unservable")).get("phase") == "Degraded" and s,
                  timeout=180)  # fmt: skip
    assert condition(st, "Stalled")["reason"] == "StableNotReady"
    assert "revision 1 is not serving" in st["message"]


def test_deleting_a_served_finetune_keeps_the_served_adapter(cluster: Cluster, faulty: HostOperator, ns: str) -> None:
    apply(cluster, ns, quick("served", output={"retention": "Delete"}))
    st = wait_for("Succeeded", phase_in(cluster, ns, "served", "Succeeded", "Failed"), timeout=300)
    assert st["phase"] == "Succeeded", st
    uid = uid_of(cluster, ns, "served")
    apply(cluster, ns, serving_doc("served-bot", {"fineTuneRef": {"name": "served"}}))
    wait_for("a stable revision", lambda: adep_status(cluster, ns, "served-bot").get("stable"), timeout=120)
    cluster.kubectl("delete", "finetune", "served", "-n", ns, "--wait=true", "--timeout=120s")
    keys = stored_keys(cluster, f"{ns}/served/{uid}/")
    assert any("/adapter/" in k for k in keys), keys
    assert any(k.endswith("manifest.json") for k in keys)
    assert not any("/checkpoints/" in k for k in keys), "checkpoints of a deleted FineTune were kept"


def test_an_operator_stopped_mid_promotion_recovers_the_promoted_revision(
    cluster: Cluster, faulty: HostOperator, api_proxy: FaultProxy, ns: str
) -> None:
    for name, seed in (("first", 1), ("second", 2)):
        apply(cluster, ns, quick(name, training={"epochs": 1, "seed": seed}))
    for name in ("first", "second"):
        st = wait_for(f"{name} to finish", phase_in(cluster, ns, name, "Succeeded", "Failed"), timeout=400)
        assert st["phase"] == "Succeeded", st
    apply(cluster, ns, serving_doc("bot", {"fineTuneRef": {"name": "first"}}))
    wait_for("Healthy", lambda: adep_status(cluster, ns, "bot").get("phase") == "Healthy" or None, timeout=240)
    apply(cluster, ns, serving_doc("bot", {"fineTuneRef": {"name": "second"}}))
    wait_for("the canary on record", lambda: adep_status(cluster, ns, "bot").get("canary"), timeout=60)
    # Status writes of the AdapterDeployment are refused from now: the promotion happens, its record does not.
    with api_proxy.fault(Rule("refuse", verb="PATCH", path=f"/namespaces/{ns}/adapterdeployments/bot/status")):
        wait_for("the stable Deployment to serve revision 2", lambda: (
            (get(cluster, ns, "deployment", "bot-stable") or {}).get("metadata", {}).get("annotations", {})
            .get("kubetune.io/revision") == "2" or None), timeout=300)  # fmt: skip
        faulty.stop(signal.SIGKILL)
    faulty.start()
    st = wait_for("Healthy on revision 2", lambda: (
        (s := adep_status(cluster, ns, "bot")).get("phase") == "Healthy"
        and (s.get("stable") or {}).get("revision") == 2 and s), timeout=240)  # fmt: skip
    assert st["stable"]["fineTune"] == "second"
    assert not [h for h in st.get("history") or [] if h["outcome"] == "RolledBack"], st["history"]
