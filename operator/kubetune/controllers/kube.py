"""Thin helpers over the Kubernetes client that every controller uses.

Create-or-adopt (an operator restarted mid-run must find its objects, never
duplicate them), status patches of changed fields only, Events, and storage
settings built from a FineTune's credentials Secret.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException

from kubetune.api.types import API_GROUP, API_VERSION
from kubetune.builders.meta import owned_by
from kubetune.controllers.informer import namespaced
from kubetune.controllers.transport import ApiTransport
from kubetune_trainer import storage

log = logging.getLogger("kubetune")


class ForeignObjectError(Exception):
    """An object with our name exists but belongs to someone else (e.g. a deleted FineTune's Job)."""


class KubeAPI(Protocol):
    """What the controllers ask of the API server; :class:`Kube` talks to a real one, tests use a fake."""

    def create_or_adopt(self, manifest: dict[str, Any], owner_uid: str) -> tuple[dict[str, Any], bool]: ...
    def get_custom(self, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None: ...
    def list_custom(self, plural: str, namespace: str) -> list[dict[str, Any]]: ...
    def patch_custom(self, plural: str, namespace: str, name: str, patch: dict[str, Any]) -> None: ...
    def patch_status(self, plural: str, namespace: str | None, name: str, status: dict[str, Any]) -> None: ...
    def secret_data(self, namespace: str, name: str, fresh: bool = False) -> dict[str, str] | None: ...
    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None: ...
    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None: ...
    def job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]: ...
    def read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def patch_deployment(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]: ...
    def delete_deployment(self, namespace: str, name: str) -> None: ...
    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]: ...


# Where each kind the controllers create lives in the API.
PATHS = {
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "Service": "/api/v1/namespaces/{ns}/services",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "Event": "/api/v1/namespaces/{ns}/events",
}
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


def _custom_path(plural: str, namespace: str | None, name: str = "") -> str:
    base = f"/apis/{API_GROUP}/{API_VERSION}"
    where = f"/namespaces/{namespace}" if namespace is not None else ""
    return f"{base}{where}/{plural}" + (f"/{name}" if name else "")


@dataclass
class Kube:
    """The operator's API access, shared by the controllers (implements :class:`KubeAPI`).

    Requests send and return plain JSON through :class:`ApiTransport` (kept
    connections, the client's configuration and credentials): the generated
    API classes would validate every body into models and back, and the
    client's own transport walks every body and scans the environment on every
    call; both cost more CPU per FineTune than everything else the operator
    does for it.
    """

    api: ApiTransport
    # Credentials read from Secrets, by (namespace, name), for a short while: the
    # progress timer needs them every few seconds and must not GET the Secret each time.
    _secrets: dict[tuple[str, str], tuple[float, dict[str, str]]] = field(default_factory=dict)
    secret_ttl: float = 30.0

    def request(self, method: str, path: str, **options: Any) -> Any:
        """One API request (:meth:`ApiTransport.request`); the decoded JSON answer, ApiException on an error."""
        return self.api.request(method, path, **options)

    def _get(self, path: str, **kwargs: Any) -> dict[str, Any] | None:
        """GET ``path``; None when it does not exist."""
        try:
            found: dict[str, Any] = self.request("GET", path, **kwargs)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return found

    def warm_up(self) -> None:
        """Load boto3 and the S3 service model now rather than while the first objects wait."""
        storage.warm_up()

    def read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(PATHS["Deployment"].format(ns=namespace) + f"/{name}")

    def patch_deployment(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        path = PATHS["Deployment"].format(ns=namespace) + f"/{name}"
        patched: dict[str, Any] = self.request("PATCH", path, body=patch, content_type=STRATEGIC_MERGE_PATCH)
        return patched

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Patch a Job; one that is gone already is not an error (its FineTune hears of that)."""
        try:
            self.request("PATCH", PATHS["Job"].format(ns=namespace) + f"/{name}", body=patch,
                         content_type=STRATEGIC_MERGE_PATCH)  # fmt: skip
        except ApiException as e:
            if e.status != 404:
                raise

    def delete_deployment(self, namespace: str, name: str) -> None:
        try:
            self.request("DELETE", PATHS["Deployment"].format(ns=namespace) + f"/{name}",
                         body={"propagationPolicy": "Background"})  # fmt: skip
        except ApiException as e:
            if e.status != 404:
                raise

    def pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        listed = self.request("GET", f"/api/v1/namespaces/{namespace}/pods", query=[("labelSelector", selector)])
        items: list[dict[str, Any]] = listed["items"]
        return items

    def create_or_adopt(self, manifest: dict[str, Any], owner_uid: str) -> tuple[dict[str, Any], bool]:
        """Create ``manifest``; if it exists and is ours, return it. (object, created)."""
        kind = manifest["kind"]
        ns = manifest["metadata"]["namespace"]
        name = manifest["metadata"]["name"]
        path = PATHS[kind].format(ns=ns)
        try:
            created: dict[str, Any] = self.request("POST", path, body=manifest)
            return created, True
        except ApiException as e:
            if e.status != 409:
                raise
        existing = self._get(f"{path}/{name}")
        if existing is None:  # gone between the two calls: the next reconcile creates it
            raise ForeignObjectError(f"{kind} {ns}/{name} was there a moment ago and is gone")
        if not owned_by(existing, owner_uid):
            raise ForeignObjectError(f"{kind} {ns}/{name} exists and is not owned by this object")
        return existing, False

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(PATHS["Job"].format(ns=namespace) + f"/{name}")

    def job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        return self.pods(namespace, {"batch.kubernetes.io/job-name": job})

    def patch_status(self, plural: str, namespace: str | None, name: str, status: dict[str, Any]) -> None:
        path = _custom_path(plural, namespace, name) + "/status"
        self.request("PATCH", path, body={"status": status}, content_type=MERGE_PATCH)

    def get_custom(self, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self._get(_custom_path(plural, namespace, name))

    def list_custom(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.request("GET", _custom_path(plural, namespace))["items"]
        return items

    def patch_custom(self, plural: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.request("PATCH", _custom_path(plural, namespace, name), body=patch, content_type=MERGE_PATCH)

    def list_all(self, path: str, namespaces: list[str], *, label_selector: str | None = None) -> list[dict[str, Any]]:
        """Every object at ``path`` (``/apis/batch/v1/jobs``) in ``namespaces``, or cluster-wide when empty."""
        query = [("labelSelector", label_selector)] if label_selector else None
        if not namespaces:
            listed: list[dict[str, Any]] = self.request("GET", path, query=query)["items"]
            return listed
        found: list[dict[str, Any]] = []
        for ns in namespaces:
            found += self.request("GET", namespaced(path, ns), query=query)["items"]
        return found

    def secret_data(self, namespace: str, name: str, fresh: bool = False) -> dict[str, str] | None:
        """The decoded data of a Secret (cached briefly, unless ``fresh``); None when it does not exist."""
        key = (namespace, name)
        cached = self._secrets.get(key)
        if not fresh and cached is not None and time.monotonic() - cached[0] < self.secret_ttl:
            return cached[1]
        secret = self._get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
        if secret is None:
            self._secrets.pop(key, None)
            return None
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        self._secrets[key] = (time.monotonic(), data)
        return data

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about ``obj``; never fails the caller."""
        event = build_event(obj, type_, reason, message)
        try:
            self.request("POST", PATHS["Event"].format(ns=event["metadata"]["namespace"]), body=event)
        except ApiException as e:
            log.warning("could not post event %s on %s: %s", reason, obj["metadata"]["name"], e.reason)


def build_event(obj: dict[str, Any], type_: str, reason: str, message: str) -> dict[str, Any]:
    """A core/v1 Event about ``obj``."""
    meta = obj["metadata"]
    ts = datetime.now(UTC).isoformat()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta.get("namespace") or "default"},
        "involvedObject": {
            "apiVersion": obj.get("apiVersion"),
            "kind": obj.get("kind"),
            "name": meta["name"],
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": "kubetune-operator"},
        "firstTimestamp": ts,
        "lastTimestamp": ts,
        "count": 1,
        "reportingComponent": "kubetune.io/operator",
        "reportingInstance": "kubetune-operator",
    }


