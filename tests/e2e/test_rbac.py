"""The chart's RBAC, proven on a real API server with RBAC on, by the operator as the chart installs it.

The session's operator is the chart's (``helm install``: its image, its
ServiceAccount, its ClusterRole); the API server records every request of a
service account in its audit log. The whole story runs: a templated FineTune
trains and succeeds; a second one (whose artifacts go with it) is created
suspended, survives an operator stopped between creating its Job and writing
its status (the restarted one re-reads and adopts what exists) and resumes; an
AdapterDeployment serves the first adapter and promotes the second through a
canary; both FineTunes are deleted.

Then, from the operator's recorded requests: RBAC refused none (no 403), and
every verb of every rule in the rendered ClusterRole was used successfully.
Removing any one rule would therefore fail a request the story needs — each
rule is needed.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
import yaml

from tests.cluster import Cluster
from tests.conftest import ROOT
from tests.e2e.helpers import (
    ChartOperator,
    Operator,
    apply,
    create_tenant,
    delete_namespace,
    get,
    jobs,
    phase_in,
    quick,
    wait_for,
)

# exclusive: it stops the session's operator and reads every request of its ServiceAccount
pytestmark = [pytest.mark.real_node, pytest.mark.exclusive]
SERVICE_ACCOUNT = f"system:serviceaccount:{ChartOperator.NAMESPACE}:{ChartOperator.SERVICE_ACCOUNT}"


def helm_template(cluster: Cluster) -> list[dict[str, Any]]:
    out = subprocess.run(
        [
            str(cluster.bin_dir / "helm"),
            "template",
            ChartOperator.RELEASE,
            str(ROOT / "charts/kubetune"),
            "--namespace",
            ChartOperator.NAMESPACE,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def operator_requests(cluster: Cluster) -> list[dict[str, Any]]:
    """The chart operator's requests (audit events at their last stage), from the API server's audit log."""
    events: dict[str, dict[str, Any]] = {}
    for line in cluster.control_plane.audit_log.read_text().splitlines():
        event = json.loads(line)
        if event["user"]["username"] == SERVICE_ACCOUNT:
            events[event["auditID"]] = event  # ResponseStarted (watches), then ResponseComplete
    return list(events.values())


def rule_of(event: dict[str, Any]) -> tuple[str, str, str] | None:
    """(group, resource[/subresource], verb) of one request, or None for discovery and non-resource paths."""
    ref = event.get("objectRef")
    if not ref or not ref.get("resource"):
        return None
    resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    return ref.get("apiGroup", ""), resource, event["verb"]


def test_happy_path_with_the_charts_service_account_uses_every_rule(cluster: Cluster, operator: Operator) -> None:
    assert isinstance(operator, ChartOperator)
    pod = operator.pod()
    assert pod is not None
    assert pod["spec"]["serviceAccountName"] == ChartOperator.SERVICE_ACCOUNT
    ns = create_tenant(cluster, "rbac")
    template = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneTemplate",
        "metadata": {"name": f"{ns}-defaults"},
        "spec": {"defaults": {"training": {"seed": 42}}, "guardrails": {"maxGpus": 1}},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(template))
    try:
        apply(cluster, ns, quick("first", templateRef={"name": template["metadata"]["name"]}))
        second = quick("second", training={"seed": 7}, runPolicy={"suspend": True}, output={"retention": "Delete"})
        apply(cluster, ns, second)
        wait_for("the second Job, suspended", lambda: get(cluster, ns, "job", "second-train"))
        wait_for("its status", lambda: (get(cluster, ns, "ft", "second") or {}).get("status", {}).get("jobName"))
        # As if the operator had stopped between creating the Job and writing status: the restarted
        # one re-reads (GET) the Job that exists and adopts it instead of creating a twin.
        operator.stop()
        no_status = ["--subresource=status", "--type=merge", "-p", '{"status":null}']
        cluster.kubectl("patch", "ft", "second", "-n", ns, *no_status)
        operator.start()
        wait_for("adoption", lambda: (get(cluster, ns, "ft", "second") or {}).get("status", {}).get("runId"))
        names = [j["metadata"]["name"] for j in jobs(cluster, ns)]
        assert sorted(names) == ["first-train", "second-train"], names
        cluster.kubectl(
            "patch", "ft", "second", "-n", ns, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}'
        )
        for name in ("first", "second"):
            st = wait_for(f"{name} to succeed", phase_in(cluster, ns, name, "Succeeded", "Failed"), timeout=400)
            assert st["phase"] == "Succeeded", st

        deployment = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "AdapterDeployment",
            "metadata": {"name": "bot"},
            "spec": {
                "baseModel": {"uri": "s3://models/tiny-llama/"},
                "adapter": {"fineTuneRef": {"name": "first"}},
                "servedModelName": "bot",
                "runtime": {"type": "kubetune"},
                "rollout": {"strategy": "Canary", "progressDeadlineSeconds": 120},
            },
        }
        apply(cluster, ns, deployment)
        wait_for("Healthy", lambda: (get(cluster, ns, "adep", "bot") or {}).get("status", {}).get("phase") == "Healthy")
        deployment["spec"]["adapter"] = {"fineTuneRef": {"name": "second"}}
        apply(cluster, ns, deployment)
        wait_for(
            "promotion",
            lambda: (
                (s := (get(cluster, ns, "adep", "bot") or {}).get("status", {})).get("phase") == "Healthy"
                and s["stable"]["fineTune"] == "second"
            ),
            timeout=240,
        )
        # OwnerReferencesPermissionEnforcement: a child whose ownerReference blocks its owner's deletion
        # may only be created by who may update the owner's finalizers. The API server checks that in
        # admission (no request of its own in the audit log), so the rule counts as used when children
        # carrying such references were created.
        blocking = {
            ("kubetune.io", f"{ref['kind'].lower()}s/finalizers", "update")
            for kind in ("jobs", "deployments")
            for child in json.loads(cluster.kubectl("get", kind, "-n", ns, "-o", "json").stdout)["items"]
            for ref in child["metadata"].get("ownerReferences") or []
            if ref.get("blockOwnerDeletion") and ref["apiVersion"].startswith("kubetune.io/")
        }
        cluster.kubectl("delete", "ft", "first", "second", "-n", ns, "--timeout=120s")
        wait_for("the Jobs to go", lambda: get(cluster, ns, "job", "first-train") is None or None, timeout=60)
    finally:
        cluster.kubectl("delete", "finetunetemplate", template["metadata"]["name"], check=False)

    requests = operator_requests(cluster)
    assert requests, "the audit log recorded nothing of the operator's"
    refused = [e for e in requests if e.get("annotations", {}).get("authorization.k8s.io/decision") == "forbid"]
    assert not refused, f"the chart's RBAC refused: {[(rule_of(e), e['requestURI']) for e in refused[:5]]}"
    in_story = [e for e in requests if (e.get("objectRef") or {}).get("namespace") == ns]
    assert not [e for e in in_story if e["responseStatus"]["code"] == 403], "a request of the story was forbidden"
    used = {rule for e in requests if (code := e["responseStatus"]["code"]) < 400 or code in (404, 409)
            if (rule := rule_of(e))} | blocking  # fmt: skip
    (role,) = [d for d in helm_template(cluster) if d["kind"] == "ClusterRole"]
    unused = [
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        if (group, resource, verb) not in used
    ]
    assert not unused, f"rules the operator never used (not needed, or the story misses a path): {unused}"
    delete_namespace(cluster, ns)
