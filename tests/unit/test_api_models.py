"""The pydantic models accept the docs' examples and refuse the invalid fixtures.

``kubetune run`` validates a manifest without an API server, so the models must
refuse what the CRD's schema and CEL rules refuse (transition rules aside).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from kubetune.api import AdapterDeployment, FineTune, FineTuneTemplate

ROOT = Path(__file__).resolve().parents[2]
MODELS: dict[str, type[BaseModel]] = {
    "FineTune": FineTune,
    "AdapterDeployment": AdapterDeployment,
    "FineTuneTemplate": FineTuneTemplate,
}
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "tests" / "fixtures" / "invalid").glob("*.yaml"))


def _expected_field(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# expect:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{path.name} has no '# expect:' line")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        MODELS[doc["kind"]].model_validate(doc)


def test_there_are_enough_invalid_fixtures() -> None:
    assert len(INVALID) >= 25


LOCAL = [p for p in INVALID if "-update-" not in p.name and "-cluster-" not in p.name]
CLUSTER_ONLY = [p for p in INVALID if "-cluster-" in p.name]


@pytest.mark.parametrize("path", CLUSTER_ONLY, ids=lambda p: p.name)
def test_cluster_only_refusals_are_accepted_by_kubetune_run(path: Path) -> None:
    """file:// is refused at admission (pods cannot read the applier's disk) but is what `kubetune run` reads."""
    doc: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    MODELS[doc["kind"]].model_validate(doc)


@pytest.mark.parametrize("path", LOCAL, ids=lambda p: p.name)
def test_invalid_fixture_is_refused_locally(path: Path) -> None:
    doc: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    expected = _expected_field(path).replace("[", ".").replace("]", "")
    with pytest.raises(ValidationError) as caught:
        MODELS[doc["kind"]].model_validate(doc)
    locations = [".".join(str(p) for p in err["loc"]) for err in caught.value.errors()]
    # A model-level rule reports the enclosing object; a field rule the field itself.
    assert any(expected.startswith(loc) or loc.startswith(expected) for loc in locations), (
        f"{path.name}: expected an error at {expected}, got {locations}"
    )


def test_decimal_strings_accept_ints_but_not_floats() -> None:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docs/examples/finetune-minimal.yaml").read_text())
    doc["spec"]["training"] = {"learningRate": 1}
    assert FineTune.model_validate(doc).spec.training is not None
    doc["spec"]["training"] = {"learningRate": 0.5}
    with pytest.raises(ValidationError, match="learningRate"):
        FineTune.model_validate(doc)
