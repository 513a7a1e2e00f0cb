"""The AdapterDeployment controller: serve an adapter, roll forward on eval results, roll back on trouble.

Level-triggered like the FineTune controller: every event of an
AdapterDeployment, and of the Deployments and eval Jobs it owns, reconciles
it — read what the cluster shows (:meth:`AdapterDeploymentController.observe`),
let the pure :func:`kubetune.builders.rollout.decide` choose the next status
and actions, carry them out, write the status. While a rollout is in flight
(waiting for a FineTune, a canary coming up, an online eval running) the
shared scheduler looks again every ``rollout_interval_seconds``; a settled
AdapterDeployment costs nothing. No kopf state and no finalizer: what it owns
goes with it through ownerReferences.

Every decision is recorded in ``status`` (stable, canary, history); ``spec`` is
never written, so a GitOps tool's self-heal never fights the controller.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import kopf
from pydantic import ValidationError

from kubetune.api.adapterdeployment import AdapterDeployment
from kubetune.api.types import API_GROUP, API_VERSION
from kubetune.builders import adapterdeployment as build
from kubetune.builders import meta
from kubetune.builders import rollout as ro
from kubetune.builders.settings import OperatorSettings
from kubetune.controllers import metrics
from kubetune.controllers.finetune import snapshot
from kubetune.controllers.kube import KubeAPI, StatusBook, changed_fields
from kubetune.controllers.scheduler import Backoff, Scheduler, why
from kubetune_trainer.contract import now_iso

log = logging.getLogger("kubetune.adapterdeployment")
ADEP = (API_GROUP, API_VERSION, "adapterdeployments")
PLURAL = "adapterdeployments"
MAX_RETRY_DELAY_S = 60.0
SETTLED_PHASES = ("Healthy", "Degraded", "Paused")


def termination_message(pods: list[dict[str, Any]]) -> str | None:
    """The newest termination message among some pods (e.g. a failed eval Job's)."""
    newest: tuple[str, str] | None = None
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or {}
            if term.get("message"):
                key = str(term.get("finishedAt") or "")
                if newest is None or key > newest[0]:
                    newest = (key, str(term["message"]).strip())
    return newest[1] if newest else None


class AdapterDeploymentController:
    """Rolls AdapterDeployments forward and back; every decision comes from :mod:`kubetune.builders.rollout`."""

    def __init__(self, kube: KubeAPI, settings: OperatorSettings, scheduler: Scheduler) -> None:
        self.kube = kube
        self.settings = settings
        self.scheduler = scheduler
        self.book = StatusBook()
        self.backoff = Backoff(MAX_RETRY_DELAY_S)
        self.adeps: dict[str, dict[str, Any]] = {}  # uid -> the AdapterDeployment as last seen (seeded at start-up)

    def observe(self, adep: AdapterDeployment, status: dict[str, Any]) -> ro.Observed:
        """Read what the decision needs: the Deployments, the FineTune, canary pods, the eval Job."""
        ns, name = adep.metadata["namespace"], adep.metadata["name"]
        ref = adep.spec.adapter.fine_tune_ref
        canary = status.get("canary")
        eval_job = None
        eval_message = None
        if canary is not None and adep.spec.rollout.online_eval is not None:
            job_name = build.eval_job_name(name, int(canary["revision"]))
            eval_job = self.kube.read_job(ns, job_name)
            if ro.job_outcome(eval_job) == "Failed":
                eval_message = termination_message(self.kube.job_pods(ns, job_name))
                eval_message = eval_message or next(
                    (c.get("message") for c in (eval_job or {}).get("status", {}).get("conditions") or []
                     if c.get("type") == "Failed"), ""
                )  # fmt: skip
        stable = self.kube.read_deployment(ns, build.deployment_name(name, "stable"))
        settling = stable is not None and not ro.available(stable, adep.spec.runtime.replicas)
        return ro.Observed(
            now=now_iso(),
            stable=stable,
            stable_pods=self.kube.pods(ns, build.selector(adep, "stable")) if settling else [],
            canary=self.kube.read_deployment(ns, build.deployment_name(name, "canary")),
            finetune=self.kube.get_custom("finetunes", ns, ref.name) if ref else None,
            canary_pods=self.kube.pods(ns, build.selector(adep, "canary")) if canary is not None else [],
            eval_job=eval_job,
            eval_message=eval_message,
        )

    def apply(self, adep: AdapterDeployment, actions: list[ro.Action]) -> None:
        """Carry out the decision's actions, in order."""
        ns, uid = adep.metadata["namespace"], adep.metadata["uid"]
        for action in actions:
            if isinstance(action, ro.EnsureService):
                self.kube.create_or_adopt(build.build_service(adep, self.settings), uid)
            elif isinstance(action, ro.ApplyDeployment):
                manifest = build.build_deployment(
                    adep, action.candidate, action.revision, action.role, action.replicas, self.settings
                )
                current, created = self.kube.create_or_adopt(manifest, uid)
                if not created and ro.revision_of(current) != str(action.revision):
                    self.kube.patch_deployment(ns, manifest["metadata"]["name"], manifest)
            elif isinstance(action, ro.ScaleDeployment):
                dep = build.deployment_name(adep.metadata["name"], action.role)
                self.kube.patch_deployment(ns, dep, {"spec": {"replicas": action.replicas}})
            elif isinstance(action, ro.DeleteDeployment):
                self.kube.delete_deployment(ns, build.deployment_name(adep.metadata["name"], action.role))
            elif isinstance(action, ro.EnsureEvalJob):
                job = build.build_online_eval_job(adep, action.revision, action.endpoint, self.settings)
                self.kube.create_or_adopt(job, uid)

    def reconcile(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """One step of the rollout; the status written (None when the spec is invalid)."""
        started = time.monotonic()
        meta_ = obj["metadata"]
        uid, ns, name = meta_["uid"], meta_["namespace"], meta_["name"]
        try:
            adep = build.resolved(AdapterDeployment.model_validate({"metadata": meta_, "spec": obj["spec"]}),
                                  self.settings)  # fmt: skip
        except ValidationError as e:
            log.error("%s/%s: invalid spec: %s", ns, name, e)
            return None
        with self.book.lock(uid):
            old = self.book.latest(uid, obj.get("status") or {})
            decision = ro.decide(adep, old, self.observe(adep, old))
            self.apply(adep, decision.actions)
            new = decision.status
            new["endpoint"] = build.endpoint(adep)
            delta = changed_fields(old, new)
            if delta:
                self.kube.patch_status(PLURAL, ns, name, delta)
                self.book.record(uid, new)
        self.record(obj, old, new, decision.outcomes)
        metrics.RECONCILE_SECONDS.labels(kind="AdapterDeployment").observe(time.monotonic() - started)
        return new

    def record(
        self, obj: dict[str, Any], old: dict[str, Any], new: dict[str, Any], outcomes: list[tuple[str, str]]
    ) -> None:
        """Metrics for the outcomes, and an Event when the phase changed."""
        for outcome, reason in outcomes:
            if outcome == "Promoted":
                metrics.ROLLOUTS.inc()
            elif outcome in ("RolledBack", "Rejected"):
                metrics.ROLLBACKS.labels(reason=reason).inc()
        if new.get("phase") != old.get("phase"):
            kind = "Warning" if new.get("phase") == "Degraded" else "Normal"
            self.kube.event(obj, kind, str(new.get("phase")), str(new.get("message", "")))

    def reconcile_safely(self, obj: dict[str, Any]) -> None:
        """Reconcile; look again later while a rollout is in flight, or after a failure (with back-off)."""
        uid = obj["metadata"]["uid"]
        try:
            new = self.reconcile(obj)
        except Exception as e:  # API errors, an unreachable API server
            delay = self.backoff.failed(uid)
            log.warning("%s/%s: reconcile failed (%s); retrying in %gs", obj["metadata"]["namespace"],
                        obj["metadata"]["name"], why(e), delay)  # fmt: skip
            self.scheduler.call_later(("rollout", uid), delay, partial(self.reconcile_safely, obj))
            return
        self.backoff.succeeded(uid)
        if new is not None and new.get("phase") not in SETTLED_PHASES:
            interval = self.settings.rollout_interval_seconds
            self.scheduler.call_later(
                ("rollout", uid), interval, partial(self.reconcile_safely, obj), keep_earlier=True
            )
        else:
            self.scheduler.cancel(("rollout", uid))

    def seed(self, adeps: list[dict[str, Any]]) -> None:
        """Fill the lookup from a list of every AdapterDeployment, before the first event is handled."""
        for body in adeps:
            self.adeps[body["metadata"]["uid"]] = snapshot(body)

    def child_seen(self, body: Any) -> None:
        """A Deployment or eval Job changed: reconcile its AdapterDeployment (deduplicated by the scheduler)."""
        owner = meta.owner_uid(dict(body), "AdapterDeployment")
        obj = self.adeps.get(owner) if owner else None
        if owner and obj is not None:
            self.scheduler.call_later(("rollout", owner), 0, partial(self.reconcile_safely, obj))

    def on_event(self, event_type: str, obj: dict[str, Any]) -> None:
        uid = obj["metadata"]["uid"]
        if event_type == "DELETED":
            self.adeps.pop(uid, None)
        else:
            self.adeps[uid] = obj
        if event_type == "DELETED":
            self.forget(uid)  # owned Deployments, Service and Jobs go with it (ownerReferences)
            return
        if obj["metadata"].get("deletionTimestamp"):
            return
        self.reconcile_safely(obj)

    def forget(self, uid: str) -> None:
        self.book.forget(uid)
        self.backoff.succeeded(uid)
        self.scheduler.cancel(("rollout", uid))


def register(controller: AdapterDeploymentController, registry: kopf.OperatorRegistry) -> None:
    """Bind the controller to kopf: AdapterDeployments' events, and their Deployments' and eval Jobs'."""

    @kopf.on.event(*ADEP, id="rollout", registry=registry)
    def adapterdeployment_event(*, type: str, body: kopf.Body, **_: Any) -> None:
        controller.on_event(type, snapshot(body))

    def child_event(*, body: kopf.Body, **_: Any) -> None:
        controller.child_seen(body)

    labelled = {meta.ADEP_LABEL: kopf.PRESENT}
    kopf.on.event("apps", "v1", "deployments", labels=labelled, id="deployment", registry=registry)(child_event)
    kopf.on.event("batch", "v1", "jobs", labels=labelled, id="eval-job", registry=registry)(child_event)