class StatusBook:
    """The status this process last wrote for each object, and one lock per object.

    Several handlers (create, Job events, timers) update one object's status
    concurrently, each starting from whatever event woke it — often older than
    what another handler just wrote. Computing every update from the newest
    status known, under the object's lock, keeps one handler from undoing
    another's (a merge patch replaces whole lists such as conditions).
    """

    def __init__(self) -> None:
        self._latest: dict[str, dict[str, Any]] = {}
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()

    def lock(self, uid: str) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault(uid, threading.RLock())

    def latest(self, uid: str, observed: dict[str, Any]) -> dict[str, Any]:
        return dict(self._latest.get(uid, observed))

    def record(self, uid: str, status: dict[str, Any]) -> None:
        self._latest[uid] = dict(status)

    def forget(self, uid: str) -> None:
        with self._guard:
            self._latest.pop(uid, None)
            self._locks.pop(uid, None)


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The top-level status fields that differ: the body of a merge patch (None deletes a field)."""
    delta: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    delta.update({k: None for k in old if k not in new})
    return delta


# The operator's reads of a tenant's store (progress.json, manifest.json) are small: short timeouts and
# one retry, so an unreachable or black-holed endpoint costs a poll at most a few seconds of one thread.
OPERATOR_S3_ATTEMPTS = 2
OPERATOR_S3_CONNECT_TIMEOUT_S = 2.0
OPERATOR_S3_READ_TIMEOUT_S = 5.0


def s3_settings(secret: dict[str, str] | None, endpoint: str | None, region: str) -> storage.S3Settings:
    """Storage settings with the FineTune's credentials (the operator reads progress and reports with them)."""
    secret = secret or {}
    return storage.S3Settings(
        endpoint=endpoint,
        region=region,
        attempts=OPERATOR_S3_ATTEMPTS,
        connect_timeout=OPERATOR_S3_CONNECT_TIMEOUT_S,
        read_timeout=OPERATOR_S3_READ_TIMEOUT_S,
        access_key=secret.get("AWS_ACCESS_KEY_ID"),
        secret_key=secret.get("AWS_SECRET_ACCESS_KEY"),
        session_token=secret.get("AWS_SESSION_TOKEN"),
    )
