"""FineTune status from what the operator observes: its Job, the trainer's summary, progress.json.

Pure functions, so every transition is unit-tested. Conditions follow
``metav1.Condition`` and kstatus: ``Ready`` (done and good), ``Reconciling``
(work in progress), ``Stalled`` (failed; needs a human), plus the specific
ones (Validated, Queued, DataReady, Trained, Evaluated, GatesPassed,
Succeeded). ``lastTransitionTime`` changes only when a status changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.contract import AdapterSummary, DataSummary, EvaluationSummary, Progress, Summary

ACTIVE_PHASES = ("Pending", "Queued", "Preparing", "Training", "Evaluating", "Suspended")
TERMINAL_PHASES = ("Succeeded", "Failed")
RUNNING_PHASES = ("Preparing", "Training", "Evaluating")
STAGE_PHASE = {
    "prepare": "Preparing",
    "train": "Training",
    "evaluate": "Evaluating",
    "publish": "Evaluating",
    "done": "Evaluating",  # published; the pod is exiting and the Job about to complete
}

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
    summary: Summary | None = None  # the trainer's termination message, when a pod ended
    container_reason: str | None = None  # e.g. OOMKilled, when the container gave one
    progress: Progress | None = None  # progress.json
    suspended_by_user: bool = False
    queue: str | None = None


def _decimal(value: float | int | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def progress_status(progress: Progress) -> dict[str, Any]:
    """progress.json → status.progress (decimals as strings, per the API conventions)."""
    return _present(
        {
            "stage": progress.stage,
            "step": progress.step,
            "totalSteps": progress.total_steps,
            "percent": progress.percent,
            "epoch": _decimal(progress.epoch),
            "loss": _decimal(progress.loss),
            "evalLoss": _decimal(progress.eval_loss),
            "tokensPerSecond": None if progress.tokens_per_second is None else int(progress.tokens_per_second),
            "etaSeconds": None if progress.eta_seconds is None else int(progress.eta_seconds),
            "resumedFromStep": progress.resumed_from_step,
            "updatedAt": progress.updated_at,
        }
    )


def _job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return dict(c)
    return None


def attempts(job: dict[str, Any]) -> int:
    """Pods started for the Job so far (failed, running and succeeded ones)."""
    s = job.get("status") or {}
    return int(s.get("failed") or 0) + int(s.get("active") or 0) + int(s.get("succeeded") or 0)


def adapter_status(adapter: AdapterSummary) -> dict[str, Any]:
    return adapter.model_dump(by_alias=True, exclude_none=True)


def evaluation_status(e: EvaluationSummary) -> dict[str, Any]:
    gates = [
        _present(
            {
                "metric": g.metric,
                "rule": g.rule,
                "value": _decimal(g.value),
                "threshold": _decimal(g.threshold),
                "passed": g.passed,
                "message": g.message[:1024],
            }
        )
        for g in e.gates
    ]
    return _present(
        {
            "score": _decimal(e.score),
            "metrics": {k: v for k, v in ((k, _decimal(v)) for k, v in e.metrics.items()) if v is not None},
            "baselines": {
                b: {k: v for k, v in ((k, _decimal(v)) for k, v in m.items()) if v is not None}
                for b, m in e.baselines.items()
            },
            "gates": gates,
            "passed": e.passed,
            "reportUri": e.report_uri,
        }
    )


def data_status(d: DataSummary) -> dict[str, Any]:
    return _present(
        {
            "trainExamples": d.train,
            "validationExamples": d.validation,
            "evalExamples": d.eval,
            "dropped": d.dropped or None,
            "digest": d.digest,
            "reportUri": d.report_uri,
        }
    )


@dataclass(frozen=True)
class _Verdict:
    phase: str
    reason: str
    message: str


def _verdict(status: dict[str, Any], seen: Observation) -> _Verdict:
    """The phase the observation puts the run in, with a reason and a message."""
    job = seen.job
    summary = seen.summary
    complete = job is not None and _job_condition(job, "Complete") is not None
    failed = _job_condition(job, "Failed") if job is not None else None
    published = summary is not None and summary.phase == "Succeeded" and summary.adapter is not None
    # A published run succeeded even when another pod of it failed the Job afterwards
    # (two pods of one run: a Job deleted under a still-running pod and created again).
    if summary is not None and summary.phase == "Succeeded" and (complete or (failed and published)):
        return _Verdict("Succeeded", "Succeeded", summary.message or "fine-tune published")
    if complete or failed:
        reason = summary.reason if summary is not None else ""
        if not reason or reason == "Succeeded":
            reason = _CONTAINER_REASONS.get(seen.container_reason or "", "")
        if not reason and failed:
            reason = _JOB_REASONS.get(str(failed.get("reason")), "TrainerFailed")
        fallback = "the trainer exited without its JSON summary (see the pod's log)"
        message = (summary.message if summary is not None else "") or (failed or {}).get("message") or fallback
        return _Verdict("Failed", reason or "TrainerFailed", str(message))
    if job is not None and (job.get("spec") or {}).get("suspend"):
        if seen.suspended_by_user:
            return _Verdict("Suspended", "Suspended", "runPolicy.suspend is true; resumes from the newest checkpoint")
        return _Verdict("Queued", "WaitingForAdmission", f"waiting for Kueue to admit the Job (queue {seen.queue})")
    if job is not None and int((job.get("status") or {}).get("active") or 0) > 0:
        if seen.progress is None and status.get("phase") in RUNNING_PHASES:
            # No report read this time (a replacement pod not ready yet): no step back to Preparing.
            return _Verdict(str(status["phase"]), "Running", str(status.get("message") or ""))
        stage = seen.progress.stage if seen.progress is not None else None
        phase = STAGE_PHASE.get(str(stage), "Preparing")
        message = (seen.progress.message if seen.progress is not None else "") or phase.lower()
        return _Verdict(phase, "Running", message)
    if status.get("phase") in RUNNING_PHASES:
        # Between a pod's end and the Job's verdict (or a retry's pod): no step back to Pending.
        return _Verdict(str(status["phase"]), "Running", str(status.get("message") or ""))
    return _Verdict("Pending", "JobCreated", "waiting for the training pod to start")


def _mirror(new: dict[str, Any], seen: Observation, cond: Callable[..., None]) -> None:
    """Copy what the Job, progress.json and the summary say into ``new`` (and their conditions)."""
    job, summary, progress = seen.job, seen.summary, seen.progress
    if progress is not None:
        new["progress"] = progress_status(progress)
        if progress.checkpoint_step:
            new["checkpoint"] = _present({"uri": progress.checkpoint_uri, "step": progress.checkpoint_step})
    if job is not None:
        new["jobName"] = job["metadata"]["name"]
        new["attempts"] = attempts(job)
        start = (job.get("status") or {}).get("startTime")
        if start:
            new["startTime"] = start
    if summary is None:
        return
    if summary.data is not None and summary.data.train is not None:
        new["data"] = data_status(summary.data)
        cond("DataReady", True, "DataCurated", f"{summary.data.train} training examples after curation")
    if summary.evaluation is not None:
        new["evaluation"] = evaluation_status(summary.evaluation)
        cond("Trained", True, "TrainingComplete", "")
        cond("Evaluated", True, "Evaluated", summary.message[:1024])
        passed = summary.evaluation.passed
        cond("GatesPassed", passed, "GatesPassed" if passed else "EvalGateFailed", summary.message)
    if summary.adapter is not None and summary.adapter.uri:
        new["adapter"] = adapter_status(summary.adapter)
    resumed = summary.training.resumed_from_step if summary.training is not None else None
    if resumed:
        new["progress"] = {**(new.get("progress") or {}), "resumedFromStep": resumed}


def observe(status: dict[str, Any], seen: Observation, *, generation: int | None, now: str) -> dict[str, Any]:
    """The FineTune's next status, given its current status and what was observed."""
    new: dict[str, Any] = dict(status)
    new["observedGeneration"] = generation
    conditions = status.get("conditions") or []

    def cond(type_: str, value: bool | None, reason: str, message: str = "") -> None:
        nonlocal conditions
        conditions = set_condition(conditions, type_, value, reason, message, generation=generation, now=now)

    _mirror(new, seen, cond)
    verdict = _verdict(status, seen)
    phase, reason, message = verdict.phase, verdict.reason, verdict.message
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
            new["adapter"] = {**new["adapter"], "promotable": False}
    else:
        cond("Ready", False, phase, message)
        cond("Reconciling", True, phase, message)
        cond("Stalled", False, phase, "")
        if phase in ("Training", "Evaluating"):
            cond("DataReady", True, "DataCurated", "")
        if phase == "Evaluating":
            cond("Trained", True, "TrainingComplete", "")
    new["conditions"] = conditions
    return {k: v for k, v in new.items() if v is not None}


