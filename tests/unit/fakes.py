"""In-memory stand-ins for the controllers' API access and scheduler, for unit tests of controller methods.

The end-to-end suite drives the controllers against a real API server; these
let a unit test call one method (``launch``, ``follow_job``, ``reconcile``) and
look at exactly what it wrote. :class:`FakeKube` implements
:class:`kubetune.controllers.kube.KubeAPI` with the API server's semantics the
controllers rely on: create conflicts, ownership, merge patches of status
(``None`` deletes a field), label selection.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from kubetune.builders.meta import owned_by
from kubetune.controllers.kube import ForeignObjectError
from kubetune.controllers.scheduler import Scheduler

Key = tuple[str, str | None, str]  # (kind or plural, namespace, name)

_uids = itertools.count(1)


def merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) of ``patch`` onto ``target``, in place."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def api_error(status: int, reason: str = "injected") -> ApiException:
    """The exception the Kubernetes client raises for an HTTP error."""
    return ApiException(status=status, reason=reason)


@dataclass
class FakeKube:
    """Objects by (kind, namespace, name); every write is recorded in ``writes``."""

    objects: dict[Key, dict[str, Any]] = field(default_factory=dict)
    secrets: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    writes: list[tuple[str, str, str]] = field(default_factory=list)  # (verb, kind, name)
    failures: dict[str, list[Exception]] = field(default_factory=dict)  # method -> errors to raise, in turn

    # -- test set-up and inspection

    def add(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{next(_uids)}")
        meta.setdefault("generation", 1)
        self.objects[(kind, meta.get("namespace"), meta["name"])] = obj
        return obj

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, namespace, name))

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for (k, _, _), o in self.objects.items() if k == kind]

    def fail(self, method: str, *errors: Exception) -> None:
        """Make the next calls of ``method`` raise ``errors``, one each."""
        self.failures.setdefault(method, []).extend(errors)

    def _maybe_fail(self, method: str) -> None:
        pending = self.failures.get(method)
        if pending:
            raise pending.pop(0)

    # -- KubeAPI

    def create_or_adopt(self, manifest: dict[str, Any], owner_uid: str) -> tuple[dict[str, Any], bool]:
        self._maybe_fail("create_or_adopt")
        kind, meta = manifest["kind"], manifest["metadata"]
        existing = self.get(kind, meta.get("namespace"), meta["name"])
        if existing is not None:
            if not owned_by(existing, owner_uid):
                raise ForeignObjectError(f"{kind} {meta.get('namespace')}/{meta['name']} is not ours")
            return copy.deepcopy(existing), False
        obj = copy.deepcopy(manifest)
        obj.setdefault("status", {})
        self.add(kind, obj)
        self.writes.append(("create", kind, meta["name"]))
        return copy.deepcopy(obj), True

    def get_custom(self, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        self._maybe_fail("get_custom")
        obj = self.get(plural, namespace, name)
        return copy.deepcopy(obj) if obj is not None else None

    def list_custom(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for o in self.of_kind(plural) if o["metadata"].get("namespace") == namespace]

    def patch_custom(self, plural: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        obj = self.get(plural, namespace, name)
        if obj is None:
            raise api_error(404, "NotFound")
        merge(obj, patch)
        obj["metadata"].pop("resourceVersion", None)
        self.writes.append(("patch", plural, name))

    def patch_status(self, plural: str, namespace: str | None, name: str, status: dict[str, Any]) -> None:
        self._maybe_fail("patch_status")
        obj = self.get(plural, namespace, name)
        if obj is None:
            raise api_error(404, "NotFound")
        merge(obj.setdefault("status", {}), status)
        self.writes.append(("patch-status", plural, name))

    def secret_data(self, namespace: str, name: str, fresh: bool = False) -> dict[str, str] | None:
        self._maybe_fail("secret_data")
        return self.secrets.get((namespace, name))

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self._maybe_fail("patch_job")
        job = self.get("Job", namespace, name)
        if job is not None:
            merge(job, patch)
            self.writes.append(("patch", "Job", name))

    def job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        return self.pods(namespace, {"batch.kubernetes.io/job-name": job})

    def read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.get("Deployment", namespace, name)
        return copy.deepcopy(obj) if obj is not None else None

    def patch_deployment(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        obj = self.get("Deployment", namespace, name)
        if obj is None:
            raise api_error(404, "NotFound")
        merge(obj, patch)
        obj["metadata"]["generation"] = int(obj["metadata"].get("generation", 1)) + 1
        self.writes.append(("patch", "Deployment", name))
        return copy.deepcopy(obj)

    def delete_deployment(self, namespace: str, name: str) -> None:
        if self.objects.pop(("Deployment", namespace, name), None) is not None:
            self.writes.append(("delete", "Deployment", name))

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.get("Job", namespace, name)
        return copy.deepcopy(obj) if obj is not None else None

    def pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(p)
            for p in self.of_kind("Pod")
            if p["metadata"].get("namespace") == namespace
            and all((p["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())
        ]


class ManualScheduler(Scheduler):
    """A scheduler whose work runs only when a test says so (``run``), in due order."""

    def __init__(self) -> None:
        super().__init__()
        self.work: dict[Hashable, tuple[float, Callable[[], None]]] = {}

    def call_later(self, key: Hashable, delay: float, fn: Callable[[], None], *, keep_earlier: bool = False) -> None:
        current = self.work.get(key)
        if keep_earlier and current is not None and current[0] <= delay:
            delay = current[0]
        self.work[key] = (delay, fn)

    def cancel(self, key: Hashable) -> None:
        self.work.pop(key, None)

    def scheduled(self, key: Hashable) -> bool:
        return key in self.work

    def delay(self, key: Hashable) -> float:
        return self.work[key][0]

    def run(self, key: Hashable) -> None:
        """Run the work scheduled under ``key`` now."""
        _, fn = self.work.pop(key)
        fn()
