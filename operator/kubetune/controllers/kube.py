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

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from kubetune.api.types import API_GROUP, API_VERSION
from kubetune.builders.meta import owned_by
from kubetune_trainer import storage

log = logging.getLogger("kubetune")


class ForeignObjectError(Exception):
    """An object with our name exists but belongs to someone else (e.g. a deleted FineTune's Job)."""


class KubeAPI(Protocol):
    """What the controllers ask of the API server; :class:`Kube` talks to a real one, tests use a fake."""

    def create_or_adopt(self, manifest: dict[str, Any], owner_uid: str) -> tuple[dict[str, Any], bool]: ...
    def get_custom(self, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None: ...
    def list_custom(self, plural: str, namespace: str) -> list[dict[str, Any]]: ...
    def patch_status(self, plural: str, namespace: str | None, name: str, status: dict[str, Any]) -> None: ...
    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None: ...
    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None: ...
    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None: ...
    def job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]: ...
    def read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def patch_deployment(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]: ...
    def delete_deployment(self, namespace: str, name: str) -> None: ...
    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]: ...


@dataclass
class Kube:
    """The operator's API access, shared by the controllers (implements :class:`KubeAPI`)."""

    api: k8s.ApiClient
    # Credentials read from Secrets, by (namespace, name), for a short while: the
    # progress timer needs them every few seconds and must not GET the Secret each time.
    _secrets: dict[tuple[str, str], tuple[float, dict[str, str]]] = field(default_factory=dict)
    secret_ttl: float = 30.0

    @property
    def core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self.api)

    @property
    def batch(self) -> k8s.BatchV1Api:
        return k8s.BatchV1Api(self.api)

    @property
    def custom(self) -> k8s.CustomObjectsApi:
        return k8s.CustomObjectsApi(self.api)

    @property
    def apps(self) -> k8s.AppsV1Api:
        return k8s.AppsV1Api(self.api)

    def warm_up(self) -> None:
        """Load the API client's modules now rather than while the first objects wait.

        The client imports each API group's module on first use (core/v1 alone is
        ~0.5 s of CPU: every method is wrapped by pydantic), and so does boto3.
        """
        for api in (k8s.CoreV1Api, k8s.BatchV1Api, k8s.CustomObjectsApi, k8s.AppsV1Api):
            api(self.api)
        storage.warm_up()

    def read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._to_dict(self.apps.read_namespaced_deployment(name, namespace))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def patch_deployment(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self._to_dict(self.apps.patch_namespaced_deployment(name, namespace, patch))

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Patch a Job; one that is gone already is not an error (its FineTune hears of that)."""
        try:
            self.batch.patch_namespaced_job(name, namespace, patch)
        except ApiException as e:
            if e.status != 404:
                raise

    def delete_deployment(self, namespace: str, name: str) -> None:
        try:
            self.apps.delete_namespaced_deployment(name, namespace, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise

    def pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        return [self._to_dict(p) for p in self.core.list_namespaced_pod(namespace, label_selector=selector).items]

    def _to_dict(self, obj: Any) -> dict[str, Any]:
        data: dict[str, Any] = self.api.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
        return data

    def create_or_adopt(self, manifest: dict[str, Any], owner_uid: str) -> tuple[dict[str, Any], bool]:
        """Create ``manifest``; if it exists and is ours, return it. (object, created)."""
        kind = manifest["kind"]
        ns = manifest["metadata"]["namespace"]
        name = manifest["metadata"]["name"]
        create: Any
        read: Any
        create, read = {
            "Job": (self.batch.create_namespaced_job, self.batch.read_namespaced_job),
            "ConfigMap": (self.core.create_namespaced_config_map, self.core.read_namespaced_config_map),
            "Service": (self.core.create_namespaced_service, self.core.read_namespaced_service),
            "Deployment": (self.apps.create_namespaced_deployment, self.apps.read_namespaced_deployment),
        }[kind]
        try:
            return self._to_dict(create(ns, manifest)), True
        except ApiException as e:
            if e.status != 409:
                raise
        existing = self._to_dict(read(name, ns))
        if not owned_by(existing, owner_uid):
            raise ForeignObjectError(f"{kind} {ns}/{name} exists and is not owned by this object")
        return existing, False

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._to_dict(self.batch.read_namespaced_job(name, namespace))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job}")
        return [self._to_dict(p) for p in pods.items]

    def patch_status(self, plural: str, namespace: str | None, name: str, status: dict[str, Any]) -> None:
        body = {"status": status}
        if namespace is None:
            self.custom.patch_cluster_custom_object_status(API_GROUP, API_VERSION, plural, name, body)
        else:
            self.custom.patch_namespaced_custom_object_status(API_GROUP, API_VERSION, namespace, plural, name, body)

    def get_custom(self, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            if namespace is None:
                obj = self.custom.get_cluster_custom_object(API_GROUP, API_VERSION, plural, name)
            else:
                obj = self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, plural, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        result: dict[str, Any] = obj  # type: ignore[assignment]
        return result

    def list_custom(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        listed: dict[str, Any] = self.custom.list_namespaced_custom_object(  # type: ignore[assignment]
            API_GROUP, API_VERSION, namespace, plural
        )
        items: list[dict[str, Any]] = listed["items"]
        return items

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """The decoded data of a Secret (cached briefly); None when it does not exist."""
        key = (namespace, name)
        cached = self._secrets.get(key)
        if cached is not None and time.monotonic() - cached[0] < self.secret_ttl:
            return cached[1]
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as e:
            if e.status == 404:
                self._secrets.pop(key, None)
                return None
            raise
        data = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
        self._secrets[key] = (time.monotonic(), data)
        return data

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about ``obj``; never fails the caller."""
        meta = obj["metadata"]
        ts = datetime.now(UTC)
        event: dict[str, Any] = {
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
            "firstTimestamp": ts.isoformat(),
            "lastTimestamp": ts.isoformat(),
            "count": 1,
            "reportingComponent": "kubetune.io/operator",
            "reportingInstance": "kubetune-operator",
        }
        try:
            self.core.create_namespaced_event(event["metadata"]["namespace"], event)  # type: ignore[arg-type]
        except ApiException as e:
            log.warning("could not post event %s on %s: %s", reason, meta["name"], e.reason)


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
