"""Every manifest in the docs is real: it parses, and kubetune's are accepted by the API server.

YAML blocks in ``docs/**/*.md`` and the manifests in ``docs/examples`` and
``docs/gitops`` are applied with ``--dry-run=server`` against the test
control plane (schema, CEL rules, defaulting — everything but storage).
Argo CD's own kinds are only parsed: their CRDs are not installed here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import Cluster
from tests.conftest import ROOT

BLOCK = re.compile(r"```yaml\n(.*?)```", re.DOTALL)


def manifests() -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    for md in [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]:
        for i, block in enumerate(BLOCK.findall(md.read_text(encoding="utf-8"))):
            for doc in yaml.safe_load_all(block):
                if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                    found.append((f"{md.relative_to(ROOT)}#{i}", doc))
    for path in sorted((ROOT / "docs" / "examples").glob("*.yaml")) + sorted((ROOT / "docs" / "gitops").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            found.append((str(path.relative_to(ROOT)), doc))
    return found


def test_the_docs_hold_manifests() -> None:
    kinds = {doc["kind"] for _, doc in manifests()}
    assert {"FineTune", "AdapterDeployment", "FineTuneTemplate", "Application", "ConfigMap"} <= kinds


@pytest.mark.parametrize(("where", "doc"), manifests(), ids=lambda v: v if isinstance(v, str) else v.get("kind", "?"))
def test_manifest_is_accepted(cluster: Cluster, crds: None, namespace: str, where: str, doc: dict[str, Any]) -> None:
    if doc["apiVersion"].startswith("argoproj.io/"):
        assert doc["spec"]["destination"]["namespace"], where
        return
    target = [] if doc["kind"] == "FineTuneTemplate" else ["-n", namespace]
    if doc["kind"] == "ConfigMap" and doc["metadata"].get("namespace"):
        doc = {**doc, "metadata": {**doc["metadata"], "namespace": namespace}}
    result = cluster.kubectl("apply", "--dry-run=server", *target, "-f", "-", input=json.dumps(doc), check=False)
    if where.endswith("finetune-local.yaml"):  # file:// URIs are for `kubetune run`, refused by a cluster
        assert result.returncode != 0
        assert "kubetune run" in result.stderr, f"{where}: {result.stderr}"
        return
    assert result.returncode == 0, f"{where}: {result.stderr}"


def test_health_checks_shipped_for_argocd_match_the_tested_ones() -> None:
    checks = {p.parent.name for p in (ROOT / "docs" / "argocd").glob("*/*/health.lua")}
    text = (ROOT / "docs" / "gitops" / "README.md").read_text(encoding="utf-8")
    for kind in checks:
        assert f"resource.customizations.health.kubetune.io_{kind}" in text
        assert f"docs/argocd/kubetune.io/{kind}/health.lua" in text
    assert Path(ROOT / "docs" / "argocd" / "kubetune.io").is_dir()
