"""FineTune status from what the operator observes: its Job, the trainer's summary, progress.json.

Pure functions, so every transition is unit-tested. Conditions follow
``metav1.Condition`` and kstatus: ``Ready`` (done and good), ``Reconciling``
(work in progress), ``Stalled`` (failed; needs a human), plus the specific
ones (Validated, Queued, DataReady, Trained, Evaluated, GatesPassed,
Succeeded). ``lastTransitionTime`` changes only when a status changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

ACTIVE_PHASES = ("Pending", "Queued", "Preparing", "Training", "Evaluating", "Suspended")
TERMINAL_PHASES = ("Succeeded", "Failed")
STAGE_PHASE = {"prepare": "Preparing", "train": "Training", "evaluate": "Evaluating", "publish": "Evaluating"}

# Reasons a container or Job gives that map to an actionable FineTune reason.
_CONTAINER_REASONS = {"OOMKilled": "OutOfMemory", "DeadlineExceeded": "DeadlineExceeded"}
_JOB_REASONS = {"DeadlineExceeded": "DeadlineExceeded", "BackoffLimitExceeded": "BackoffLimitExceeded"}


def set_condition(
    conditions: list[dict[str, Any]] | None,
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    *,
    generation: int | None,
    now: str,
) -> list[dict[str, Any]]:
    """A copy of ``conditions`` with ``type_`` set; the transition time moves only on a status change."""
    value = "Unknown" if status is None else ("True" if status else "False")
    out = [dict(c) for c in conditions or [] if c.get("type") != type_]
    previous = next((c for c in conditions or [] if c.get("type") == type_), None)
    changed = previous is None or previous.get("status") != value
    condition: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": now if changed or previous is None else previous.get("lastTransitionTime", now),
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    out.append(condition)
    return sorted(out, key=lambda c: str(c["type"]))


@dataclass(frozen=True)
class Observation:
    """What the controller saw of one run."""

    job: dict[str, Any] | None
    summary: dict[str, Any] | None = None  # the trainer's termination message, when a pod ended
    container_reason: str | None = None  # e.g. OOMKilled, when the container gave one
    progress: dict[str, Any] | None = None  # progress.json
    suspended_by_user: bool = False
    queue: str | None = None


def _decimal(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float):
        return None if math.isnan(value) else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def progress_status(progress: dict[str, Any]) -> dict[str, Any]:
    """progress.json → status.progress (decimals as strings, per the API conventions)."""
    out: dict[str, Any] = {
        "stage": progress.get("stage"),
        "step": progress.get("step"),
        "totalSteps": progress.get("total_steps"),
        "percent": progress.get("percent"),
        "epoch": _decimal(progress.get("epoch")),
        "loss": _decimal(progress.get("loss")),
        "evalLoss": _decimal(progress.get("eval_loss")),
        "tokensPerSecond": None if progress.get("tokens_per_second") is None else int(progress["tokens_per_second"]),
        "etaSeconds": None if progress.get("eta_seconds") is None else int(progress["eta_seconds"]),
        "resumedFromStep": progress.get("resumed_from_step"),
        "updatedAt": progress.get("updated_at"),
    }
    return {k: v for k, v in out.items() if v is not None}


def _job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return dict(c)
    return None


def attempts(job: dict[str, Any]) -> int:
    """Pods started for the Job so far (failed, running and succeeded ones)."""
    s = job.get("status") or {}
    return int(s.get("failed") or 0) + int(s.get("active") or 0) + int(s.get("succeeded") or 0)


def adapter_status(summary: dict[str, Any]) -> dict[str, Any]:
    a = summary.get("adapter") or {}
    out = {
        "uri": a.get("uri"),
        "digest": a.get("digest"),
        "sizeBytes": a.get("sizeBytes"),
        "trainableParams": a.get("trainableParams"),
        "manifestUri": a.get("manifestUri"),
        "promotable": a.get("promotable"),
    }
    return {k: v for k, v in out.items() if v is not None}


def evaluation_status(summary: dict[str, Any]) -> dict[str, Any]:
    e = summary.get("evaluation") or {}
    if not e:
        return {}
    gates = []
    for g in e.get("gates") or []:
        gates.append(
            {
                k: v
                for k, v in {
                    "metric": g.get("metric"),
                    "rule": g.get("rule"),
                    "value": _decimal(g.get("value")),
                    "threshold": _decimal(g.get("threshold")),
                    "passed": bool(g.get("passed")),
                    "message": (g.get("message") or "")[:1024],
                }.items()
                if v is not None
            }
        )
    out = {
        "score": _decimal(e.get("score")),
        "metrics": {k: _decimal(v) for k, v in (e.get("metrics") or {}).items()},
        "baselines": {b: {k: _decimal(v) for k, v in m.items()} for b, m in (e.get("baselines") or {}).items()},
        "gates": gates,
        "passed": e.get("passed"),
        "reportUri": e.get("reportUri"),
    }
    return {k: v for k, v in out.items() if v is not None}


def data_status(summary: dict[str, Any]) -> dict[str, Any]:
    d = summary.get("data") or {}
    out = {
        "trainExamples": d.get("train"),
        "validationExamples": d.get("validation"),
        "evalExamples": d.get("eval"),
        "dropped": d.get("dropped"),
        "digest": d.get("digest"),
        "reportUri": d.get("reportUri"),
    }
    return {k: v for k, v in out.items() if v is not None}


def observe(status: dict[str, Any], seen: Observation, *, generation: int | None, now: str) -> dict[str, Any]:
    """The FineTune's next status, given its current status and what was observed."""
    new: dict[str, Any] = dict(status)
    new["observedGeneration"] = generation
    conditions = status.get("conditions") or []

    def cond(type_: str, value: bool | None, reason: str, message: str = "") -> None:
        nonlocal conditions
        conditions = set_condition(conditions, type_, value, reason, message, generation=generation, now=now)

    job = seen.job
    if seen.progress:
        new["progress"] = progress_status(seen.progress)
        step = seen.progress.get("checkpoint_step")
        if step:
            new["checkpoint"] = {"uri": seen.progress.get("checkpoint_uri"), "step": step}
    if job is not None:
        new["jobName"] = job["metadata"]["name"]
        new["attempts"] = attempts(job)
        start = (job.get("status") or {}).get("startTime")
        if start:
            new["startTime"] = start

    complete = job is not None and _job_condition(job, "Complete") is not None
    failed = job is not None and _job_condition(job, "Failed")
    summary = seen.summary or {}

    if summary.get("data"):
        new["data"] = data_status(summary)
        cond("DataReady", True, "DataCurated", f"{summary['data'].get('train')} training examples after curation")
    if summary.get("evaluation"):
        new["evaluation"] = evaluation_status(summary)
        cond("Trained", True, "TrainingComplete", "")
        cond("Evaluated", True, "Evaluated", str(summary.get("message", ""))[:1024])
        passed = bool(summary["evaluation"].get("passed"))
        cond("GatesPassed", passed, "GatesPassed" if passed else "EvalGateFailed", str(summary.get("message", "")))
    if summary.get("adapter"):
        new["adapter"] = adapter_status(summary)
    resumed = (summary.get("training") or {}).get("resumedFromStep")
    if resumed:
        new["progress"] = {**(new.get("progress") or {}), "resumedFromStep": resumed}

    if complete and summary.get("phase") == "Succeeded":
        phase, reason, message = "Succeeded", "Succeeded", str(summary.get("message") or "fine-tune published")
    elif complete or failed:
        reason = str(summary.get("reason") or "")
        if not reason or reason == "Succeeded":
            reason = _CONTAINER_REASONS.get(seen.container_reason or "", "")
        if not reason and failed:
            reason = _JOB_REASONS.get(str(failed.get("reason")), "TrainerFailed")
        if not reason:  # completed, yet no summary: the trainer did not say what it did
            reason = "TrainerFailed"
        fallback = "the trainer exited without its JSON summary (see the pod's log)"
        message = str(summary.get("message") or (failed.get("message") if failed else "") or fallback)
        phase = "Failed"
    elif job is not None and (job.get("spec") or {}).get("suspend"):
        if seen.suspended_by_user:
            phase, reason, message = (
                "Suspended",
                "Suspended",
                "runPolicy.suspend is true; resumes from the newest checkpoint",
            )
        else:
            phase, reason, message = (
                "Queued",
                "WaitingForAdmission",
                f"waiting for Kueue to admit the Job (queue {seen.queue})",
            )
    elif job is not None and int((job.get("status") or {}).get("active") or 0) > 0:
        stage = (seen.progress or {}).get("stage")
        phase = STAGE_PHASE.get(str(stage), "Preparing")
        reason, message = "Running", str((seen.progress or {}).get("message") or f"{phase.lower()}")
    elif status.get("phase") in ("Preparing", "Training", "Evaluating"):
        # Between a pod's end and the Job's verdict (or a retry's pod): no step back to Pending.
        phase, reason, message = str(status["phase"]), "Running", str(status.get("message") or "")
    else:
        phase, reason, message = "Pending", "JobCreated", "waiting for the training pod to start"

    new["phase"] = phase
    new["message"] = message[:4096]
    if seen.queue:
        cond("Queued", phase == "Queued", "WaitingForAdmission" if phase == "Queued" else "Admitted", "")
    if phase == "Succeeded":
        cond("Succeeded", True, "Succeeded", message)
        cond("Ready", True, "Succeeded", message)
        cond("Reconciling", False, "Succeeded", "")
        cond("Stalled", False, "Succeeded", "")
        new.setdefault("completionTime", now)
    elif phase == "Failed":
        cond("Succeeded", False, reason, message)
        cond("Ready", False, reason, message)
        cond("Reconciling", False, reason, "")
        cond("Stalled", True, reason, message)
        if reason in ("TrainerFailed", "BackoffLimitExceeded", "OutOfMemory", "DeadlineExceeded"):
            cond("Trained", False, reason, message)
        new.setdefault("completionTime", now)
        if "adapter" in new:
            new["adapter"]["promotable"] = False
    else:
        cond("Ready", False, phase, message)
        cond("Reconciling", True, phase, message)
        cond("Stalled", False, phase, "")
        if phase == "Training":
            cond("DataReady", True, "DataCurated", "")
        if phase == "Evaluating":
            cond("DataReady", True, "DataCurated", "")
            cond("Trained", True, "TrainingComplete", "")
    new["conditions"] = conditions
    return {k: v for k, v in new.items() if v is not None}


