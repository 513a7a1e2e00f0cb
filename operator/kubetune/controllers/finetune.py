"""The FineTune controller: level-triggered, around the pure builders.

Every FineTune event (and every event of a FineTune's Job), delivered by the
informers of controllers/informer.py rather than by kopf's handlers, reconciles
the object to where its spec says it should be:

- no Job yet: validate against the template, check the credentials Secret,
  create (or adopt) the Job, which carries the trainer's config — never twice, so an operator
  restarted at any point converges;
- a Job: mirror it (and, when it ends, the trainer's termination summary) into
  status, and make its ``suspend`` follow ``spec.runPolicy.suspend``;
- while the Job runs, a scheduled poll mirrors ``progress.json`` into status.

The controller keeps no state in the objects it watches: no annotations
and, unless ``output.retention: Delete`` asks the operator to delete artifacts,
no finalizer. Waits and retries (a missing template or Secret, an API error)
go through :class:`~kubetune.controllers.scheduler.Scheduler`. Deleting a
FineTune deletes its Job and Service through their
ownerReferences. Status writes carry only the fields that changed.

Writes per FineTune up to its Job: the Job, one status patch.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubetune.api.finetune import FineTune
from kubetune.api.template import FineTuneTemplate
from kubetune.builders import finetune as build
from kubetune.builders import meta
from kubetune.builders import status as st
from kubetune.builders.settings import OperatorSettings
from kubetune.builders.trainer_config import run_prefix
from kubetune.controllers import metrics
from kubetune.controllers.kube import (
    OPERATOR_S3_CONNECT_TIMEOUT_S,
    OPERATOR_S3_READ_TIMEOUT_S,
    ForeignObjectError,
    KubeAPI,
    StatusBook,
    changed_fields,
    s3_settings,
)
from kubetune.controllers.s3read import S3Reader
from kubetune.controllers.scheduler import Backoff, Scheduler, why
from kubetune_trainer import storage
from kubetune_trainer.contract import Progress, Summary, now_iso, seconds_since, summary_from_manifest

log = logging.getLogger("kubetune.finetune")
PLURAL = "finetunes"
# After a Job disappears under a running FineTune, wait this long before creating it again
# (a FineTune being deleted loses its Job first; its own DELETED event cancels the relaunch).
RELAUNCH_DELAY_S = 2.0
MAX_RETRY_DELAY_S = 60.0
# The store not answering the progress poll for this long is said in status (the trainer waits for it).
STORAGE_DOWN_AFTER_S = 30.0


class RetryError(Exception):
    """Reconcile again in ``delay`` seconds (a missing template or Secret, a foreign object in the way)."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


def api_message(e: ApiException) -> str:
    """The message of an API error's Status body, else its reason."""
    try:
        return str(json.loads(e.body or "{}").get("message") or e.reason)
    except (ValueError, AttributeError):
        return str(e.reason)


def field_paths(delta: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted paths of the leaves of a status patch (``progress.percent``), for the debug log."""
    paths: list[str] = []
    for key, value in delta.items():
        path = f"{prefix}{key}"
        paths.extend(field_paths(value, path + ".") if isinstance(value, dict) and value else [path])
    return paths


def summary_from_pods(pods: list[dict[str, Any]]) -> tuple[Summary | None, str | None]:
    """The newest trainer termination summary and container reason among the Job's pods."""
    best: tuple[str, Summary | None, str | None] | None = None
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") != build.TRAINER_CONTAINER:
                continue
            term = (cs.get("state") or {}).get("terminated")
            if not term:
                continue
            finished = str(term.get("finishedAt") or "")
            if best is None or finished > best[0]:
                best = (finished, Summary.parse(term.get("message")), term.get("reason"))
    return (best[1], best[2]) if best else (None, None)


# The metadata the controllers read. Not managedFields, nor the last-applied annotation: together
# they are most of an object's size, and the operator keeps one copy of every object in memory.
KEPT_METADATA = (
    "name",
    "namespace",
    "uid",
    "generation",
    "resourceVersion",
    "labels",
    "deletionTimestamp",
    "finalizers",
)
FINALIZER = "kubetune.io/delete-artifacts"
"""On FineTunes with ``output.retention: Delete`` only: their artifacts are deleted before they go."""
DELETE_RETRY_S = 15.0


def snapshot(body: Any) -> dict[str, Any]:
    """A plain copy of a kubetune object as a watch delivered it: what the controller reads of it, nothing more."""
    metadata = body["metadata"]
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: metadata[k] for k in KEPT_METADATA if k in metadata},
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }


def job_snapshot(body: Any) -> dict[str, Any]:
    """What the controller reads of a training Job: identity, notes, suspend and size, the containers'
    resources, the status. A whole Job (its pod template) is several times as large."""
    metadata, spec = body["metadata"], body.get("spec") or {}
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
    resources = [{"name": c.get("name"), "resources": c.get("resources") or {}} for c in containers]
    return {
        "metadata": {k: metadata[k] for k in (*KEPT_METADATA, "annotations", "ownerReferences") if k in metadata},
        "spec": {
            **{k: spec[k] for k in ("suspend", "parallelism", "completions") if k in spec},
            "template": {"spec": {"containers": resources}},
        },
        "status": dict(body.get("status") or {}),
    }


