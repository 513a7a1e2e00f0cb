"""The CRDs against a real kube-apiserver: install, explain, print, and refuse bad manifests.

Every invalid fixture must be refused by `kubectl apply` with a message that
names the offending field: that message is the whole user experience of a
typo, so the test reads it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster import Cluster

# The bare API: no operator may act on these objects (it would also start real training runs).
# exclusive: the session's operator is stopped for the module (tests/e2e/lanes.py)
pytestmark = [pytest.mark.usefixtures("no_operator"), pytest.mark.exclusive]

ROOT = Path(__file__).resolve().parents[2]
INVALID = sorted((ROOT / "tests" / "fixtures" / "invalid").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.yaml"))


def _expected_field(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# expect:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{path.name} has no '# expect:' line")


def test_crds_are_established_with_status_subresource(cluster: Cluster, crds: None) -> None:
    out = cluster.kubectl("get", "crd", "-l", "app.kubernetes.io/part-of=kubetune", "-o", "json").stdout
    items = {i["metadata"]["name"]: i for i in json.loads(out)["items"]}
    assert set(items) == {
        "finetunes.kubetune.io",
        "adapterdeployments.kubetune.io",
        "finetunetemplates.kubetune.io",
    }
    for name, crd in items.items():
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True", name
        assert conditions.get("NamesAccepted") == "True", name
        assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}


def test_kubectl_explain_prints_field_descriptions(cluster: Cluster, crds: None) -> None:
    # Explain reads the published OpenAPI, which lags CRD creation by a moment.
    deadline = time.monotonic() + 60
    while True:
        result = cluster.kubectl("explain", "finetune.spec.method", check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert result.returncode == 0, result.stderr
    assert "LoRA (low-rank adapters on a frozen base)" in result.stdout
    assert "lora" in result.stdout
    assert "Adapter settings for LoRA, QLoRA and DoRA." in result.stdout
    lora = cluster.kubectl("explain", "finetune.spec.method.lora.rank").stdout
    assert "Rank r of the adapter matrices" in lora


LOCAL_ONLY = "finetune-local.yaml"  # file:// URIs: what `kubetune run` reads on one machine


def test_the_local_example_is_refused_by_a_cluster_naming_kubetune_run(
    cluster: Cluster, crds: None, namespace: str
) -> None:
    result = cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "docs" / "examples" / LOCAL_ONLY), check=False)
    assert result.returncode != 0
    assert "spec.baseModel.uri" in result.stderr
    assert "kubetune run" in result.stderr


@pytest.mark.parametrize("path", [p for p in EXAMPLES if p.name != LOCAL_ONLY], ids=lambda p: p.name)
def test_docs_examples_apply(cluster: Cluster, crds: None, namespace: str, path: Path) -> None:
    kinds = {d["kind"] for d in yaml.safe_load_all(path.read_text(encoding="utf-8"))}
    result = cluster.kubectl("apply", "-n", namespace, "-f", str(path))
    assert "created" in result.stdout
    if "FineTuneTemplate" in kinds:
        cluster.kubectl("delete", "-f", str(path))


def columns(header: str, row: str) -> dict[str, str]:
    """A `kubectl get` row's cells by the header's column offsets (an empty cell stays empty)."""
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    ends = [*starts[1:], None]
    return {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, ends, strict=True)}


def test_get_shows_printer_columns(cluster: Cluster, crds: None, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "docs/examples/finetune-full.yaml"))
    cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "docs/examples/adapterdeployment.yaml"))
    header, row = cluster.kubectl("get", "ft", "-n", namespace).stdout.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "METHOD", "BASE", "PROGRESS", "SCORE", "AGE"]
    # By the header's column offsets: PHASE is empty or whatever the session's operator wrote first.
    cells = columns(header, row)
    assert (cells["NAME"], cells["METHOD"], cells["BASE"]) == ("support-bot-v3", "LoRA", "s3://models/tiny-llama/")
    header = cluster.kubectl("get", "adep", "-n", namespace).stdout.splitlines()[0]
    assert header.split() == ["NAME", "PHASE", "STABLE", "CANARY", "READY", "AGE"]
    wide = cluster.kubectl("get", "ft", "-n", namespace, "-o", "wide").stdout.splitlines()[0]
    assert "MESSAGE" in wide.split()


def test_status_is_a_subresource(cluster: Cluster, crds: None, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "docs/examples/finetune-minimal.yaml"))
    patch = json.dumps({"status": {"phase": "Training", "observedGeneration": 1}})
    # A write to the main resource drops status; only the subresource sets it. (The session's operator may
    # already have written a status of its own, Pending: the patch's phase must not be in it.)
    cluster.kubectl("patch", "ft", "support-bot-v1", "-n", namespace, "--type=merge", "-p", patch)
    dropped = cluster.kubectl("get", "ft", "support-bot-v1", "-n", namespace, "-o", "jsonpath={.status.phase}")
    assert dropped.stdout != "Training", dropped.stdout
    cluster.kubectl(
        "patch", "ft", "support-bot-v1", "-n", namespace, "--subresource=status", "--type=merge", "-p", patch
    )
    phase = cluster.kubectl("get", "ft", "support-bot-v1", "-n", namespace, "-o", "jsonpath={.status.phase}")
    assert phase.stdout == "Training"


def test_suspend_may_change_after_creation(cluster: Cluster, crds: None, namespace: str) -> None:
    doc = yaml.safe_load((ROOT / "docs/examples/finetune-minimal.yaml").read_text(encoding="utf-8"))
    doc["spec"]["runPolicy"] = {"backoffLimit": 2}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
    doc["spec"]["runPolicy"]["suspend"] = True
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
    assert "configured" in result.stdout
    suspended = cluster.kubectl(
        "get", "ft", "support-bot-v1", "-n", namespace, "-o", "jsonpath={.spec.runPolicy.suspend}"
    )
    assert suspended.stdout == "true"


def test_there_are_enough_invalid_fixtures() -> None:
    assert len(INVALID) >= 25


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_manifest_is_rejected_naming_the_field(
    cluster: Cluster, crds: None, namespace: str, path: Path
) -> None:
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    *setup, bad = docs
    for doc in setup:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(bad), check=False)
    if bad["kind"] == "FineTuneTemplate" and result.returncode == 0:
        cluster.kubectl("delete", "finetunetemplate", bad["metadata"]["name"], check=False)
    assert result.returncode != 0, f"{path.name} was accepted:\n{result.stdout}"
    field = _expected_field(path)
    assert field in result.stderr, f"{path.name}: the error does not name {field}:\n{result.stderr}"
