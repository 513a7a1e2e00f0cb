"""The FineTune controller: thin kopf handlers around the pure builders.

- create/resume: validate against the template, check the credentials Secret,
  create (or adopt) the trainer ConfigMap and Job — never twice, so an operator
  restarted at any point converges;
- Job events: mirror the Job (and, when it ends, the trainer's termination
  summary) into status;
- a timer while the run is active: mirror ``progress.json`` into status;
- ``spec.runPolicy.suspend``: suspend or resume the Job;
- delete: remove the Job and ConfigMap; artifacts only with ``output.retention: Delete``.

Status writes carry only the fields that changed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubetune.api.finetune import FineTune
from kubetune.api.template import FineTuneTemplate
from kubetune.api.types import API_GROUP, API_VERSION
from kubetune.builders import finetune as build
from kubetune.builders import status as st
from kubetune.builders.settings import OperatorSettings
from kubetune.builders.trainer_config import run_prefix
from kubetune.controllers import metrics
from kubetune.controllers.kube import ForeignObjectError, Kube, StatusBook, changed_fields, now_iso, s3_settings
from kubetune_trainer import storage

log = logging.getLogger("kubetune.finetune")
FT = (API_GROUP, API_VERSION, "finetunes")
PLURAL = "finetunes"


def _summary_from_pods(pods: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None]:
    """The newest trainer termination summary (JSON) and container reason among the Job's pods."""
    best: tuple[str, dict[str, Any] | None, str | None] | None = None
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") != build.TRAINER_CONTAINER:
                continue
            term = (cs.get("state") or {}).get("terminated")
            if not term:
                continue
            try:
                summary = json.loads(term.get("message") or "")
            except json.JSONDecodeError:
                summary = None
            if not isinstance(summary, dict):
                summary = None
            finished = str(term.get("finishedAt") or "")
            if best is None or finished > best[0]:
                best = (finished, summary, term.get("reason"))
    return (best[1], best[2]) if best else (None, None)


def _hours_since(timestamp: str) -> float:
    started = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - started).total_seconds() / 3600)


