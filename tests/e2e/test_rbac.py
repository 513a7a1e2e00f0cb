"""The chart's RBAC, proven on a real API server with RBAC on.

The chart is rendered with ``helm template`` and applied; the operator runs
with a kubeconfig holding only a token of the chart's ServiceAccount, behind a
proxy that records every request. The whole story runs: a templated FineTune
trains and succeeds; a second one (whose artifacts go with it) is created
suspended, survives an operator stopped between creating its Job and writing
its status (the restarted one re-reads and adopts what exists) and resumes;
an AdapterDeployment serves the first adapter and promotes the second through
a canary; both FineTunes are deleted.

Then, from the recorded requests: none was forbidden, and every verb of every
rule in the rendered ClusterRole was used successfully. Removing any one rule
would therefore fail a request the story needs — each rule is needed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import Cluster
from tests.conftest import ROOT
from tests.e2e.helpers import ACCESS_KEY, SECRET_KEY, Operator, apply, example, get, jobs, phase_in, wait_for

RELEASE_NS = "kubetune-system"
SA = "kubetune"


def helm_template(cluster: Cluster) -> list[dict[str, Any]]:
    out = subprocess.run(
        [
            str(cluster.bin_dir / "helm"),
            "template",
            "kubetune",
            str(ROOT / "charts/kubetune"),
            "--namespace",
            RELEASE_NS,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


_PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?:/namespaces/[^/]+)?/(?P<resource>[^/?]+)(?:/(?P<name>[^/?]+))?(?:/(?P<sub>[^/?]+))?"
)


def classify(method: str, path: str, watch: bool) -> tuple[str, str, str] | None:
    """(group, resource[/subresource], verb) of one request, or None for discovery and non-resource paths."""
    match = _PATH.match(path)
    if not match or path.rstrip("/").count("/") < 2:
        return None
    group, resource, name, sub = match["group"] or "", match["resource"], match["name"], match["sub"]
    if sub:
        resource = f"{resource}/{sub}"
    verb = {
        "POST": "create",
        "PATCH": "patch",
        "PUT": "update",
        "DELETE": "delete" if name else "deletecollection",
    }.get(method)
    if method == "GET":
        verb = "get" if name else ("watch" if watch else "list")
    return (group, resource, verb) if verb else None


class ProxiedOperator(Operator):
    """The operator, authenticated only by the ServiceAccount's token, behind a recording proxy."""

    def __init__(self, cluster: Cluster, workdir: Path, token: str) -> None:
        super().__init__(cluster, workdir)
        self.requests = workdir / "requests.jsonl"
        self.proxy = subprocess.Popen(
            [sys.executable, str(ROOT / "bench/_proxy.py"), "--upstream", cluster.server,
             "--ca", str(cluster.control_plane.ca_file), "--log", str(self.requests)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        assert self.proxy.stdout is not None
        port = int(self.proxy.stdout.readline().split()[-1])
        self.kubeconfig = workdir / "sa-kubeconfig"
        self.kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                    "users": [{"name": SA, "user": {"token": token}}],
                    "contexts": [{"name": "c", "context": {"cluster": "c", "user": SA}}],
                    "current-context": "c",
                }
            )
        )

    def env(self) -> dict[str, str]:
        return {**super().env(), "KUBECONFIG": str(self.kubeconfig)}

    def close(self) -> None:
        self.stop()
        os.killpg(self.proxy.pid, signal.SIGTERM)
        try:
            self.proxy.wait(timeout=5)
        except subprocess.TimeoutExpired:  # open watch streams keep it busy; it has recorded everything
            os.killpg(self.proxy.pid, signal.SIGKILL)
            self.proxy.wait()

    def recorded(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.requests.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def chart_operator(
    cluster: Cluster, operator: Operator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxiedOperator]:
    # The suite's admin-token operator would race this one for the same objects: pause it.
    operator.stop()
    cluster.kubectl("create", "namespace", RELEASE_NS, check=False)
    rbac_kinds = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    for doc in helm_template(cluster):
        if doc["kind"] in rbac_kinds:
            cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))
    token = cluster.kubectl("create", "token", SA, "-n", RELEASE_NS, "--duration=2h").stdout.strip()
    op = ProxiedOperator(cluster, tmp_path_factory.mktemp("chart-operator"), token)
    op.start()
    try:
        yield op
    finally:
        op.close()
        operator.start()


def test_happy_path_with_the_charts_service_account_uses_every_rule(
    cluster: Cluster, chart_operator: ProxiedOperator
) -> None:
    ns = f"rbac-{int(time.time()) % 100000}"
    cluster.kubectl("create", "namespace", ns)
    wait_for("the default ServiceAccount", lambda: get(cluster, ns, "serviceaccount", "default"))
    cluster.kubectl(
        "create", "secret", "generic", "s3-credentials", "-n", ns,
        f"--from-literal=AWS_ACCESS_KEY_ID={ACCESS_KEY}", f"--from-literal=AWS_SECRET_ACCESS_KEY={SECRET_KEY}",
    )  # fmt: skip
    template = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneTemplate",
        "metadata": {"name": f"{ns}-defaults"},
        "spec": {"defaults": {"training": {"seed": 42}}, "guardrails": {"maxGpus": 1}},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(template))
    try:
        apply(cluster, ns, example("first", templateRef={"name": template["metadata"]["name"]}))
        second = example("second", training={"seed": 7}, runPolicy={"suspend": True}, output={"retention": "Delete"})
        apply(cluster, ns, second)
        wait_for("the second Job, suspended", lambda: get(cluster, ns, "job", "second-train"))
        wait_for("its status", lambda: (get(cluster, ns, "ft", "second") or {}).get("status", {}).get("jobName"))
        # As if the operator had stopped between creating the Job and writing status: the restarted
        # one re-reads (GET) the Job that exists and adopts it instead of creating a twin.
        chart_operator.stop()
        no_status = ["--subresource=status", "--type=merge", "-p", '{"status":null}']
        cluster.kubectl("patch", "ft", "second", "-n", ns, *no_status)
        chart_operator.start()
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
        cluster.kubectl("delete", "ft", "first", "second", "-n", ns, "--timeout=120s")
        wait_for("the Jobs to go", lambda: get(cluster, ns, "job", "first-train") is None or None, timeout=60)
    finally:
        cluster.kubectl("delete", "finetunetemplate", template["metadata"]["name"], check=False)

    requests = chart_operator.recorded()
    forbidden = [r for r in requests if r["s"] == 403]
    assert not forbidden, f"the chart's RBAC refused: {forbidden[:5]}"
    used = {c for r in requests if r["s"] < 400 or r["s"] in (404, 409) if (c := classify(r["m"], r["p"], r["w"]))}
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
