"""AdapterDeployment → revisions, gate decisions, and the serving Deployments, Service and eval Job.

Pure functions: the controller feeds in what it read (the AdapterDeployment,
the FineTune its adapter comes from, the current status) and applies what
comes out. Two runtimes:

- ``kubetune``: the reference server (``kubetune-trainer serve``) from the
  trainer image; CPU-capable, what the end-to-end tests drive.
- ``vllm``: vLLM's OpenAI server with ``--enable-lora``; base model and adapter
  are fetched (and the adapter's digest verified) by an init container.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from kubetune.api.adapterdeployment import AdapterDeployment, DeploymentGate
from kubetune.api.finetune import LOWER_IS_BETTER, LoRASpec
from kubetune.builders import meta
from kubetune.builders.resolve import resolve_adapter_deployment
from kubetune.builders.security import credentials_env, literal, restricted_container, restricted_pod
from kubetune.builders.settings import OperatorSettings

Role = Literal["stable", "canary"]
MODELS_MOUNT = "/models"
BASE_DIR = f"{MODELS_MOUNT}/base"
ADEP_LABEL = meta.ADEP_LABEL
ROLE_LABEL = meta.ROLE_LABEL
# vLLM accepts only these values for --max-lora-rank.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class Candidate:
    """An adapter source resolved to something servable."""

    adapter_uri: str
    adapter_digest: str
    fine_tune: str | None = None
    fine_tune_uid: str | None = None
    metrics: dict[str, str] = field(default_factory=dict)
    lora_rank: int = field(default_factory=lambda: int(LoRASpec.model_fields["rank"].default))

    def same_as(self, revision: dict[str, Any] | None) -> bool:
        return bool(revision) and revision.get("adapterDigest") == self.adapter_digest  # type: ignore[union-attr]


@dataclass(frozen=True)
class Resolution:
    """What the adapter source currently resolves to: a candidate, a wait, or a refusal."""

    candidate: Candidate | None = None
    waiting: str | None = None  # a message while the FineTune is still running
    rejected: str | None = None  # reason when it can never be served
    message: str = ""


def resolve_source(adep: AdapterDeployment, finetune: dict[str, Any] | None) -> Resolution:
    """The candidate revision of ``spec.adapter`` (``finetune`` is the referenced FineTune, if any)."""
    source = adep.spec.adapter
    if source.uri is not None and source.digest is not None:
        return Resolution(Candidate(adapter_uri=source.uri, adapter_digest=source.digest))
    assert source.fine_tune_ref is not None
    name = source.fine_tune_ref.name
    if finetune is None:
        return Resolution(waiting=f"FineTune {name} does not exist (yet)")
    status = finetune.get("status") or {}
    phase = status.get("phase")
    adapter = status.get("adapter") or {}
    if phase == "Failed":
        ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
        reason = str(ready.get("reason") or "FineTuneFailed")
        return Resolution(rejected=reason, message=f"FineTune {name} failed: {status.get('message', '')}")
    if phase != "Succeeded" or not adapter.get("digest"):
        return Resolution(waiting=f"FineTune {name} is {phase or 'not started'}; waiting for it to succeed")
    if adapter.get("promotable") is False:
        return Resolution(rejected="EvalGateFailed", message=f"FineTune {name}'s adapter is not promotable")
    rank = int(adapter.get("loraRank") or LoRASpec.model_fields["rank"].default)
    metrics = {k: str(v) for k, v in ((status.get("evaluation") or {}).get("metrics") or {}).items()}
    return Resolution(
        Candidate(
            adapter_uri=str(adapter["uri"]),
            adapter_digest=str(adapter["digest"]),
            fine_tune=name,
            fine_tune_uid=finetune["metadata"].get("uid"),
            metrics=metrics,
            lora_rank=rank,
        )
    )


def check_gates(candidate: Candidate, gates: list[DeploymentGate], stable: dict[str, Any] | None) -> list[str]:
    """Every deployment gate the candidate misses, in words (empty: promotable)."""
    failures = []
    for gate in gates:
        raw = candidate.metrics.get(gate.metric)
        if raw is None:
            failures.append(f"{gate.metric}: the revision has no {gate.metric} score to gate on")
            continue
        value = float(raw)
        lower_better = gate.metric in LOWER_IS_BETTER
        if gate.min is not None:
            ok = value <= float(gate.min) if lower_better else value >= float(gate.min)
            if not ok:
                failures.append(f"{gate.metric} {value:.4f} misses min {gate.min}")
        elif gate.max_regression_vs_stable is not None:
            old = ((stable or {}).get("metrics") or {}).get(gate.metric)
            if old is None:
                continue  # nothing serving yet, or the stable revision has no score: nothing to regress from
            drop = (value - float(old)) if lower_better else (float(old) - value)
            if drop > float(gate.max_regression_vs_stable) + 1e-12:
                failures.append(
                    f"{gate.metric} {value:.4f} is {drop:.4f} worse than the stable revision's {float(old):.4f} "
                    f"(allowed {gate.max_regression_vs_stable})"
                )
    return failures


def revision_record(candidate: Candidate, number: int, now: str) -> dict[str, Any]:
    record: dict[str, Any] = {
        "revision": number,
        "adapterUri": candidate.adapter_uri,
        "adapterDigest": candidate.adapter_digest,
        "since": now,
    }
    if candidate.fine_tune:
        record["fineTune"] = candidate.fine_tune
    if candidate.fine_tune_uid:
        record["fineTuneUid"] = candidate.fine_tune_uid
    if candidate.metrics:
        record["metrics"] = dict(candidate.metrics)
    return record


# ----------------------------------------------------------------------------- Kubernetes objects


def deployment_name(adep_name: str, role: Role) -> str:
    return meta.child_name(adep_name, role)


def service_name(adep_name: str) -> str:
    """The stable Service: the AdapterDeployment's own name when it is a valid Service name (DNS-1035)."""
    return meta.child_name(adep_name, letter_first=True)


