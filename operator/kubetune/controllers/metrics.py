"""Prometheus metrics of the operator (served on ``/metrics``)."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import Counter, Gauge, Histogram

FINETUNES = Gauge("kubetune_finetunes", "FineTunes by phase", ["phase"])
RECONCILE_SECONDS = Histogram(
    "kubetune_reconcile_duration_seconds",
    "Time to reconcile one object",
    ["kind"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
JOB_LAUNCHES = Counter("kubetune_job_launches_total", "Training Jobs created")
FAILURES = Counter("kubetune_finetune_failures_total", "FineTunes that ended Failed, by reason", ["reason"])
GPUS_REQUESTED = Counter("kubetune_gpus_requested_total", "GPUs requested by the training Jobs created")
GPU_HOURS = Counter("kubetune_gpu_hours_total", "GPU-hours held by finished training Jobs (start to end)")
ROLLOUTS = Counter("kubetune_rollouts_total", "AdapterDeployment revisions promoted")
ROLLBACKS = Counter("kubetune_rollbacks_total", "AdapterDeployment revisions rolled back or rejected", ["reason"])

_phases: dict[tuple[str, str], str] = {}


def finetune_phase(namespace: str, name: str, phase: str | None) -> None:
    """Record a FineTune's phase (None when it is gone) and refresh the per-phase gauge."""
    if phase is None:
        _phases.pop((namespace, name), None)
    else:
        _phases[(namespace, name)] = phase
    counts = Tally(_phases.values())
    for known in ("Pending", "Queued", "Preparing", "Training", "Evaluating", "Suspended", "Succeeded", "Failed"):
        FINETUNES.labels(phase=known).set(counts.get(known, 0))
