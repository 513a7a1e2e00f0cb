"""The trainer ↔ operator contract: exit codes, the termination summary, progress.json.

A training pod tells the operator three things, and this module is the one
place their shapes are written down (the operator imports it; it must stay
light — pydantic and the standard library only, checked by import-linter):

- its **exit code** (:class:`ExitCode`): the Job's ``podFailurePolicy`` fails
  the Job at once on the codes no retry can fix (:data:`NON_RETRYABLE`);
- its **termination message** (:class:`Summary`): one line of JSON, at most
  4 KiB (Kubernetes' limit), written when the run ends;
- ``<run>/progress.json`` in the artifact store (:class:`Progress`), rewritten
  every few seconds while the run is active.

Wire names are what they have always been (``run_id``, ``sizeBytes``, ...):
older and newer trainers and operators read each other. Unknown fields are
ignored on read, so a newer trainer never breaks an older operator.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

TERMINATION_MESSAGE_LIMIT = 4096
"""Kubernetes keeps at most this many bytes of a container's termination message."""

TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def now_iso() -> str:
    """The current time as an RFC 3339 UTC timestamp with seconds (what status and progress.json carry)."""
    return datetime.now(UTC).strftime(TIMESTAMP_FORMAT)


def parse_time(timestamp: str) -> datetime:
    """An RFC 3339 timestamp as written by :func:`now_iso` or the API server (``Z`` or an offset)."""
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).astimezone(UTC)


def seconds_since(timestamp: str | None, now: datetime | None = None) -> float:
    """Seconds from ``timestamp`` to ``now`` (0 when there is no timestamp)."""
    if not timestamp:
        return 0.0
    return ((now or datetime.now(UTC)) - parse_time(timestamp)).total_seconds()


class ExitCode(IntEnum):
    """The trainer's exit codes; the operator's podFailurePolicy keys on them."""

    OK = 0
    FAILED = 1  # unexpected error: the Job retries within its backoffLimit
    USAGE = 2  # wrong command line (argparse)
    BAD_INPUT = 10  # invalid data, config or method for this hardware: never retried
    GATES_FAILED = 11  # trained and published, but the eval gates failed: not retried
    OUT_OF_MEMORY = 12  # out of memory: the same settings fail again, not retried
    STORAGE_UNAVAILABLE = 75  # EX_TEMPFAIL: the store is unreachable, retried
    TERMINATED = 143  # 128 + SIGTERM: stopped (suspend, preemption, eviction); the next pod resumes


NON_RETRYABLE = (ExitCode.BAD_INPUT, ExitCode.GATES_FAILED, ExitCode.OUT_OF_MEMORY)
"""Exit codes on which the Job fails at once: a retry would fail the same way."""

BAD_INPUT_REASONS = (
    "ConfigInvalid",
    "DataInvalid",
    "DataNotFound",
    "BaseModelNotFound",
    "BaseModelDigestMismatch",
    "MethodUnavailable",
    "ArtifactConflict",
)


def exit_code_for(reason: str) -> ExitCode:
    """The exit code that goes with a summary's reason (``launch`` restores it after torchrun)."""
    if reason == "Succeeded":
        return ExitCode.OK
    if reason in BAD_INPUT_REASONS:
        return ExitCode.BAD_INPUT
    return {
        "EvalGateFailed": ExitCode.GATES_FAILED,
        "OutOfMemory": ExitCode.OUT_OF_MEMORY,
        "StorageUnavailable": ExitCode.STORAGE_UNAVAILABLE,
    }.get(reason, ExitCode.FAILED)


class _Wire(BaseModel):
    """A message on the wire: read leniently (unknown fields ignored), written without empty fields."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class AdapterSummary(_Wire):
    """The published artifact."""

    uri: str | None = None
    digest: str | None = None
    size_bytes: int | None = Field(default=None, alias="sizeBytes")
    trainable_params: int | None = Field(default=None, alias="trainableParams")
    manifest_uri: str | None = Field(default=None, alias="manifestUri")
    promotable: bool | None = None
    lora_rank: int | None = Field(default=None, alias="loraRank")


class GateOutcome(_Wire):
    """One gate's result."""

    metric: str
    rule: str
    value: float | None = None
    threshold: float | None = None
    passed: bool
    message: str = ""


class EvaluationSummary(_Wire):
    """Scores of the fine-tune and its baselines, and the gates."""

    passed: bool
    headline: str | None = None
    score: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    baselines: dict[str, dict[str, float]] = Field(default_factory=dict)
    gates: list[GateOutcome] = Field(default_factory=list)
    report_uri: str | None = Field(default=None, alias="reportUri")
    summary: str = ""