def failed_status(
    status: dict[str, Any], reason: str, message: str, *, generation: int | None, now: str, terminal: bool
) -> dict[str, Any]:
    """Status for a FineTune that cannot start: Failed (terminal) or Pending with the reason (it may recover)."""
    new = dict(status)
    new["observedGeneration"] = generation
    new["message"] = message[:4096]
    conditions = status.get("conditions") or []
    conditions = set_condition(conditions, "Validated", False, reason, message, generation=generation, now=now)
    conditions = set_condition(conditions, "Ready", False, reason, message, generation=generation, now=now)
    if terminal:
        new["phase"] = "Failed"
        new.setdefault("completionTime", now)
        conditions = set_condition(conditions, "Succeeded", False, reason, message, generation=generation, now=now)
        conditions = set_condition(conditions, "Stalled", True, reason, message, generation=generation, now=now)
        conditions = set_condition(conditions, "Reconciling", False, reason, "", generation=generation, now=now)
    else:
        new["phase"] = "Pending"
        conditions = set_condition(conditions, "Stalled", False, reason, "", generation=generation, now=now)
        conditions = set_condition(conditions, "Reconciling", True, reason, message, generation=generation, now=now)
    new["conditions"] = conditions
    return new


def launched(status: dict[str, Any], job_name: str) -> bool:
    """Whether creating ``job_name`` reached status (:func:`validated` ran); if not, the Job is adopted."""
    ok = any(c.get("type") == "Validated" and c.get("status") == "True" for c in status.get("conditions") or [])
    return ok and status.get("jobName") == job_name and bool(status.get("runId"))


def validated(
    status: dict[str, Any], job_name: str, run_id: str, *, generation: int | None, now: str
) -> dict[str, Any]:
    """Status right after the Job was created (or found)."""
    new = dict(status)
    new.update(observedGeneration=generation, jobName=job_name, runId=run_id)
    new.setdefault("phase", "Pending")
    conditions = set_condition(
        status.get("conditions"), "Validated", True, "Validated", "", generation=generation, now=now
    )
    conditions = set_condition(conditions, "Reconciling", True, "JobCreated", "", generation=generation, now=now)
    new["conditions"] = conditions
    return new