def job_ended(job: dict[str, Any]) -> bool:
    return any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in (job.get("status") or {}).get("conditions") or []
    )


def job_storage(job: dict[str, Any]) -> tuple[str | None, str | None, str, str | None]:
    """(run prefix, endpoint, region, credentials Secret) recorded on a training Job by the builder."""
    notes = job["metadata"].get("annotations") or {}
    return (
        notes.get(build.OUTPUT_ANNOTATION),
        notes.get(build.STORAGE_ENDPOINT_ANNOTATION) or None,
        notes.get(build.STORAGE_REGION_ANNOTATION) or "us-east-1",
        notes.get(build.STORAGE_SECRET_ANNOTATION) or None,
    )


class EndpointBreaker:
    """Stores that just failed are left alone for a while, so one tenant's unreachable (or black-holed)
    endpoint costs the shared poll threads one bounded attempt per ``cooldown``, not one per FineTune per poll."""

    def __init__(self, cooldown: float = 15.0) -> None:
        self.cooldown = cooldown
        self._open_until: dict[str | None, float] = {}
        self._lock = threading.Lock()

    def is_open(self, endpoint: str | None) -> bool:
        with self._lock:
            return self._open_until.get(endpoint, 0.0) > time.monotonic()

    def failed(self, endpoint: str | None) -> None:
        with self._lock:
            self._open_until[endpoint] = time.monotonic() + self.cooldown

    def succeeded(self, endpoint: str | None) -> None:
        with self._lock:
            self._open_until.pop(endpoint, None)


