"""How the fake kubelet reads a pod spec: Kubernetes' rules, ported as pure functions.

Kept apart from the kubelet's I/O so the rules (``$(VAR)`` expansion, downward
API fields, resource fields, mount-path rewriting) read like the upstream code
they copy and can be checked without a cluster.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from kubernetes.utils import parse_quantity

Obj = dict[str, Any]

_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def now() -> str:
    """A metav1.Time: RFC 3339, seconds, UTC."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def is_env_name(name: str) -> bool:
    """What envFrom accepts as a variable name (others are skipped, as upstream does)."""
    return bool(_ENV_NAME.match(name))


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion (third_party/forked/golang/expansion).

    ``$(VAR)`` becomes VAR's value when VAR is defined and stays as written
    otherwise; ``$$`` is an escaped ``$``; any other ``$`` is kept.
    """
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            rest = text[cursor + 1 :]
            if rest[0] == "$":
                out.append("$")
                advance = 1
            elif rest[0] == "(":
                close = rest.find(")")
                if close == -1:
                    out.append("$(")
                    advance = 1
                else:
                    name = rest[1:close]
                    out.append(env.get(name, f"$({name})"))
                    advance = close + 1
            else:
                out.append("$" + rest[0])
                advance = 1
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out.append(text[checkpoint:])
    return "".join(out)


def format_map(values: Mapping[str, str]) -> str:
    """Labels or annotations as the downward API writes them: ``key="value"`` lines, sorted."""
    return "\n".join(f"{key}={json.dumps(values[key])}" for key in sorted(values))


def field_value(pod: Obj, field_path: str, pod_ip: str, host_ip: str) -> str:
    """The value of a downward-API ``fieldRef`` for this pod."""
    meta = pod["metadata"]
    spec = pod["spec"]
    subscript = _SUBSCRIPT.match(field_path)
    if subscript:
        return str(meta.get(subscript.group(1), {}).get(subscript.group(2), ""))
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "metadata.labels": format_map(meta.get("labels", {})),
        "metadata.annotations": format_map(meta.get("annotations", {})),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if field_path not in simple:
        raise ValueError(f"unsupported fieldRef fieldPath {field_path!r}")
    return str(simple[field_path])


def resource_value(container: Obj, resource: str, divisor: str | None, allocatable: Mapping[str, str]) -> str:
    """The value of a ``resourceFieldRef``: limits fall back to node allocatable, as upstream."""
    kind, _, name = resource.partition(".")
    resources = container.get("resources", {})
    raw = resources.get(kind, {}).get(name)
    if raw is None and kind == "limits":
        raw = allocatable.get(name)
    amount = Decimal(parse_quantity(raw)) if raw is not None else Decimal(0)  # type: ignore[no-untyped-call]
    unit = Decimal(parse_quantity(divisor)) if divisor else Decimal(0)  # type: ignore[no-untyped-call]
    return str(math.ceil(amount / (unit or 1)))  # the API server defaults an unset divisor to "0"


class PathMapper:
    """Rewrites in-container paths (mount points, the termination log) to host paths.

    The fake kubelet has no mount namespace: a container that was told to write
    to /data (a volume mount) must write to that volume's folder instead. Every
    occurrence of a mapped path in the command line and environment is replaced,
    the longest path first so /data/models wins over /data; a path only counts
    when it is not part of a longer path (``/database`` and ``/srv/data`` are
    not ``/data``), though ``file:///data`` is.
    """

    def __init__(self, mapping: Sequence[tuple[str, Path]]) -> None:
        self._targets = {container.rstrip("/"): host for container, host in mapping if container.rstrip("/")}
        ordered = sorted(self._targets, key=len, reverse=True)
        self._pattern = (
            re.compile(r"(?:(?<=://)|(?<![\w./-]))(" + "|".join(re.escape(p) for p in ordered) + r")(?![\w.-])")
            if ordered
            else None
        )

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: str(self._targets[m.group(1)]), text)
