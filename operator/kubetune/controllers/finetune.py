"""The FineTune controller: level-triggered kopf handlers around the pure builders.

Every FineTune event (and every event of a FineTune's Job) reconciles the
object to where its spec says it should be:

- no Job yet: validate against the template, check the credentials Secret,
  create (or adopt) the trainer ConfigMap and Job — never twice, so an operator
  restarted at any point converges;
- a Job: mirror it (and, when it ends, the trainer's termination summary) into
  status, and make its ``suspend`` follow ``spec.runPolicy.suspend``;
- while the Job runs, a scheduled poll mirrors ``progress.json`` into status.

The controller keeps no state in the objects it watches: no kopf annotations
and, unless ``output.retention: Delete`` asks the operator to delete artifacts,
no finalizer. Waits and retries (a missing template or Secret, an API error)
go through :class:`~kubetune.controllers.scheduler.Scheduler`. Deleting a
FineTune deletes its Job, ConfigMap and Service through their
ownerReferences. Status writes carry only the fields that changed.

Writes per FineTune up to its Job: ConfigMap, Job, one status patch.
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
from kubetune.controllers.scheduler import Scheduler
from kubetune_trainer import storage

log = logging.getLogger("kubetune.finetune")
FT = (API_GROUP, API_VERSION, "finetunes")
PLURAL = "finetunes"
# After a Job disappears under a running FineTune, wait this long before creating it again
# (a FineTune being deleted loses its Job first; its own DELETED event cancels the relaunch).
RELAUNCH_DELAY_S = 2.0
MAX_RETRY_DELAY_S = 60.0


class RetryError(Exception):
    """Reconcile again in ``delay`` seconds (a missing template or Secret, a foreign object in the way)."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


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


def _snapshot(body: Any) -> dict[str, Any]:
    """A plain copy of a FineTune as kopf handed it (kopf's bodies are live views of the latest event)."""
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": dict(body["metadata"]),
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }


def _owned_job(job_index: Any, namespace: str, name: str, uid: str) -> dict[str, Any] | None:
    for job in job_index.get((namespace, name), []):
        if any(ref.get("uid") == uid for ref in job["metadata"].get("ownerReferences") or []):
            found: dict[str, Any] = job
            return found
    return None