class FineTuneController:
    """Reconciles FineTunes to Jobs and mirrors the Jobs back into status.

    State kept in this process (never in the objects): the newest status written per object
    (:class:`StatusBook`), the Jobs created whose watch events may lag, retry counts, suspend
    patches in flight, and the running Jobs whose progress is polled.
    """

    def __init__(self, kube: KubeAPI, settings: OperatorSettings, scheduler: Scheduler) -> None:
        self.kube = kube
        self.settings = settings
        self.scheduler = scheduler
        self.book = StatusBook()
        self.launched: dict[str, str] = {}  # uid -> the Job this process created or adopted
        self.backoff = Backoff(MAX_RETRY_DELAY_S)  # consecutive failures per uid: the wait before the next try
        self.suspend_sent: dict[str, bool] = {}  # uid -> a suspend patch whose Job event has not come back
        self.running: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}  # uid -> (FineTune, Job) polled
        self.jobs: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}  # uid -> (FineTune, newest Job) followed
        # What the watches delivered last (slim copies), for lookups without API reads: FineTunes by uid,
        # Jobs by their FineTune's uid. Seeded by a list at start-up, before any event is handled.
        self.finetunes: dict[str, dict[str, Any]] = {}
        self.job_of: dict[str, dict[str, Any]] = {}
        self.progress_written: dict[str, float] = {}  # uid -> when status.progress was last written
        self.failed_seen: dict[str, int] = {}  # uid -> the Job's failed pods when last checked for OOMKilled
        self.store_down: dict[str, tuple[float, str]] = {}  # uid -> (since, error) while its store does not answer
        self.breaker = EndpointBreaker()
        self.seen_lock = threading.Lock()  # the FineTune and Job informers' threads, one event at a time
        self.s3 = S3Reader(connect_timeout=OPERATOR_S3_CONNECT_TIMEOUT_S, read_timeout=OPERATOR_S3_READ_TIMEOUT_S)

    # ------------------------------------------------------------------ status

    def update_status(
        self, obj: dict[str, Any], compute: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> dict[str, Any]:
        """Compute the next status from the newest known one, under the object's lock; patch what changed."""
        meta_ = obj["metadata"]
        uid = meta_["uid"]
        with self.book.lock(uid):
            old = self.book.latest(uid, obj.get("status") or {})
            if old.get("phase") in st.TERMINAL_PHASES:
                return old
            new = compute(old)
            if new is None:
                return old
            delta = changed_fields(old, new)
            if not delta:
                return old
            self.kube.patch_status(PLURAL, meta_["namespace"], meta_["name"], delta)
            self.book.record(uid, new)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s/%s: status write: %s", meta_["namespace"], meta_["name"], ", ".join(field_paths(delta)))
        if new.get("phase") != old.get("phase"):
            self.phase_changed(obj, old, new)
        return new

    def phase_changed(self, obj: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> None:
        """Metrics, a log line and (for what a person acts on) an Event."""
        meta_ = obj["metadata"]
        phase = new.get("phase")
        metrics.finetune_phase(meta_["namespace"], meta_["name"], phase)
        log.info("%s/%s: %s -> %s", meta_["namespace"], meta_["name"], old.get("phase") or "-", phase)
        if phase in ("Pending", "Preparing"):
            return  # they come and go within seconds
        reason = next((c["reason"] for c in new.get("conditions", []) if c["type"] == "Ready"), phase)
        self.kube.event(
            obj, "Warning" if phase == "Failed" else "Normal", str(reason), f"{phase}: {new.get('message', '')}"
        )
        if phase == "Failed":
            metrics.FAILURES.labels(reason=str(reason)).inc()

    def observe(self, obj: dict[str, Any], job: dict[str, Any], **seen: Any) -> dict[str, Any]:
        """Update status from what was seen of the FineTune's Job (and its pods' summary, or progress.json)."""
        labels = job["metadata"].get("labels") or {}
        observation = st.Observation(
            job=job,
            suspended_by_user=bool((obj["spec"].get("runPolicy") or {}).get("suspend")),
            queue=labels.get(build.QUEUE_LABEL),
            **seen,
        )
        generation = obj["metadata"].get("generation")
        uid = obj["metadata"]["uid"]
        fresh_enough = time.monotonic() - self.progress_written.get(uid, 0.0) < self.settings.progress_status_seconds

        def compute(cur: dict[str, Any]) -> dict[str, Any] | None:
            new = st.observe(cur, observation, generation=generation, now=now_iso())
            if observation.progress is not None:
                if fresh_enough and not st.visible_change(cur, new):
                    return None  # only the step, loss or ETA moved, and status.progress is recent: no write
                self.progress_written[uid] = time.monotonic()
            return new

        return self.update_status(obj, compute)

    # ------------------------------------------------------------------ reconcile

    def reconcile(self, obj: dict[str, Any], job: dict[str, Any] | None) -> None:
        """Bring one FineTune to its spec. ``job``: its Job as last seen by the watch (None: none seen)."""
        uid = obj["metadata"]["uid"]
        name = build.job_name(obj["metadata"]["name"])
        with self.book.lock(uid):  # one reconcile of an object at a time: its events and the retries
            current = self.book.latest(uid, obj.get("status") or {})
            if current.get("phase") in st.TERMINAL_PHASES:
                return
            if job is None and self.launched.get(uid) == name:
                return  # this process created it; its watch event is on the way
            if job is None or not st.launched(current, name):
                # No Job, or one whose creation never reached status (an operator stopped in between): adopt it.
                job = self.launch(obj)
                if job is None:
                    return
            self.launched[uid] = name
            self.sync_suspend(obj, job)

    def reconcile_safely(self, obj: dict[str, Any], job: dict[str, Any] | None) -> None:
        """Reconcile; on a failure, schedule another try (an event is delivered once)."""
        meta_ = obj["metadata"]
        uid = meta_["uid"]
        try:
            self.reconcile(obj, job)
        except RetryError as e:
            log.info("%s/%s: %s; trying again in %gs", meta_["namespace"], meta_["name"], e, e.delay)
            delay = e.delay
        except Exception as e:  # API errors, an unreachable API server: back off, up to a minute
            delay = self.backoff.failed(uid)
            log.warning(
                "%s/%s: reconcile failed (%s); retrying in %gs", meta_["namespace"], meta_["name"], why(e), delay
            )
        else:
            self.backoff.succeeded(uid)
            self.scheduler.cancel(("retry", uid))
            return
        self.scheduler.call_later(("retry", uid), delay, partial(self.reconcile_safely, obj, None))

    def stop(
        self,
        obj: dict[str, Any],
        reason: str,
        message: str,
        *,
        terminal: bool,
        condition: str = "Validated",
        attempts: int | None = None,
    ) -> None:
        """Record why the FineTune cannot go on: Failed (``terminal``) or Pending with the reason."""
        generation = obj["metadata"].get("generation")
        now = now_iso()

        def change(cur: dict[str, Any]) -> dict[str, Any]:
            new = st.failed_status(
                cur, reason, message, generation=generation, now=now, terminal=terminal, condition=condition
            )
            return new if attempts is None else {**new, "attempts": attempts}

        self.update_status(obj, change)

    def plan(self, obj: dict[str, Any]) -> build.Plan | None:
        """The FineTune resolved against its template and the settings; None when it failed for good."""
        try:
            finetune = FineTune.model_validate({"metadata": obj["metadata"], "spec": obj["spec"]})
        except ValidationError as e:
            self.stop(obj, "SpecInvalid", str(e), terminal=True)
            return None
        template = None
        if finetune.spec.template_ref is not None:
            ref = finetune.spec.template_ref.name
            raw = self.kube.get_custom("finetunetemplates", None, ref)
            if raw is None:
                self.stop(obj, "TemplateNotFound", f"FineTuneTemplate {ref} does not exist (spec.templateRef)",
                          terminal=False)  # fmt: skip
                raise RetryError(f"template {ref} not found", 10)
            template = FineTuneTemplate.model_validate(raw)
        try:
            return build.plan(finetune, obj["spec"], template, self.settings)
        except build.TemplateViolationError as e:
            self.stop(obj, "TemplateViolation", str(e), terminal=True)
        except ValidationError as e:
            self.stop(obj, "SpecInvalid", f"after applying the template: {e}", terminal=True)
        return None

    def check_credentials(self, obj: dict[str, Any], plan: build.Plan) -> None:
        """Wait (Pending, with the reason) until the credentials Secret exists with both keys."""
        if not plan.secret_name:
            return
        data = self.kube.secret_data(obj["metadata"]["namespace"], plan.secret_name)
        missing = [key for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if data is None or key not in data]
        if missing:
            what = "does not exist" if data is None else f"lacks {', '.join(missing)}"
            message = f"Secret {plan.secret_name} (spec.storage.secretRef) {what}; the run starts once it does"
            self.stop(obj, "StorageCredentialsMissing", message, terminal=False)
            raise RetryError(f"secret {plan.secret_name} {what}", 5)

    def launch(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Validate, then create (or adopt) the Job; the Job, or None when the FineTune failed."""
        started = time.monotonic()
        plan = self.plan(obj)
        if plan is None:
            return None
        self.check_credentials(obj, plan)
        self.ensure_finalizer(obj, plan)
        finetune = plan.finetune
        uid = obj["metadata"]["uid"]
        try:
            if plan.spec.resources.nodes > 1:
                self.kube.create_or_adopt(build.build_headless_service(finetune, self.settings), uid)
            job, created = self.kube.create_or_adopt(build.build_job(finetune, plan, self.settings), uid)
        except ForeignObjectError as e:
            raise RetryError(f"{e}; waiting for it to go away", 5) from e
        except ApiException as e:
            if e.status != 422:
                raise
            # The API server refused an object built from this spec: no retry changes that, so say why.
            self.stop(obj, "Invalid", f"the API server refused an object of this FineTune: {api_message(e)}",
                      terminal=True)  # fmt: skip
            return None
        if created:
            log.info("%s/%s: created Job %s", obj["metadata"]["namespace"], obj["metadata"]["name"],
                     job["metadata"]["name"])  # fmt: skip
            metrics.JOB_LAUNCHES.inc()
            metrics.GPUS_REQUESTED.inc(plan.spec.total_gpus)
        generation = obj["metadata"].get("generation")

        def launched_status(cur: dict[str, Any]) -> dict[str, Any]:
            new = st.validated(cur, job["metadata"]["name"], plan.config.run_id, generation=generation, now=now_iso())
            if cur.get("phase") in (None, "Pending"):
                seen = st.Observation(job=job, suspended_by_user=plan.spec.run_policy.suspend, queue=plan.queue)
                new = st.observe(new, seen, generation=generation, now=now_iso())
            return new

        self.update_status(obj, launched_status)
        metrics.RECONCILE_SECONDS.labels(kind="FineTune").observe(time.monotonic() - started)
        return job

    def sync_suspend(self, obj: dict[str, Any], job: dict[str, Any]) -> None:
        """Make the Job's ``suspend`` follow ``spec.runPolicy.suspend``.

        With a queue, resuming means handing the Job back to Kueue: the operator
        suspends a queued Job but never unsuspends it (Kueue admits it).
        """
        uid = obj["metadata"]["uid"]
        wanted = bool((obj["spec"].get("runPolicy") or {}).get("suspend"))
        actual = bool(job["spec"].get("suspend"))
        queued = build.QUEUE_LABEL in (job["metadata"].get("labels") or {})
        if wanted == actual or (actual and queued):
            self.suspend_sent.pop(uid, None)
            return
        if self.suspend_sent.get(uid) == wanted:
            return  # sent already; the Job's event has not come back yet
        self.kube.patch_job(obj["metadata"]["namespace"], job["metadata"]["name"], {"spec": {"suspend": wanted}})
        self.suspend_sent[uid] = wanted

    def forget(self, namespace: str, name: str, uid: str) -> None:
        """The FineTune is gone: drop what this process knew of it."""
        metrics.finetune_phase(namespace, name, None)
        self.book.forget(uid)
        for state in (
            self.launched,
            self.suspend_sent,
            self.running,
            self.jobs,
            self.failed_seen,
            self.store_down,
            self.progress_written,
        ):
            state.pop(uid, None)
        self.backoff.succeeded(uid)
        self.job_of.pop(uid, None)
        for work in ("reconcile", "job", "retry", "relaunch", "progress", "follow", "delete"):
            self.scheduler.cancel((work, uid))

    def seed(self, finetunes: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> None:
        """Fill the lookups from a list of every FineTune and training Job, before the first event is handled
        (so that a Job's event always finds its FineTune, whichever arrives first)."""
        for body in finetunes:
            self.finetunes[body["metadata"]["uid"]] = snapshot(body)
        for body in jobs:
            owner = meta.owner_uid(body, "FineTune")
            if owner:
                self.job_of[owner] = job_snapshot(body)

    # The informers call the two ``*_seen`` methods on their threads, one event at a time (``seen_lock``):
    # they only remember what the event carried (a slim copy: the decoded event is dropped at once) and
    # hand the work that calls the API to the scheduler's threads, keyed by object. Events of one object
    # that arrive while its work waits are folded into that one run, which reads the newest copy.

    def finetune_seen(self, event_type: str, body: Any) -> None:
        """A watch event of a FineTune: remember it; reconcile it on a scheduler thread."""
        obj = snapshot(body)
        with self.seen_lock:
            self._finetune_seen(event_type, obj)

    def _finetune_seen(self, event_type: str, obj: dict[str, Any]) -> None:
        meta_ = obj["metadata"]
        uid = meta_["uid"]
        if event_type == "DELETED":
            self.finetunes.pop(uid, None)
        else:
            self.finetunes[uid] = obj
        if event_type == "DELETED" or meta_.get("deletionTimestamp"):
            self.on_finetune_event(event_type, obj, None)  # no API call: it forgets, or schedules the finalizer
            return
        self.scheduler.call_later(("reconcile", uid), 0, partial(self.reconcile_seen, uid), keep_earlier=True)

    def reconcile_seen(self, uid: str) -> None:
        """Reconcile the newest copy of a FineTune with its Job as last seen."""
        obj = self.finetunes.get(uid)
        if obj is not None:
            self.on_finetune_event("MODIFIED", obj, self.job_seen_for(obj))

    def job_seen_for(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """The FineTune's Job as last seen (not one left by an earlier FineTune of another name)."""
        job = self.job_of.get(obj["metadata"]["uid"])
        if job is not None and job["metadata"]["name"] != build.job_name(obj["metadata"]["name"]):
            return None
        return job

    def job_seen(self, event_type: str, body: Any) -> None:
        """A watch event of a training Job: remember it; follow it for its FineTune on a scheduler thread."""
        job = job_snapshot(body)
        with self.seen_lock:
            self._job_seen(event_type, job)

    def _job_seen(self, event_type: str, job: dict[str, Any]) -> None:
        owner = meta.owner_uid(job, "FineTune")
        if owner is None:
            return
        if event_type == "DELETED":
            if self.job_of.get(owner, {}).get("metadata", {}).get("uid") == job["metadata"].get("uid"):
                self.job_of.pop(owner, None)
        else:
            self.job_of[owner] = job
        obj = self.finetunes.get(owner)
        if obj is not None and self.note_job_event(event_type, obj, job):
            self.scheduler.call_later(("job", owner), 0, partial(self.follow_safely, owner), keep_earlier=True)

    def on_finetune_event(self, event_type: str, obj: dict[str, Any], job: dict[str, Any] | None) -> None:
        meta_ = obj["metadata"]
        if event_type == "DELETED":
            self.forget(meta_["namespace"], meta_["name"], meta_["uid"])
            return
        if meta_.get("deletionTimestamp"):
            if FINALIZER in (meta_.get("finalizers") or []):
                self.scheduler.call_later(("delete", meta_["uid"]), 0, partial(self.finalize, meta_["uid"]),
                                          keep_earlier=True)  # fmt: skip
            return  # going away: nothing to start
        self.reconcile_safely(obj, job)

    # ------------------------------------------------------------------ follow the Job

    def terminal(self, obj: dict[str, Any]) -> bool:
        return self.book.latest(obj["metadata"]["uid"], obj.get("status") or {}).get("phase") in st.TERMINAL_PHASES

    def on_job_event(self, event_type: str, obj: dict[str, Any], job: dict[str, Any]) -> None:
        """An event of a FineTune's Job (``obj``: the owning FineTune as last seen)."""
        if self.note_job_event(event_type, obj, job):
            self.follow_safely(obj["metadata"]["uid"])

    def note_job_event(self, event_type: str, obj: dict[str, Any], job: dict[str, Any]) -> bool:
        """Remember a Job's event, with no API call; whether the Job is to be followed now."""
        uid = obj["metadata"]["uid"]
        if event_type == "DELETED":
            self.jobs.pop(uid, None)
            self.stop_polling(uid)
            for work in ("follow", "job"):
                self.scheduler.cancel((work, uid))
            if self.launched.get(uid) == job["metadata"]["name"]:
                self.launched.pop(uid, None)
            if not self.terminal(obj):
                # A key of its own: a reconcile that read the Job just before it went ends by cancelling
                # its retries, and must not cancel this.
                self.scheduler.call_later(("relaunch", uid), RELAUNCH_DELAY_S, partial(self.relaunch, obj))
            return False
        if self.terminal(obj):
            return False
        self.jobs[uid] = (obj, job)
        return True

    def follow_safely(self, uid: str) -> None:
        """Follow the newest Job seen; on a failure (an API or storage error) try again with back-off.

        An event is delivered once, and a Job's last event may be the only one: a status
        write that fails when the Job completes must not leave the FineTune unfinished.
        """
        seen = self.jobs.get(uid)
        if seen is None:
            return
        obj, job = seen
        try:
            self.follow_job(obj, job)
        except Exception as e:
            delay = self.backoff.failed(uid)
            log.warning("%s/%s: following its Job failed (%s); trying again in %gs", obj["metadata"]["namespace"],
                        obj["metadata"]["name"], why(e), delay)  # fmt: skip
            self.scheduler.call_later(("follow", uid), delay, partial(self.follow_safely, uid))
            return
        self.backoff.succeeded(uid)
        self.scheduler.cancel(("follow", uid))

    def follow_job(self, obj: dict[str, Any], job: dict[str, Any]) -> None:
        """Mirror the Job into status; when it ends, read the trainer's summary; poll progress while it runs."""
        uid = obj["metadata"]["uid"]
        ended = job_ended(job)
        summary, reason = self.final_summary(obj, job) if ended else (None, None)
        if not ended and self.out_of_memory(obj, job):
            return
        new = self.observe(obj, job, summary=summary, container_reason=reason)
        if new.get("phase") in st.TERMINAL_PHASES:
            self.jobs.pop(uid, None)
            self.stop_polling(uid)
            if ended and new.get("startTime"):
                gpus = build.job_gpus(job, self.settings.gpu_resource_name)
                metrics.GPU_HOURS.inc(gpus * seconds_since(str(new["startTime"])) / 3600)
            return
        if not ended:
            self.sync_suspend(obj, job)
        if not ended and int((job.get("status") or {}).get("active") or 0) and not job["spec"].get("suspend"):
            self.running[uid] = (obj, job)
            poll = partial(self.poll_progress, uid)
            self.scheduler.call_later(("progress", uid), self.settings.status_interval_seconds, poll, keep_earlier=True)
        else:
            self.stop_polling(uid)

    def final_summary(self, obj: dict[str, Any], job: dict[str, Any]) -> tuple[Summary | None, str | None]:
        """What the run said when it ended: its pods' termination summary, else its manifest.json.

        The manifest is the record of a run that published: it stands in when the termination
        message is missing (the pods are gone) or was cut to its 4 KiB limit (no adapter in it).
        A store that cannot be read raises: the caller tries again rather than guessing.
        """
        summary, reason = summary_from_pods(self.kube.job_pods(obj["metadata"]["namespace"], job["metadata"]["name"]))
        if summary is not None and summary.adapter is not None and summary.evaluation is not None:
            return summary, reason
        run, endpoint, region, secret = job_storage(job)
        if not run:
            return summary, reason
        settings = self.storage_settings(obj["metadata"]["namespace"], endpoint, region, secret)
        manifest_uri = storage.join(run, "manifest.json")
        try:
            manifest = self.read_store(manifest_uri, settings)
        except storage.NotFoundError:
            return summary, reason  # nothing was published: the summary (or its absence) says why
        run_id = (job["metadata"].get("annotations") or {}).get(build.RUN_ID_ANNOTATION, "")
        return summary_from_manifest(manifest, manifest_uri, run_id), reason

    def out_of_memory(self, obj: dict[str, Any], job: dict[str, Any]) -> bool:
        """A trainer container was OOMKilled: fail now, naming the memory to raise, instead of retrying.

        A retry gets the same memory and dies the same way; the Job is suspended so it stops trying.
        """
        uid = obj["metadata"]["uid"]
        failed = int((job.get("status") or {}).get("failed") or 0)
        if failed <= self.failed_seen.get(uid, 0):
            return False  # no new failed pod since the last look
        self.failed_seen[uid] = failed
        _, reason = summary_from_pods(self.kube.job_pods(obj["metadata"]["namespace"], job["metadata"]["name"]))
        if reason != "OOMKilled":
            return False
        limit = build.job_memory_limit(job)
        message = (
            f"the trainer was killed for using more than its memory limit ({limit}); raise spec.resources.memory"
            if limit
            else "the trainer was killed for running out of memory; set spec.resources.memory higher"
        ) + " or lower training.batchSize / maxSeqLength, or enable gradientCheckpointing"
        # The attempts are the pods that ran and failed: a replacement the Job created meanwhile never runs.
        self.stop(obj, "OutOfMemory", message, terminal=True, condition="Trained", attempts=failed)
        self.kube.patch_job(obj["metadata"]["namespace"], job["metadata"]["name"], {"spec": {"suspend": True}})
        self.stop_polling(obj["metadata"]["uid"])
        return True

    def stop_polling(self, uid: str) -> None:
        self.running.pop(uid, None)
        self.scheduler.cancel(("progress", uid))

    def relaunch(self, obj: dict[str, Any]) -> None:
        """The Job of an unfinished FineTune went away: create it again, if the FineTune is still there."""
        meta_ = obj["metadata"]
        uid = meta_["uid"]
        try:
            current = self.kube.get_custom(PLURAL, meta_["namespace"], meta_["name"])
        except Exception as e:  # an API error or an unreachable API server: try again, or the Job stays gone
            log.warning("%s/%s: could not read the FineTune (%s)", meta_["namespace"], meta_["name"], why(e))
            self.scheduler.call_later(("relaunch", uid), RELAUNCH_DELAY_S, partial(self.relaunch, obj))
            return
        if current is None or current["metadata"].get("uid") != uid:
            return
        if current["metadata"].get("deletionTimestamp") or self.job_seen_for(current) is not None:
            return  # going away, or a Job of it was seen since
        with self.book.lock(uid):
            # A reconcile that read the Job just before it went may have noted it again as this process's.
            self.launched.pop(uid, None)
        log.info("%s/%s: its Job is gone; creating it again", meta_["namespace"], meta_["name"])
        self.reconcile_safely(snapshot(current), None)

    # ------------------------------------------------------------------ progress

    def read_store(self, uri: str, settings: storage.S3Settings) -> Any:
        """A small JSON document from a run's store: signed GETs of our own when the FineTune's Secret gives
        credentials (a tenth of boto3's CPU per poll), boto3 otherwise (ambient credentials, file://)."""
        if uri.startswith("s3://") and settings.access_key and settings.secret_key:
            return json.loads(self.s3.get(uri, settings))
        return storage.read_json(uri, settings)

    def storage_settings(
        self, namespace: str, endpoint: str | None, region: str, secret: str | None, fresh: bool = False
    ) -> storage.S3Settings:
        """The FineTune's store, with its credentials; never the operator's own (a missing Secret is an error).

        ``fresh``: the Secret as it is now, not as cached for the polls (a deletion must not act on
        credentials the user has just removed).
        """
        data = self.kube.secret_data(namespace, secret, fresh=fresh) if secret else None
        if secret and data is None:
            raise storage.StorageError(f"the credentials Secret {namespace}/{secret} does not exist")
        return s3_settings(data, endpoint, region)

    def poll_progress(self, uid: str) -> None:
        """Mirror ``progress.json`` of a running Job into status, then poll again after the interval.

        Never stops on an error (an unreadable store, a refused status write): the next poll tries again.
        """
        current = self.running.get(uid)
        if current is None:
            return  # the Job ended, was suspended or went away
        obj, job = current
        try:
            # Pods that are not running yet (pending, pulling, waiting for a GPU) wrote no progress.
            ready = int((job.get("status") or {}).get("ready") or 0) > 0
            progress = self.read_progress(obj, job) if ready else None
            if progress is not None:
                self.observe(obj, job, progress=progress)
            self.check_stalled(obj, job, progress)
            self.check_storage(obj, uid)
        except Exception as e:
            log.warning(
                "%s/%s: progress poll failed (%s)", obj["metadata"]["namespace"], obj["metadata"]["name"], why(e)
            )
        if uid in self.running:
            poll = partial(self.poll_progress, uid)
            self.scheduler.call_later(("progress", uid), self.settings.status_interval_seconds, poll)

    def read_progress(self, obj: dict[str, Any], job: dict[str, Any]) -> Progress | None:
        """The run's progress.json; None when it is not there yet or the store does not answer."""
        uid = obj["metadata"]["uid"]
        run, endpoint, region, secret = job_storage(job)
        if not run:
            return None
        if self.breaker.is_open(endpoint):
            return None  # that store failed a moment ago: no thread waits on it again yet
        settings = self.storage_settings(obj["metadata"]["namespace"], endpoint, region, secret)
        try:
            raw = self.read_store(storage.join(run, "progress.json"), settings)
        except storage.NotFoundError:
            self.store_down.pop(uid, None)
            return None
        except storage.StorageError as e:
            self.breaker.failed(endpoint)
            first, _ = self.store_down.get(uid, (time.monotonic(), ""))
            self.store_down[uid] = (first, str(e))
            return None
        self.breaker.succeeded(endpoint)
        self.store_down.pop(uid, None)
        return Progress.model_validate(raw) if isinstance(raw, dict) else None

    def check_storage(self, obj: dict[str, Any], uid: str) -> None:
        """The store has not answered for a while: say so in status while the run waits for it."""
        down = self.store_down.get(uid)
        if down is None or time.monotonic() - down[0] < STORAGE_DOWN_AFTER_S:
            return
        message = f"waiting for the artifact store (unreachable for {int(time.monotonic() - down[0])}s): {down[1]}"
        generation = obj["metadata"].get("generation")
        now = now_iso()
        self.update_status(
            obj, lambda cur: st.waiting(cur, "StorageUnavailable", message, generation=generation, now=now)
        )

    def check_stalled(self, obj: dict[str, Any], job: dict[str, Any], progress: Progress | None) -> None:
        """No progress report for a while: say why the run is stuck (Stalled), as the pods tell it."""
        since = (progress.updated_at if progress is not None else None) or (job.get("status") or {}).get("startTime")
        quiet = seconds_since(since) if since else 0.0
        if quiet < self.settings.stalled_after_seconds:
            return
        pods = self.kube.job_pods(obj["metadata"]["namespace"], job["metadata"]["name"])
        reason, message = st.why_stuck(pods)
        if reason is None:
            reason, message = "ProgressStale", f"no progress report for {int(quiet)}s"
        generation = obj["metadata"].get("generation")
        now = now_iso()
        self.update_status(obj, lambda cur: st.stalled(cur, reason, message, generation=generation, now=now))

    # ------------------------------------------------------------------ delete
    # The Job and Service carry ownerReferences: the garbage collector removes
    # them with the FineTune. A finalizer (one more write per FineTune, and a FineTune that
    # cannot be deleted while the operator is down) is only worth it to delete artifacts,
    # so the controller adds one only to FineTunes that ask for that.

    def ensure_finalizer(self, obj: dict[str, Any], plan: build.Plan) -> None:
        """A FineTune whose artifacts go with it carries the finalizer before its Job exists (one write; no
        other FineTune gets one, so the rest can be deleted while the operator is down)."""
        finalizers = list(obj["metadata"].get("finalizers") or [])
        if plan.spec.output.retention != "Delete" or FINALIZER in finalizers:
            return
        patch = {"metadata": {"finalizers": [*finalizers, FINALIZER], "resourceVersion": obj["metadata"].get(
            "resourceVersion")}}  # fmt: skip
        self.kube.patch_custom(PLURAL, obj["metadata"]["namespace"], obj["metadata"]["name"], patch)
        obj["metadata"]["finalizers"] = [*finalizers, FINALIZER]

    def finalize(self, uid: str) -> None:
        """A FineTune with the finalizer is being deleted: delete its artifacts, then let it go."""
        obj = self.finetunes.get(uid)
        if obj is None or FINALIZER not in (obj["metadata"].get("finalizers") or []):
            return
        elapsed = seconds_since(obj["metadata"].get("deletionTimestamp"))
        try:
            if self.delete_artifacts(obj, elapsed):
                finalizers = [f for f in obj["metadata"].get("finalizers") or [] if f != FINALIZER]
                patch = {
                    "metadata": {"finalizers": finalizers, "resourceVersion": obj["metadata"].get("resourceVersion")}
                }
                self.kube.patch_custom(PLURAL, obj["metadata"]["namespace"], obj["metadata"]["name"], patch)
                return
        except ApiException as e:
            if e.status == 404:
                return
            log.warning("%s/%s: could not remove the finalizer (%s)", obj["metadata"]["namespace"],
                        obj["metadata"]["name"], why(e))  # fmt: skip
        self.scheduler.call_later(("delete", uid), DELETE_RETRY_S, partial(self.finalize, uid))

    @staticmethod
    def deletes_artifacts(spec: dict[str, Any]) -> bool:
        return bool((spec.get("output") or {}).get("retention") == "Delete")

    def delete_artifacts(self, obj: dict[str, Any], elapsed: float = 0.0) -> bool:
        """``output.retention: Delete``: remove the run's artifacts before the FineTune goes.

        True when done: deleted; or the adapter kept because an AdapterDeployment serves it (only
        checkpoints go); or given up after ``artifact_delete_timeout_seconds`` with a Warning Event
        naming what stays (a Secret or store gone for good must not keep the FineTune, or its
        namespace, from going). False: try again.
        """
        meta_ = obj["metadata"]
        namespace, name, uid = meta_["namespace"], meta_["name"], str(meta_["uid"])
        try:
            plan = build.plan(
                FineTune.model_validate({"metadata": meta_, "spec": obj["spec"]}), obj["spec"], None, self.settings
            )
        except (ValidationError, build.TemplateViolationError):
            return True  # it never ran: nothing was written
        run = run_prefix(plan.output_root, namespace, name, uid)
        try:
            stor = plan.spec.storage
            settings = self.storage_settings(namespace, stor.endpoint, str(stor.region), plan.secret_name, fresh=True)
            loc = storage.resolve(run, settings)
            served = self.served_by(namespace, uid)
            if served:
                checkpoints = storage.resolve(storage.join(run, "checkpoints") + "/", settings)
                removed = checkpoints.store.delete_prefix(checkpoints.key)
                kept = f"kept {run}adapter/ and manifest.json: served by AdapterDeployment {', '.join(served)}"
                self.kube.event(obj, "Normal", "AdapterKept", f"{kept}; deleted {removed} checkpoint files")
                return True
            removed = loc.store.delete_prefix(loc.key)
        except Exception as e:
            if elapsed < self.settings.artifact_delete_timeout_seconds:
                log.warning("%s/%s: could not delete its artifacts yet (%s)", namespace, name, e)
                return False
            message = f"gave up deleting {run} after {int(elapsed)}s ({e}); the artifacts stay there"
            self.kube.event(obj, "Warning", "ArtifactsRetained", message)
            log.warning("%s/%s: %s", namespace, name, message)
            return True
        log.info("deleted %d artifacts under %s (output.retention: Delete)", removed, run)
        return True

    def served_by(self, namespace: str, uid: str) -> list[str]:
        """The AdapterDeployments whose stable or canary revision is this FineTune's adapter."""
        serving = []
        for adep in self.kube.list_custom("adapterdeployments", namespace):
            status = adep.get("status") or {}
            if any((status.get(role) or {}).get("fineTuneUid") == uid for role in ("stable", "canary")):
                serving.append(str(adep["metadata"]["name"]))
        return serving
