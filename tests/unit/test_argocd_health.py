"""The Argo CD health checks in docs/argocd, executed in a real Lua runtime against their fixtures.

Argo CD runs ``health.lua`` with the object bound to ``obj`` and reads the
returned table; ``health_test.yaml`` lists fixtures and the expected result,
in the layout of Argo CD's bundled resource customizations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import LuaRuntime  # type: ignore[import-untyped]

from tests.conftest import ROOT

CHECKS = sorted((ROOT / "docs" / "argocd").glob("*/*/health.lua"))


def _to_lua(lua: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


def run_check(script: Path, obj: dict[str, Any]) -> dict[str, str]:
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = _to_lua(lua, obj)
    result = lua.execute(script.read_text())
    return {"status": str(result["status"]), "message": str(result["message"])}


def cases() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for script in CHECKS:
        for case in yaml.safe_load((script.parent / "health_test.yaml").read_text())["tests"]:
            out.append((script, case))
    return out


def test_both_kinds_have_checks() -> None:
    assert [p.parent.name for p in CHECKS] == ["AdapterDeployment", "FineTune"]


@pytest.mark.parametrize(
    ("script", "case"), cases(), ids=lambda v: v["inputPath"] if isinstance(v, dict) else v.parent.name
)
def test_health_check(script: Path, case: dict[str, Any]) -> None:
    obj = yaml.safe_load((script.parent / case["inputPath"]).read_text())
    assert run_check(script, obj) == case["healthStatus"]


def test_every_state_is_covered() -> None:
    seen: dict[str, set[str]] = {script.parent.name: set() for script in CHECKS}
    for script, case in cases():
        seen[script.parent.name].add(case["healthStatus"]["status"])
    assert seen["FineTune"] == {"Healthy", "Progressing", "Degraded", "Suspended"}
    assert seen["AdapterDeployment"] == {"Healthy", "Progressing", "Degraded", "Suspended"}