def eval_job_name(adep_name: str, revision: int) -> str:
    return meta.child_name(adep_name, f"eval-r{revision}")


def endpoint(adep: AdapterDeployment) -> str:
    """The in-cluster URL of the OpenAI API the stable revision serves."""
    return f"http://{service_name(adep.metadata['name'])}.{adep.metadata['namespace']}.svc/v1"


def labels(adep: AdapterDeployment, settings: OperatorSettings, role: Role | None = None) -> dict[str, str]:
    name = str(adep.metadata["name"])
    out = meta.standard_labels("kubetune-server", "serving", name, settings.extra_labels, adapterdeployment=name)
    if role is not None:
        out[ROLE_LABEL] = role
    return out


def selector(adep: AdapterDeployment, role: Role) -> dict[str, str]:
    """The labels that pick the pods of one role."""
    return {ADEP_LABEL: meta.label_value(str(adep.metadata["name"])), ROLE_LABEL: role}


def owner_reference(adep: AdapterDeployment) -> dict[str, Any]:
    return meta.owner_reference("AdapterDeployment", adep.metadata)


def resolved(adep: AdapterDeployment, settings: OperatorSettings) -> AdapterDeployment:
    """``adep`` with its spec fully resolved (:func:`kubetune.builders.resolve.resolve_adapter_deployment`).

    Every builder below expects a resolved AdapterDeployment.
    """
    return adep.model_copy(update={"spec": resolve_adapter_deployment(adep.spec, settings)})


def _gpus(adep: AdapterDeployment) -> int:
    resources = adep.spec.runtime.resources
    assert resources is not None, "resolved() sets runtime.resources"
    assert resources.gpus is not None, "resolved() sets runtime.resources.gpus"
    return resources.gpus


def _storage_env(adep: AdapterDeployment, settings: OperatorSettings) -> list[dict[str, Any]]:
    storage = adep.spec.storage
    assert storage is not None, "resolved() sets spec.storage"
    assert storage.region is not None, "resolved() sets spec.storage.region"
    env: list[dict[str, Any]] = []
    if storage.endpoint:
        env.append({"name": "KUBETUNE_STORAGE_ENDPOINT", "value": literal(storage.endpoint)})
    env.append({"name": "AWS_REGION", "value": literal(storage.region)})
    env += credentials_env(storage.secret_ref.name if storage.secret_ref else None)
    if settings.hf_endpoint:
        env.append({"name": "HF_ENDPOINT", "value": settings.hf_endpoint})
    return env


def vllm_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds ``rank``."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])


def _pvcs(adep: AdapterDeployment, candidate: Candidate) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read-only volumes for the claims ``pvc://`` URIs of the base model and the adapter name."""
    return meta.pvc_volumes(meta.pvc_claims([adep.spec.base_model.uri, candidate.adapter_uri]))


