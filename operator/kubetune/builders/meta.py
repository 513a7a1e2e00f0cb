"""Metadata every object kubetune creates shares: names, labels, owner references, resources.

Child objects are named after their parent, and Kubernetes is stricter about
some names than about the parent's: a FineTune may have a 253-character name
with dots, but its Job name ends up in a label value (63 characters), its
pods' hostnames must be DNS-1123 labels, and a Service name must be a
DNS-1035 label (a letter first, no dots). :func:`child_name` derives a name
that is always valid, readable when it can be, and unique by a hash of the
parent's name when it had to be shortened or changed. Objects are found again
by their owner's uid (ownerReferences), never by a name or label parsed back.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from kubetune.api.types import GROUP_VERSION

MANAGED_BY = "kubetune"
FINETUNE_LABEL = "kubetune.io/finetune"
ADEP_LABEL = "kubetune.io/adapterdeployment"
ROLE_LABEL = "kubetune.io/role"
DNS_LABEL_MAX = 63

_INVALID = re.compile(r"[^a-z0-9-]+")


def _digest(value: str, length: int = 8) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:length]


def child_name(parent: str, suffix: str = "", *, limit: int = DNS_LABEL_MAX, letter_first: bool = False) -> str:
    """``<parent>-<suffix>`` as a valid DNS-1123 label (DNS-1035 with ``letter_first``) of at most ``limit``.

    When ``parent`` does not fit as it is (too long, dots or other characters
    a label may not have, a leading digit where a letter is needed), the name
    keeps a readable prefix of it and adds 8 hex digits of its sha256, so two
    parents never share a child name by truncation.
    """
    tail = f"-{suffix}" if suffix else ""
    plain = f"{parent}{tail}"
    if len(plain) <= limit and _is_label(plain, letter_first):
        return plain
    head = _INVALID.sub("-", parent.lower()).strip("-")
    if letter_first and not head[:1].isalpha():
        head = f"k-{head}".rstrip("-")
    room = limit - len(tail) - 9  # "-" + 8 hex digits
    head = head[:room].rstrip("-")
    return f"{head}-{_digest(parent)}{tail}" if head else f"k{_digest(parent)}{tail}"


def _is_label(name: str, letter_first: bool) -> bool:
    pattern = r"[a-z]([-a-z0-9]*[a-z0-9])?" if letter_first else r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    return re.fullmatch(pattern, name) is not None


def label_value(value: str) -> str:
    """``value`` as a label value: itself when it fits in 63 characters, else a prefix and a hash."""
    if len(value) <= DNS_LABEL_MAX:
        return value
    return f"{value[:54].rstrip('-._')}-{_digest(value)}"


def owner_reference(kind: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """The controller owner reference to a kubetune object (its children go when it goes)."""
    return {
        "apiVersion": GROUP_VERSION,
        "kind": kind,
        "name": metadata["name"],
        "uid": metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    """Whether ``obj`` has an owner reference to ``uid``."""
    return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def owner_uid(obj: dict[str, Any], kind: str) -> str | None:
    """The uid of ``obj``'s controlling kubetune owner of ``kind``, if any."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == kind and str(ref.get("apiVersion", "")).startswith("kubetune.io/"):
            uid: str | None = ref.get("uid")
            return uid
    return None


def standard_labels(app: str, component: str, instance: str, extra: dict[str, str], **kubetune: str) -> dict[str, str]:
    """app.kubernetes.io/* labels plus ``kubetune.io/<key>`` ones (``finetune=...``), all valid values."""
    labels = {
        **extra,
        "app.kubernetes.io/name": app,
        "app.kubernetes.io/instance": label_value(instance),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }
    labels.update({f"kubetune.io/{key}": label_value(value) for key, value in kubetune.items()})
    return labels


def resources(*, cpu: str | None, memory: str | None, gpus: int, gpu_resource_name: str) -> dict[str, dict[str, str]]:
    """A container's resources: CPU requested, memory requested and limited, GPUs limited."""
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if cpu is not None:
        requests["cpu"] = cpu
    if memory is not None:
        requests["memory"] = limits["memory"] = memory
    if gpus > 0:
        limits[gpu_resource_name] = str(gpus)
    out: dict[str, dict[str, str]] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


_SUFFIXES = {"m": Decimal("0.001"), "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9)}
_SUFFIXES |= {"T": Decimal(10**12), "P": Decimal(10**15), "E": Decimal(10**18)}
_SUFFIXES |= {f"{p}i": Decimal(1024 ** (n + 1)) for n, p in enumerate("KMGTPE")}


def quantity(value: str) -> Decimal:
    """A Kubernetes quantity's value (``"250m"`` is 0.25, ``"2Gi"`` 2147483648); the API's pattern is assumed."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)", value)
    if match is None or match[2] not in ("", *_SUFFIXES):
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return Decimal(match[1]) * _SUFFIXES.get(match[2], Decimal(1))


def cpu_threads_env(cpu: str | None, processes: int = 1) -> list[dict[str, Any]]:
    """``OMP_NUM_THREADS`` for a container's processes: its CPU request shared among them, rounded up.

    torch sizes its thread pool from the cores it sees, which in a container are the node's, not its
    share: a trainer that requested a quarter of a core on a busy 64-core node starts 64 OpenMP threads
    that spin waiting for each other on its neighbours' CPU time. One thread per requested core (at
    least one) is what the scheduler set aside for it. Nothing is set without a request.
    """
    if cpu is None:
        return []
    threads = max(1, math.ceil(quantity(cpu) / max(processes, 1)))
    return [{"name": "OMP_NUM_THREADS", "value": str(threads)}]


PVC_ROOT = "/mnt/pvc"
"""Where pods mount the PersistentVolumeClaims that ``pvc://claim/path`` URIs name (``$KUBETUNE_PVC_ROOT``)."""


def pvc_claims(uris: list[str | None]) -> list[str]:
    """The claims the ``pvc://`` URIs among ``uris`` name, each once, in order."""
    claims: list[str] = []
    for uri in uris:
        if uri and uri.startswith("pvc://"):
            claim = uri.removeprefix("pvc://").split("/", 1)[0]
            if claim and claim not in claims:
                claims.append(claim)
    return claims


def pvc_volumes(read: Sequence[str], write: Sequence[str] = ()) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts for the claims a pod reads (read-only) and writes, at ``PVC_ROOT/<claim>``."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    for claim in [*write, *(c for c in read if c not in write)]:
        name = child_name("pvc", claim)
        writable = claim in write
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}})
        mounts.append({"name": name, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": not writable})
    return volumes, mounts
