"""FineTune → the objects of its training run: a Job (carrying the trainer config) and, multi-node, a Service.

Pure functions of the FineTune, its template and the operator settings, so
every spec field's effect on the Job is unit-tested without a cluster.
Storage credentials only ever appear here as Secret *references*.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubetune.api.finetune import FineTune, ResolvedFineTuneSpec
from kubetune.api.template import FineTuneTemplate
from kubetune.builders import meta
from kubetune.builders.resolve import resolve_finetune
from kubetune.builders.security import credentials_env, restricted_container, restricted_pod
from kubetune.builders.settings import OperatorSettings
from kubetune.builders.trainer_config import build_trainer_config
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.contract import NON_RETRYABLE, ExitCode

TRAINER_CONTAINER = "trainer"
CONFIG_MOUNT = "/etc/kubetune"
SCRATCH_MOUNT = "/scratch"
TERMINATION_LOG = "/dev/termination-log"
RENDEZVOUS_PORT = 29500
FINETUNE_LABEL = meta.FINETUNE_LABEL
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# What the controller needs to read a run's progress.json, recorded on its Job (no template lookups later).
OUTPUT_ANNOTATION = "kubetune.io/output"
RUN_ID_ANNOTATION = "kubetune.io/run-id"
STORAGE_ENDPOINT_ANNOTATION = "kubetune.io/storage-endpoint"
STORAGE_REGION_ANNOTATION = "kubetune.io/storage-region"
STORAGE_SECRET_ANNOTATION = "kubetune.io/storage-secret"


class TemplateViolationError(ValueError):
    """The FineTune breaks a guardrail of its template; the message names the rule."""


@dataclass(frozen=True)
class Plan:
    """Everything the controller needs to run one FineTune, resolved and validated."""

    finetune: FineTune
    spec: ResolvedFineTuneSpec
    config: TrainerConfig

    @property
    def output_root(self) -> str:
        assert self.spec.output.uri is not None, "plan() refuses a FineTune without an output"
        return self.spec.output.uri

    @property
    def queue(self) -> str | None:
        return self.spec.run_policy.queue_name

    @property
    def secret_name(self) -> str | None:
        ref = self.spec.storage.secret_ref
        return ref.name if ref is not None else None


def job_name(finetune_name: str) -> str:
    """The training Job (and, multi-node, its headless Service): a DNS-1035 label, so both are valid.

    At most 60 characters: an Indexed Job's pods are named ``<job>-<index>`` and use that as their
    hostname, which must stay a 63-character label for indexes up to 63.
    """
    return meta.child_name(finetune_name, "train", limit=60, letter_first=True)


def labels(finetune: FineTune, settings: OperatorSettings) -> dict[str, str]:
    name = str(finetune.metadata.get("name"))
    return meta.standard_labels("kubetune-trainer", "training", name, settings.extra_labels, finetune=name)


def owner_reference(finetune: FineTune) -> dict[str, Any]:
    return meta.owner_reference("FineTune", finetune.metadata)


def check_guardrails(spec: ResolvedFineTuneSpec, template: FineTuneTemplate | None) -> list[str]:
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
    if g.allowed_images and not spec.image.startswith(tuple(g.allowed_images)):
        rule(f"spec.image {spec.image} is not one of {', '.join(g.allowed_images)}")
    if g.allowed_methods and spec.method.type not in g.allowed_methods:
        rule(f"spec.method.type {spec.method.type} is not allowed (allowed: {', '.join(g.allowed_methods)})")
    if g.max_gpus is not None and spec.resources.gpus > g.max_gpus:
        rule(f"spec.resources.gpus {spec.resources.gpus} exceeds maxGpus {g.max_gpus}")
    if g.max_nodes is not None and spec.resources.nodes > g.max_nodes:
        rule(f"spec.resources.nodes {spec.resources.nodes} exceeds maxNodes {g.max_nodes}")
    if g.max_epochs is not None and spec.training.epochs > g.max_epochs:
        rule(f"spec.training.epochs {spec.training.epochs} exceeds maxEpochs {g.max_epochs}")
    deadline = spec.run_policy.active_deadline_seconds
    if g.max_active_deadline_seconds is not None and (deadline is None or deadline > g.max_active_deadline_seconds):
        rule(
            f"spec.runPolicy.activeDeadlineSeconds {deadline or 'unset'} must be at most "
            f"{g.max_active_deadline_seconds}"
        )
    queue = spec.run_policy.queue_name
    if g.require_queue and not queue:
        rule("spec.runPolicy.queueName is required")
    if g.allowed_queues and queue is not None and queue not in g.allowed_queues:
        rule(f"spec.runPolicy.queueName {queue} is not one of {', '.join(g.allowed_queues)}")
    if g.require_gates and not spec.evaluation.gates:
        rule("spec.evaluation.gates must declare at least one gate")
    return broken


def plan(
    finetune: FineTune, raw_spec: dict[str, Any], template: FineTuneTemplate | None, settings: OperatorSettings
) -> Plan:
    """Resolve the FineTune against its template and the settings; raise on guardrail violations."""
    spec = resolve_finetune(raw_spec, template, settings)
    broken = check_guardrails(spec, template)
    if broken:
        raise TemplateViolationError("; ".join(broken))
    for field, uri in (("baseModel.uri", spec.base_model.uri), ("dataset.train", spec.dataset.train)):
        if uri.startswith("file://"):
            raise TemplateViolationError(
                f"spec.{field}: file:// URIs only work with `kubetune run` on one machine; use s3://, pvc:// or hf://"
            )
    endpoint = spec.storage.endpoint
    allowed = settings.allowed_storage_endpoints
    if allowed and endpoint and not endpoint.startswith(allowed):
        raise TemplateViolationError(
            f"spec.storage.endpoint {endpoint} is not one this operator may use ({', '.join(allowed)})"
        )
    if not spec.output.uri:
        raise TemplateViolationError(
            "spec.output.uri is not set and the operator has no default output (set defaultOutputUri in the chart)"
        )
    config = build_trainer_config(
        finetune.metadata,
        spec,
        run_id=str(finetune.metadata["uid"]),
        output_root=spec.output.uri,
        work_dir=f"{SCRATCH_MOUNT}/work",
        progress_interval_seconds=settings.progress_interval_seconds,
    )
    return Plan(finetune=finetune, spec=spec, config=config)


CONFIG_ANNOTATION = "kubetune.io/trainer-config"


def trainer_config_json(plan: Plan) -> str:
    """The resolved TrainerConfig as the pod reads it. It holds no credentials: those stay in the Secret."""
    return json.dumps(plan.config.model_dump(mode="json"), separators=(",", ":"), sort_keys=True)


def _trainer_command(
    job: str, namespace: str, spec: ResolvedFineTuneSpec, settings: OperatorSettings
) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """The trainer container's command, args and the env they need (torchrun for several GPUs or nodes)."""
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
    nodes, gpus = spec.resources.nodes, spec.resources.gpus
    if nodes == 1 and gpus <= 1:
        return command, args, []
    # torchrun, through the trainer's `launch`, which keeps the exit codes podFailurePolicy reads.
    launch = [*command, "launch", f"--nnodes={nodes}", f"--nproc-per-node={max(gpus, 1)}"]
    env: list[dict[str, Any]] = []
    if nodes > 1:
        index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        env = [
            {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": index}}},
            {"name": "MASTER_ADDR", "value": f"{job}-0.{job}.{namespace}.svc"},
            {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        ]
        launch += ["--node-rank=$(NODE_RANK)", "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)"]
    return [*launch, "--", args[0]], args[1:], env


def _trainer_container(job: str, namespace: str, plan: Plan, settings: OperatorSettings) -> dict[str, Any]:
    spec = plan.spec
    command, args, launch_env = _trainer_command(job, namespace, spec, settings)
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": f"{SCRATCH_MOUNT}/hf"},
        {"name": "TMPDIR", "value": f"{SCRATCH_MOUNT}/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        *credentials_env(plan.secret_name),
        *meta.cpu_threads_env(spec.resources.cpu, processes=max(spec.resources.gpus, 1)),
    ]
    if settings.hf_endpoint:
        env.append({"name": "HF_ENDPOINT", "value": settings.hf_endpoint})
    res = spec.resources
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "args": args,
        "env": env + launch_env,
        "resources": meta.resources(
            cpu=res.cpu, memory=res.memory, gpus=res.gpus, gpu_resource_name=settings.gpu_resource_name
        ),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "scratch", "mountPath": SCRATCH_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": restricted_container(),
    }
    if res.nodes > 1:
        container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]
    return container


