"""CustomResourceDefinitions of the kubetune.io API, built from the models.

``kubetune crds`` writes these to ``crds/``; a unit test fails when the
committed files differ, so the YAML users install can never drift from the
code that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from kubetune.api.adapterdeployment import AdapterDeployment
from kubetune.api.finetune import FineTune
from kubetune.api.schema import Schema, schema_for
from kubetune.api.template import FineTuneTemplate
from kubetune.api.types import API_GROUP, API_VERSION


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: Literal["string", "integer", "number", "boolean", "date"] = "string"
    description: str = ""
    priority: int = 0


@dataclass(frozen=True)
class KindInfo:
    model: type[BaseModel]
    kind: str
    plural: str
    singular: str
    scope: Literal["Namespaced", "Cluster"]
    short_names: tuple[str, ...]
    columns: tuple[PrinterColumn, ...]


_AGE = PrinterColumn("Age", ".metadata.creationTimestamp", "date")

KINDS: tuple[KindInfo, ...] = (
    KindInfo(
        model=FineTune,
        kind="FineTune",
        plural="finetunes",
        singular="finetune",
        scope="Namespaced",
        short_names=("ft",),
        columns=(
            PrinterColumn("Phase", ".status.phase", description="Lifecycle phase"),
            PrinterColumn("Method", ".spec.method.type", description="LoRA, QLoRA, DoRA or Full"),
            PrinterColumn("Base", ".spec.baseModel.uri", description="Base model"),
            PrinterColumn("Progress", ".status.progress.percent", "integer", "Percent of training steps done"),
            PrinterColumn("Score", ".status.evaluation.score", description="Primary eval metric"),
            _AGE,
            PrinterColumn("Message", ".status.message", priority=1),
        ),
    ),
    KindInfo(
        model=AdapterDeployment,
        kind="AdapterDeployment",
        plural="adapterdeployments",
        singular="adapterdeployment",
        scope="Namespaced",
        short_names=("adep",),
        columns=(
            PrinterColumn("Phase", ".status.phase", description="Healthy, Progressing, Paused or Degraded"),
            PrinterColumn("Stable", ".status.stable.fineTune", description="FineTune of the stable revision"),
            PrinterColumn("Canary", ".status.canary.fineTune", description="FineTune of the canary revision"),
            PrinterColumn("Ready", ".status.readyReplicas", "integer", "Ready pods of the stable revision"),
            _AGE,
            PrinterColumn("Model", ".spec.servedModelName", priority=1),
        ),
    ),
    KindInfo(
        model=FineTuneTemplate,
        kind="FineTuneTemplate",
        plural="finetunetemplates",
        singular="finetunetemplate",
        scope="Cluster",
        short_names=("ftt",),
        columns=(_AGE,),
    ),
)


def _root_schema(info: KindInfo) -> Schema:
    schema = schema_for(info.model)
    props = schema["properties"]
    props["apiVersion"] = {
        "type": "string",
        "description": "APIVersion defines the versioned schema of this representation of an object.",
    }
    props["kind"] = {
        "type": "string",
        "description": "Kind is a string value representing the REST resource.",
    }
    props["metadata"] = {"type": "object"}
    schema["required"] = ["spec"]
    return schema


def build_crd(info: KindInfo) -> dict[str, Any]:
    """The CRD manifest of one kind."""
    columns = []
    for c in info.columns:
        col: dict[str, Any] = {"name": c.name, "type": c.type, "jsonPath": c.json_path}
        if c.description:
            col["description"] = c.description
        if c.priority:
            col["priority"] = c.priority
        columns.append(col)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{info.plural}.{API_GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.singular,
                "shortNames": list(info.short_names),
                "categories": ["kubetune"],
            },
            "scope": info.scope,
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": _root_schema(info)},
                }
            ],
        },
    }


def render_crds() -> dict[str, str]:
    """File name -> YAML text of every CRD, as ``crds/`` should hold them."""
    header = "# Generated by `kubetune crds` from kubetune.api; do not edit.\n"
    return {
        f"{API_GROUP}_{info.plural}.yaml": header
        + yaml.safe_dump(build_crd(info), sort_keys=False, width=100, allow_unicode=True)
        for info in KINDS
    }