def _fetchers(adep: AdapterDeployment, candidate: Candidate, settings: OperatorSettings) -> list[dict[str, Any]]:
    """Init containers that fetch the base model and the adapter (digests verified) into the pod."""
    spec = adep.spec
    _, pvc_mounts = _pvcs(adep, candidate)
    env = _storage_env(adep, settings)
    fetch = [*settings.trainer_command, "fetch"]
    base = [*fetch, literal(spec.base_model.uri), BASE_DIR]
    base += ["--digest", spec.base_model.digest] if spec.base_model.digest else []
    adapter = [*fetch, literal(candidate.adapter_uri), adapter_dir(adep), "--digest", candidate.adapter_digest]
    return [
        {
            "name": name,
            "image": settings.trainer_image,
            "command": command,
            "env": env,
            "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT}, *pvc_mounts],
            "securityContext": restricted_container(),
        }
        for name, command in (("fetch-base", base), ("fetch-adapter", adapter))
    ]


def adapter_dir(adep: AdapterDeployment) -> str:
    return f"{MODELS_MOUNT}/adapters/{adep.spec.served_model_name}"


def _server_command(
    adep: AdapterDeployment, candidate: Candidate, settings: OperatorSettings
) -> tuple[list[str], list[str], str]:
    """The server's command, args and health path, by runtime."""
    runtime = adep.spec.runtime
    served = adep.spec.served_model_name
    port = str(runtime.port)
    if runtime.type == "vllm":
        args = [
            "--model", BASE_DIR,
            "--served-model-name", f"{served}-base",
            "--host", "0.0.0.0",
            "--port", port,
            "--enable-lora",
            "--lora-modules", f"{served}={adapter_dir(adep)}",
            "--max-lora-rank", str(vllm_lora_rank(candidate.lora_rank)),
            "--max-loras", str(runtime.max_loras),
        ]  # fmt: skip
        if _gpus(adep) > 1:
            args += ["--tensor-parallel-size", str(_gpus(adep))]
        return ["python3", "-m", "vllm.entrypoints.openai.api_server"], args + list(runtime.args or []), "/health"
    args = [
        "--base-model", BASE_DIR,
        "--base-model-name", f"{served}-base",
        "--adapter", f"{served}={adapter_dir(adep)}",
        "--adapter-digest", f"{served}={candidate.adapter_digest}",
        "--host", "$(POD_IP)",
        "--port", port,
    ]  # fmt: skip
    return [*settings.trainer_command, "serve"], args + list(runtime.args or []), "/healthz"


def _server(adep: AdapterDeployment, candidate: Candidate, settings: OperatorSettings) -> dict[str, Any]:
    runtime = adep.spec.runtime
    command, args, health = _server_command(adep, candidate, settings)
    resources = runtime.resources
    assert resources is not None, "resolved() sets runtime.resources"
    assert runtime.image is not None, "resolved() sets runtime.image"
    probe = {"httpGet": {"path": health, "port": runtime.port}, "periodSeconds": 2, "timeoutSeconds": 2}
    return {
        "name": "server",
        "image": runtime.image,
        "command": command,
        "args": args,
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "HF_HOME", "value": f"{MODELS_MOUNT}/hf"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *meta.cpu_threads_env(resources.cpu),
        ],
        "ports": [{"name": "http", "containerPort": runtime.port}],
        "readinessProbe": {**probe, "failureThreshold": 3},
        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 6},
        "startupProbe": {**probe, "failureThreshold": 150},
        "resources": meta.resources(
            cpu=resources.cpu, memory=resources.memory, gpus=_gpus(adep), gpu_resource_name=settings.gpu_resource_name
        ),
        "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT}, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": restricted_container(),
    }


def build_deployment(
    adep: AdapterDeployment,
    candidate: Candidate,
    revision: int,
    role: Role,
    replicas: int,
    settings: OperatorSettings,
) -> dict[str, Any]:
    """The Deployment that serves ``candidate`` as ``role`` (stable or canary)."""
    spec = adep.spec
    runtime = spec.runtime
    name = adep.metadata["name"]
    init = _fetchers(adep, candidate, settings)
    server = _server(adep, candidate, settings)
    pod_labels = labels(adep, settings, role)
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # The pause container is the pod's init, not the server: a SIGTERM during a long model load
        # (a canary rolled back as it starts) stops it at once rather than after the grace period, and
        # the server's worker processes (vLLM's engine) are reaped when they exit.
        "shareProcessNamespace": True,
        "securityContext": restricted_pod(settings.run_as_user),
        "initContainers": init,
        "containers": [server],
        "volumes": [
            {"name": "models", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
            *_pvcs(adep, candidate)[0],
        ],
    }
    if runtime.node_selector:
        pod["nodeSelector"] = dict(runtime.node_selector)
    if runtime.tolerations:
        pod["tolerations"] = list(runtime.tolerations)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name(name, role),
            "namespace": adep.metadata["namespace"],
            "labels": pod_labels,
            "annotations": revision_annotations(candidate, revision),
            "ownerReferences": [owner_reference(adep)],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(adep, role)},
            # New pods come up before old ones go: serving never drops below the desired replicas.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "progressDeadlineSeconds": spec.rollout.progress_deadline_seconds,
            "revisionHistoryLimit": 2,
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {
                        "kubetune.io/revision": str(revision),
                        "kubetune.io/adapter-digest": candidate.adapter_digest,
                    },
                },
                "spec": pod,
            },
        },
    }


