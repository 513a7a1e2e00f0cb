"""FineTune → the Kubernetes objects of its training run: ConfigMap, Job, and (multi-node) a headless Service.

Pure functions of the FineTune, its template and the operator settings, so
every spec field's effect on the Job is unit-tested without a cluster.
Storage credentials only ever appear here as Secret *references*.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from kubetune.api.finetune import FineTune, FineTuneSpec
from kubetune.api.template import FineTuneTemplate
from kubetune.api.types import GROUP_VERSION
from kubetune.builders.security import credentials_env, restricted_container, restricted_pod
from kubetune.builders.settings import OperatorSettings
from kubetune.builders.trainer_config import build_trainer_config, resolve_spec
from kubetune_trainer.config import TrainerConfig

# The trainer's exit codes that no retry can fix (kubetune_trainer.pipeline.ExitCode):
# bad input, eval gates failed, out of memory. The Job fails on the first one.
NON_RETRYABLE_EXIT_CODES = (10, 11, 12)
TRAINER_CONTAINER = "trainer"
CONFIG_MOUNT = "/etc/kubetune"
SCRATCH_MOUNT = "/scratch"
TERMINATION_LOG = "/dev/termination-log"
RENDEZVOUS_PORT = 29500
FINETUNE_LABEL = "kubetune.io/finetune"
MANAGED_BY = "kubetune"


class TemplateViolationError(ValueError):
    """The FineTune breaks a guardrail of its template; the message names the rule."""


@dataclass(frozen=True)
class Plan:
    """Everything the controller needs to run one FineTune, resolved and validated."""

    spec: FineTuneSpec
    image: str
    queue: str | None
    secret_name: str | None
    output_root: str
    config: TrainerConfig


def _k8s_name(base: str, suffix: str, limit: int = 63) -> str:
    # Job names become label values (batch.kubernetes.io/job-name): at most 63 characters.
    name = f"{base}-{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    return f"{base[: limit - len(suffix) - 10].rstrip('-.')}-{digest}-{suffix}"


def job_name(finetune_name: str) -> str:
    return _k8s_name(finetune_name, "train")


def config_map_name(finetune_name: str) -> str:
    return _k8s_name(finetune_name, "trainer-config", 253)


def labels(finetune: FineTune, settings: OperatorSettings) -> dict[str, str]:
    name = str(finetune.metadata.get("name"))
    return {
        **settings.extra_labels,
        "app.kubernetes.io/name": "kubetune-trainer",
        "app.kubernetes.io/instance": name[:63],
        "app.kubernetes.io/component": "training",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        FINETUNE_LABEL: name[:63],
    }


def owner_reference(finetune: FineTune) -> dict[str, Any]:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "FineTune",
        "name": finetune.metadata["name"],
        "uid": finetune.metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def check_guardrails(spec: FineTuneSpec, template: FineTuneTemplate | None, image: str) -> list[str]:
    """Every guardrail the (resolved) spec breaks, each naming the rule and the field."""
    if template is None or template.spec.guardrails is None:
        return []
    g = template.spec.guardrails
    name = template.metadata.get("name")
    broken: list[str] = []

    def rule(what: str) -> None:
        broken.append(f"FineTuneTemplate {name}: {what}")

    if g.allowed_base_model_prefixes and not spec.base_model.uri.startswith(tuple(g.allowed_base_model_prefixes)):
        rule(f"spec.baseModel.uri {spec.base_model.uri} is not under {', '.join(g.allowed_base_model_prefixes)}")
    if g.allowed_dataset_prefixes:
        for field, uri in (
            ("train", spec.dataset.train),
            ("validation", spec.dataset.validation),
            ("eval", spec.dataset.eval),
        ):
            if uri is not None and not uri.startswith(tuple(g.allowed_dataset_prefixes)):
                rule(f"spec.dataset.{field} {uri} is not under {', '.join(g.allowed_dataset_prefixes)}")
    if g.allowed_images and not image.startswith(tuple(g.allowed_images)):
        rule(f"spec.image {image} is not one of {', '.join(g.allowed_images)}")
    method = spec.method.type if spec.method is not None else "LoRA"
    if g.allowed_methods and method not in g.allowed_methods:
        rule(f"spec.method.type {method} is not allowed (allowed: {', '.join(g.allowed_methods)})")
    resources = spec.resources
    gpus = resources.gpus if resources is not None else 1
    nodes = resources.nodes if resources is not None else 1
    if g.max_gpus is not None and gpus > g.max_gpus:
        rule(f"spec.resources.gpus {gpus} exceeds maxGpus {g.max_gpus}")
    if g.max_nodes is not None and nodes > g.max_nodes:
        rule(f"spec.resources.nodes {nodes} exceeds maxNodes {g.max_nodes}")
    epochs = spec.training.epochs if spec.training is not None else 3
    if g.max_epochs is not None and epochs > g.max_epochs:
        rule(f"spec.training.epochs {epochs} exceeds maxEpochs {g.max_epochs}")
    policy = spec.run_policy
    deadline = policy.active_deadline_seconds if policy is not None else None
    if g.max_active_deadline_seconds is not None and (deadline is None or deadline > g.max_active_deadline_seconds):
        rule(
            f"spec.runPolicy.activeDeadlineSeconds {deadline or 'unset'} must be at most "
            f"{g.max_active_deadline_seconds}"
        )
    queue = policy.queue_name if policy is not None else None
    if g.require_queue and not queue:
        rule("spec.runPolicy.queueName is required")
    if g.allowed_queues and queue is not None and queue not in g.allowed_queues:
        rule(f"spec.runPolicy.queueName {queue} is not one of {', '.join(g.allowed_queues)}")
    gates = spec.evaluation.gates if spec.evaluation is not None else []
    if g.require_gates and not gates:
        rule("spec.evaluation.gates must declare at least one gate")
    return broken


def plan(
    finetune: FineTune, raw_spec: dict[str, Any], template: FineTuneTemplate | None, settings: OperatorSettings
) -> Plan:
    """Resolve the FineTune against its template and the settings; raise on guardrail violations."""
    spec = resolve_spec(raw_spec, template)
    image = spec.image or settings.trainer_image
    broken = check_guardrails(spec, template, image)
    if broken:
        raise TemplateViolationError("; ".join(broken))
    for field, uri in (("baseModel.uri", spec.base_model.uri), ("dataset.train", spec.dataset.train)):
        if uri.startswith("file://"):
            raise TemplateViolationError(
                f"spec.{field}: file:// URIs only work with `kubetune run` on one machine; use s3://, pvc:// or hf://"
            )
    output_root = (spec.output.uri if spec.output is not None else None) or settings.default_output_uri
    if not output_root:
        raise TemplateViolationError(
            "spec.output.uri is not set and the operator has no default output (set defaultOutputUri in the chart)"
        )
    queue = (spec.run_policy.queue_name if spec.run_policy is not None else None) or settings.default_queue
    secret = spec.storage.secret_ref.name if spec.storage is not None and spec.storage.secret_ref else None
    run_id = str(finetune.metadata["uid"])
    config = build_trainer_config(
        finetune,
        spec,
        run_id=run_id,
        output_root=output_root,
        default_storage_endpoint=settings.default_storage_endpoint,
        work_dir=f"{SCRATCH_MOUNT}/work",
    )
    config = config.model_copy(update={"progress_interval_seconds": settings.progress_interval_seconds})
    if config.storage.region == "us-east-1" and settings.default_storage_region != "us-east-1":
        config = config.model_copy(
            update={"storage": config.storage.model_copy(update={"region": settings.default_storage_region})}
        )
    return Plan(
        spec=spec,
        image=image,
        queue=queue,
        secret_name=secret or settings.default_storage_secret,
        output_root=output_root,
        config=config,
    )


def build_config_map(finetune: FineTune, plan: Plan, settings: OperatorSettings) -> dict[str, Any]:
    """The trainer config as a ConfigMap. It holds no credentials: those stay in the Secret."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(finetune.metadata["name"]),
            "namespace": finetune.metadata["namespace"],
            "labels": labels(finetune, settings),
            "ownerReferences": [owner_reference(finetune)],
        },
        "data": {"config.json": json.dumps(plan.config.model_dump(mode="json"), indent=2, sort_keys=True)},
    }