def register(config: OperatorSettings, registry: kopf.OperatorRegistry) -> None:
    """Register the FineTune handlers, with ``config``, on ``registry``."""

    def kube(memo: Any) -> Kube:
        k: Kube = memo.kube
        return k

    book = StatusBook()

    def update_status(
        k: Kube,
        body: dict[str, Any],
        observed: dict[str, Any],
        compute: Callable[[dict[str, Any]], dict[str, Any] | None],
    ) -> dict[str, Any]:
        """Compute the next status from the newest known one, under the object's lock; patch what changed."""
        meta = body["metadata"]
        uid = meta["uid"]
        with book.lock(uid):
            old = book.latest(uid, observed)
            if old.get("phase") in st.TERMINAL_PHASES:
                return old
            new = compute(old)
            if new is None:
                return old
            delta = changed_fields(old, new)
            if not delta:
                return old
            k.patch_status(PLURAL, meta["namespace"], meta["name"], delta)
            book.record(uid, new)
        if new.get("phase") != old.get("phase"):
            metrics.finetune_phase(meta["namespace"], meta["name"], new.get("phase"))
        # Events for the transitions a person acts on; Pending and Preparing come and go within seconds.
        if new.get("phase") != old.get("phase") and new.get("phase") not in ("Pending", "Preparing"):
            reason = next((c["reason"] for c in new.get("conditions", []) if c["type"] == "Ready"), new.get("phase"))
            kind = "Warning" if new.get("phase") == "Failed" else "Normal"
            k.event(body, kind, str(reason), f"{new.get('phase')}: {new.get('message', '')}")
            if new.get("phase") == "Failed":
                metrics.FAILURES.labels(reason=str(reason)).inc()
        return new

    def storage_for(k: Kube, namespace: str, spec: dict[str, Any]) -> storage.S3Settings:
        stor = spec.get("storage") or {}
        secret_name = (stor.get("secretRef") or {}).get("name") or config.default_storage_secret
        secret = k.secret_data(namespace, secret_name) if secret_name else None
        return s3_settings(
            secret,
            stor.get("endpoint") or config.default_storage_endpoint,
            stor.get("region") or config.default_storage_region,
        )

    # ------------------------------------------------------------------ indexes (no API reads to look things up)

    @kopf.index(*FT, id="finetune_index", registry=registry)
    def finetune_index(
        *, namespace: str | None, name: str, body: kopf.Body, **_: Any
    ) -> dict[tuple[str | None, str], dict[str, Any]]:
        run_policy = (body.get("spec") or {}).get("runPolicy") or {}
        return {
            (namespace, name): {
                "body": {"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": dict(body["metadata"])},
                "spec": dict(body.get("spec") or {}),
                "status": dict(body.get("status") or {}),
                "generation": body["metadata"].get("generation"),
                "suspend": bool(run_policy.get("suspend")),
            }
        }

    @kopf.index("batch", "v1", "jobs", labels={build.FINETUNE_LABEL: kopf.PRESENT}, id="job_index", registry=registry)
    def job_index(
        *, namespace: str | None, name: str, body: kopf.Body, **_: Any
    ) -> dict[tuple[str | None, str], dict[str, Any]]:
        return {
            (namespace, name): {
                "metadata": dict(body["metadata"]),
                "spec": dict(body["spec"]),
                "status": dict(body.get("status") or {}),
            }
        }

    # ------------------------------------------------------------------ launch

    @kopf.on.resume(*FT, registry=registry)
    @kopf.on.create(*FT, registry=registry)
    def launch(*, body: kopf.Body, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status, memo: Any, **_: Any) -> None:
        started = time.monotonic()
        k = kube(memo)
        observed = dict(status)
        if book.latest(meta["uid"], observed).get("phase") in st.TERMINAL_PHASES:
            return
        obj = dict(body)
        namespace, generation = meta["namespace"], meta.get("generation")

        def stop(reason: str, message: str, *, terminal: bool) -> None:
            update_status(
                k,
                obj,
                observed,
                lambda cur: st.failed_status(
                    cur, reason, message, generation=generation, now=now_iso(), terminal=terminal
                ),
            )

        try:
            finetune = FineTune.model_validate({"metadata": dict(meta), "spec": dict(spec)})
        except ValidationError as e:
            stop("SpecInvalid", str(e), terminal=True)
            return
        template = None
        if finetune.spec.template_ref is not None:
            ref = finetune.spec.template_ref.name
            raw = k.get_custom("finetunetemplates", None, ref)
            if raw is None:
                stop("TemplateNotFound", f"FineTuneTemplate {ref} does not exist (spec.templateRef)", terminal=False)
                raise kopf.TemporaryError(f"template {ref} not found", delay=10)
            template = FineTuneTemplate.model_validate(raw)
        try:
            plan = build.plan(finetune, dict(spec), template, config)
        except build.TemplateViolationError as e:
            stop("TemplateViolation", str(e), terminal=True)
            return
        except ValidationError as e:
            stop("SpecInvalid", f"after applying the template: {e}", terminal=True)
            return
        if plan.secret_name:
            data = k.secret_data(namespace, plan.secret_name)
            missing = [key for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if data is None or key not in data]
            if missing:
                what = "does not exist" if data is None else f"lacks {', '.join(missing)}"
                stop(
                    "StorageCredentialsMissing",
                    f"Secret {plan.secret_name} (spec.storage.secretRef) {what}; the run starts once it does",
                    terminal=False,
                )
                raise kopf.TemporaryError(f"secret {plan.secret_name} {what}", delay=5)
        try:
            k.create_or_adopt(build.build_config_map(finetune, plan, config), meta["uid"])
            if (plan.spec.resources.nodes if plan.spec.resources else 1) > 1:
                k.create_or_adopt(build.build_headless_service(finetune, config), meta["uid"])
            job, created = k.create_or_adopt(build.build_job(finetune, plan, config), meta["uid"])
        except ForeignObjectError as e:
            raise kopf.TemporaryError(f"{e}; waiting for it to go away", delay=5) from e
        if created:
            metrics.JOB_LAUNCHES.inc()
            resources = plan.spec.resources
            metrics.GPUS_REQUESTED.inc((resources.gpus if resources else 1) * (resources.nodes if resources else 1))
        suspended = bool(plan.spec.run_policy and plan.spec.run_policy.suspend)

        def launched(cur: dict[str, Any]) -> dict[str, Any]:
            new = st.validated(cur, job["metadata"]["name"], plan.config.run_id, generation=generation, now=now_iso())
            if cur.get("phase") in (None, "Pending"):
                seen = st.Observation(job=job, suspended_by_user=suspended, queue=plan.queue)
                new = st.observe(new, seen, generation=generation, now=now_iso())
            return new

        update_status(k, obj, observed, launched)
        metrics.RECONCILE_SECONDS.labels(kind="FineTune").observe(time.monotonic() - started)

    # ------------------------------------------------------------------ follow the Job

    @kopf.on.event("batch", "v1", "jobs", labels={build.FINETUNE_LABEL: kopf.PRESENT}, registry=registry)
    def follow_job(*, type: str, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
        if type == "DELETED":
            return
        finetune_index: kopf.Index[Any, Any] = kwargs["finetune_index"]
        namespace = body["metadata"]["namespace"]
        ft_name = body["metadata"]["labels"][build.FINETUNE_LABEL]
        owners = [r.get("uid") for r in body["metadata"].get("ownerReferences") or []]
        for entry in finetune_index.get((namespace, ft_name), []):
            if entry["body"]["metadata"].get("uid") not in owners:
                continue
            uid = entry["body"]["metadata"]["uid"]
            if book.latest(uid, entry["status"]).get("phase") in st.TERMINAL_PHASES:
                return
            job = {
                "metadata": dict(body["metadata"]),
                "spec": dict(body["spec"]),
                "status": dict(body.get("status") or {}),
            }
            summary, reason = None, None
            ended = any(
                c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                for c in job["status"].get("conditions") or []
            )
            k = kube(memo)
            if ended:
                summary, reason = _summary_from_pods(k.job_pods(namespace, job["metadata"]["name"]))
            spec = entry["spec"]
            queue = ((spec.get("runPolicy") or {}).get("queueName")) or config.default_queue
            seen = st.Observation(
                job=job, summary=summary, container_reason=reason, suspended_by_user=entry["suspend"], queue=queue
            )
            observe = partial(st.observe, seen=seen, generation=entry["generation"], now=now_iso())
            new = update_status(k, entry["body"], entry["status"], observe)
            if ended and new.get("phase") in st.TERMINAL_PHASES and new.get("startTime"):
                resources = spec.get("resources") or {}
                gpus = int(resources.get("gpus", 1)) * int(resources.get("nodes", 1))
                metrics.GPU_HOURS.inc(gpus * _hours_since(str(new["startTime"])))
            return

    # ------------------------------------------------------------------ progress

    def active(*, status: kopf.Status, **_: Any) -> bool:
        return status.get("phase") in ("Preparing", "Training", "Evaluating", "Pending") and bool(status.get("jobName"))

    @kopf.timer(*FT, interval=config.status_interval_seconds, when=active, registry=registry)
    def mirror_progress(
        *, body: kopf.Body, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status, memo: Any, **kwargs: Any
    ) -> None:
        job_index: kopf.Index[Any, Any] = kwargs["job_index"]
        k = kube(memo)
        namespace = meta["namespace"]
        jobs = list(job_index.get((namespace, status["jobName"]), []))
        job = jobs[0] if jobs else None
        if job is None or not int((job.get("status") or {}).get("active") or 0):
            return
        run = (job["metadata"].get("annotations") or {}).get("kubetune.io/output")
        if not run:
            return
        try:
            progress = storage.read_json(storage.join(run, "progress.json"), storage_for(k, namespace, dict(spec)))
        except storage.StorageError:
            return  # not written yet, or the store is briefly away: the next tick tries again
        run_policy = spec.get("runPolicy") or {}
        seen = st.Observation(
            job=job,
            progress=progress,
            suspended_by_user=bool(run_policy.get("suspend")),
            queue=run_policy.get("queueName") or config.default_queue,
        )
        update_status(
            k,
            dict(body),
            dict(status),
            lambda cur: st.observe(cur, seen, generation=meta.get("generation"), now=now_iso()),
        )

    # ------------------------------------------------------------------ suspend / resume

    # An update handler (not on.field, which also runs at creation and costs a write per FineTune there).
    @kopf.on.update(*FT, field="spec.runPolicy.suspend", registry=registry)
    def suspend(*, meta: kopf.Meta, spec: kopf.Spec, new: Any, memo: Any, **_: Any) -> None:
        k = kube(memo)
        job = build.job_name(meta["name"])
        queued = bool((spec.get("runPolicy") or {}).get("queueName") or config.default_queue)
        value = bool(new) or queued  # with Kueue, resuming means handing the Job back to Kueue
        try:
            k.batch.patch_namespaced_job(job, meta["namespace"], {"spec": {"suspend": value}})
        except ApiException as e:
            if e.status != 404:
                raise

    # ------------------------------------------------------------------ delete
    # The Job, ConfigMap and Service carry ownerReferences: the garbage collector removes
    # them with the FineTune. A finalizer (one more write per FineTune, and a FineTune that
    # cannot be deleted while the operator is down) is only worth it to delete artifacts.

    def deletes_artifacts(*, spec: kopf.Spec, **_: Any) -> bool:
        return bool((spec.get("output") or {}).get("retention") == "Delete")

    @kopf.on.delete(*FT, optional=True, registry=registry)
    def forget(*, meta: kopf.Meta, **_: Any) -> None:
        metrics.finetune_phase(meta["namespace"], meta["name"], None)
        book.forget(meta["uid"])

    @kopf.on.delete(*FT, when=deletes_artifacts, registry=registry)
    def delete_artifacts(*, meta: kopf.Meta, spec: kopf.Spec, memo: Any, **_: Any) -> None:
        k = kube(memo)
        namespace, name = meta["namespace"], meta["name"]
        root = (spec.get("output") or {}).get("uri") or config.default_output_uri
        if not root:
            return
        run = run_prefix(root, namespace, name, str(meta["uid"]))
        loc = storage.resolve(run, storage_for(k, namespace, dict(spec)))
        removed = loc.store.delete_prefix(loc.key)
        log.info("deleted %d artifacts under %s (output.retention: Delete)", removed, run)
