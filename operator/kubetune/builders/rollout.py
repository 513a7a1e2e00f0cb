"""The AdapterDeployment rollout, decided: (spec, status, what the cluster shows) → (next status, actions).

A pure function, so every transition of the rollout is a row in a unit-test
table. The controller reads the cluster into an :class:`Observed`, calls
:func:`decide`, writes the status and carries out the :data:`Action` list;
it decides nothing itself.

One step of the rollout, in order:

1. resolve ``spec.adapter`` to a candidate — or wait for its FineTune, or
   reject it (failed, or not promotable);
2. the candidate already serves as stable: keep the stable Deployment at its
   revision and size; Healthy once it is available;
3. it was rejected or rolled back before: Degraded until spec.adapter changes;
4. nothing serves yet: gate it, then roll it out as the first stable revision;
5. it served before (in history as Promoted/Superseded): a revert, cut over
   at once, no gates, no canary;
6. paused: nothing new starts;
7. gates against the stable revision; Immediate promotes at once;
8. Canary: start the canary, roll back on a crash loop or the deadline, run
   the online eval when asked, promote when it passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetune.api.adapterdeployment import AdapterDeployment
from kubetune.builders.adapterdeployment import (
    Candidate,
    Resolution,
    Role,
    check_gates,
    resolve_source,
    revision_from_annotations,
    revision_record,
)
from kubetune.builders.status import set_condition
from kubetune_trainer.contract import parse_time, seconds_since

CRASH_RESTARTS = 2  # a canary container restarting this often will not come up by itself
NO_DIGEST = "sha256:" + "0" * 64


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class EnsureService:
    """Create the stable Service if it is missing."""


@dataclass(frozen=True)
class ApplyDeployment:
    """Create the ``role`` Deployment serving ``candidate`` as ``revision``, or move it to that revision."""

    role: Role
    revision: int
    candidate: Candidate
    replicas: int


@dataclass(frozen=True)
class ScaleDeployment:
    role: Role
    replicas: int


@dataclass(frozen=True)
class DeleteDeployment:
    role: Role


@dataclass(frozen=True)
class EnsureEvalJob:
    """Start the online eval Job of the canary ``revision`` against ``endpoint`` (once)."""

    revision: int
    endpoint: str


Action = EnsureService | ApplyDeployment | ScaleDeployment | DeleteDeployment | EnsureEvalJob


# ----------------------------------------------------------------------------- what the controller saw


@dataclass(frozen=True)
class Observed:
    """What the cluster shows, read by the controller just before deciding."""

    now: str
    stable: dict[str, Any] | None = None  # the stable Deployment
    canary: dict[str, Any] | None = None  # the canary Deployment
    finetune: dict[str, Any] | None = None  # the FineTune spec.adapter.fineTuneRef names
    canary_pods: list[dict[str, Any]] = field(default_factory=list)
    stable_pods: list[dict[str, Any]] = field(default_factory=list)  # read when the stable one is not available
    eval_job: dict[str, Any] | None = None  # the online eval Job of the canary revision in status
    eval_message: str | None = None  # its pods' termination message, when it failed


@dataclass
class Decision:
    """The next status, what to do to the cluster, and the outcomes recorded (for metrics)."""

    status: dict[str, Any]
    actions: list[Action]
    outcomes: list[tuple[str, str]]  # (outcome, reason) of each history entry added


# ----------------------------------------------------------------------------- cluster facts


def revision_of(deployment: dict[str, Any] | None) -> str | None:
    if deployment is None:
        return None
    annotations: dict[str, str] = deployment["metadata"].get("annotations") or {}
    return annotations.get("kubetune.io/revision")


def available(deployment: dict[str, Any] | None, replicas: int) -> bool:
    """All replicas of the newest template are up and ready."""
    if deployment is None:
        return False
    status = deployment.get("status") or {}
    if status.get("observedGeneration", 0) < deployment["metadata"].get("generation", 0):
        return False
    return (
        int(status.get("updatedReplicas") or 0) >= replicas
        and int(status.get("readyReplicas") or 0) >= replicas
        and int(status.get("replicas") or 0) == replicas
    )


def crash_looping(pods: list[dict[str, Any]]) -> str | None:
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


def job_outcome(job: dict[str, Any] | None) -> str | None:
    """Complete, Failed, or None while a Job runs (or does not exist)."""
    for c in (job or {}).get("status", {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return str(c["type"])
    return None


# ----------------------------------------------------------------------------- the decision


def decide(adep: AdapterDeployment, status: dict[str, Any], observed: Observed) -> Decision:
    """The next status of ``adep`` and the actions that get the cluster there (``adep.spec`` resolved)."""
    return _Step(adep, status, observed).run()


class _Step:
    """One decision, written as small steps over a working copy of the status."""

    def __init__(self, adep: AdapterDeployment, old: dict[str, Any], observed: Observed) -> None:
        self.adep = adep
        self.spec = adep.spec
        self.seen = observed
        self.now = observed.now
        self.generation: int | None = adep.metadata.get("generation")
        self.old = old
        self.new = dict(old)
        self.history: list[dict[str, Any]] = [dict(h) for h in old.get("history") or []]
        self.conditions: list[dict[str, Any]] = list(old.get("conditions") or [])
        self.stable: dict[str, Any] | None = old.get("stable")
        self.canary: dict[str, Any] | None = old.get("canary")
        self.stable_dep = observed.stable
        self.actions: list[Action] = []
        self.outcomes: list[tuple[str, str]] = []
        self.replicas = self.spec.runtime.replicas

    # -- bookkeeping

    def cond(self, type_: str, value: bool, reason: str, message: str = "") -> None:
        self.conditions = set_condition(
            self.conditions, type_, value, reason, message, generation=self.generation, now=self.now
        )

    def remember(self, outcome: str, revision: dict[str, Any], reason: str, message: str = "") -> None:
        entry = {
            "revision": revision["revision"],
            "adapterDigest": revision["adapterDigest"],
            "adapterUri": revision.get("adapterUri"),
            "fineTune": revision.get("fineTune"),
            "outcome": outcome,
            "reason": reason,
            "message": message[:1024],
            "at": self.now,
        }
        self.history.insert(0, {k: v for k, v in entry.items() if v is not None})
        del self.history[self.spec.revision_history_limit :]
        self.outcomes.append((outcome, reason))

    def next_revision(self) -> int:
        numbers = [h["revision"] for h in self.history] + [r["revision"] for r in (self.stable, self.canary) if r]
        return max(numbers, default=0) + 1

    def finish(self, phase: str, message: str) -> Decision:
        new = self.new
        del self.history[self.spec.revision_history_limit :]
        new.update(phase=phase, message=message[:4096], history=self.history, conditions=self.conditions)
        for key, value in (("stable", self.stable), ("canary", self.canary)):
            if value is None:
                new.pop(key, None)
            else:
                new[key] = value
        if not self.history:
            new.pop("history", None)
        return Decision(new, self.actions, self.outcomes)

    # -- cluster changes

    def apply(self, candidate: Candidate, revision: int, role: Role, replicas: int) -> None:
        self.actions.append(ApplyDeployment(role, revision, candidate, replicas))
        if role == "stable":
            self.stable_dep = None  # just changed: not available until the next observation says so

    def drop_canary(self) -> None:
        if self.seen.canary is not None:
            self.actions.append(DeleteDeployment("canary"))
        self.canary = None

    # -- the steps

    def run(self) -> Decision:
        self.new["observedGeneration"] = self.generation
        self.actions.append(EnsureService())
        ready = (self.seen.stable or {}).get("status") or {}
        self.new["readyReplicas"] = int(ready.get("readyReplicas") or 0)
        self.follow_the_stable_deployment()
        resolution = resolve_source(self.adep, self.seen.finetune)
        if resolution.waiting:
            return self.waiting(resolution.waiting)
        if resolution.rejected:
            return self.rejected(resolution)
        candidate = resolution.candidate
        assert candidate is not None
        if candidate.same_as(self.stable):
            return self.keep_stable(candidate)
        prior = next((h for h in self.history if h.get("adapterDigest") == candidate.adapter_digest), None)
        if prior is not None and prior.get("outcome") in ("Rejected", "RolledBack"):
            return self.refused_before(prior)
        if self.stable is None:
            return self.first_rollout(candidate)
        if prior is not None and prior.get("outcome") in ("Promoted", "Superseded"):
            return self.revert(candidate, int(prior["revision"]))
        if self.spec.rollout.paused:
            self.cond("Reconciling", False, "Paused", "rollout.paused is true")
            return self.finish("Paused", f"rollout paused; revision {self.stable['revision']} serves")
        failures = check_gates(candidate, list(self.spec.rollout.gates or []), self.stable)
        if failures:
            return self.reject_by_gates(candidate, failures)
        self.cond("GatesPassed", True, "GatesPassed", "")
        if self.spec.rollout.strategy == "Immediate":
            return self.promote(candidate, revision_record(candidate, self.next_revision(), self.now))
        return self.canary_step(candidate)

    def follow_the_stable_deployment(self) -> None:
        """Status follows what the cluster shows: if the stable Deployment serves another revision than
        status says (an operator stopped between rolling it and writing status), that revision is stable."""
        served = revision_from_annotations((self.seen.stable or {}).get("metadata", {}).get("annotations") or {},
                                           self.now)  # fmt: skip
        if served is None or (self.stable is not None and self.stable["revision"] == served["revision"]):
            return
        previous = self.stable
        self.stable = served
        if self.canary is not None and self.canary["revision"] == served["revision"]:
            self.canary = None
        self.history = [h for h in self.history if h["revision"] != served["revision"]]
        if previous is not None:
            self.remember("Superseded", previous, "Replaced", f"replaced by revision {served['revision']}")
        self.remember("Promoted", served, "Recovered", "the stable Deployment serves it")

    def serving(self, message: str) -> Decision:
        """Steady serving of the stable revision (after any rollout)."""
        if self.stable is not None and available(self.stable_dep, self.replicas):
            self.cond("Ready", True, "Serving", f"revision {self.stable['revision']} serves")
            self.cond("Reconciling", False, "Serving", "")
            self.cond("Stalled", False, "Serving", "")
            self.new.pop("progressingSince", None)
            served = self.spec.served_model_name
            return self.finish("Healthy", message or f"revision {self.stable['revision']} serves {served}")
        deadline = self.spec.rollout.progress_deadline_seconds
        since = self.new.setdefault("progressingSince", self.now)  # also when serving pods went away later
        if self.stable is not None and seconds_since(since, parse_time(self.now)) > deadline:
            return self.stable_not_ready(deadline)
        self.cond("Ready", False, "RollingOut", "the stable Deployment is rolling out")
        self.cond("Reconciling", True, "RollingOut", "")
        return self.finish("Progressing", message or "the stable Deployment is rolling out")

    def stable_not_ready(self, deadline: int) -> Decision:
        """The stable revision did not become ready in time: Degraded, with the pods' reason. Pods of an
        earlier revision keep serving (the Deployment never takes one down before its replacement is up)."""
        assert self.stable is not None
        why = crash_looping(self.seen.stable_pods) or f"not ready within {deadline}s"
        message = f"revision {self.stable['revision']} is not serving: {why}"
        self.cond("Ready", False, "StableNotReady", message)
        self.cond("Stalled", True, "StableNotReady", message)
        self.cond("Reconciling", False, "StableNotReady", "")
        older = int(((self.seen.stable or {}).get("status") or {}).get("readyReplicas") or 0)
        keeps = f"; {older} pod(s) of the previous revision keep serving" if older else ""
        return self.finish("Degraded", message + keeps)

    def waiting(self, message: str) -> Decision:
        self.cond("Reconciling", True, "WaitingForFineTune", message)
        if self.stable is None:
            self.cond("Ready", False, "WaitingForFineTune", message)
            return self.finish("Progressing", message)
        return self.serving(message)

    def rejected(self, resolution: Resolution) -> Decision:
        reason = str(resolution.rejected)
        ref = self.spec.adapter.fine_tune_ref
        fine_tune = ref.name if ref else None
        last = self.history[0] if self.history else {}
        if last.get("fineTune") != fine_tune or last.get("outcome") != "Rejected":
            adapter = ((self.seen.finetune or {}).get("status") or {}).get("adapter") or {}
            record = {"revision": self.next_revision(), "adapterDigest": adapter.get("digest") or NO_DIGEST,
                      "fineTune": fine_tune}  # fmt: skip
            self.remember("Rejected", record, reason, resolution.message)
        self.drop_canary()
        self.cond("GatesPassed", False, reason, resolution.message)
        self.cond("Stalled", True, reason, resolution.message)
        self.cond("Reconciling", False, reason, "")
        self.cond("Ready", self.stable is not None and available(self.stable_dep, self.replicas), reason,
                  resolution.message)  # fmt: skip
        serves = f"revision {self.stable['revision']} keeps serving" if self.stable else "nothing serves"
        return self.finish("Degraded", f"rejected: {resolution.message}; {serves}")

    def keep_stable(self, candidate: Candidate) -> Decision:
        assert self.stable is not None
        self.drop_canary()
        if revision_of(self.stable_dep) != str(self.stable["revision"]):
            self.apply(candidate, self.stable["revision"], "stable", self.replicas)
        elif self.stable_dep is not None and self.stable_dep["spec"].get("replicas") != self.replicas:
            self.actions.append(ScaleDeployment("stable", self.replicas))
        self.cond("GatesPassed", True, "GatesPassed", "")
        return self.serving("")

    def refused_before(self, prior: dict[str, Any]) -> Decision:
        self.cond("Stalled", True, str(prior.get("reason")), str(prior.get("message", "")))
        self.cond("Reconciling", False, str(prior.get("reason")), "")
        return self.finish(
            "Degraded",
            f"revision {prior['revision']} was {prior['outcome']} ({prior.get('reason')}); "
            "change spec.adapter to retry",
        )

    def first_rollout(self, candidate: Candidate) -> Decision:
        failures = check_gates(candidate, list(self.spec.rollout.gates or []), None)
        if failures:
            message = "; ".join(failures)
            self.remember("Rejected", revision_record(candidate, self.next_revision(), self.now), "EvalGateFailed",
                          message)  # fmt: skip
            self.cond("GatesPassed", False, "EvalGateFailed", message)
            self.cond("Stalled", True, "EvalGateFailed", message)
            return self.finish("Degraded", f"rejected: {message}")
        self.stable = revision_record(candidate, self.next_revision(), self.now)
        self.apply(candidate, self.stable["revision"], "stable", self.replicas)
        self.remember("Promoted", self.stable, "Initial", "first revision")
        self.cond("GatesPassed", True, "GatesPassed", "")
        self.new["progressingSince"] = self.now
        return self.serving("")

    def revert(self, candidate: Candidate, revision: int) -> Decision:
        """A revision that served before: cut over at once, no gates, no canary."""
        assert self.stable is not None
        self.drop_canary()
        previous = self.stable
        self.stable = revision_record(candidate, revision, self.now)
        self.apply(candidate, revision, "stable", self.replicas)
        self.remember("Superseded", previous, "Reverted", f"replaced by revision {revision}")
        self.remember("Promoted", self.stable, "Revert", "cut over to a revision from history")
        self.new["progressingSince"] = self.now
        return self.serving(f"reverted to revision {revision}")

    def reject_by_gates(self, candidate: Candidate, failures: list[str]) -> Decision:
        assert self.stable is not None
        message = "; ".join(failures)
        self.drop_canary()
        self.remember("Rejected", revision_record(candidate, self.next_revision(), self.now), "EvalGateFailed", message)
        self.cond("GatesPassed", False, "EvalGateFailed", message)
        self.cond("Stalled", True, "EvalGateFailed", message)
        self.cond("Reconciling", False, "EvalGateFailed", "")
        return self.finish("Degraded", f"rejected: {message}; revision {self.stable['revision']} keeps serving")

    def promote(self, candidate: Candidate, revision: dict[str, Any]) -> Decision:
        previous = self.stable
        assert previous is not None
        self.stable = {**revision, "since": self.now}
        self.apply(candidate, self.stable["revision"], "stable", self.replicas)
        self.drop_canary()
        self.remember("Superseded", previous, "Replaced", f"replaced by revision {self.stable['revision']}")
        self.remember(
            "Promoted", self.stable, "CanaryPassed" if self.spec.rollout.strategy == "Canary" else "Immediate"
        )
        self.new["progressingSince"] = self.now
        return self.serving(f"promoted revision {self.stable['revision']}")

    def roll_back(self, reason: str, message: str) -> Decision:
        assert self.canary is not None
        assert self.stable is not None
        self.remember("RolledBack", self.canary, reason, message)
        self.drop_canary()
        self.cond("Stalled", True, reason, message)
        self.cond("Reconciling", False, reason, "")
        keeps = f"revision {self.stable['revision']} keeps serving"
        self.cond("Ready", available(self.stable_dep, self.replicas), reason, keeps)
        return self.finish("Degraded", f"rolled back: {message}; {keeps}")

    def canary_step(self, candidate: Candidate) -> Decision:
        canary_spec = self.spec.rollout.canary
        assert canary_spec is not None, "resolve_adapter_deployment sets rollout.canary"
        if self.canary is None or self.canary.get("adapterDigest") != candidate.adapter_digest:
            self.drop_canary()
            self.canary = revision_record(candidate, self.next_revision(), self.now)
            self.apply(candidate, self.canary["revision"], "canary", canary_spec.replicas)
            self.new["progressingSince"] = self.now
            self.cond("Ready", available(self.stable_dep, self.replicas), "CanaryStarted", "")
            self.cond("Reconciling", True, "CanaryStarted", f"canary revision {self.canary['revision']} is starting")
            self.cond("Stalled", False, "CanaryStarted", "")
            return self.finish("Progressing", f"canary revision {self.canary['revision']} is starting")
        crash = crash_looping(self.seen.canary_pods)
        if crash:
            return self.roll_back("CanaryCrashLoop", crash)
        deadline = self.spec.rollout.progress_deadline_seconds
        if not available(self.seen.canary, canary_spec.replicas):
            if seconds_since(self.old.get("progressingSince"), parse_time(self.now)) > deadline:
                return self.roll_back("CanaryNotReady", f"canary not ready within {deadline}s")
            return self.finish("Progressing", f"waiting for canary revision {self.canary['revision']} to become ready")
        if self.spec.rollout.online_eval is not None:
            verdict = self.online_eval()
            if verdict is not None:
                return verdict
        return self.promote(candidate, self.canary)

    def online_eval(self) -> Decision | None:
        """Run the canary's online eval; a decision while it runs or when it failed, None when it passed."""
        assert self.canary is not None
        outcome = job_outcome(self.seen.eval_job)
        if outcome == "Failed":
            return self.roll_back(
                "OnlineEvalFailed", f"online eval of the canary failed: {self.seen.eval_message or ''}"
            )
        if outcome == "Complete":
            return None
        if self.seen.eval_job is None:
            ip = next(
                (p["status"]["podIP"] for p in self.seen.canary_pods if (p.get("status") or {}).get("podIP")), None
            )
            name, ns = self.adep.metadata["name"], self.adep.metadata["namespace"]
            endpoint = f"http://{ip}:{self.spec.runtime.port}" if ip else f"http://{name}-canary.{ns}.svc"
            self.actions.append(EnsureEvalJob(self.canary["revision"], endpoint))
        return self.finish("Progressing", f"evaluating canary revision {self.canary['revision']} online")
