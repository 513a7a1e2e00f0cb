"""Operator settings: what a platform team configures once (Helm values, flags, environment)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class OperatorSettings:
    """Defaults and knobs of the operator. Every field can be set by ``KUBETUNE_<FIELD>`` in the environment."""

    trainer_image: str = "ghcr.io/kubetune/trainer:0.1.0"
    """Image of training pods when neither the FineTune nor its template names one."""

    trainer_command: tuple[str, ...] = ("kubetune-trainer",)
    """Entrypoint of the trainer in that image (also runs the reference server and the fetch init containers)."""

    vllm_image: str = "vllm/vllm-openai:v0.11.0"
    """Image of the vllm serving runtime."""

    rollout_interval_seconds: float = 5.0
    """How often the operator checks AdapterDeployment rollouts (canary readiness, deadlines, FineTunes)."""

    default_output_uri: str | None = None
    """Artifact root for FineTunes without spec.output.uri (e.g. s3://adapters/)."""

    default_storage_endpoint: str | None = None
    """S3 endpoint for FineTunes without spec.storage.endpoint."""

    default_storage_region: str = "us-east-1"
    """S3 region when the FineTune does not say."""

    default_storage_secret: str | None = None
    """Name of the credentials Secret (in the FineTune's namespace) when spec.storage.secretRef is unset."""

    allowed_storage_endpoints: tuple[str, ...] = ()
    """S3 endpoints (URL prefixes) FineTunes and AdapterDeployments may name; empty: any. The operator reads
    progress and manifests from these stores with the tenants' credentials, so a platform team can keep it
    from talking to anything else."""

    default_queue: str | None = None
    """Kueue LocalQueue for FineTunes without runPolicy.queueName."""

    gpu_resource_name: str = "nvidia.com/gpu"
    """Extended resource that GPUs are requested as."""

    hf_endpoint: str | None = None
    """HF_ENDPOINT for training pods (a hub mirror), when hf:// models are used."""

    progress_interval_seconds: float = 10.0
    """How often the trainer writes progress.json."""

    status_interval_seconds: float = 10.0
    """How often the operator mirrors progress.json into status while a run is active."""

    stalled_after_seconds: float = 300.0
    """A running FineTune with no progress report for this long is marked Stalled, with the pods' reason."""

    artifact_delete_timeout_seconds: float = 600.0
    """How long the operator keeps trying to delete a FineTune's artifacts (output.retention: Delete) before
    it lets the FineTune go and leaves them, with a Warning Event naming where they are."""

    progress_status_seconds: float = 600.0
    """How often status.progress is refreshed when only the step, loss or ETA moved; a new percentage, stage,
    checkpoint or phase is written at once. Keeps API writes per running FineTune low."""

    run_as_user: int = 65532
    """UID of training pods (they always run as non-root)."""

    metrics_port: int = 8080
    """Port of the Prometheus /metrics endpoint (0 disables it)."""

    health_port: int = 8081
    """Port of the /healthz liveness endpoint (0 disables it)."""

    extra_labels: dict[str, str] = field(default_factory=dict)
    """Labels added to every object the operator creates."""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> OperatorSettings:
        """Settings from ``KUBETUNE_*`` variables, then explicit overrides (flags)."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get("KUBETUNE_" + f.name.upper())
            if raw is None or raw == "":
                continue
            default = f.default
            if f.name in ("trainer_command", "allowed_storage_endpoints"):
                values[f.name] = tuple(raw.replace(",", " ").split())
            elif f.name == "extra_labels":
                values[f.name] = dict(item.split("=", 1) for item in raw.split(",") if "=" in item)
            elif isinstance(default, bool):
                values[f.name] = raw.lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                values[f.name] = int(raw)
            elif isinstance(default, float):
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
