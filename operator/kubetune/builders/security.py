"""Pieces every pod kubetune creates shares: the restricted security contexts and credentials by reference."""

from __future__ import annotations

from typing import Any


def restricted_container() -> dict[str, Any]:
    """A container security context that meets the `restricted` Pod Security Standard."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def restricted_pod(uid: int) -> dict[str, Any]:
    """A pod security context: non-root ``uid``, RuntimeDefault seccomp."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def credentials_env(secret_name: str | None) -> list[dict[str, Any]]:
    """S3 credentials as references to the Secret's keys: the values never appear in a manifest."""
    if secret_name is None:
        return []

    def ref(key: str, optional: bool) -> dict[str, Any]:
        return {"name": key, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key, "optional": optional}}}

    return [ref("AWS_ACCESS_KEY_ID", False), ref("AWS_SECRET_ACCESS_KEY", False), ref("AWS_SESSION_TOKEN", True)]


def literal(value: str) -> str:
    """``value`` exactly as written in a command, an argument or an env value.

    Kubernetes expands ``$(VAR)`` there, from the container's env — which holds the
    storage credentials — so a user's value is escaped (``$$(`` stays ``$(``).
    """
    return value.replace("$(", "$$(")