def failed_status(
    status: dict[str, Any],
    reason: str,
    message: str,
    *,
    generation: int | None,
    now: str,
    terminal: bool,
    condition: str = "Validated",
) -> dict[str, Any]:
    """Status for a FineTune that cannot go on: Failed (terminal) or Pending with the reason (it may recover).

    ``condition`` is the one the failure belongs to: Validated before a Job exists, Trained for a
    run stopped by the operator (out of memory).
    """
    new = dict(status)
    new["observedGeneration"] = generation
    new["message"] = message[:4096]
    conditions = status.get("conditions") or []
    conditions = set_condition(conditions, condition, False, reason, message, generation=generation, now=now)
    conditions = set_condition(conditions, "Ready", False, reason, message, generation=generation, now=now)
    if terminal:
        new["phase"] = "Failed"
        new.setdefault("completionTime", now)
        if "adapter" in new:
            new["adapter"] = {**new["adapter"], "promotable": False}
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


# Pod states that do not go away by themselves (or not soon): what a person must fix.
_STUCK_WAITING = {
    "CreateContainerConfigError": "a Secret or ConfigMap the pod needs is missing",
    "CreateContainerError": "the container could not be created",
    "ImagePullBackOff": "the image cannot be pulled",
    "ErrImagePull": "the image cannot be pulled",
    "InvalidImageName": "the image name is invalid",
}