REVISION_ANNOTATION = "kubetune.io/revision"


def revision_annotations(candidate: Candidate, revision: int) -> dict[str, str]:
    """What a serving Deployment records of the revision it serves: enough to rebuild the revision's record
    from the Deployment alone (status follows what the cluster shows, even after an interrupted rollout)."""
    notes = {
        REVISION_ANNOTATION: str(revision),
        "kubetune.io/adapter-digest": candidate.adapter_digest,
        "kubetune.io/adapter-uri": candidate.adapter_uri,
        "kubetune.io/fine-tune": candidate.fine_tune,
        "kubetune.io/fine-tune-uid": candidate.fine_tune_uid,
        "kubetune.io/metrics": json.dumps(candidate.metrics, sort_keys=True) if candidate.metrics else None,
    }
    return {k: v for k, v in notes.items() if v}


def revision_from_annotations(annotations: dict[str, str], now: str) -> dict[str, Any] | None:
    """The revision record a Deployment's annotations describe (None when they describe none)."""
    try:
        number = int(annotations[REVISION_ANNOTATION])
        candidate = Candidate(
            adapter_uri=annotations["kubetune.io/adapter-uri"],
            adapter_digest=annotations["kubetune.io/adapter-digest"],
            fine_tune=annotations.get("kubetune.io/fine-tune"),
            fine_tune_uid=annotations.get("kubetune.io/fine-tune-uid"),
            metrics={str(k): str(v) for k, v in json.loads(annotations.get("kubetune.io/metrics") or "{}").items()},
        )
    except (KeyError, ValueError, AttributeError):
        return None
    return revision_record(candidate, number, now)


def build_service(adep: AdapterDeployment, settings: OperatorSettings) -> dict[str, Any]:
    """The stable endpoint clients use; canary pods are not behind it."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(adep.metadata["name"]),
            "namespace": adep.metadata["namespace"],
            "labels": labels(adep, settings),
            "ownerReferences": [owner_reference(adep)],
        },
        "spec": {
            "selector": selector(adep, "stable"),
            "ports": [{"name": "http", "port": 80, "targetPort": adep.spec.runtime.port}],
        },
    }


def build_online_eval_job(
    adep: AdapterDeployment, revision: int, endpoint: str, settings: OperatorSettings
) -> dict[str, Any]:
    """A Job that scores the canary through its endpoint (``kubetune-trainer eval-endpoint``)."""
    online = adep.spec.rollout.online_eval
    assert online is not None
    job = eval_job_name(adep.metadata["name"], revision)
    pvc_volumes, pvc_mounts = meta.pvc_volumes(meta.pvc_claims([online.dataset]))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job,
            "namespace": adep.metadata["namespace"],
            "labels": {**labels(adep, settings), "kubetune.io/revision": str(revision)},
            "ownerReferences": [owner_reference(adep)],
        },
        "spec": {
            "backoffLimit": 1,
            "activeDeadlineSeconds": adep.spec.rollout.progress_deadline_seconds,
            "template": {
                "metadata": {"labels": labels(adep, settings)},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "shareProcessNamespace": True,  # as in the serving pods: an early SIGTERM is not lost
                    "securityContext": restricted_pod(settings.run_as_user),
                    "containers": [
                        {
                            "name": "eval",
                            "image": settings.trainer_image,
                            "command": [
                                *settings.trainer_command,
                                "eval-endpoint",
                                "--endpoint",
                                endpoint,
                                "--model",
                                adep.spec.served_model_name,
                                "--dataset",
                                literal(online.dataset),
                                "--metric",
                                online.metric,
                                "--min",
                                online.min,
                                "--max-examples",
                                str(online.max_examples),
                                "--termination-log",
                                "/dev/termination-log",
                            ],
                            "env": _storage_env(adep, settings),
                            "terminationMessagePath": "/dev/termination-log",
                            "securityContext": restricted_container(),
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *pvc_mounts],
                        }
                    ],
                    "volumes": [{"name": "tmp", "emptyDir": {}}, *pvc_volumes],
                },
            },
        },
    }
