"""The rollout decider's transition table: (spec, status, what the cluster shows) → (status, actions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml

from kubetune.api import AdapterDeployment
from kubetune.api.adapterdeployment import AdapterDeploymentStatus
from kubetune.builders import adapterdeployment as build
from kubetune.builders import rollout as ro
from kubetune.builders.settings import OperatorSettings
from tests.conftest import ROOT

SETTINGS = OperatorSettings(trainer_image="registry.example/kubetune/trainer:1.0")
NOW = "2026-11-29T12:00:00Z"
A, B, C = ("sha256:" + ch * 64 for ch in "abc")


def ago(seconds: int) -> str:
    return (datetime(2026, 11, 29, 12, tzinfo=UTC) - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def adep(**spec: Any) -> AdapterDeployment:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docs/examples/adapterdeployment.yaml").read_text())
    doc["metadata"].update(namespace="team-a", uid="adep-uid", generation=3)
    doc["spec"]["rollout"].pop("onlineEval")
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(doc["spec"].get(key), dict):
            doc["spec"][key].update(value)
        else:
            doc["spec"][key] = value
    return build.resolved(AdapterDeployment.model_validate(doc), SETTINGS)


ONLINE_EVAL = {"onlineEval": {"dataset": "s3://d/heldout.jsonl", "metric": "exact_match", "min": "0.8"}}


def finetune(digest: str | None = A, phase: str = "Succeeded", score: str = "0.91", **adapter: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "message": "done", "evaluation": {"metrics": {"exact_match": score}}}
    if digest is not None:
        status["adapter"] = {"uri": f"s3://adapters/{digest[7:11]}/", "digest": digest, "promotable": True, **adapter}
    if phase == "Failed":
        status["conditions"] = [{"type": "Ready", "status": "False", "reason": "DataInvalid"}]
    return {"metadata": {"name": "support-bot-v3", "uid": "ft-uid"}, "spec": {}, "status": status}


def revision(number: int, digest: str, score: str = "0.91") -> dict[str, Any]:
    return {
        "revision": number,
        "adapterUri": f"s3://adapters/{digest[7:11]}/",
        "adapterDigest": digest,
        "fineTune": "support-bot-v3",
        "metrics": {"exact_match": score},
        "since": ago(3600),
    }


def deployment(number: int, replicas: int = 2, ready: int | None = None, generation: int = 1) -> dict[str, Any]:
    ready = replicas if ready is None else ready
    return {
        "metadata": {"name": "d", "generation": generation, "annotations": {"kubetune.io/revision": str(number)}},
        "spec": {"replicas": replicas},
        "status": {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": ready, "readyReplicas": ready},
    }


def history(*entries: tuple[int, str, str]) -> list[dict[str, Any]]:
    return [
        {"revision": n, "adapterDigest": d, "outcome": outcome, "reason": "R", "at": ago(7200)}
        for n, d, outcome in entries
    ]


def pod(ip: str = "10.244.0.7", restarts: int = 0) -> dict[str, Any]:
    cs = {"name": "server", "restartCount": restarts, "lastState": {"terminated": {"exitCode": 3, "message": "boom"}}}
    return {"status": {"podIP": ip, "containerStatuses": [cs]}}


def job(outcome: str | None) -> dict[str, Any]:
    conditions = [{"type": outcome, "status": "True"}] if outcome else []
    return {"metadata": {"name": "e"}, "status": {"conditions": conditions}}


@dataclass
class Case:
    name: str
    status: dict[str, Any]
    observed: dict[str, Any]
    phase: str
    actions: list[tuple[Any, ...]]  # (ActionType, role or revision)
    outcomes: list[tuple[str, str]] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)
    expect: dict[str, Any] = field(default_factory=dict)  # status fields that must have these values


SERVING = {"stable": revision(1, A), "history": history((1, A, "Promoted"))}
CANARY = {**SERVING, "canary": revision(2, B), "progressingSince": ago(30)}

CASES = [
    Case("first rollout", {}, {"finetune": finetune(A)}, "Progressing",
         [(ro.ApplyDeployment, "stable", 1)], [("Promoted", "Initial")], expect={"stable.revision": 1}),
    Case("first rollout rejected by its gates", {}, {"finetune": finetune(A, score="0.5")}, "Degraded", [],
         [("Rejected", "EvalGateFailed")], expect={"stable": None}),
    Case("first revision becomes ready", SERVING, {"finetune": finetune(A), "stable": deployment(1)}, "Healthy", []),
    Case("stable scaled to spec.runtime.replicas", SERVING, {"finetune": finetune(A), "stable": deployment(1, 1)},
         "Progressing", [(ro.ScaleDeployment, "stable", 2)]),
    Case("stable Deployment missing is re-created", SERVING, {"finetune": finetune(A)}, "Progressing",
         [(ro.ApplyDeployment, "stable", 1)]),
    Case("waiting for the FineTune", {}, {"finetune": finetune(None, phase="Training")}, "Progressing", []),
    Case("FineTune failed: rejected", SERVING, {"finetune": finetune(None, phase="Failed"), "stable": deployment(1)},
         "Degraded", [], [("Rejected", "DataInvalid")], expect={"stable.revision": 1}),
    Case("canary start", SERVING, {"finetune": finetune(B), "stable": deployment(1)}, "Progressing",
         [(ro.ApplyDeployment, "canary", 2)], expect={"canary.revision": 2}),
    Case("canary not ready yet", CANARY,
         {"finetune": finetune(B), "stable": deployment(1), "canary": deployment(2, 1, ready=0)}, "Progressing", []),
    Case("canary crash loop", CANARY,
         {"finetune": finetune(B), "stable": deployment(1), "canary": deployment(2, 1, ready=0),
          "canary_pods": [pod(restarts=3)]},
         "Degraded", [(ro.DeleteDeployment, "canary")], [("RolledBack", "CanaryCrashLoop")], expect={"canary": None}),
    Case("canary deadline", {**CANARY, "progressingSince": ago(601)},
         {"finetune": finetune(B), "stable": deployment(1), "canary": deployment(2, 1, ready=0)},
         "Degraded", [(ro.DeleteDeployment, "canary")], [("RolledBack", "CanaryNotReady")]),
    Case("canary ready: promote", CANARY,
         {"finetune": finetune(B), "stable": deployment(1), "canary": deployment(2, 1)}, "Progressing",
         [(ro.ApplyDeployment, "stable", 2), (ro.DeleteDeployment, "canary")],
         [("Superseded", "Replaced"), ("Promoted", "CanaryPassed")], expect={"stable.revision": 2, "canary": None}),
    Case("canary ready: online eval starts", CANARY,
         {"finetune": finetune(B), "stable": deployment(1), "canary": deployment(2, 1), "canary_pods": [pod()]},
         "Progressing", [(ro.EnsureEvalJob, 2)], spec={"rollout": ONLINE_EVAL}),
    Case("online eval running", CANARY,
         {"finetune": finetune(B), "stable": deployment(1), "canary": deployment(2, 1), "eval_job": job(None)},
         "Progressing", [], spec={"rollout": ONLINE_EVAL}),
    Case("online eval passed: promote", CANARY,
         {"finetune": finetune(B), "stable": deployment(1), "canary": deployment(2, 1), "eval_job": job("Complete")},
         "Progressing", [(ro.ApplyDeployment, "stable", 2), (ro.DeleteDeployment, "canary")],
         [("Superseded", "Replaced"), ("Promoted", "CanaryPassed")], spec={"rollout": ONLINE_EVAL}),
    Case("online eval failed: roll back", CANARY,
         {"finetune": finetune(B), "stable": deployment(1), "canary": deployment(2, 1), "eval_job": job("Failed"),
          "eval_message": "exact_match 0.42 < 0.8"},
         "Degraded", [(ro.DeleteDeployment, "canary")], [("RolledBack", "OnlineEvalFailed")],
         spec={"rollout": ONLINE_EVAL}, expect={"message~": "exact_match 0.42 < 0.8"}),
    Case("rejected by gates against stable", SERVING, {"finetune": finetune(B, score="0.85"), "stable": deployment(1)},
         "Degraded", [], [("Rejected", "EvalGateFailed")], expect={"stable.revision": 1}),
    Case("rolled back before: stays Degraded",
         {**SERVING, "history": history((2, B, "RolledBack"), (1, A, "Promoted"))},
         {"finetune": finetune(B), "stable": deployment(1)}, "Degraded", []),
    Case("revert to a served digest", {"stable": revision(2, B), "history": history((2, B, "Promoted"),
         (1, A, "Superseded"))}, {"finetune": finetune(A), "stable": deployment(2)}, "Progressing",
         [(ro.ApplyDeployment, "stable", 1)], [("Superseded", "Reverted"), ("Promoted", "Revert")],
         expect={"stable.revision": 1}),
    Case("paused", SERVING, {"finetune": finetune(B), "stable": deployment(1)}, "Paused", [],
         spec={"rollout": {"paused": True}}),
    Case("immediate", SERVING, {"finetune": finetune(B), "stable": deployment(1)}, "Progressing",
         [(ro.ApplyDeployment, "stable", 2)], [("Superseded", "Replaced"), ("Promoted", "Immediate")],
         spec={"rollout": {"strategy": "Immediate"}}),
    Case("history limit", {"stable": revision(3, A), "history": history(*((n, C, "Rejected") for n in (3, 2, 1)))},
         {"finetune": finetune(B), "stable": deployment(3)}, "Progressing", [(ro.ApplyDeployment, "canary", 4)],
         spec={"revisionHistoryLimit": 2}, expect={"len(history)": 2}),
    Case("history limit on a new entry", SERVING | {"history": history(*((n, C, "Rejected") for n in (3, 2, 1)))},
         {"finetune": finetune(B, score="0.5"), "stable": deployment(1)}, "Degraded", [],
         [("Rejected", "EvalGateFailed")], spec={"revisionHistoryLimit": 2}, expect={"len(history)": 2}),
]  # fmt: skip


def lookup(status: dict[str, Any], path: str) -> Any:
    if path.startswith("len("):
        return len(lookup(status, path[4:-1]))
    value: Any = status
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_transition(case: Case) -> None:
    decision = ro.decide(adep(**case.spec), case.status, ro.Observed(now=NOW, **case.observed))
    status = decision.status
    assert status["phase"] == case.phase, status.get("message")
    got = []
    for action in decision.actions:
        if isinstance(action, ro.EnsureService):
            continue
        if isinstance(action, ro.ApplyDeployment):
            got.append((ro.ApplyDeployment, action.role, action.revision))
        elif isinstance(action, ro.ScaleDeployment):
            got.append((ro.ScaleDeployment, action.role, action.replicas))
        elif isinstance(action, ro.DeleteDeployment):
            got.append((ro.DeleteDeployment, action.role))
        elif isinstance(action, ro.EnsureEvalJob):
            got.append((ro.EnsureEvalJob, action.revision))
    assert got == case.actions
    assert decision.outcomes == case.outcomes
    for path, want in case.expect.items():
        if path.endswith("~"):
            assert want in str(lookup(status, path[:-1]))
        else:
            assert lookup(status, path) == want, path
    # Every status the decider writes is one the CRD keeps (a misspelt key would be pruned).
    AdapterDeploymentStatus.model_validate(status)


def served_by(number: int, digest: str, ready: bool = True) -> dict[str, Any]:
    """A stable Deployment whose annotations say which revision it serves."""
    dep = deployment(number, ready=None if ready else 0)
    dep["metadata"]["annotations"] = build.revision_annotations(
        build.Candidate(
            f"s3://adapters/{digest[7:11]}/", digest, fine_tune="support-bot-v3", metrics={"exact_match": "0.93"}
        ),
        number,
    )
    return dep


def test_an_interrupted_promotion_is_recovered_from_the_stable_deployment() -> None:
    """The operator stopped after rolling the stable Deployment to the canary's revision, before writing status."""
    observed = ro.Observed(now=NOW, finetune=finetune(B), stable=served_by(2, B))  # the canary is gone too
    decision = ro.decide(adep(), {**CANARY, "progressingSince": ago(3600)}, observed)
    status = decision.status
    assert status["phase"] == "Healthy", status["message"]
    assert status["stable"]["revision"] == 2
    assert status["stable"]["adapterDigest"] == B
    assert status["stable"]["metrics"] == {"exact_match": "0.93"}
    assert "canary" not in status
    assert [(h["revision"], h["outcome"]) for h in status["history"][:2]] == [(2, "Promoted"), (1, "Superseded")]
    assert decision.outcomes == [("Superseded", "Replaced"), ("Promoted", "Recovered")]
    AdapterDeploymentStatus.model_validate(status)


