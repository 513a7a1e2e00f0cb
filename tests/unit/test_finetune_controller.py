"""The FineTune controller's methods, one at a time, against an in-memory API (no API server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from kubetune.api.finetune import FineTuneStatus
from kubetune.builders import finetune as build
from kubetune.builders.settings import OperatorSettings
from kubetune.controllers.finetune import MAX_RETRY_DELAY_S, FineTuneController
from kubetune.controllers.kube import KubeAPI
from kubetune_trainer.contract import Summary
from tests.conftest import ROOT
from tests.unit.fakes import FakeKube, ManualScheduler, api_error

NS = "team-a"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}


@pytest.fixture
def output(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"


@pytest.fixture
def kube() -> FakeKube:
    k = FakeKube()
    k.secrets[(NS, "s3-credentials")] = dict(CREDENTIALS)
    return k


@pytest.fixture
def controller(kube: FakeKube, output: Path) -> FineTuneController:
    settings = OperatorSettings(
        trainer_image="trainer:test",
        default_output_uri=f"file://{output}",
        default_storage_secret="s3-credentials",
        status_interval_seconds=5,
    )
    return FineTuneController(kube, settings, ManualScheduler())


def finetune(kube: FakeKube, name: str = "support-bot-v1", **spec: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docs/examples/finetune-minimal.yaml").read_text())
    doc["metadata"].update(name=name, namespace=NS)
    doc["spec"].update(spec)
    doc["status"] = {}
    return kube.add("finetunes", doc)


def status(kube: FakeKube, obj: dict[str, Any]) -> dict[str, Any]:
    found = kube.get("finetunes", NS, obj["metadata"]["name"])
    assert found is not None
    current: dict[str, Any] = found["status"]
    FineTuneStatus.model_validate(current)  # every status written is one the CRD keeps
    return current


def condition(current: dict[str, Any], type_: str) -> tuple[str, str]:
    c = next(c for c in current["conditions"] if c["type"] == type_)
    return c["status"], c["reason"]


def the_job(kube: FakeKube) -> dict[str, Any]:
    (job,) = kube.of_kind("Job")
    return job


def set_job(job: dict[str, Any], **status: Any) -> dict[str, Any]:
    job["status"] = status
    return job


def trainer_pod(kube: FakeKube, job: dict[str, Any], summary: Summary | None, exit_code: int, reason: str = "") -> None:
    term = {"exitCode": exit_code, "finishedAt": "2026-11-29T10:05:00Z", "reason": reason or "Completed"}
    if summary is not None:
        term["message"] = summary.to_json()
    kube.add(
        "Pod",
        {
            "metadata": {"name": f"{job['metadata']['name']}-x", "namespace": NS,
                         "labels": {"batch.kubernetes.io/job-name": job["metadata"]["name"]}},
            "status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": term}}]},
        },
    )  # fmt: skip


COMPLETE = [{"type": "Complete", "status": "True"}]
FAILED = [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "exit 10"}]


def succeeded_summary() -> Summary:
    return Summary.model_validate(
        {
            "phase": "Succeeded",
            "reason": "Succeeded",
            "message": "exact_match 0.9; prompted 0.2",
            "run_id": "r",
            "adapter": {"uri": "s3://a/adapter/", "digest": "sha256:" + "a" * 64, "sizeBytes": 10,
                        "trainableParams": 5, "promotable": True, "loraRank": 16},
            "evaluation": {"passed": True, "score": 0.9, "metrics": {"exact_match": 0.9},
                           "baselines": {"prompted": {"exact_match": 0.2}},
                           "gates": [{"metric": "exact_match", "rule": "min 0.8", "value": 0.9, "threshold": 0.8,
                                      "passed": True}]},
            "data": {"train": 400, "validation": 40, "eval": 90, "dropped": {"duplicate": 3}},
            "training": {"steps": 10, "resumedFromStep": 4},
        }
    )  # fmt: skip


# ----------------------------------------------------------------------------- launch


def test_launch_writes_the_job_and_one_status_patch(kube: FakeKube, controller: FineTuneController) -> None:
    obj = finetune(kube)
    controller.reconcile_safely(obj, None)
    assert kube.writes == [
        ("create", "Job", "support-bot-v1-train"),
        ("patch-status", "finetunes", "support-bot-v1"),
    ]
    current = status(kube, obj)
    assert current["phase"] == "Pending"
    assert condition(current, "Validated") == ("True", "Validated")
    assert current["jobName"] == "support-bot-v1-train"
    assert current["runId"] == obj["metadata"]["uid"]


def test_a_second_event_before_the_job_is_seen_creates_nothing(kube: FakeKube, controller: FineTuneController) -> None:
    obj = finetune(kube)
    controller.reconcile(obj, None)
    controller.reconcile(obj, None)  # the Job's watch event has not arrived yet
    assert len(kube.of_kind("Job")) == 1
    assert sum(1 for w in kube.writes if w[0] == "create") == 1


def test_a_job_left_by_a_stopped_operator_is_adopted(kube: FakeKube, controller: FineTuneController) -> None:
    obj = finetune(kube)
    controller.reconcile(obj, None)
    job = the_job(kube)
    kube.objects[("finetunes", NS, "support-bot-v1")]["status"] = {}  # the status patch never happened
    fresh = FineTuneController(kube, controller.settings, ManualScheduler())  # a restarted operator
    kube.writes.clear()
    fresh.reconcile(obj | {"status": {}}, job)
    assert len(kube.of_kind("Job")) == 1
    assert kube.writes == [("patch-status", "finetunes", "support-bot-v1")]
    assert status(kube, obj)["jobName"] == job["metadata"]["name"]


def test_missing_secret_waits_then_starts(kube: FakeKube, controller: FineTuneController) -> None:
    kube.secrets.clear()
    obj = finetune(kube)
    controller.reconcile_safely(obj, None)
    current = status(kube, obj)
    assert current["phase"] == "Pending"
    assert condition(current, "Validated") == ("False", "StorageCredentialsMissing")
    assert "Secret s3-credentials" in current["message"]
    assert kube.of_kind("Job") == []
    scheduler = controller.scheduler
    assert isinstance(scheduler, ManualScheduler)
    assert scheduler.delay(("retry", obj["metadata"]["uid"])) == 5
    kube.secrets[(NS, "s3-credentials")] = dict(CREDENTIALS)
    scheduler.run(("retry", obj["metadata"]["uid"]))
    assert len(kube.of_kind("Job")) == 1
    assert condition(status(kube, obj), "Validated") == ("True", "Validated")


def test_missing_template_waits(kube: FakeKube, controller: FineTuneController) -> None:
    obj = finetune(kube, templateRef={"name": "team-default"})
    controller.reconcile_safely(obj, None)
    assert condition(status(kube, obj), "Validated") == ("False", "TemplateNotFound")
    assert isinstance(controller.scheduler, ManualScheduler)
    assert controller.scheduler.delay(("retry", obj["metadata"]["uid"])) == 10


def test_template_guardrail_fails_for_good(kube: FakeKube, controller: FineTuneController) -> None:
    kube.add("finetunetemplates", {"metadata": {"name": "t"}, "spec": {"guardrails": {"maxGpus": 0}}})
    obj = finetune(kube, templateRef={"name": "t"})
    controller.reconcile_safely(obj, None)
    current = status(kube, obj)
    assert current["phase"] == "Failed"
    assert condition(current, "Stalled") == ("True", "TemplateViolation")
    assert "maxGpus 0" in current["message"]
    assert kube.of_kind("Job") == []
    assert kube.events[-1][:2] == ("Warning", "TemplateViolation")


def test_a_foreign_job_in_the_way_is_waited_for(kube: FakeKube, controller: FineTuneController) -> None:
    kube.add("Job", {"metadata": {"name": "support-bot-v1-train", "namespace": NS, "ownerReferences": []}})
    obj = finetune(kube)
    controller.reconcile_safely(obj, None)
    assert isinstance(controller.scheduler, ManualScheduler)
    assert controller.scheduler.delay(("retry", obj["metadata"]["uid"])) == 5


def test_api_errors_back_off_to_a_minute(kube: FakeKube, controller: FineTuneController) -> None:
    obj = finetune(kube)
    scheduler = controller.scheduler
    assert isinstance(scheduler, ManualScheduler)
    delays = []
    for _ in range(8):
        kube.fail("create_or_adopt", api_error(500))
        controller.reconcile_safely(obj, None)
        delays.append(scheduler.delay(("retry", obj["metadata"]["uid"])))
    assert delays == [2, 4, 8, 16, 32, MAX_RETRY_DELAY_S, MAX_RETRY_DELAY_S, MAX_RETRY_DELAY_S]
    scheduler.run(("retry", obj["metadata"]["uid"]))
    assert len(kube.of_kind("Job")) == 1
    assert not scheduler.scheduled(("retry", obj["metadata"]["uid"]))


def test_long_names_get_valid_children(kube: FakeKube, controller: FineTuneController) -> None:
    name = "a" * 62 + "-b.c" + "d" * 5  # 71 characters, the 63rd a '-'
    obj = finetune(kube, name=name)
    controller.reconcile_safely(obj, None)
    job = the_job(kube)
    assert len(job["metadata"]["name"]) <= 60
    for value in job["metadata"]["labels"].values():
        assert len(value) <= 63
        assert value[-1].isalnum()
    assert status(kube, obj)["jobName"] == job["metadata"]["name"]


# ----------------------------------------------------------------------------- following the Job


def launched(kube: FakeKube, controller: FineTuneController, **spec: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    obj = finetune(kube, **spec)
    controller.reconcile(obj, None)
    return obj, the_job(kube)


def test_running_job_is_mirrored_and_progress_polled(
    kube: FakeKube, controller: FineTuneController, output: Path
) -> None:
    obj, job = launched(kube, controller)
    controller.on_job_event("MODIFIED", obj, set_job(job, active=1, ready=1, startTime="2026-11-29T10:00:00Z"))
    current = status(kube, obj)
    assert (current["phase"], current["attempts"], current["startTime"]) == ("Preparing", 1, "2026-11-29T10:00:00Z")
    uid = obj["metadata"]["uid"]
    scheduler = controller.scheduler
    assert isinstance(scheduler, ManualScheduler)
    assert scheduler.delay(("progress", uid)) == 5
    run = Path(job["metadata"]["annotations"][build.OUTPUT_ANNOTATION].removeprefix("file://"))
    run.mkdir(parents=True)
    progress = {"stage": "train", "step": 7, "total_steps": 20, "epoch": 0.35, "loss": 1.25, "checkpoint_step": 5,
                "checkpoint_uri": "s3://x/ckpt/", "message": "training", "percent": 35}  # fmt: skip
    (run / "progress.json").write_text(json.dumps(progress))
    scheduler.run(("progress", uid))
    current = status(kube, obj)
    assert current["phase"] == "Training"
    want = {"step": 7, "totalSteps": 20, "epoch": "0.35", "loss": "1.25", "percent": 35, "stage": "train"}
    assert {k: current["progress"].get(k) for k in want} == want
    assert current["checkpoint"] == {"uri": "s3://x/ckpt/", "step": 5}
    assert scheduler.scheduled(("progress", uid))  # polls again while the Job runs


def test_completed_job_with_summary_succeeds(kube: FakeKube, controller: FineTuneController) -> None:
    obj, job = launched(kube, controller)
    controller.on_job_event("MODIFIED", obj, set_job(job, active=1))
    trainer_pod(kube, job, succeeded_summary(), 0)
    controller.on_job_event("MODIFIED", obj, set_job(job, succeeded=1, conditions=COMPLETE))
    current = status(kube, obj)
    assert current["phase"] == "Succeeded"
    assert current["adapter"]["digest"] == "sha256:" + "a" * 64
    assert current["adapter"]["loraRank"] == 16
    assert current["evaluation"]["baselines"] == {"prompted": {"exact_match": "0.2"}}
    assert current["data"]["trainExamples"] == 400
    assert current["progress"]["resumedFromStep"] == 4
    assert condition(current, "Ready") == ("True", "Succeeded")
    assert not controller.scheduler.scheduled(("progress", obj["metadata"]["uid"]))
    assert kube.events[-1][:2] == ("Normal", "Succeeded")


@pytest.mark.parametrize(
    ("summary", "job_status", "reason"),
    [
        (Summary.failed("DataInvalid", "train.jsonl:4: not JSON", "r"), {"failed": 1, "conditions": FAILED},
         "DataInvalid"),
        (None, {"succeeded": 1, "conditions": COMPLETE}, "TrainerFailed"),
        (None, {"failed": 4, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]},
         "BackoffLimitExceeded"),
        (None, {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]},
         "DeadlineExceeded"),
    ],
)  # fmt: skip
def test_failed_runs_name_a_reason(
    kube: FakeKube, controller: FineTuneController, summary: Summary | None, job_status: dict[str, Any], reason: str
) -> None:
    obj, job = launched(kube, controller)
    trainer_pod(kube, job, summary, 10 if summary else 1)
    controller.on_job_event("MODIFIED", obj, set_job(job, **job_status))
    current = status(kube, obj)
    assert current["phase"] == "Failed"
    assert condition(current, "Stalled") == ("True", reason)
    assert current["message"]


def test_oom_killed_container_is_out_of_memory(kube: FakeKube, controller: FineTuneController) -> None:
    obj, job = launched(kube, controller)
    trainer_pod(kube, job, None, 137, reason="OOMKilled")
    controller.on_job_event("MODIFIED", obj, set_job(job, failed=4, conditions=FAILED))
    assert condition(status(kube, obj), "Stalled") == ("True", "OutOfMemory")


def test_suspend_follows_the_spec_once(kube: FakeKube, controller: FineTuneController) -> None:
    obj, job = launched(kube, controller)
    obj = obj | {"spec": {**obj["spec"], "runPolicy": {"suspend": True}}}
    controller.on_job_event("MODIFIED", obj, set_job(job, active=1))
    controller.on_job_event("MODIFIED", obj, set_job(job, active=1))  # the Job's event has not come back yet
    assert [w for w in kube.writes if w[1] == "Job" and w[0] == "patch"] == [("patch", "Job", "support-bot-v1-train")]
    assert the_job(kube)["spec"]["suspend"] is True
    controller.on_job_event("MODIFIED", obj, set_job(the_job(kube), active=0))
    assert status(kube, obj)["phase"] == "Suspended"


def test_a_queued_job_is_never_unsuspended_by_the_operator(kube: FakeKube, controller: FineTuneController) -> None:
    obj, job = launched(kube, controller, runPolicy={"queueName": "team-a"})
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][build.QUEUE_LABEL] == "team-a"
    controller.on_job_event("MODIFIED", obj, set_job(job))
    assert not [w for w in kube.writes if w[1] == "Job" and w[0] == "patch"]
    current = status(kube, obj)
    assert current["phase"] == "Queued"
    assert condition(current, "Queued") == ("True", "WaitingForAdmission")


def job_deleted(kube: FakeKube, controller: FineTuneController) -> tuple[dict[str, Any], dict[str, Any]]:
    """A launched FineTune whose Job was deleted and whose watch said so: its relaunch is scheduled."""
    obj, job = launched(kube, controller)
    del kube.objects[("Job", NS, job["metadata"]["name"])]
    controller.on_job_event("DELETED", obj, job)
    return obj, job


def run_relaunch(controller: FineTuneController, obj: dict[str, Any]) -> None:
    scheduler = controller.scheduler
    assert isinstance(scheduler, ManualScheduler)
    scheduler.run(("relaunch", obj["metadata"]["uid"]))


def test_a_deleted_job_of_an_unfinished_finetune_is_created_again(
    kube: FakeKube, controller: FineTuneController
) -> None:
    obj, _ = job_deleted(kube, controller)
    run_relaunch(controller, obj)
    assert len(kube.of_kind("Job")) == 1


def test_a_job_deleted_under_a_reconcile_with_the_old_copy_is_still_created_again(
    kube: FakeKube, controller: FineTuneController
) -> None:
    # A reconcile read the Job as last seen; before it ran, the Job was deleted and its watch said so.
    # Done with the old copy, that reconcile must neither cancel the relaunch nor make the operator
    # believe it has a Job on the way.
    obj, job = job_deleted(kube, controller)
    controller.on_finetune_event("MODIFIED", obj, job)
    run_relaunch(controller, obj)
    (again,) = kube.of_kind("Job")
    assert again["metadata"]["name"] == job["metadata"]["name"]


@pytest.mark.parametrize("error", [api_error(503, "ServiceUnavailable"), ConnectionRefusedError(111, "refused")])
def test_a_relaunch_that_cannot_read_the_finetune_tries_again(
    kube: FakeKube, controller: FineTuneController, error: Exception
) -> None:
    obj, _ = job_deleted(kube, controller)
    kube.fail("get_custom", error)
    run_relaunch(controller, obj)
    assert kube.of_kind("Job") == []
    run_relaunch(controller, obj)  # scheduled again; the API answers this time
    assert len(kube.of_kind("Job")) == 1


def test_no_relaunch_when_a_new_job_was_seen_first(kube: FakeKube, controller: FineTuneController) -> None:
    obj, job = launched(kube, controller)
    controller.on_job_event("DELETED", obj, job)
    controller.job_seen("ADDED", job)  # someone created it again before the relaunch was due
    kube.writes.clear()
    run_relaunch(controller, obj)
    assert [w for w in kube.writes if w[1] == "Job"] == []


def test_a_finished_finetune_ignores_later_job_events(kube: FakeKube, controller: FineTuneController) -> None:
    obj, job = launched(kube, controller)
    trainer_pod(kube, job, succeeded_summary(), 0)
    controller.on_job_event("MODIFIED", obj, set_job(job, succeeded=1, conditions=COMPLETE))
    kube.writes.clear()
    controller.on_job_event("DELETED", obj, job)  # ttlSecondsAfterFinished removed it
    controller.on_finetune_event("MODIFIED", obj, None)
    assert kube.writes == []
    assert not controller.scheduler.scheduled(("relaunch", obj["metadata"]["uid"]))


def test_forget_drops_everything_about_a_deleted_finetune(kube: FakeKube, controller: FineTuneController) -> None:
    obj, job = launched(kube, controller)
    controller.on_job_event("MODIFIED", obj, set_job(job, active=1))
    uid = obj["metadata"]["uid"]
    controller.on_finetune_event("DELETED", obj, None)
    assert uid not in controller.running
    assert uid not in controller.launched
    assert not controller.scheduler.scheduled(("progress", uid))


def test_retention_delete_removes_the_run_prefix(kube: FakeKube, controller: FineTuneController, output: Path) -> None:
    obj = finetune(kube, output={"retention": "Delete"})
    run = output / NS / "support-bot-v1" / obj["metadata"]["uid"]
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "weights.safetensors").write_bytes(b"w")
    keep = output / NS / "support-bot-v1" / "other-run"
    keep.mkdir(parents=True)
    assert controller.deletes_artifacts(obj["spec"])
    controller.delete_artifacts(obj)
    assert not (run / "adapter" / "weights.safetensors").exists()
    assert keep.exists()


# ----------------------------------------------------------------------------- faults (issue: nothing lost)


def test_a_refused_status_write_when_the_job_completes_is_retried(
    kube: FakeKube, controller: FineTuneController
) -> None:
    obj, job = launched(kube, controller)
    trainer_pod(kube, job, succeeded_summary(), 0)
    kube.fail("patch_status", api_error(500, "Internal Server Error"))
    controller.on_job_event("MODIFIED", obj, set_job(job, succeeded=1, conditions=COMPLETE))
    assert status(kube, obj)["phase"] == "Pending"  # the write was refused
    scheduler = controller.scheduler
    assert isinstance(scheduler, ManualScheduler)
    assert scheduler.delay(("follow", obj["metadata"]["uid"])) == 2
    scheduler.run(("follow", obj["metadata"]["uid"]))
    assert status(kube, obj)["phase"] == "Succeeded"


def test_a_progress_poll_survives_api_errors(kube: FakeKube, controller: FineTuneController, output: Path) -> None:
    obj, job = launched(kube, controller)
    controller.on_job_event("MODIFIED", obj, set_job(job, active=1, ready=1))
    run = Path(job["metadata"]["annotations"][build.OUTPUT_ANNOTATION].removeprefix("file://"))
    run.mkdir(parents=True)
    (run / "progress.json").write_text(json.dumps({"stage": "train", "step": 2, "total_steps": 9}))
    kube.fail("patch_status", api_error(429, "Too Many Requests"))
    scheduler = controller.scheduler
    assert isinstance(scheduler, ManualScheduler)
    scheduler.run(("progress", obj["metadata"]["uid"]))
    assert scheduler.scheduled(("progress", obj["metadata"]["uid"]))  # still polling
    scheduler.run(("progress", obj["metadata"]["uid"]))
    assert status(kube, obj)["progress"]["step"] == 2


@pytest.mark.parametrize("cut", ["no pods", "summary cut to its limit"])
def test_a_published_run_succeeds_from_its_manifest(
    kube: FakeKube, controller: FineTuneController, output: Path, cut: str
) -> None:
    obj, job = launched(kube, controller)
    run = Path(job["metadata"]["annotations"][build.OUTPUT_ANNOTATION].removeprefix("file://"))
    run.mkdir(parents=True)
    manifest = {
        "runId": obj["metadata"]["uid"],
        "promotable": True,
        "evaluation": {"passed": True, "score": 0.9, "metrics": {"exact_match": 0.9}, "summary": "exact_match 0.9"},
        "artifact": {"uri": "s3://a/adapter/", "digest": "sha256:" + "e" * 64, "sizeBytes": 3},
        "parameters": {"trainable": 5},
        "config": {"method": {"type": "LoRA", "lora": {"rank": 8}}},
        "data": {"summary": {"train": 40}},
        "training": {"steps": 3},
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    if cut != "no pods":
        trainer_pod(kube, job, Summary(phase="Succeeded", reason="Succeeded", message="cut"), 0)
    controller.on_job_event("MODIFIED", obj, set_job(job, succeeded=1, conditions=COMPLETE))
    current = status(kube, obj)
    assert current["phase"] == "Succeeded"
    assert current["adapter"]["digest"] == "sha256:" + "e" * 64
    assert current["adapter"]["loraRank"] == 8


def test_out_of_memory_fails_at_the_first_attempt_and_stops_the_job(
    kube: FakeKube, controller: FineTuneController
) -> None:
    obj, job = launched(kube, controller, resources={"memory": "4Gi"})
    trainer_pod(kube, job, None, 137, reason="OOMKilled")
    controller.on_job_event("MODIFIED", obj, set_job(job, failed=1, active=1))
    current = status(kube, obj)
    assert current["phase"] == "Failed"
    assert current["attempts"] == 1  # the replacement pod the Job had created is not an attempt
    assert condition(current, "Stalled") == ("True", "OutOfMemory")
    assert condition(current, "Trained") == ("False", "OutOfMemory")
    assert "4Gi" in current["message"]
    assert "spec.resources.memory" in current["message"]
    assert the_job(kube)["spec"]["suspend"] is True
    assert not controller.scheduler.scheduled(("progress", obj["metadata"]["uid"]))


def test_a_killed_pod_that_is_not_oom_is_retried(kube: FakeKube, controller: FineTuneController) -> None:
    obj, job = launched(kube, controller)
    trainer_pod(kube, job, None, 137, reason="Error")
    controller.on_job_event("MODIFIED", obj, set_job(job, failed=1, active=1))
    assert status(kube, obj)["phase"] == "Preparing"


def test_a_stuck_pod_makes_the_run_stalled_with_its_reason(kube: FakeKube, controller: FineTuneController) -> None:
    obj, job = launched(kube, controller)
    controller.on_job_event("MODIFIED", obj, set_job(job, active=1, startTime="2020-01-01T00:00:00Z"))
    kube.add("Pod", {
        "metadata": {"name": "p", "namespace": NS, "labels": {"batch.kubernetes.io/job-name": job["metadata"]["name"]}},
        "status": {"containerStatuses": [{"name": "trainer", "state": {"waiting": {
            "reason": "CreateContainerConfigError", "message": 'secret "s3-credentials" not found'}}}]},
    })  # fmt: skip
    scheduler = controller.scheduler
    assert isinstance(scheduler, ManualScheduler)
    scheduler.run(("progress", obj["metadata"]["uid"]))
    current = status(kube, obj)
    assert condition(current, "Stalled") == ("True", "CreateContainerConfigError")
    assert 'secret "s3-credentials" not found' in current["message"]
    assert current["phase"] == "Preparing"  # not over: it recovers when the Secret is back


def test_no_progress_for_long_is_stalled(kube: FakeKube, controller: FineTuneController) -> None:
    obj, job = launched(kube, controller)
    controller.on_job_event("MODIFIED", obj, set_job(job, active=1, startTime="2020-01-01T00:00:00Z"))
    scheduler = controller.scheduler
    assert isinstance(scheduler, ManualScheduler)
    scheduler.run(("progress", obj["metadata"]["uid"]))
    assert condition(status(kube, obj), "Stalled") == ("True", "ProgressStale")


def test_retention_delete_keeps_an_adapter_that_is_served(
    kube: FakeKube, controller: FineTuneController, output: Path
) -> None:
    obj = finetune(kube, output={"retention": "Delete"})
    run = output / NS / "support-bot-v1" / obj["metadata"]["uid"]
    for part in ("adapter/weights.safetensors", "manifest.json", "checkpoints/step-4/state.pt"):
        (run / part).parent.mkdir(parents=True, exist_ok=True)
        (run / part).write_bytes(b"x")
    kube.add("adapterdeployments", {"metadata": {"name": "support-bot", "namespace": NS},
                                    "status": {"stable": {"fineTuneUid": obj["metadata"]["uid"]}}})  # fmt: skip
    assert controller.delete_artifacts(obj)
    assert (run / "adapter" / "weights.safetensors").exists()
    assert (run / "manifest.json").exists()
    assert not (run / "checkpoints" / "step-4" / "state.pt").exists()
    assert kube.events[-1][:2] == ("Normal", "AdapterKept")
    assert "AdapterDeployment support-bot" in kube.events[-1][2]


def test_retention_delete_gives_up_in_bounded_time_when_the_secret_is_gone(
    kube: FakeKube, controller: FineTuneController, output: Path
) -> None:
    obj = finetune(kube, output={"retention": "Delete"})
    run = output / NS / "support-bot-v1" / obj["metadata"]["uid"]
    (run / "adapter").mkdir(parents=True)
    kube.secrets.clear()  # deleted first, as a namespace deletion may do
    assert controller.delete_artifacts(obj, elapsed=5) is False  # not yet: try again
    limit = controller.settings.artifact_delete_timeout_seconds
    assert controller.delete_artifacts(obj, elapsed=limit) is True
    kind, reason, message = kube.events[-1]
    assert (kind, reason) == ("Warning", "ArtifactsRetained")
    assert str(run) in message
    assert "s3-credentials" in message
    assert (run / "adapter").exists()


def test_an_object_the_api_server_refuses_fails_the_finetune_with_its_message(
    kube: FakeKube, controller: FineTuneController
) -> None:
    obj = finetune(kube)
    error = api_error(422, "Unprocessable Entity")
    error.body = json.dumps({"message": 'Job.batch "x" is invalid: metadata.name: Invalid value'})
    kube.fail("create_or_adopt", error)
    controller.reconcile_safely(obj, None)
    current = status(kube, obj)
    assert current["phase"] == "Failed"
    assert condition(current, "Stalled") == ("True", "Invalid")
    assert "metadata.name: Invalid value" in current["message"]


def test_progress_is_written_when_something_visible_changes_else_at_most_once_a_minute(
    kube: FakeKube, controller: FineTuneController
) -> None:
    obj, job = launched(kube, controller)
    controller.on_job_event("MODIFIED", obj, set_job(job, active=1, ready=1))
    run = Path(job["metadata"]["annotations"][build.OUTPUT_ANNOTATION].removeprefix("file://"))
    run.mkdir(parents=True)
    uid = obj["metadata"]["uid"]
    scheduler = controller.scheduler
    assert isinstance(scheduler, ManualScheduler)

    def poll(step: int, total: int = 1000, **extra: Any) -> int:
        doc = {"stage": "train", "step": step, "total_steps": total, "percent": 100 * step // total, **extra}
        (run / "progress.json").write_text(json.dumps(doc))
        before = len([w for w in kube.writes if w[0] == "patch-status"])
        scheduler.run(("progress", uid))
        return len([w for w in kube.writes if w[0] == "patch-status"]) - before

    assert poll(1) == 1  # the first report: Training, with progress
    assert poll(2) == 0  # only the step moved (0% -> 0%)
    assert poll(3, loss=1.5) == 0
    assert poll(10) == 1  # 1%: a new percentage is written at once
    assert poll(11, checkpoint_step=10, checkpoint_uri="s3://c/") == 1  # a checkpoint too
    controller.progress_written[uid] -= controller.settings.progress_status_seconds  # a minute later
    assert poll(12) == 1
    assert status(kube, obj)["progress"]["step"] == 12


# ----------------------------------------------------------------------------- lookups and the finalizer


def test_a_job_seen_before_its_finetune_is_followed_thanks_to_the_seed(
    kube: FakeKube, controller: FineTuneController
) -> None:
    obj, job = launched(kube, controller)
    restarted = FineTuneController(kube, controller.settings, ManualScheduler())
    stored = kube.get("finetunes", NS, "support-bot-v1")
    assert stored is not None
    restarted.seed([stored], [])  # what the start-up list returned
    trainer_pod(kube, job, succeeded_summary(), 0)
    restarted.job_seen("ADDED", set_job(job, succeeded=1, conditions=COMPLETE))  # before the FineTune's event
    assert isinstance(restarted.scheduler, ManualScheduler)
    restarted.scheduler.run(("job", obj["metadata"]["uid"]))  # the follow, handed to a scheduler thread
    assert status(kube, obj)["phase"] == "Succeeded"


def test_a_job_of_an_unknown_finetune_is_ignored(kube: FakeKube, controller: FineTuneController) -> None:
    _, job = launched(kube, controller)
    fresh = FineTuneController(kube, controller.settings, ManualScheduler())
    kube.writes.clear()
    fresh.job_seen("MODIFIED", set_job(job, active=1))
    assert kube.writes == []


def test_the_finetune_event_finds_its_job_in_the_lookup(kube: FakeKube, controller: FineTuneController) -> None:
    _, job = launched(kube, controller)
    restarted = FineTuneController(kube, controller.settings, ManualScheduler())
    restarted.seed([], [job])
    kube.writes.clear()
    stored = kube.get("finetunes", NS, "support-bot-v1")
    assert stored is not None
    restarted.finetune_seen("ADDED", stored)
    assert isinstance(restarted.scheduler, ManualScheduler)
    restarted.scheduler.run(("reconcile", stored["metadata"]["uid"]))
    assert [w for w in kube.writes if w[0] == "create"] == []  # it found its Job: nothing created twice


class Calls:
    """A KubeAPI that records the name of every method called on it, then calls the fake."""

    def __init__(self, inner: FakeKube) -> None:
        self.inner = inner
        self.names: list[str] = []

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.inner, name)
        if not callable(found):
            return found

        def call(*args: Any, **kwargs: Any) -> Any:
            self.names.append(name)
            return found(*args, **kwargs)

        return call


def test_events_make_no_api_call_and_those_of_one_object_fold_into_one_reconcile(
    kube: FakeKube, controller: FineTuneController
) -> None:
    """kopf calls ``finetune_seen`` and ``job_seen`` in its event loop: they must not call the API."""
    calls = Calls(kube)
    controller.kube = cast(KubeAPI, calls)
    scheduler = controller.scheduler
    assert isinstance(scheduler, ManualScheduler)
    obj = finetune(kube)
    uid = obj["metadata"]["uid"]
    controller.finetune_seen("ADDED", obj)
    relabelled = {**obj, "metadata": {**obj["metadata"], "labels": {"team": "a"}}}
    controller.finetune_seen("MODIFIED", relabelled)
    assert calls.names == []
    assert list(scheduler.work) == [("reconcile", uid)]  # one run for both events
    scheduler.run(("reconcile", uid))
    assert [w[0] for w in kube.writes] == ["create", "patch-status"]
    assert controller.finetunes[uid]["metadata"]["labels"] == {"team": "a"}  # it read the newest copy
    job = the_job(kube)
    trainer_pod(kube, job, succeeded_summary(), 0)
    calls.names.clear()
    controller.job_seen("ADDED", set_job(job, active=1))
    controller.job_seen("MODIFIED", set_job(job, succeeded=1, conditions=COMPLETE))
    assert calls.names == []
    assert ("job", uid) in scheduler.work
    scheduler.run(("job", uid))
    assert status(kube, obj)["phase"] == "Succeeded"  # the newest Job (complete) was followed
    controller.finetune_seen("DELETED", obj)
    assert not any(key[1] == uid for key in scheduler.work)  # forgotten at once, its work cancelled


def seen(controller: FineTuneController, event_type: str, obj: dict[str, Any]) -> None:
    """A FineTune's event as kopf delivers it, and the reconcile it schedules run at once."""
    controller.finetune_seen(event_type, obj)
    scheduler = controller.scheduler
    assert isinstance(scheduler, ManualScheduler)
    scheduler.run(("reconcile", obj["metadata"]["uid"]))


