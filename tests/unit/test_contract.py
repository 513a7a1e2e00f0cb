"""The trainer ↔ operator contract, and the status the operator builds from it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.api.finetune import (
    EvaluationSpec,
    FineTuneStatus,
    LoRASpec,
    ResolvedFineTuneSpec,
    RunPolicy,
    TrainingSpec,
)
from kubetune.api.types import StorageSpec
from kubetune.builders import status as st
from kubetune.builders.resolve import resolve_finetune
from kubetune.builders.settings import OperatorSettings
from kubetune.builders.trainer_config import build_trainer_config
from kubetune_trainer import config as tc
from kubetune_trainer.contract import (
    NON_RETRYABLE,
    ExitCode,
    Progress,
    Summary,
    exit_code_for,
    summary_from_manifest,
)

NOW = "2026-11-29T10:00:00Z"
SUMMARY: dict[str, Any] = {
    "phase": "Succeeded",
    "reason": "Succeeded",
    "message": "exact_match 0.9",
    "run_id": "uid-1",
    "adapter": {"uri": "s3://a/", "digest": "sha256:" + "a" * 64, "sizeBytes": 1, "trainableParams": 2,
                "manifestUri": "s3://a/manifest.json", "promotable": True, "loraRank": 8},
    "evaluation": {"passed": True, "headline": "exact_match", "score": 0.9, "metrics": {"exact_match": 0.9},
                   "baselines": {"base": {"exact_match": 0.0}}, "reportUri": "s3://a/eval/report.json",
                   "gates": [{"metric": "exact_match", "rule": "min 0.5", "value": 0.9, "threshold": 0.5,
                              "passed": True, "message": ""}], "summary": "ok"},
    "data": {"train": 10, "validation": 2, "eval": 3, "dropped": {"duplicate": 1}, "digest": "sha256:" + "d" * 64},
    "training": {"steps": 4, "resumedFromStep": 2, "tokensPerSecond": 100.5},
}  # fmt: skip


def test_summary_round_trips_with_the_wire_names() -> None:
    summary = Summary.model_validate(SUMMARY)
    line = summary.to_json()
    assert "\n" not in line
    data = json.loads(line)
    assert data["run_id"] == "uid-1"
    assert data["adapter"]["sizeBytes"] == 1
    assert data["training"]["resumedFromStep"] == 2
    assert Summary.parse(line) == summary


def test_summary_stays_within_the_termination_message_limit() -> None:
    summary = Summary.model_validate({**SUMMARY, "message": "x" * 10_000})
    line = summary.to_json()
    assert len(line.encode()) <= 4096
    assert json.loads(line)["adapter"]["digest"] == SUMMARY["adapter"]["digest"]


@pytest.mark.parametrize("text", [None, "", "Traceback (most recent call last):", "[1, 2]", '{"phase": "Failed"}'])
def test_anything_else_is_not_a_summary(text: str | None) -> None:
    assert Summary.parse(text) is None


def test_unknown_fields_from_a_newer_trainer_are_ignored() -> None:
    summary = Summary.parse(json.dumps({**SUMMARY, "future": {"x": 1}, "adapter": {**SUMMARY["adapter"], "new": 2}}))
    assert summary is not None
    assert summary.adapter is not None
    assert summary.adapter.digest == SUMMARY["adapter"]["digest"]


def test_exit_codes_and_reasons() -> None:
    assert [int(c) for c in NON_RETRYABLE] == [10, 11, 12]
    assert exit_code_for("DataInvalid") is ExitCode.BAD_INPUT
    assert exit_code_for("EvalGateFailed") is ExitCode.GATES_FAILED
    assert exit_code_for("StorageUnavailable") is ExitCode.STORAGE_UNAVAILABLE
    assert exit_code_for("Anything") is ExitCode.FAILED
    assert Summary.failed("OutOfMemory", "m", "r").exit_code is ExitCode.OUT_OF_MEMORY


def test_summary_from_a_manifest() -> None:
    manifest = {
        "runId": "uid-1",
        "promotable": False,
        "evaluation": SUMMARY["evaluation"] | {"passed": False, "summary": "gates failed"},
        "artifact": {"uri": "s3://a/adapter/", "digest": "sha256:" + "c" * 64, "sizeBytes": 9},
        "parameters": {"trainable": 3},
        "config": {"method": {"type": "LoRA", "lora": {"rank": 4}}},
        "data": {"summary": SUMMARY["data"]},
        "training": SUMMARY["training"],
    }
    summary = summary_from_manifest(manifest, "s3://a/manifest.json", "uid-1")
    assert (summary.phase, summary.reason, summary.message) == ("Failed", "EvalGateFailed", "gates failed")
    assert summary.adapter is not None
    assert (summary.adapter.digest, summary.adapter.lora_rank, summary.adapter.promotable) == (
        "sha256:" + "c" * 64,
        4,
        False,
    )


def test_progress_document() -> None:
    doc = Progress(stage="train", step=5, total_steps=20, loss=1.5).as_json()
    assert doc["percent"] == 25
    assert doc["updated_at"]
    assert Progress.model_validate(doc).step == 5


# ----------------------------------------------------------------------------- status the CRD keeps


def job(spec: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "j"}, "spec": spec or {}, "status": status}


PHASES = {
    "Pending": st.Observation(job=job()),
    "Queued": st.Observation(job=job({"suspend": True}), queue="team-a"),
    "Suspended": st.Observation(job=job({"suspend": True}), suspended_by_user=True),
    "Preparing": st.Observation(job=job(active=1, startTime=NOW)),
    "Training": st.Observation(
        job=job(active=1), progress=Progress(stage="train", step=3, total_steps=9, loss=2.0, checkpoint_step=2,
                                             checkpoint_uri="s3://c/", tokens_per_second=10.5, eta_seconds=3.2)
    ),
    "Evaluating": st.Observation(job=job(active=1), progress=Progress(stage="evaluate", step=9, total_steps=9)),
    "Succeeded": st.Observation(job=job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}]),
                                summary=Summary.model_validate(SUMMARY)),
    "Failed": st.Observation(
        job=job(failed=1, conditions=[{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]),
        summary=Summary.failed("DataInvalid", "train.jsonl:3: not JSON", "uid-1"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("phase", list(PHASES))
def test_every_phase_gives_a_status_the_crd_keeps(phase: str) -> None:
    status = st.validated({}, "j", "uid-1", generation=1, now=NOW)
    status = st.observe(status, PHASES[phase], generation=1, now=NOW)
    assert status["phase"] == phase
    FineTuneStatus.model_validate(status)  # extra="forbid": a key the structural schema would prune fails here


@pytest.mark.parametrize("terminal", [True, False])
def test_a_finetune_that_cannot_start_has_a_status_the_crd_keeps(terminal: bool) -> None:
    status = st.failed_status({}, "TemplateViolation", "m", generation=2, now=NOW, terminal=terminal)
    FineTuneStatus.model_validate(status)


# ----------------------------------------------------------------------------- one home for defaults


def test_resolved_spec_has_every_section() -> None:
    settings = OperatorSettings(default_output_uri="s3://out/", default_storage_secret="creds", default_queue="q")
    spec = resolve_finetune({"baseModel": {"uri": "s3://m/"}, "dataset": {"train": "s3://d/t.jsonl"}}, None, settings)
    assert spec.method.type == "LoRA"
    assert spec.method.lora == LoRASpec()
    assert spec.training == TrainingSpec()
    assert spec.evaluation == EvaluationSpec()
    assert spec.output.uri == "s3://out/"
    assert spec.run_policy.queue_name == "q"
    assert spec.storage == StorageSpec(region="us-east-1", secret_ref={"name": "creds"})  # type: ignore[arg-type]
    assert spec.image == settings.trainer_image
    assert spec.run_policy.model_dump(exclude={"queue_name"}) == RunPolicy().model_dump(exclude={"queue_name"})


def test_api_defaults_equal_the_trainers() -> None:
    """The API models' defaults, resolved and rendered, are exactly TrainerConfig's own defaults."""
    spec = ResolvedFineTuneSpec.model_validate(
        {"baseModel": {"uri": "s3://m/"}, "dataset": {"train": "s3://d/t.jsonl"}, "image": "i",
         "storage": {"region": "us-east-1"}}
    )  # fmt: skip
    rendered = build_trainer_config(
        {"name": "x", "namespace": "n", "uid": "u"},
        spec,
        run_id="u",
        output_root="s3://out/",
        work_dir=tc.TrainerConfig.model_fields["work_dir"].default,
        progress_interval_seconds=tc.TrainerConfig.model_fields["progress_interval_seconds"].default,
    )
    assert rendered.method == tc.MethodConfig()
    assert rendered.training == tc.TrainingConfig()
    assert rendered.evaluation == tc.EvaluationConfig()
    assert rendered.storage == tc.StorageConfig()
    assert rendered.dataset.curation == tc.CurationConfig()
    defaults = tc.DatasetConfig(train="s3://d/t.jsonl")
    assert rendered.dataset == defaults
