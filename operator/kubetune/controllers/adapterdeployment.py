"""The AdapterDeployment controller: serve an adapter, roll forward on eval results, roll back on trouble.

One reconcile function, run on spec changes and on a timer, moves the rollout
along. Every decision is recorded in ``status`` (stable, canary, history);
``spec`` is never written, so a GitOps tool's self-heal never fights the
controller, and reverting a commit to a revision still in history cuts over
at once without re-running gates.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from kubetune.api.adapterdeployment import AdapterDeployment
from kubetune.api.types import API_GROUP, API_VERSION
from kubetune.builders import adapterdeployment as build
from kubetune.builders.settings import OperatorSettings
from kubetune.builders.status import set_condition
from kubetune.controllers import metrics
from kubetune.controllers.kube import Kube, StatusBook, changed_fields, now_iso

log = logging.getLogger("kubetune.adapterdeployment")
ADEP = (API_GROUP, API_VERSION, "adapterdeployments")
PLURAL = "adapterdeployments"
CRASH_RESTARTS = 2  # a canary container restarting this often will not come up by itself


def _seconds_since(timestamp: str | None) -> float:
    if not timestamp:
        return 0.0
    started = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return (datetime.now(UTC) - started).total_seconds()


def _available(dep: dict[str, Any] | None, replicas: int) -> bool:
    """All replicas of the newest template are up and ready."""
    if dep is None:
        return False
    status = dep.get("status") or {}
    if status.get("observedGeneration", 0) < dep["metadata"].get("generation", 0):
        return False
    want = replicas
    return (
        int(status.get("updatedReplicas") or 0) >= want
        and int(status.get("readyReplicas") or 0) >= want
        and int(status.get("replicas") or 0) == want
    )


def _crash_looping(pods: list[dict[str, Any]]) -> str | None:
    """Why the pods will not come up by themselves, if they will not."""
    for pod in pods:
        status = pod.get("status") or {}
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            last = (cs.get("lastState") or {}).get("terminated") or {}
            if int(cs.get("restartCount") or 0) >= CRASH_RESTARTS or waiting.get("reason") == "CrashLoopBackOff":
                detail = (last.get("message") or "").strip().splitlines()
                hint = f": {detail[-1]}" if detail else ""
                return f"container {cs.get('name')} keeps failing (exit {last.get('exitCode', '?')}){hint}"
    return None


def register(config: OperatorSettings, registry: kopf.OperatorRegistry) -> None:
    """Register the AdapterDeployment handlers, with ``config``, on ``registry``."""
    book = StatusBook()

    def reconcile(k: Kube, body: dict[str, Any], observed: dict[str, Any]) -> None:
        meta = body["metadata"]
        uid, ns, name = meta["uid"], meta["namespace"], meta["name"]
        generation = meta.get("generation")
        try:
            adep = AdapterDeployment.model_validate({"metadata": meta, "spec": body["spec"]})
        except ValidationError as e:
            log.error("%s/%s: invalid spec: %s", ns, name, e)
            return
        with book.lock(uid):
            old = book.latest(uid, observed)
            new = step(k, adep, old, generation)
            delta = changed_fields(old, new)
            if delta:
                k.patch_status(PLURAL, ns, name, delta)
                book.record(uid, new)
                if new.get("phase") != old.get("phase"):
                    kind = "Warning" if new.get("phase") == "Degraded" else "Normal"
                    k.event(body, kind, str(new.get("phase")), str(new.get("message", "")))

    def step(k: Kube, adep: AdapterDeployment, old: dict[str, Any], generation: int | None) -> dict[str, Any]:
        """One move of the rollout state machine; returns the next status."""
        ns, name = adep.metadata["namespace"], adep.metadata["name"]
        uid = adep.metadata["uid"]
        now = now_iso()
        new = dict(old)
        new["observedGeneration"] = generation
        history: list[dict[str, Any]] = [dict(h) for h in old.get("history") or []]
        conditions = old.get("conditions") or []
        stable, canary = old.get("stable"), old.get("canary")
        rollout = adep.spec.rollout
        replicas = adep.spec.runtime.replicas

        def cond(type_: str, value: bool, reason: str, message: str = "") -> None:
            nonlocal conditions
            conditions = set_condition(conditions, type_, value, reason, message, generation=generation, now=now)

        def remember(outcome: str, revision: dict[str, Any], reason: str, message: str = "") -> None:
            entry = {
                "revision": revision["revision"],
                "adapterDigest": revision["adapterDigest"],
                "adapterUri": revision.get("adapterUri"),
                "outcome": outcome,
                "reason": reason,
                "message": message[:1024],
                "at": now,
            }
            if revision.get("fineTune"):
                entry["fineTune"] = revision["fineTune"]
            history.insert(0, {k2: v for k2, v in entry.items() if v is not None})
            del history[adep.spec.revision_history_limit :]
            if outcome == "Promoted":
                metrics.ROLLOUTS.inc()
            elif outcome in ("RolledBack", "Rejected"):
                metrics.ROLLBACKS.labels(reason=reason).inc()

        def next_revision() -> int:
            numbers = [h["revision"] for h in history] + [r["revision"] for r in (stable, canary) if r]
            return max(numbers, default=0) + 1

        def apply_deployment(candidate: build.Candidate, number: int, role: build.Role, count: int) -> dict[str, Any]:
            manifest = build.build_deployment(adep, candidate, number, role, count, config)
            obj, created = k.create_or_adopt(manifest, uid)
            if not created and obj["metadata"].get("annotations", {}).get("kubetune.io/revision") != str(number):
                k.apps.patch_namespaced_deployment(manifest["metadata"]["name"], ns, manifest)
                obj = k.read_deployment(ns, manifest["metadata"]["name"]) or obj
            return obj

        def finish(phase: str, message: str) -> dict[str, Any]:
            new.update(phase=phase, message=message[:4096], history=history, conditions=conditions)
            for key, value in (("stable", stable), ("canary", canary)):
                if value is None:
                    new.pop(key, None)
                else:
                    new[key] = value
            if not history:
                new.pop("history", None)
            return new

        k.create_or_adopt(build.build_service(adep, config), uid)
        new["endpoint"] = f"http://{name}.{ns}.svc/v1"
        stable_dep = k.read_deployment(ns, build.deployment_name(name, "stable"))
        canary_dep = k.read_deployment(ns, build.deployment_name(name, "canary"))
        new["readyReplicas"] = int(((stable_dep or {}).get("status") or {}).get("readyReplicas") or 0)

        ref = adep.spec.adapter.fine_tune_ref
        finetune = k.get_custom("finetunes", ns, ref.name) if ref else None
        resolution = build.resolve_source(adep, finetune)

        def drop_canary() -> None:
            nonlocal canary
            if canary_dep is not None:
                k.delete_deployment(ns, build.deployment_name(name, "canary"))
            canary = None

        def stable_state(message: str) -> dict[str, Any]:
            """Steady serving of the stable revision (after any rollout)."""
            if stable is not None and _available(stable_dep, replicas):
                cond("Ready", True, "Serving", f"revision {stable['revision']} serves")
                cond("Reconciling", False, "Serving", "")
                cond("Stalled", False, "Serving", "")
                new.pop("progressingSince", None)
                return finish(
                    "Healthy", message or f"revision {stable['revision']} serves {adep.spec.served_model_name}"
                )
            cond("Ready", False, "RollingOut", "the stable Deployment is rolling out")
            cond("Reconciling", True, "RollingOut", "")
            return finish("Progressing", message or "the stable Deployment is rolling out")

        if resolution.waiting:
            cond("Reconciling", True, "WaitingForFineTune", resolution.waiting)
            if stable is None:
                cond("Ready", False, "WaitingForFineTune", resolution.waiting)
                return finish("Progressing", resolution.waiting)
            return stable_state(resolution.waiting)

        if resolution.rejected:
            fine_tune = ref.name if ref else None
            if not history or history[0].get("fineTune") != fine_tune or history[0].get("outcome") != "Rejected":
                digest = ((finetune or {}).get("status") or {}).get("adapter", {}).get("digest") or "sha256:" + "0" * 64
                remember(
                    "Rejected",
                    {"revision": next_revision(), "adapterDigest": digest, "fineTune": fine_tune},
                    resolution.rejected,
                    resolution.message,
                )
            drop_canary()
            cond("GatesPassed", False, resolution.rejected, resolution.message)
            cond("Stalled", True, resolution.rejected, resolution.message)
            cond("Reconciling", False, resolution.rejected, "")
            cond(
                "Ready",
                stable is not None and _available(stable_dep, replicas),
                resolution.rejected,
                resolution.message,
            )
            return finish(
                "Degraded",
                f"rejected: {resolution.message}; "
                + (f"revision {stable['revision']} keeps serving" if stable else "nothing serves"),
            )

        candidate = resolution.candidate
        assert candidate is not None

        if candidate.same_as(stable):
            assert stable is not None
            drop_canary()
            if stable_dep is None or stable_dep["metadata"].get("annotations", {}).get("kubetune.io/revision") != str(
                stable["revision"]
            ):
                stable_dep = apply_deployment(candidate, stable["revision"], "stable", replicas)
            elif stable_dep["spec"].get("replicas") != replicas:
                k.apps.patch_namespaced_deployment(stable_dep["metadata"]["name"], ns, {"spec": {"replicas": replicas}})
            cond("GatesPassed", True, "GatesPassed", "")
            return stable_state("")

        prior = next((h for h in history if h.get("adapterDigest") == candidate.adapter_digest), None)
        if prior is not None and prior.get("outcome") in ("Rejected", "RolledBack"):
            cond("Stalled", True, str(prior.get("reason")), str(prior.get("message", "")))
            cond("Reconciling", False, str(prior.get("reason")), "")
            return finish(
                "Degraded",
                f"revision {prior['revision']} was {prior['outcome']} ({prior.get('reason')}); "
                "change spec.adapter to retry",
            )

        if stable is None:
            failures = build.check_gates(candidate, list(rollout.gates or []), None)
            if failures:
                remember(
                    "Rejected",
                    build.revision_record(candidate, next_revision(), now),
                    "EvalGateFailed",
                    "; ".join(failures),
                )
                cond("GatesPassed", False, "EvalGateFailed", "; ".join(failures))
                cond("Stalled", True, "EvalGateFailed", "; ".join(failures))
                return finish("Degraded", "rejected: " + "; ".join(failures))
            stable = build.revision_record(candidate, next_revision(), now)
            stable_dep = apply_deployment(candidate, stable["revision"], "stable", replicas)
            remember("Promoted", stable, "Initial", "first revision")
            cond("GatesPassed", True, "GatesPassed", "")
            new["progressingSince"] = now
            return stable_state("")

        if prior is not None and prior.get("outcome") in ("Promoted", "Superseded"):
            # A revert to a revision that served before: cut over at once, no gates, no canary.
            drop_canary()
            previous = stable
            stable = {**build.revision_record(candidate, int(prior["revision"]), now)}
            stable_dep = apply_deployment(candidate, stable["revision"], "stable", replicas)
            remember("Superseded", previous, "Reverted", f"replaced by revision {stable['revision']}")
            remember("Promoted", stable, "Revert", "cut over to a revision from history")
            new["progressingSince"] = now
            return stable_state(f"reverted to revision {stable['revision']}")

        if rollout.paused:
            cond("Reconciling", False, "Paused", "rollout.paused is true")
            return finish("Paused", f"rollout paused; revision {stable['revision']} serves")

        failures = build.check_gates(candidate, list(rollout.gates or []), stable)
        if failures:
            drop_canary()
            remember(
                "Rejected",
                build.revision_record(candidate, next_revision(), now),
                "EvalGateFailed",
                "; ".join(failures),
            )
            cond("GatesPassed", False, "EvalGateFailed", "; ".join(failures))
            cond("Stalled", True, "EvalGateFailed", "; ".join(failures))
            cond("Reconciling", False, "EvalGateFailed", "")
            return finish("Degraded", f"rejected: {'; '.join(failures)}; revision {stable['revision']} keeps serving")
        cond("GatesPassed", True, "GatesPassed", "")

        def promote(revision: dict[str, Any]) -> dict[str, Any]:
            nonlocal stable, stable_dep
            previous = stable
            stable = {**revision, "since": now}
            stable_dep = apply_deployment(candidate, stable["revision"], "stable", replicas)
            drop_canary()
            assert previous is not None
            remember("Superseded", previous, "Replaced", f"replaced by revision {stable['revision']}")
            remember("Promoted", stable, "CanaryPassed" if rollout.strategy == "Canary" else "Immediate")
            new["progressingSince"] = now
            return stable_state(f"promoted revision {stable['revision']}")

        if rollout.strategy == "Immediate":
            return promote(build.revision_record(candidate, next_revision(), now))

        if canary is None or canary.get("adapterDigest") != candidate.adapter_digest:
            drop_canary()
            canary = build.revision_record(candidate, next_revision(), now)
            apply_deployment(candidate, canary["revision"], "canary", rollout.canary.replicas if rollout.canary else 1)
            new["progressingSince"] = now
            cond("Ready", _available(stable_dep, replicas), "CanaryStarted", "")
            cond("Reconciling", True, "CanaryStarted", f"canary revision {canary['revision']} is starting")
            cond("Stalled", False, "CanaryStarted", "")
            return finish("Progressing", f"canary revision {canary['revision']} is starting")

        canary_replicas = rollout.canary.replicas if rollout.canary else 1

        def roll_back(reason: str, message: str) -> dict[str, Any]:
            nonlocal canary
            assert canary is not None
            assert stable is not None
            remember("RolledBack", canary, reason, message)
            drop_canary()
            cond("Stalled", True, reason, message)
            cond("Reconciling", False, reason, "")
            cond("Ready", _available(stable_dep, replicas), reason, f"revision {stable['revision']} keeps serving")
            return finish("Degraded", f"rolled back: {message}; revision {stable['revision']} keeps serving")

        crash = _crash_looping(k.pods(ns, {build.ADEP_LABEL: name[:63], build.ROLE_LABEL: "canary"}))
        if crash:
            return roll_back("CanaryCrashLoop", crash)
        if not _available(canary_dep, canary_replicas):
            if _seconds_since(old.get("progressingSince")) > rollout.progress_deadline_seconds:
                return roll_back("CanaryNotReady", f"canary not ready within {rollout.progress_deadline_seconds}s")
            return finish("Progressing", f"waiting for canary revision {canary['revision']} to become ready")
        if rollout.online_eval is not None:
            pods = k.pods(ns, {build.ADEP_LABEL: name[:63], build.ROLE_LABEL: "canary"})
            ip = next((p["status"].get("podIP") for p in pods if p["status"].get("podIP")), None)
            endpoint = f"http://{ip}:{adep.spec.runtime.port}" if ip else f"http://{name}-canary.{ns}.svc"
            job_manifest = build.build_online_eval_job(adep, canary["revision"], endpoint, config)
            job, _ = k.create_or_adopt(job_manifest, uid)
            conditions_of_job = {
                c["type"]: c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"
            }
            if "Failed" in conditions_of_job:
                summary = k.termination_message(ns, job["metadata"]["name"]) or conditions_of_job["Failed"].get(
                    "message", ""
                )
                return roll_back("OnlineEvalFailed", f"online eval of the canary failed: {summary}")
            if "Complete" not in conditions_of_job:
                return finish("Progressing", f"evaluating canary revision {canary['revision']} online")
        return promote(canary)

    def kube(memo: Any) -> Kube:
        k: Kube = memo.kube
        return k

    @kopf.on.resume(*ADEP, registry=registry)
    @kopf.on.create(*ADEP, registry=registry)
    @kopf.on.update(*ADEP, registry=registry)
    def on_change(*, body: kopf.Body, status: kopf.Status, memo: Any, **_: Any) -> None:
        reconcile(kube(memo), dict(body), dict(status))

    @kopf.timer(*ADEP, interval=config.rollout_interval_seconds, registry=registry)
    def on_timer(*, body: kopf.Body, status: kopf.Status, memo: Any, **_: Any) -> None:
        reconcile(kube(memo), dict(body), dict(status))

    @kopf.on.delete(*ADEP, optional=True, registry=registry)
    def on_delete(*, meta: kopf.Meta, memo: Any, **_: Any) -> None:
        book.forget(meta["uid"])  # owned Deployments, Service and Jobs go with it (ownerReferences)
