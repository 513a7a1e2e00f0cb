"""The pure builders: every FineTune field's effect on the Job and status, without a cluster."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import FineTune, FineTuneTemplate
from kubetune.builders import finetune as build
from kubetune.builders import status as st
from kubetune.builders.settings import OperatorSettings
from kubetune_trainer.contract import Progress, Summary
from tests.conftest import ROOT

SETTINGS = OperatorSettings(
    trainer_image="registry.example/kubetune/trainer:1.0",
    default_output_uri="s3://adapters/",
    default_storage_endpoint="http://minio.storage:9000",
    default_storage_secret="s3-credentials",
)
NOW = "2026-11-29T10:00:00Z"


def finetune(**spec: Any) -> tuple[FineTune, dict[str, Any]]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docs/examples/finetune-minimal.yaml").read_text())
    doc["metadata"].update(namespace="team-a", uid="0b5e1c7e-0000-4000-8000-000000000001", generation=1)
    for key, value in spec.items():
        doc["spec"][key] = value
    return FineTune.model_validate(doc), doc["spec"]


def job_for(
    settings: OperatorSettings = SETTINGS, template: FineTuneTemplate | None = None, **spec: Any
) -> dict[str, Any]:
    ft, raw = finetune(**spec)
    return build.build_job(ft, build.plan(ft, raw, template, settings), settings)


def container(job: dict[str, Any]) -> dict[str, Any]:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


def env(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(job)["env"]}


# ----------------------------------------------------------------------------- the Job


def test_job_identity_ownership_and_labels() -> None:
    job = job_for()
    meta = job["metadata"]
    assert meta["name"] == "support-bot-v1-train"
    assert meta["namespace"] == "team-a"
    (owner,) = meta["ownerReferences"]
    assert owner == {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTune",
        "name": "support-bot-v1",
        "uid": "0b5e1c7e-0000-4000-8000-000000000001",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubetune"
    assert meta["labels"]["kubetune.io/finetune"] == "support-bot-v1"
    assert job["spec"]["template"]["metadata"]["labels"]["kubetune.io/finetune"] == "support-bot-v1"
    assert meta["annotations"]["kubetune.io/output"] == (
        "s3://adapters/team-a/support-bot-v1/0b5e1c7e-0000-4000-8000-000000000001/"
    )


def test_long_names_stay_valid_label_values() -> None:
    name = "a" * 70
    assert len(build.job_name(name)) <= 63
    assert build.job_name(name) != build.job_name("a" * 69)
    assert build.job_name(name).endswith("-train")


def test_command_mounts_and_restricted_security() -> None:
    job = job_for()
    c = container(job)
    assert c["command"] == ["kubetune-trainer"]
    assert c["args"][:3] == ["run", "--config", "/etc/kubetune/config.json"]
    assert c["args"][c["args"].index("--termination-log") + 1] == "/dev/termination-log"
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/etc/kubetune", "/scratch", "/tmp"}
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert pod["shareProcessNamespace"] is True  # the trainer is not PID 1: an early SIGTERM is not lost
    assert pod["restartPolicy"] == "Never"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["downwardAPI"]["items"][0]["path"] == "config.json"


def test_image_comes_from_spec_then_template_then_settings() -> None:
    assert container(job_for())["image"] == "registry.example/kubetune/trainer:1.0"
    assert container(job_for(image="my/trainer:2"))["image"] == "my/trainer:2"
    template = FineTuneTemplate.model_validate(
        {"metadata": {"name": "t"}, "spec": {"defaults": {"image": "platform/trainer:3"}}}
    )
    assert container(job_for(template=template, templateRef={"name": "t"}))["image"] == "platform/trainer:3"


def test_credentials_only_as_secret_references() -> None:
    e = env(job_for())
    assert e["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID", "optional": False}
    }
    assert e["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == "s3-credentials"
    assert e["AWS_SESSION_TOKEN"]["secretKeyRef"]["optional"] is True
    own = env(job_for(storage={"secretRef": {"name": "team-creds"}}))
    assert own["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == "team-creds"
    no_secret = env(job_for(OperatorSettings(default_output_uri="s3://adapters/")))
    assert "AWS_ACCESS_KEY_ID" not in no_secret


def test_resources_and_gpus() -> None:
    default = container(job_for())["resources"]
    assert default == {"limits": {"nvidia.com/gpu": "1"}}
    sized = container(job_for(resources={"gpus": 4, "cpu": "8", "memory": "40Gi"}))["resources"]
    assert sized == {"requests": {"cpu": "8", "memory": "40Gi"}, "limits": {"memory": "40Gi", "nvidia.com/gpu": "4"}}
    cpu_only = container(job_for(resources={"gpus": 0}))["resources"]
    assert cpu_only == {}
    amd = OperatorSettings(default_output_uri="s3://a/", gpu_resource_name="amd.com/gpu")
    assert container(job_for(amd, resources={"gpus": 2}))["resources"]["limits"] == {"amd.com/gpu": "2"}


def test_trainer_threads_follow_the_cpu_request() -> None:
    assert env(job_for(resources={"gpus": 0, "cpu": "250m"}))["OMP_NUM_THREADS"] == "1"
    assert env(job_for(resources={"gpus": 0, "cpu": "6"}))["OMP_NUM_THREADS"] == "6"
    assert env(job_for(resources={"gpus": 4, "cpu": "16"}))["OMP_NUM_THREADS"] == "4"  # four torchrun processes
    assert "OMP_NUM_THREADS" not in env(job_for(resources={"gpus": 0}))  # no request: torch's default


def test_placement() -> None:
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    job = job_for(
        resources={"nodeSelector": {"gpu": "h100"}, "tolerations": tolerations, "priorityClassName": "batch-low"}
    )
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == tolerations
    assert pod["priorityClassName"] == "batch-low"
    bare = job_for()["spec"]["template"]["spec"]
    assert not {"nodeSelector", "tolerations", "priorityClassName"} & set(bare)


def test_run_policy() -> None:
    default = job_for()["spec"]
    assert default["backoffLimit"] == 3
    assert default["suspend"] is False
    assert not {"activeDeadlineSeconds", "ttlSecondsAfterFinished"} & set(default)
    spec = job_for(
        runPolicy={"backoffLimit": 1, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 600, "suspend": True}
    )["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (1, 3600, 600)
    assert spec["suspend"] is True


def test_pod_failure_policy_fails_fast_on_bad_input_and_ignores_disruptions_and_storage_outages() -> None:
    rules = job_for()["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [10, 11, 12]},
    }
    assert rules[1] == {
        "action": "Ignore",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [75]},
    }
    assert rules[2] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}


def test_kueue_queue_creates_the_job_suspended_with_the_label() -> None:
    job = job_for(runPolicy={"queueName": "team-a"})
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["suspend"] is True
    queued_by_default = job_for(OperatorSettings(default_output_uri="s3://a/", default_queue="shared"))
    assert queued_by_default["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "shared"
    assert "kueue.x-k8s.io/queue-name" not in job_for()["metadata"]["labels"]


def test_multi_node_is_an_indexed_job_with_torchrun() -> None:
    ft, raw = finetune(resources={"nodes": 2, "gpus": 8})
    p = build.plan(ft, raw, None, SETTINGS)
    job = build.build_job(ft, p, SETTINGS)
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 2, 2)
    c = container(job)
    assert c["command"][:4] == ["kubetune-trainer", "launch", "--nnodes=2", "--nproc-per-node=8"]
    assert "--node-rank=$(NODE_RANK)" in c["command"]
    assert c["command"][-2:] == ["--", "run"]
    assert c["args"][:2] == ["--config", "/etc/kubetune/config.json"]
    assert env(job)["MASTER_ADDR"] == "support-bot-v1-train-0.support-bot-v1-train.team-a.svc"
    assert job["spec"]["template"]["spec"]["subdomain"] == "support-bot-v1-train"
    service = build.build_headless_service(ft, SETTINGS)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": "support-bot-v1-train"}
    assert "completionMode" not in job_for()["spec"]


def test_several_gpus_on_one_node_use_all_of_them() -> None:
    c = container(job_for(resources={"gpus": 4}))
    assert c["command"] == ["kubetune-trainer", "launch", "--nnodes=1", "--nproc-per-node=4", "--", "run"]
    assert container(job_for())["command"] == ["kubetune-trainer"]


def test_hf_endpoint_reaches_the_pod() -> None:
    settings = OperatorSettings(default_output_uri="s3://a/", hf_endpoint="http://hub-mirror:8080")
    assert env(job_for(settings))["HF_ENDPOINT"] == "http://hub-mirror:8080"
    assert "HF_ENDPOINT" not in env(job_for())


# ----------------------------------------------------------------------------- the trainer config


def test_the_job_carries_the_resolved_config_and_no_credentials() -> None:
    ft, raw = finetune(
        training={"learningRate": "1e-4", "epochs": 2, "maxSeqLength": 512},
        method={"type": "DoRA", "lora": {"rank": 8, "dropout": "0.1"}},
        evaluation={
            "gates": [
                {"metric": "exact_match", "minLiftOver": {"baseline": "prompted", "by": "0.05"}},
                {"metric": "token_f1", "minLiftOver": {"baseline": "base", "significance": "0.01"}},
            ]
        },
    )
    p = build.plan(ft, raw, None, SETTINGS)
    job = build.build_job(ft, p, SETTINGS)
    text = job["spec"]["template"]["metadata"]["annotations"][build.CONFIG_ANNOTATION]
    config = json.loads(text)
    assert config["run_id"] == "0b5e1c7e-0000-4000-8000-000000000001"
    assert config["output_uri"] == "s3://adapters/team-a/support-bot-v1/0b5e1c7e-0000-4000-8000-000000000001/"
    assert config["training"]["learning_rate"] == pytest.approx(1e-4)
    assert config["method"] == {
        "type": "DoRA",
        "lora": {"rank": 8, "alpha": 32, "dropout": 0.1, "target_modules": None, "last_layers": None},
    }
    lifts = [g["min_lift_over"] for g in config["evaluation"]["gates"]]
    assert lifts == [
        {"baseline": "prompted", "by": 0.05, "significance": None},
        {"baseline": "base", "by": 0.0, "significance": 0.01},
    ]
    assert config["storage"]["endpoint"] == "http://minio.storage:9000"
    assert config["lineage"] == {
        "namespace": "team-a",
        "name": "support-bot-v1",
        "uid": ft.metadata["uid"],
        "generation": 1,
    }
    assert "AWS" not in text
    # The pod reads it as /etc/kubetune/config.json through the downward API.
    (volume,) = [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    (item,) = volume["downwardAPI"]["items"]
    assert item == {
        "path": "config.json",
        "fieldRef": {"fieldPath": "metadata.annotations['kubetune.io/trainer-config']"},
    }
    assert {"name": "config", "mountPath": "/etc/kubetune", "readOnly": True} in container(job)["volumeMounts"]


def test_template_defaults_sit_under_the_spec() -> None:
    template = FineTuneTemplate.model_validate(
        yaml.safe_load((ROOT / "docs/examples/finetunetemplate.yaml").read_text())
    )
    ft, raw = finetune(templateRef={"name": "team-default"}, training={"epochs": 5}, runPolicy={"queueName": "team-a"})
    p = build.plan(ft, raw, template, SETTINGS)
    assert p.config.training.epochs == 5  # the FineTune's own value wins
    assert p.config.training.learning_rate == pytest.approx(2e-4)  # from the template
    assert p.config.method.lora.rank == 16
    assert p.queue == "team-a"
    assert p.config.evaluation.gates[0].min_lift_over is not None
    assert p.output_root == "s3://adapters/"


def test_plan_refuses_local_uris_and_a_missing_output() -> None:
    ft, raw = finetune(baseModel={"uri": "file:///models/tiny"})
    with pytest.raises(build.TemplateViolationError, match=r"spec.baseModel.uri: file:// URIs only work"):
        build.plan(ft, raw, None, SETTINGS)
    ft, raw = finetune()
    with pytest.raises(build.TemplateViolationError, match=r"spec\.output\.uri is not set"):
        build.plan(ft, raw, None, OperatorSettings())


@pytest.mark.parametrize(
    ("guardrails", "spec", "needle"),
    [
        (
            {"allowedBaseModelPrefixes": ["s3://approved/"]},
            {},
            "spec.baseModel.uri s3://models/tiny-llama/ is not under",
        ),
        ({"allowedDatasetPrefixes": ["s3://curated/"]}, {}, "spec.dataset.train"),
        ({"allowedImages": ["platform/"]}, {}, "spec.image registry.example/kubetune/trainer:1.0 is not one of"),
        ({"allowedMethods": ["LoRA"]}, {"method": {"type": "Full"}}, "spec.method.type Full is not allowed"),
        ({"maxGpus": 2}, {"resources": {"gpus": 4}}, "spec.resources.gpus 4 exceeds maxGpus 2"),
        ({"maxNodes": 1}, {"resources": {"nodes": 2}}, "spec.resources.nodes 2 exceeds maxNodes 1"),
        ({"maxEpochs": 2}, {"training": {"epochs": 3}}, "spec.training.epochs 3 exceeds maxEpochs 2"),
        ({"maxActiveDeadlineSeconds": 60}, {}, "spec.runPolicy.activeDeadlineSeconds unset must be at most 60"),
        ({"requireQueue": True}, {}, "spec.runPolicy.queueName is required"),
        ({"allowedQueues": ["a"]}, {"runPolicy": {"queueName": "b"}}, "spec.runPolicy.queueName b is not one of a"),
        ({"requireGates": True}, {}, "spec.evaluation.gates must declare at least one gate"),
    ],
)
def test_each_guardrail_names_its_rule(guardrails: dict[str, Any], spec: dict[str, Any], needle: str) -> None:
    template = FineTuneTemplate.model_validate({"metadata": {"name": "strict"}, "spec": {"guardrails": guardrails}})
    ft, raw = finetune(templateRef={"name": "strict"}, **spec)
    with pytest.raises(build.TemplateViolationError, match="FineTuneTemplate strict: ") as caught:
        build.plan(ft, raw, template, SETTINGS)
    assert needle in str(caught.value)


def test_a_spec_within_the_guardrails_passes() -> None:
    template = FineTuneTemplate.model_validate(
        yaml.safe_load((ROOT / "docs/examples/finetunetemplate.yaml").read_text())
    )
    ft, raw = finetune(
        templateRef={"name": "team-default"},
        baseModel={"uri": "s3://models/tiny/"},
        dataset={"train": "s3://datasets/a.jsonl", "eval": "s3://datasets/b.jsonl"},
    )
    assert build.plan(ft, raw, template, SETTINGS).queue == "team-default"


def test_settings_from_the_environment() -> None:
    s = OperatorSettings.from_env(
        {
            "KUBETUNE_TRAINER_IMAGE": "x/y:1",
            "KUBETUNE_STATUS_INTERVAL_SECONDS": "2.5",
            "KUBETUNE_METRICS_PORT": "9000",
            "KUBETUNE_TRAINER_COMMAND": "python -m kubetune_trainer.cli",
            "KUBETUNE_EXTRA_LABELS": "team=ml,cost=gpu",
        },
        health_port=0,
    )
    assert (s.trainer_image, s.status_interval_seconds, s.metrics_port, s.health_port) == ("x/y:1", 2.5, 9000, 0)
    assert s.trainer_command == ("python", "-m", "kubetune_trainer.cli")
    assert s.extra_labels == {"team": "ml", "cost": "gpu"}


# ----------------------------------------------------------------------------- status


def job(
    active: int = 0, failed: int = 0, succeeded: int = 0, suspend: bool = False, **conditions: str
) -> dict[str, Any]:
    return {
        "metadata": {"name": "x-train", "annotations": {}},
        "spec": {"suspend": suspend},
        "status": {
            "active": active,
            "failed": failed,
            "succeeded": succeeded,
            "startTime": "2026-11-29T09:00:00Z",
            "conditions": [{"type": t, "status": "True", "reason": r} for t, r in conditions.items()],
        },
    }


SUMMARY_OK = {
    "phase": "Succeeded",
    "reason": "Succeeded",
    "message": "exact_match 0.9100; prompted 0.6000; base 0.1000",
    "adapter": {
        "uri": "s3://a/r/adapter/",
        "digest": "sha256:" + "a" * 64,
        "sizeBytes": 10,
        "trainableParams": 5,
        "promotable": True,
    },
    "evaluation": {
        "passed": True,
        "score": 0.91,
        "metrics": {"exact_match": 0.91},
        "baselines": {"prompted": {"exact_match": 0.6}},
        "gates": [{"metric": "exact_match", "rule": "min 0.8", "value": 0.91, "threshold": 0.8, "passed": True}],
    },
    "data": {"train": 400, "validation": 40, "eval": 90, "dropped": {"duplicate": 3}},
    "training": {"resumedFromStep": 16},
}


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_running_phases_follow_the_trainer_stage() -> None:
    for stage, phase in (("prepare", "Preparing"), ("train", "Training"), ("evaluate", "Evaluating")):
        new = st.observe(
            {},
            st.Observation(job=job(active=1), progress=Progress(stage=stage, step=3, total_steps=10)),
            generation=2,
            now=NOW,
        )
        assert new["phase"] == phase
        assert new["observedGeneration"] == 2
        assert cond(new, "Reconciling")["status"] == "True"
        assert cond(new, "Ready")["status"] == "False"
    assert st.observe({}, st.Observation(job=job()), generation=1, now=NOW)["phase"] == "Pending"


@pytest.mark.parametrize(
    ("before", "after"),
    [("Training", "Training"), ("Evaluating", "Evaluating"), ("Preparing", "Preparing"), ("Pending", "Preparing")],
)
def test_an_active_job_without_a_progress_read_keeps_its_running_phase(before: str, after: str) -> None:
    """A replacement pod that is not ready yet (no progress.json read) must not send Training back to Preparing."""
    new = st.observe(
        {"phase": before, "message": "step 8/30"}, st.Observation(job=job(active=1)), generation=1, now=NOW
    )
    assert new["phase"] == after


def test_progress_is_mirrored_with_decimal_strings() -> None:
    progress = {
        "stage": "train",
        "step": 30,
        "total_steps": 120,
        "percent": 25,
        "epoch": 1.25,
        "loss": 0.8412345,
        "eval_loss": None,
        "tokens_per_second": 5400.7,
        "eta_seconds": 93.2,
        "checkpoint_step": 16,
        "checkpoint_uri": "s3://a/r/checkpoints/step-00000016",
    }
    new = st.observe(
        {}, st.Observation(job=job(active=1), progress=Progress.model_validate(progress)), generation=1, now=NOW
    )
    assert new["progress"] == {
        "stage": "train",
        "step": 30,
        "totalSteps": 120,
        "percent": 25,
        "epoch": "1.25",
        "loss": "0.8412",
        "tokensPerSecond": 5400,
        "etaSeconds": 93,
    }
    assert new["checkpoint"] == {"uri": "s3://a/r/checkpoints/step-00000016", "step": 16}


def test_queued_and_suspended() -> None:
    queued = st.observe({}, st.Observation(job=job(suspend=True), queue="team-a"), generation=1, now=NOW)
    assert queued["phase"] == "Queued"
    assert cond(queued, "Queued")["status"] == "True"
    suspended = st.observe({}, st.Observation(job=job(suspend=True), suspended_by_user=True), generation=1, now=NOW)
    assert suspended["phase"] == "Suspended"
    admitted = st.observe(queued, st.Observation(job=job(active=1), queue="team-a"), generation=1, now=NOW)
    assert cond(admitted, "Queued")["status"] == "False"


def test_success_records_adapter_evaluation_data_and_conditions() -> None:
    new = st.observe(
        {},
        st.Observation(
            job=job(succeeded=1, failed=1, Complete="Completed"), summary=Summary.model_validate(SUMMARY_OK)
        ),
        generation=1,
        now=NOW,
    )
    assert new["phase"] == "Succeeded"
    assert new["attempts"] == 2
    assert new["adapter"]["digest"] == "sha256:" + "a" * 64
    assert new["evaluation"]["score"] == "0.91"
    assert new["evaluation"]["baselines"] == {"prompted": {"exact_match": "0.6"}}
    assert new["evaluation"]["gates"][0] == {
        "metric": "exact_match",
        "rule": "min 0.8",
        "value": "0.91",
        "threshold": "0.8",
        "passed": True,
        "message": "",
    }
    assert new["data"] == {
        "trainExamples": 400,
        "validationExamples": 40,
        "evalExamples": 90,
        "dropped": {"duplicate": 3},
    }
    assert new["progress"]["resumedFromStep"] == 16
    for type_ in ("Ready", "Succeeded", "GatesPassed", "Evaluated", "DataReady"):
        assert cond(new, type_)["status"] == "True", type_
    assert cond(new, "Stalled")["status"] == "False"
    assert new["completionTime"] == NOW


@pytest.mark.parametrize(
    ("seen", "reason"),
    [
        (
            st.Observation(
                job=job(failed=1, Failed="PodFailurePolicy"),
                summary=Summary.failed("DataInvalid", "train.jsonl:4: not JSON", "r"),
            ),
            "DataInvalid",
        ),
        (
            st.Observation(
                job=job(failed=1, Failed="PodFailurePolicy"),
                summary=Summary.model_validate({**SUMMARY_OK, "phase": "Failed", "reason": "EvalGateFailed"}),
            ),
            "EvalGateFailed",
        ),
        (st.Observation(job=job(failed=4, Failed="BackoffLimitExceeded"), container_reason="OOMKilled"), "OutOfMemory"),
        (st.Observation(job=job(failed=1, Failed="DeadlineExceeded")), "DeadlineExceeded"),
        (st.Observation(job=job(failed=4, Failed="BackoffLimitExceeded")), "BackoffLimitExceeded"),
        (
            st.Observation(
                job=job(failed=4, Failed="BackoffLimitExceeded"),
                summary=Summary.failed("StorageUnavailable", "s3 down", "r"),
            ),
            "StorageUnavailable",
        ),
    ],
)
def test_failure_reasons_are_actionable(seen: st.Observation, reason: str) -> None:
    new = st.observe({}, seen, generation=1, now=NOW)
    assert new["phase"] == "Failed"
    assert cond(new, "Ready")["reason"] == reason
    assert cond(new, "Stalled")["status"] == "True"
    assert cond(new, "Succeeded")["status"] == "False"
    if "adapter" in new:
        assert new["adapter"]["promotable"] is False


def test_a_published_run_succeeds_even_if_a_second_pod_of_it_failed_the_job() -> None:
    """A Job deleted under a running pod is created again: the first pod publishes, the Job fails on the second."""
    published = Summary.model_validate(SUMMARY_OK)
    seen = st.Observation(job=job(failed=1, Failed="PodFailurePolicy"), summary=published)
    new = st.observe({}, seen, generation=1, now=NOW)
    assert new["phase"] == "Succeeded"
    assert new["adapter"]["promotable"] is True
    # Without an adapter a succeeded summary proves nothing about a failed Job.
    bare = Summary(phase="Succeeded", reason="Succeeded", message="")
    seen = st.Observation(job=job(failed=1, Failed="PodFailurePolicy"), summary=bare)
    new = st.observe({}, seen, generation=1, now=NOW)
    assert (new["phase"], cond(new, "Ready")["reason"]) == ("Failed", "TrainerFailed")


def test_a_job_that_completes_without_a_summary_fails_with_a_reason() -> None:
    new = st.observe({}, st.Observation(job=job(succeeded=1, Complete="Completed")), generation=1, now=NOW)
    assert new["phase"] == "Failed"
    assert cond(new, "Ready")["reason"] == "TrainerFailed"
    assert "without its JSON summary" in new["message"]
    assert all(c["reason"] for c in new["conditions"])  # the CRD requires a reason on every condition


def test_no_step_back_to_pending_between_pods() -> None:
    running = st.observe({}, st.Observation(job=job(active=1), progress=Progress(stage="train")), generation=1, now=NOW)
    gap = st.observe(running, st.Observation(job=job(failed=1)), generation=1, now=NOW)
    assert gap["phase"] == "Training"


def test_condition_transition_time_moves_only_on_status_change() -> None:
    first = st.set_condition(None, "Ready", False, "Training", "", generation=1, now="t1")
    again = st.set_condition(first, "Ready", False, "Evaluating", "scoring", generation=1, now="t2")
    assert again[0]["lastTransitionTime"] == "t1"
    assert again[0]["reason"] == "Evaluating"
    flipped = st.set_condition(again, "Ready", True, "Succeeded", "", generation=1, now="t3")
    assert flipped[0]["lastTransitionTime"] == "t3"


def test_failed_status_before_the_job_exists() -> None:
    waiting = st.failed_status(
        {}, "StorageCredentialsMissing", "Secret x does not exist", generation=1, now=NOW, terminal=False
    )
    assert waiting["phase"] == "Pending"
    assert cond(waiting, "Validated")["reason"] == "StorageCredentialsMissing"
    assert cond(waiting, "Stalled")["status"] == "False"
    final = st.failed_status(copy.deepcopy(waiting), "TemplateViolation", "rule", generation=1, now=NOW, terminal=True)
    assert final["phase"] == "Failed"
    assert cond(final, "Stalled")["status"] == "True"


def test_launched_only_once_validated_reached_status() -> None:
    assert not st.launched({}, "x-train")
    # What observing the Job alone writes (an operator stopped before its own status write): adopt again.
    observed = st.observe({}, st.Observation(job=job()), generation=1, now=NOW)
    assert observed["jobName"] == "x-train"
    assert not st.launched(observed, "x-train")
    done = st.validated(observed, "x-train", "run-1", generation=1, now=NOW)
    assert st.launched(done, "x-train")
    assert not st.launched(done, "other-train")


def test_pvc_uris_are_mounted_read_only_except_the_output() -> None:
    job = job_for(
        baseModel={"uri": "pvc://models/llama/"},
        dataset={"train": "pvc://data/support/train.jsonl", "eval": "pvc://data/support/heldout.jsonl"},
        output={"uri": "pvc://adapters/runs/"},
    )
    pod = job["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert {c: v["persistentVolumeClaim"]["readOnly"] for c, v in claims.items()} == {
        "adapters": False,
        "models": True,
        "data": True,
    }
    mounts = {m["mountPath"]: m for m in container(job)["volumeMounts"]}
    for claim, volume in claims.items():
        mount = mounts[f"/mnt/pvc/{claim}"]
        assert mount["name"] == volume["name"]
        assert mount["readOnly"] is (claim != "adapters")


def test_no_pvc_no_volume() -> None:
    pod = job_for()["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]


def test_every_stage_the_trainer_reports_maps_to_a_phase_that_never_steps_back() -> None:
    """A pod that is still running after publishing ("done") must not show Preparing again."""
    import re

    from kubetune.builders.status import STAGE_PHASE

    sources = (Path(__file__).resolve().parents[2] / "trainer" / "kubetune_trainer").glob("*.py")
    reported = {m for path in sources for m in re.findall(r'\.stage\(\s*"([a-z]+)"', path.read_text())}
    assert reported == set(STAGE_PHASE), reported ^ set(STAGE_PHASE)
    order = ["Preparing", "Training", "Evaluating"]
    phases = [order.index(STAGE_PHASE[s]) for s in ("prepare", "train", "evaluate", "publish", "done")]
    assert phases == sorted(phases)