def register(config: OperatorSettings, registry: kopf.OperatorRegistry) -> None:
    """Register the FineTune handlers, with ``config``, on ``registry``."""

    def kube(memo: Any) -> Kube:
        k: Kube = memo.kube
        return k

    book = StatusBook()
    scheduler = Scheduler()
    # What this process knows beyond the watched objects, by FineTune uid.
    launched: dict[str, str] = {}  # the Job this process created or adopted (its watch event may lag)
    failures: dict[str, int] = {}  # consecutive failed reconciles, for the retry back-off
    suspend_sent: dict[str, bool] = {}  # a suspend patch sent whose Job event has not come back yet
    running: dict[str, tuple[Kube, dict[str, Any], dict[str, Any]]] = {}  # Jobs with active pods: progress polls

    def update_status(
        k: Kube, obj: dict[str, Any], compute: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> dict[str, Any]:
        """Compute the next status from the newest known one, under the object's lock; patch what changed."""
        meta = obj["metadata"]
        uid = meta["uid"]
        with book.lock(uid):
            old = book.latest(uid, obj.get("status") or {})
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
            log.info("%s/%s: %s -> %s", meta["namespace"], meta["name"], old.get("phase") or "-", new.get("phase"))
        # Events for the transitions a person acts on; Pending and Preparing come and go within seconds.
        if new.get("phase") != old.get("phase") and new.get("phase") not in ("Pending", "Preparing"):
            reason = next((c["reason"] for c in new.get("conditions", []) if c["type"] == "Ready"), new.get("phase"))
            kind = "Warning" if new.get("phase") == "Failed" else "Normal"
            k.event(obj, kind, str(reason), f"{new.get('phase')}: {new.get('message', '')}")
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

    def queue_of(spec: dict[str, Any]) -> str | None:
        return ((spec.get("runPolicy") or {}).get("queueName")) or config.default_queue

    def user_suspended(spec: dict[str, Any]) -> bool:
        return bool((spec.get("runPolicy") or {}).get("suspend"))

    def observe(k: Kube, obj: dict[str, Any], job: dict[str, Any], **seen: Any) -> dict[str, Any]:
        """Update status from what was seen of the FineTune's Job (and its pods' summary, or progress.json)."""
        seen_all = st.Observation(
            job=job, suspended_by_user=user_suspended(obj["spec"]), queue=queue_of(obj["spec"]), **seen
        )
        generation = obj["metadata"].get("generation")
        return update_status(k, obj, lambda cur: st.observe(cur, seen_all, generation=generation, now=now_iso()))

    # ------------------------------------------------------------------ indexes (no API reads to look things up)

    @kopf.index(*FT, id="finetune_index", registry=registry)
    def finetune_index(
        *, namespace: str | None, name: str, body: kopf.Body, **_: Any
    ) -> dict[tuple[str | None, str], dict[str, Any]]:
        return {(namespace, name): _snapshot(body)}

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

    @kopf.on.startup(registry=registry)
    def start_scheduler(**_: Any) -> None:
        scheduler.start()

    @kopf.on.cleanup(registry=registry)
    def stop_scheduler(**_: Any) -> None:
        scheduler.stop()

    # ------------------------------------------------------------------ reconcile

    def reconcile(k: Kube, obj: dict[str, Any], job: dict[str, Any] | None) -> None:
        """Bring one FineTune to its spec. ``job``: its Job as last seen by the watch (None: none seen)."""
        meta = obj["metadata"]
        uid = meta["uid"]
        name = build.job_name(meta["name"])
        with book.lock(uid):  # one reconcile of an object at a time: kopf's events and the scheduler's retries
            current = book.latest(uid, obj.get("status") or {})
            if current.get("phase") in st.TERMINAL_PHASES:
                return
            if job is None and launched.get(uid) == name:
                return  # this process created it; its watch event is on the way
            if job is None or not st.launched(current, name):
                # No Job, or one whose creation never reached status (an operator stopped in between): adopt it.
                job = launch(k, obj)
                if job is None:
                    return
            launched[uid] = name
            sync_suspend(k, obj, job)

    def reconcile_safely(k: Kube, obj: dict[str, Any], job: dict[str, Any] | None) -> None:
        """Reconcile; on a failure, schedule another try (kopf does not retry event handlers)."""
        meta = obj["metadata"]
        uid = meta["uid"]
        try:
            reconcile(k, obj, job)
        except RetryError as e:
            log.info("%s/%s: %s; trying again in %gs", meta["namespace"], meta["name"], e, e.delay)
            delay = e.delay
        except Exception as e:  # API errors, an unreachable API server: back off, up to a minute
            failures[uid] = failures.get(uid, 0) + 1
            delay = min(MAX_RETRY_DELAY_S, 2.0 ** failures[uid])
            log.warning(
                "%s/%s: reconcile failed (%s: %s); retrying in %gs",
                meta["namespace"],
                meta["name"],
                type(e).__name__,
                getattr(e, "reason", None) or e,
                delay,
            )
        else:
            failures.pop(uid, None)
            scheduler.cancel(("retry", uid))
            return
        scheduler.call_later(("retry", uid), delay, partial(reconcile_safely, k, obj, None))

    def launch(k: Kube, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Validate, then create (or adopt) the ConfigMap and Job; the Job, or None when the FineTune failed."""
        started = time.monotonic()
        meta, spec = obj["metadata"], obj["spec"]
        namespace, generation = meta["namespace"], meta.get("generation")

        def stop(reason: str, message: str, *, terminal: bool) -> None:
            update_status(
                k,
                obj,
                lambda cur: st.failed_status(
                    cur, reason, message, generation=generation, now=now_iso(), terminal=terminal
                ),
            )

        try:
            finetune = FineTune.model_validate({"metadata": meta, "spec": spec})
        except ValidationError as e:
            stop("SpecInvalid", str(e), terminal=True)
            return None
        template = None
        if finetune.spec.template_ref is not None:
            ref = finetune.spec.template_ref.name
            raw = k.get_custom("finetunetemplates", None, ref)
            if raw is None:
                stop("TemplateNotFound", f"FineTuneTemplate {ref} does not exist (spec.templateRef)", terminal=False)
                raise RetryError(f"template {ref} not found", 10)
            template = FineTuneTemplate.model_validate(raw)
        try:
            plan = build.plan(finetune, spec, template, config)
        except build.TemplateViolationError as e:
            stop("TemplateViolation", str(e), terminal=True)
            return None
        except ValidationError as e:
            stop("SpecInvalid", f"after applying the template: {e}", terminal=True)
            return None
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
                raise RetryError(f"secret {plan.secret_name} {what}", 5)
        try:
            k.create_or_adopt(build.build_config_map(finetune, plan, config), meta["uid"])
            if (plan.spec.resources.nodes if plan.spec.resources else 1) > 1:
                k.create_or_adopt(build.build_headless_service(finetune, config), meta["uid"])
            job, created = k.create_or_adopt(build.build_job(finetune, plan, config), meta["uid"])
        except ForeignObjectError as e:
            raise RetryError(f"{e}; waiting for it to go away", 5) from e
        if created:
            log.info("%s/%s: created Job %s", namespace, meta["name"], job["metadata"]["name"])
            metrics.JOB_LAUNCHES.inc()
            resources = plan.spec.resources
            metrics.GPUS_REQUESTED.inc((resources.gpus if resources else 1) * (resources.nodes if resources else 1))
        suspended = bool(plan.spec.run_policy and plan.spec.run_policy.suspend)

        def launched_status(cur: dict[str, Any]) -> dict[str, Any]:
            new = st.validated(cur, job["metadata"]["name"], plan.config.run_id, generation=generation, now=now_iso())
            if cur.get("phase") in (None, "Pending"):
                seen = st.Observation(job=job, suspended_by_user=suspended, queue=plan.queue)
                new = st.observe(new, seen, generation=generation, now=now_iso())
            return new

        update_status(k, obj, launched_status)
        metrics.RECONCILE_SECONDS.labels(kind="FineTune").observe(time.monotonic() - started)
        return job

    def sync_suspend(k: Kube, obj: dict[str, Any], job: dict[str, Any]) -> None:
        """Make the Job's ``suspend`` follow ``spec.runPolicy.suspend``.

        With a queue, resuming means handing the Job back to Kueue: the operator
        suspends a queued Job but never unsuspends it (Kueue admits it).
        """
        uid = obj["metadata"]["uid"]
        wanted = user_suspended(obj["spec"])
        actual = bool(job["spec"].get("suspend"))
        if wanted == actual or (actual and queue_of(obj["spec"])):
            suspend_sent.pop(uid, None)
            return
        if suspend_sent.get(uid) == wanted:
            return  # sent already; the Job's event has not come back yet
        try:
            patch = {"spec": {"suspend": wanted}}
            k.batch.patch_namespaced_job(job["metadata"]["name"], obj["metadata"]["namespace"], patch)
        except ApiException as e:
            if e.status != 404:
                raise
        suspend_sent[uid] = wanted

    def forget(namespace: str, name: str, uid: str) -> None:
        metrics.finetune_phase(namespace, name, None)
        book.forget(uid)
        for state in (launched, failures, suspend_sent, running):
            state.pop(uid, None)
        scheduler.cancel(("retry", uid))
        scheduler.cancel(("progress", uid))

    @kopf.on.event(*FT, id="reconcile", registry=registry)
    def finetune_event(*, type: str, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
        meta = body["metadata"]
        if type == "DELETED":
            forget(meta["namespace"], meta["name"], meta["uid"])
            return
        if meta.get("deletionTimestamp"):
            return  # going away: nothing to start
        job = _owned_job(kwargs["job_index"], meta["namespace"], build.job_name(meta["name"]), meta["uid"])
        reconcile_safely(kube(memo), _snapshot(body), job)

    # ------------------------------------------------------------------ follow the Job

    @kopf.on.event("batch", "v1", "jobs", labels={build.FINETUNE_LABEL: kopf.PRESENT}, id="job", registry=registry)
    def follow_job(*, type: str, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
        finetune_index: kopf.Index[Any, Any] = kwargs["finetune_index"]
        meta = body["metadata"]
        namespace = meta["namespace"]
        owners = {r.get("uid") for r in meta.get("ownerReferences") or []}
        key = (namespace, meta["labels"][build.FINETUNE_LABEL])
        obj = next((o for o in finetune_index.get(key, []) if o["metadata"].get("uid") in owners), None)
        if obj is None:
            return
        uid = obj["metadata"]["uid"]
        k = kube(memo)
        terminal = book.latest(uid, obj["status"]).get("phase") in st.TERMINAL_PHASES
        if type == "DELETED":
            running.pop(uid, None)
            scheduler.cancel(("progress", uid))
            if launched.get(uid) == meta["name"]:
                launched.pop(uid, None)
            if not terminal:
                scheduler.call_later(("retry", uid), RELAUNCH_DELAY_S, partial(relaunch, k, obj))
            return
        if terminal:
            return
        job = {"metadata": dict(meta), "spec": dict(body["spec"]), "status": dict(body.get("status") or {})}
        ended = any(
            c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
            for c in job["status"].get("conditions") or []
        )
        summary, reason = None, None
        if ended:
            summary, reason = _summary_from_pods(k.job_pods(namespace, meta["name"]))
        spec = obj["spec"]
        new = observe(k, obj, job, summary=summary, container_reason=reason)
        if new.get("phase") in st.TERMINAL_PHASES:
            running.pop(uid, None)
            scheduler.cancel(("progress", uid))
            if ended and new.get("startTime"):
                resources = spec.get("resources") or {}
                gpus = int(resources.get("gpus", 1)) * int(resources.get("nodes", 1))
                metrics.GPU_HOURS.inc(gpus * _hours_since(str(new["startTime"])))
            return
        if not ended:
            try:
                sync_suspend(k, obj, job)
            except ApiException as e:
                log.warning("%s/%s: could not set the Job's suspend: %s", namespace, meta["name"], e.reason)
        if not ended and int(job["status"].get("active") or 0) and not job["spec"].get("suspend"):
            running[uid] = (k, obj, job)
            poll = partial(poll_progress, uid)
            scheduler.call_later(("progress", uid), config.status_interval_seconds, poll, keep_earlier=True)
        else:
            running.pop(uid, None)
            scheduler.cancel(("progress", uid))

    def relaunch(k: Kube, obj: dict[str, Any]) -> None:
        """The Job of an unfinished FineTune went away: create it again, if the FineTune is still there."""
        meta = obj["metadata"]
        try:
            current = k.get_custom(PLURAL, meta["namespace"], meta["name"])
        except ApiException as e:
            log.warning("%s/%s: could not read the FineTune (%s)", meta["namespace"], meta["name"], e.reason)
            scheduler.call_later(("retry", meta["uid"]), RELAUNCH_DELAY_S, partial(relaunch, k, obj))
            return
        if current is None or current["metadata"].get("uid") != meta["uid"]:
            return
        if current["metadata"].get("deletionTimestamp"):
            return
        log.info("%s/%s: its Job is gone; creating it again", meta["namespace"], meta["name"])
        reconcile_safely(k, _snapshot(current), None)

    # ------------------------------------------------------------------ progress

    def poll_progress(uid: str) -> None:
        """Mirror ``progress.json`` of a running Job into status, then poll again after the interval."""
        current = running.get(uid)
        if current is None:
            return  # the Job ended, was suspended or went away
        k, obj, job = current
        run = (job["metadata"].get("annotations") or {}).get("kubetune.io/output")
        if run:
            namespace = obj["metadata"]["namespace"]
            try:
                progress = storage.read_json(storage.join(run, "progress.json"), storage_for(k, namespace, obj["spec"]))
            except storage.StorageError:
                progress = None  # not written yet, or the store is briefly away: the next poll tries again
            if progress:
                observe(k, obj, job, progress=progress)
        if uid in running:
            scheduler.call_later(("progress", uid), config.status_interval_seconds, partial(poll_progress, uid))

    # ------------------------------------------------------------------ delete
    # The Job, ConfigMap and Service carry ownerReferences: the garbage collector removes
    # them with the FineTune. A finalizer (one more write per FineTune, and a FineTune that
    # cannot be deleted while the operator is down) is only worth it to delete artifacts,
    # so kopf adds one only to FineTunes that ask for that.

    def deletes_artifacts(*, spec: kopf.Spec, **_: Any) -> bool:
        return bool((spec.get("output") or {}).get("retention") == "Delete")

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