def _resources(spec: FineTuneSpec, settings: OperatorSettings) -> dict[str, Any]:
    res = spec.resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if res is not None and res.cpu is not None:
        requests["cpu"] = res.cpu
    if res is not None and res.memory is not None:
        requests["memory"] = limits["memory"] = res.memory
    gpus = res.gpus if res is not None else 1
    if gpus > 0:
        limits[settings.gpu_resource_name] = str(gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def build_job(finetune: FineTune, plan: Plan, settings: OperatorSettings) -> dict[str, Any]:
    """The training Job: one pod (or an Indexed Job with torchrun for nodes > 1)."""
    spec = plan.spec
    name = finetune.metadata["name"]
    namespace = finetune.metadata["namespace"]
    job = job_name(name)
    meta_labels = labels(finetune, settings)
    policy = spec.run_policy
    resources = spec.resources
    nodes = resources.nodes if resources is not None else 1
    gpus = resources.gpus if resources is not None else 1

    args = [
        "run",
        "--config",
        f"{CONFIG_MOUNT}/config.json",
        "--termination-log",
        TERMINATION_LOG,
        "--work-dir",
        f"{SCRATCH_MOUNT}/work",
        "--no-progress-bar",
    ]
    command = list(settings.trainer_command)
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": f"{SCRATCH_MOUNT}/hf"},
        {"name": "TMPDIR", "value": f"{SCRATCH_MOUNT}/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        *credentials_env(plan.secret_name),
    ]
    if settings.hf_endpoint:
        env.append({"name": "HF_ENDPOINT", "value": settings.hf_endpoint})
    if nodes > 1 or gpus > 1:
        # torchrun, through the trainer's `launch`, which keeps the exit codes podFailurePolicy reads.
        launch = [*command, "launch", f"--nnodes={nodes}", f"--nproc-per-node={max(gpus, 1)}"]
        if nodes > 1:
            env += [
                {
                    "name": "NODE_RANK",
                    "valueFrom": {
                        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
                    },
                },
                {"name": "MASTER_ADDR", "value": f"{job}-0.{job}.{namespace}.svc"},
                {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
            ]
            launch += ["--node-rank=$(NODE_RANK)", "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)"]
        command = [*launch, "--", args[0]]
        args = args[1:]

    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": plan.image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "args": args,
        "env": env,
        "resources": _resources(spec, settings),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "scratch", "mountPath": SCRATCH_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": restricted_container(),
    }
    if nodes > 1:
        container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the Job, not the kubelet, retries: podFailurePolicy needs Never
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": restricted_pod(settings.run_as_user),
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(name)}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
        ],
    }
    if resources is not None and resources.node_selector:
        pod_spec["nodeSelector"] = dict(resources.node_selector)
    if resources is not None and resources.tolerations:
        pod_spec["tolerations"] = list(resources.tolerations)
    if resources is not None and resources.priority_class_name:
        pod_spec["priorityClassName"] = resources.priority_class_name
    if nodes > 1:
        pod_spec["subdomain"] = job

    job_labels = dict(meta_labels)
    suspended = bool(policy is not None and policy.suspend)
    if plan.queue:
        job_labels["kueue.x-k8s.io/queue-name"] = plan.queue
        suspended = True  # Kueue admits the Job by unsuspending it
    job_spec: dict[str, Any] = {
        "backoffLimit": policy.backoff_limit if policy is not None else 3,
        "suspend": suspended,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": list(NON_RETRYABLE_EXIT_CODES),
                    },
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {"metadata": {"labels": meta_labels}, "spec": pod_spec},
    }
    if nodes > 1:
        job_spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes)
    if policy is not None and policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy is not None and policy.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job,
            "namespace": namespace,
            "labels": job_labels,
            "annotations": {"kubetune.io/run-id": plan.config.run_id, "kubetune.io/output": plan.config.output_uri},
            "ownerReferences": [owner_reference(finetune)],
        },
        "spec": job_spec,
    }


def build_headless_service(finetune: FineTune, settings: OperatorSettings) -> dict[str, Any]:
    """DNS names for the pods of a multi-node Job (``<job>-<index>.<job>``), for torchrun's rendezvous."""
    job = job_name(finetune.metadata["name"])
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": job,
            "namespace": finetune.metadata["namespace"],
            "labels": labels(finetune, settings),
            "ownerReferences": [owner_reference(finetune)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"batch.kubernetes.io/job-name": job},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}],
        },
    }