def why_stuck(pods: list[dict[str, Any]]) -> tuple[str | None, str]:
    """The reason and message of the first pod that cannot make progress by itself, if any."""
    for pod in pods:
        status = pod.get("status") or {}
        for c in status.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return "Unschedulable", f"pod {pod['metadata']['name']}: {c.get('message', 'cannot be scheduled')}"
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            hint = _STUCK_WAITING.get(str(waiting.get("reason")))
            if hint:
                detail = waiting.get("message") or hint
                return str(waiting["reason"]), f"pod {pod['metadata']['name']}: {detail}"
    return None, ""


def stalled(status: dict[str, Any], reason: str, message: str, *, generation: int | None, now: str) -> dict[str, Any]:
    """A running FineTune that makes no progress: Stalled with the reason; the phase stays (it may recover)."""
    new = dict(status)
    new["observedGeneration"] = generation
    new["message"] = f"stalled: {message}"[:4096]
    conditions = set_condition(
        status.get("conditions"), "Stalled", True, reason, message, generation=generation, now=now
    )
    new["conditions"] = set_condition(conditions, "Ready", False, reason, message, generation=generation, now=now)
    return new


def waiting(status: dict[str, Any], reason: str, message: str, *, generation: int | None, now: str) -> dict[str, Any]:
    """A running FineTune waiting on something outside it (the store): Reconciling with the reason."""
    new = dict(status)
    new["observedGeneration"] = generation
    new["message"] = message[:4096]
    new["conditions"] = set_condition(
        status.get("conditions"), "Reconciling", True, reason, message, generation=generation, now=now
    )
    return new


# Progress fields that move on every report; a status write for them alone is throttled.
_RESTLESS_PROGRESS = frozenset({"step", "loss", "evalLoss", "epoch", "tokensPerSecond", "etaSeconds", "updatedAt"})


def visible_change(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether ``new`` differs from ``old`` in more than the restless progress fields (step, loss, ETA):
    a new percentage, stage, checkpoint, phase, message or condition is something a person watches for."""

    def steady(status: dict[str, Any]) -> dict[str, Any]:
        progress = {k: v for k, v in (status.get("progress") or {}).items() if k not in _RESTLESS_PROGRESS}
        return {**status, "progress": progress}

    return steady(old) != steady(new)