def test_a_stable_revision_that_never_becomes_ready_is_degraded_with_the_reason() -> None:
    crashing = [pod(restarts=4)]
    status = {"stable": revision(1, A), "history": history((1, A, "Promoted")), "progressingSince": ago(601)}
    observed = ro.Observed(now=NOW, finetune=finetune(A), stable=served_by(1, A, ready=False), stable_pods=crashing)
    decision = ro.decide(adep(), status, observed)
    assert decision.status["phase"] == "Degraded"
    ready = next(c for c in decision.status["conditions"] if c["type"] == "Stalled")
    assert (ready["status"], ready["reason"]) == ("True", "StableNotReady")
    assert "keeps failing (exit 3): boom" in decision.status["message"]
    within = ro.decide(adep(), {**status, "progressingSince": ago(60)}, observed)
    assert within.status["phase"] == "Progressing"


def test_every_step_ensures_the_service_and_records_the_generation() -> None:
    decision = ro.decide(adep(), {}, ro.Observed(now=NOW, finetune=finetune(A)))
    assert isinstance(decision.actions[0], ro.EnsureService)
    assert decision.status["observedGeneration"] == 3


def test_online_eval_endpoint_is_the_canary_pod() -> None:
    observed = ro.Observed(now=NOW, finetune=finetune(B), stable=deployment(1), canary=deployment(2, 1),
                           canary_pods=[pod("10.244.0.9")])  # fmt: skip
    decision = ro.decide(adep(rollout=ONLINE_EVAL), CANARY, observed)
    evals = [a for a in decision.actions if isinstance(a, ro.EnsureEvalJob)]
    assert evals == [ro.EnsureEvalJob(2, "http://10.244.0.9:8000")]


def test_promoted_revision_is_healthy_once_its_deployment_is_available() -> None:
    promoted = ro.decide(
        adep(), CANARY, ro.Observed(now=NOW, finetune=finetune(B), stable=deployment(1), canary=deployment(2, 1))
    ).status
    later = ro.decide(adep(), promoted, ro.Observed(now=NOW, finetune=finetune(B), stable=deployment(2)))
    assert later.status["phase"] == "Healthy"
    assert [a for a in later.actions if not isinstance(a, ro.EnsureService)] == []
    assert "progressingSince" not in later.status


def test_conditions_follow_kstatus() -> None:
    healthy = ro.decide(adep(), SERVING, ro.Observed(now=NOW, finetune=finetune(A), stable=deployment(1))).status
    conditions = {c["type"]: c["status"] for c in healthy["conditions"]}
    assert conditions == {"Ready": "True", "Reconciling": "False", "Stalled": "False", "GatesPassed": "True"}
