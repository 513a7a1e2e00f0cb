"""The AdapterDeployment controller's methods against an in-memory API: observe, decide, apply, write."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from kubetune.api.adapterdeployment import AdapterDeploymentStatus
from kubetune.builders.settings import OperatorSettings
from kubetune.controllers.adapterdeployment import AdapterDeploymentController
from tests.conftest import ROOT
from tests.unit.fakes import FakeKube, ManualScheduler, api_error

NS = "team-a"
A, B = ("sha256:" + ch * 64 for ch in "ab")


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()


@pytest.fixture
def controller(kube: FakeKube) -> AdapterDeploymentController:
    settings = OperatorSettings(trainer_image="trainer:test", rollout_interval_seconds=2)
    return AdapterDeploymentController(kube, settings, ManualScheduler())


def adapter_deployment(kube: FakeKube, *, online_eval: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docs/examples/adapterdeployment.yaml").read_text())
    doc["metadata"]["namespace"] = NS
    if not online_eval:
        doc["spec"]["rollout"].pop("onlineEval")
    doc["status"] = {}
    return kube.add("adapterdeployments", doc)


def publish(kube: FakeKube, digest: str, score: str = "0.91") -> None:
    kube.objects[("finetunes", NS, "support-bot-v3")] = {
        "metadata": {"name": "support-bot-v3", "namespace": NS, "uid": "ft-uid"},
        "spec": {},
        "status": {
            "phase": "Succeeded",
            "adapter": {"uri": f"s3://adapters/{digest[7:10]}/", "digest": digest, "promotable": True},
            "evaluation": {"metrics": {"exact_match": score}},
        },
    }


def make_available(kube: FakeKube, role: str) -> dict[str, Any]:
    dep = kube.get("Deployment", NS, f"support-bot-{role}")
    assert dep is not None
    n = dep["spec"]["replicas"]
    dep["status"] = {"observedGeneration": dep["metadata"]["generation"], "replicas": n, "updatedReplicas": n,
                     "readyReplicas": n}  # fmt: skip
    return dep


def status(kube: FakeKube) -> dict[str, Any]:
    obj = kube.get("adapterdeployments", NS, "support-bot")
    assert obj is not None
    current: dict[str, Any] = obj["status"]
    AdapterDeploymentStatus.model_validate(current)
    return current


def step(kube: FakeKube, controller: AdapterDeploymentController) -> dict[str, Any]:
    obj = kube.get("adapterdeployments", NS, "support-bot")
    assert obj is not None
    controller.on_event("MODIFIED", obj)
    return status(kube)


def test_first_revision_rolls_out_and_settles(kube: FakeKube, controller: AdapterDeploymentController) -> None:
    adapter_deployment(kube)
    publish(kube, A)
    current = step(kube, controller)
    assert current["phase"] == "Progressing"
    assert current["endpoint"] == "http://support-bot.team-a.svc/v1"
    assert ("create", "Service", "support-bot") in kube.writes
    assert ("create", "Deployment", "support-bot-stable") in kube.writes
    uid = kube.of_kind("adapterdeployments")[0]["metadata"]["uid"]
    scheduler = controller.scheduler
    assert isinstance(scheduler, ManualScheduler)
    assert scheduler.delay(("rollout", uid)) == 2  # in flight: look again
    make_available(kube, "stable")
    scheduler.run(("rollout", uid))
    assert status(kube)["phase"] == "Healthy"
    assert not scheduler.scheduled(("rollout", uid))  # settled: no polling


def test_canary_then_promotion_moves_the_stable_deployment(
    kube: FakeKube, controller: AdapterDeploymentController
) -> None:
    adapter_deployment(kube)
    publish(kube, A)
    step(kube, controller)
    make_available(kube, "stable")
    step(kube, controller)
    publish(kube, B, score="0.93")
    current = step(kube, controller)
    assert current["canary"]["revision"] == 2
    assert kube.get("Deployment", NS, "support-bot-canary") is not None
    make_available(kube, "canary")
    kube.writes.clear()
    current = step(kube, controller)
    assert current["stable"]["revision"] == 2
    assert ("patch", "Deployment", "support-bot-stable") in kube.writes
    assert ("delete", "Deployment", "support-bot-canary") in kube.writes
    stable = kube.get("Deployment", NS, "support-bot-stable")
    assert stable is not None
    assert stable["metadata"]["annotations"]["kubetune.io/revision"] == "2"
    assert [h["outcome"] for h in current["history"][:2]] == ["Promoted", "Superseded"]


def test_failed_online_eval_rolls_back_with_its_message(
    kube: FakeKube, controller: AdapterDeploymentController
) -> None:
    adapter_deployment(kube, online_eval=True)
    publish(kube, A)
    step(kube, controller)
    make_available(kube, "stable")
    step(kube, controller)
    publish(kube, B, score="0.93")
    step(kube, controller)
    make_available(kube, "canary")
    assert step(kube, controller)["phase"] == "Progressing"
    job = kube.get("Job", NS, "support-bot-eval-r2")
    assert job is not None
    job["status"] = {"conditions": [{"type": "Failed", "status": "True", "message": "BackoffLimitExceeded"}]}
    kube.add("Pod", {"metadata": {"name": "e", "namespace": NS, "labels": {"batch.kubernetes.io/job-name":
             "support-bot-eval-r2"}}, "status": {"containerStatuses": [{"name": "eval", "state": {"terminated":
             {"message": "exact_match 0.40 below 0.8", "finishedAt": "2026-11-29T10:00:00Z"}}}]}})  # fmt: skip
    current = step(kube, controller)
    assert current["phase"] == "Degraded"
    assert current["history"][0]["reason"] == "OnlineEvalFailed"
    assert "exact_match 0.40 below 0.8" in current["message"]
    assert kube.get("Deployment", NS, "support-bot-canary") is None
    assert kube.events[-1][:2] == ("Warning", "Degraded")


def test_api_errors_are_retried_with_back_off(kube: FakeKube, controller: AdapterDeploymentController) -> None:
    adapter_deployment(kube)
    publish(kube, A)
    kube.fail("create_or_adopt", api_error(503))
    obj = kube.of_kind("adapterdeployments")[0]
    controller.on_event("ADDED", obj)
    scheduler = controller.scheduler
    assert isinstance(scheduler, ManualScheduler)
    assert scheduler.delay(("rollout", obj["metadata"]["uid"])) == 2
    scheduler.run(("rollout", obj["metadata"]["uid"]))
    assert status(kube)["phase"] == "Progressing"


def test_deleted_adapterdeployment_is_forgotten(kube: FakeKube, controller: AdapterDeploymentController) -> None:
    obj = adapter_deployment(kube)
    controller.on_event("ADDED", obj)
    controller.on_event("DELETED", obj)
    assert not controller.scheduler.scheduled(("rollout", obj["metadata"]["uid"]))