def _pvcs(spec: ResolvedFineTuneSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The claims ``pvc://`` URIs of the spec name: read-only, but the output's claim writable."""
    read = meta.pvc_claims(
        [
            spec.base_model.uri,
            spec.dataset.train,
            spec.dataset.validation,
            spec.dataset.eval,
            spec.evaluation.general_text,
        ]
    )
    return meta.pvc_volumes(read, meta.pvc_claims([spec.output.uri]))


def _pod_spec(finetune: FineTune, job: str, plan: Plan, settings: OperatorSettings) -> dict[str, Any]:
    res = plan.spec.resources
    pvc_volumes, pvc_mounts = _pvcs(plan.spec)
    container = _trainer_container(job, finetune.metadata["namespace"], plan, settings)
    container["volumeMounts"] += pvc_mounts
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # the Job, not the kubelet, retries: podFailurePolicy needs Never
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # The pause container is the pod's init, so the trainer is not PID 1: a SIGTERM that comes
        # before Python has installed its handler (a Job deleted as its pod starts) stops it at once
        # instead of being ignored, which left a second pod of the run training until SIGKILL.
        "shareProcessNamespace": True,
        "securityContext": restricted_pod(settings.run_as_user),
        "containers": [container],
        "volumes": [
            # The trainer config travels in the pod template's annotation and reaches the container as a file
            # through the downward API: no ConfigMap to create, own and clean up per FineTune.
            {
                "name": "config",
                "downwardAPI": {
                    "items": [
                        {
                            "path": "config.json",
                            "fieldRef": {"fieldPath": f"metadata.annotations['{CONFIG_ANNOTATION}']"},
                        }
                    ]
                },
            },
            {"name": "scratch", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
            *pvc_volumes,
        ],
    }
    if res.node_selector:
        pod["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod["tolerations"] = list(res.tolerations)
    if res.priority_class_name:
        pod["priorityClassName"] = res.priority_class_name
    if res.nodes > 1:
        pod["subdomain"] = job
    return pod


def build_job(finetune: FineTune, plan: Plan, settings: OperatorSettings) -> dict[str, Any]:
    """The training Job: one pod (or an Indexed Job with torchrun for nodes > 1)."""
    spec = plan.spec
    job = job_name(finetune.metadata["name"])
    meta_labels = labels(finetune, settings)
    policy = spec.run_policy
    job_labels = dict(meta_labels)
    suspended = policy.suspend
    if plan.queue:
        job_labels[QUEUE_LABEL] = plan.queue
        suspended = True  # Kueue admits the Job by unsuspending it
    job_spec: dict[str, Any] = {
        "backoffLimit": policy.backoff_limit,
        "suspend": suspended,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [int(code) for code in NON_RETRYABLE],
                    },
                },
                # The store was unreachable for longer than the trainer waits: try again, without
                # spending the retry budget (the next pod resumes from the newest checkpoint).
                {
                    "action": "Ignore",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [int(ExitCode.STORAGE_UNAVAILABLE)],
                    },
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {
            "metadata": {"labels": meta_labels, "annotations": {CONFIG_ANNOTATION: trainer_config_json(plan)}},
            "spec": _pod_spec(finetune, job, plan, settings),
        },
    }
    if spec.resources.nodes > 1:
        nodes = spec.resources.nodes
        job_spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes)
    if policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job,
            "namespace": finetune.metadata["namespace"],
            "labels": job_labels,
            "annotations": _job_annotations(plan),
            "ownerReferences": [owner_reference(finetune)],
        },
        "spec": job_spec,
    }


