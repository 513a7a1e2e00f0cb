"""The generated CRDs: committed copies are current, and the schemas are structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.crds import KINDS, build_crd, render_crds

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crds_match_the_generator() -> None:
    rendered = render_crds()
    committed = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / "crds").glob("*.yaml")}
    assert sorted(committed) == sorted(rendered), "crds/ has missing or extra files; run `make crds`"
    stale = [name for name, text in rendered.items() if committed[name] != text]
    assert not stale, f"crds/ is stale ({', '.join(stale)}); run `make crds`"


def _walk(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, child in node.get("properties", {}).items():
        found += _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _walk(node["additionalProperties"], f"{path}{{}}")
    return found


@pytest.mark.parametrize("info", KINDS, ids=lambda i: i.kind)
def test_schema_is_structural_and_described(info: Any) -> None:
    crd = build_crd(info)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(schema)
    for forbidden in ("$ref", "nullable", "allOf", "oneOf"):
        assert forbidden not in text
    for path, node in _walk(schema, ""):
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{info.kind}{path}: anyOf is only for int-or-string"
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed, f"{info.kind}{path} has no type"
        if path.startswith((".spec.", ".status.")) and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{info.kind}{path} has no description"
        if node.get("type") == "number":
            raise AssertionError(f"{info.kind}{path} is a float; use a decimal string")


def test_no_defaults_in_template_defaults() -> None:
    crd = build_crd(next(k for k in KINDS if k.kind == "FineTuneTemplate"))
    defaults = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["defaults"]
    assert "default:" not in yaml.safe_dump(defaults)


def test_template_governed_sections_carry_no_schema_defaults() -> None:
    # If the API server filled these in, a FineTuneTemplate's defaults could never apply.
    crd = build_crd(next(k for k in KINDS if k.kind == "FineTune"))
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    for section in ("method", "training", "evaluation", "resources", "output", "storage"):
        assert "default:" not in yaml.safe_dump(spec[section]), section


def test_printer_columns_and_short_names() -> None:
    by_kind = {k.kind: build_crd(k) for k in KINDS}
    ft = by_kind["FineTune"]["spec"]
    assert ft["names"]["shortNames"] == ["ft"]
    assert [c["name"] for c in ft["versions"][0]["additionalPrinterColumns"]][:6] == [
        "Phase",
        "Method",
        "Base",
        "Progress",
        "Score",
        "Age",
    ]
    adep = by_kind["AdapterDeployment"]["spec"]
    assert adep["names"]["shortNames"] == ["adep"]
    assert [c["name"] for c in adep["versions"][0]["additionalPrinterColumns"]][:5] == [
        "Phase",
        "Stable",
        "Canary",
        "Ready",
        "Age",
    ]
    assert by_kind["FineTuneTemplate"]["spec"]["scope"] == "Cluster"


def test_committed_reference_docs_match_the_generator() -> None:
    from kubetune.api.reference import render_references

    for name, text in render_references().items():
        path = ROOT / "docs" / "reference" / name
        assert path.is_file(), f"{path} is missing; run `make docs`"
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale; run `make docs`"