class DataSummary(_Wire):
    """What curation kept and dropped."""

    train: int | None = None
    validation: int | None = None
    eval: int | None = None
    dropped: dict[str, int] = Field(default_factory=dict)
    digest: str | None = None
    report_uri: str | None = Field(default=None, alias="reportUri")


class TrainingSummary(_Wire):
    """How training went."""

    steps: int | None = None
    epochs: float | None = None
    final_loss: float | None = Field(default=None, alias="finalLoss")
    final_eval_loss: float | None = Field(default=None, alias="finalEvalLoss")
    tokens_per_second: float | None = Field(default=None, alias="tokensPerSecond")
    seconds: float | None = None
    resumed_from_step: int | None = Field(default=None, alias="resumedFromStep")
    precision: str | None = None
    device: str | None = None
    world_size: int | None = Field(default=None, alias="worldSize")


class Summary(_Wire):
    """The one-line JSON result of a run: the termination message the operator reads."""

    phase: str  # Succeeded | Failed
    reason: str  # CamelCase: Succeeded, DataInvalid, EvalGateFailed, StorageUnavailable, ...
    message: str = ""
    run_id: str = ""
    adapter: AdapterSummary | None = None
    evaluation: EvaluationSummary | None = None
    data: DataSummary | None = None
    training: TrainingSummary | None = None

    @classmethod
    def failed(cls, reason: str, message: str, run_id: str) -> Summary:
        return cls(phase="Failed", reason=reason, message=message, run_id=run_id)

    @property
    def exit_code(self) -> ExitCode:
        return exit_code_for(self.reason)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_json(self, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
        """Compact JSON within the termination-message limit (the message is cut first, then the details)."""
        data = self.as_dict()
        text = _compact(data)
        while len(text.encode()) > limit and len(data["message"]) > 20:
            data["message"] = data["message"][: len(data["message"]) // 2] + "..."
            text = _compact(data)
        if len(text.encode()) > limit:
            data = {k: data[k] for k in ("phase", "reason", "message", "run_id")}
            text = _compact(data)
        return text

    @classmethod
    def parse(cls, text: str | None) -> Summary | None:
        """A termination message read back; None when it is not a summary (a crash, logs as fallback)."""
        try:
            raw = json.loads(text or "")
        except json.JSONDecodeError:
            return None
        if not isinstance(raw, dict) or "phase" not in raw or "reason" not in raw:
            return None
        try:
            return cls.model_validate(raw)
        except ValueError:
            return None


def _compact(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


class Progress(_Wire):
    """``progress.json``: what a running trainer reports every few seconds."""

    stage: str = "prepare"  # prepare | train | evaluate | publish | done
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    resumed_from_step: int | None = None
    checkpoint_step: int | None = None
    checkpoint_uri: str | None = None
    message: str = ""
    history: list[dict[str, Any]] = Field(default_factory=list)
    percent: int = 0
    updated_at: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The document to write now: percent and the timestamp filled in."""
        data = self.model_dump(mode="json")
        data["percent"] = int(100 * self.step / self.total_steps) if self.total_steps else 0
        data["updated_at"] = now_iso()
        return data


def summary_from_manifest(manifest: dict[str, Any], manifest_uri: str, run_id: str) -> Summary:
    """The summary of a run that published: its ``manifest.json`` holds everything the summary says.

    A rerun of a published run reports this instead of redoing the work, and
    the operator reads it when a termination message is missing or cut short.
    """
    evaluation = manifest.get("evaluation") or {}
    passed = bool(manifest.get("promotable"))
    artifact = manifest.get("artifact") or {}
    method = (manifest.get("config") or {}).get("method") or {}
    rank = (method.get("lora") or {}).get("rank") if method.get("type") != "Full" else None
    return Summary(
        phase="Succeeded" if passed else "Failed",
        reason="Succeeded" if passed else "EvalGateFailed",
        message=str(evaluation.get("summary") or ""),
        run_id=str(manifest.get("runId") or run_id),
        adapter=AdapterSummary(
            uri=artifact.get("uri"),
            digest=artifact.get("digest"),
            size_bytes=artifact.get("sizeBytes"),
            trainable_params=(manifest.get("parameters") or {}).get("trainable"),
            manifest_uri=manifest_uri,
            promotable=passed,
            lora_rank=rank,
        ),
        evaluation=EvaluationSummary.model_validate(evaluation) if evaluation else None,
        data=DataSummary.model_validate((manifest.get("data") or {}).get("summary") or {}),
        training=TrainingSummary.model_validate(manifest.get("training") or {}),
    )