def _job_annotations(plan: Plan) -> dict[str, str]:
    stor = plan.spec.storage
    notes = {
        RUN_ID_ANNOTATION: plan.config.run_id,
        OUTPUT_ANNOTATION: plan.config.output_uri,
        STORAGE_ENDPOINT_ANNOTATION: stor.endpoint,
        STORAGE_REGION_ANNOTATION: stor.region,
        STORAGE_SECRET_ANNOTATION: plan.secret_name,
    }
    return {k: v for k, v in notes.items() if v}


def job_gpus(job: dict[str, Any], gpu_resource_name: str) -> int:
    """GPUs a training Job's pods hold together, read from the Job itself."""
    spec = job.get("spec") or {}
    pod = (spec.get("template") or {}).get("spec") or {}
    per_pod = sum(
        int(((c.get("resources") or {}).get("limits") or {}).get(gpu_resource_name) or 0)
        for c in pod.get("containers") or []
    )
    return per_pod * int(spec.get("parallelism") or 1)


def job_memory_limit(job: dict[str, Any]) -> str | None:
    """The trainer container's memory limit, as the Job asks for it."""
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    for c in pod.get("containers") or []:
        if c.get("name") == TRAINER_CONTAINER:
            limit = ((c.get("resources") or {}).get("limits") or {}).get("memory")
            return str(limit) if limit else None
    return None


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