def test_retention_delete_gets_the_finalizer_and_loses_it_once_the_artifacts_are_gone(
    kube: FakeKube, controller: FineTuneController, output: Path
) -> None:
    obj = finetune(kube, output={"retention": "Delete"})
    seen(controller, "ADDED", obj)
    stored = kube.get("finetunes", NS, "support-bot-v1")
    assert stored is not None
    assert stored["metadata"]["finalizers"] == ["kubetune.io/delete-artifacts"]
    run = output / NS / "support-bot-v1" / obj["metadata"]["uid"]
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "weights").write_bytes(b"w")
    stored["metadata"]["deletionTimestamp"] = "2026-11-29T10:00:00Z"
    controller.finetune_seen("MODIFIED", stored)
    scheduler = controller.scheduler
    assert isinstance(scheduler, ManualScheduler)
    scheduler.run(("delete", obj["metadata"]["uid"]))
    assert not (run / "adapter" / "weights").exists()
    assert kube.get("finetunes", NS, "support-bot-v1")["metadata"]["finalizers"] == []  # type: ignore[index]


def test_retain_gets_no_finalizer(kube: FakeKube, controller: FineTuneController) -> None:
    obj = finetune(kube)
    seen(controller, "ADDED", obj)
    assert the_job(kube)  # reconciled: the Job was created, with no finalizer on the FineTune
    assert not (kube.get("finetunes", NS, "support-bot-v1") or {})["metadata"].get("finalizers")


def test_pending_pods_cost_no_storage_reads(kube: FakeKube, controller: FineTuneController, output: Path) -> None:
    obj, job = launched(kube, controller)
    controller.on_job_event("MODIFIED", obj, set_job(job, active=1))  # a pod, not running yet
    run = Path(job["metadata"]["annotations"][build.OUTPUT_ANNOTATION].removeprefix("file://"))
    run.mkdir(parents=True)
    (run / "progress.json").write_text(json.dumps({"stage": "train", "step": 3, "total_steps": 9, "percent": 33}))
    scheduler = controller.scheduler
    assert isinstance(scheduler, ManualScheduler)
    scheduler.run(("progress", obj["metadata"]["uid"]))
    assert "progress" not in status(kube, obj)
    controller.on_job_event("MODIFIED", obj, set_job(job, active=1, ready=1))
    scheduler.run(("progress", obj["metadata"]["uid"]))
    assert status(kube, obj)["progress"]["step"] == 3
