"""Small pieces every part of the scale benchmark uses: logging, ports, percentiles, waiting, API clients."""

from __future__ import annotations

import math
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from tests.cluster import Cluster

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunes"
FINETUNE_LABEL = "kubetune.io/finetune"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CATEGORIES = ("finetunes", "finetunes/status", "jobs", "configmaps", "secrets", "events", "pods", "other")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentiles(values: Iterable[float]) -> dict[str, float | int | None]:
    """Nearest-rank p50/p95/p99, max and mean of ``values``, rounded to the millisecond."""
    data = sorted(values)
    if not data:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}

    def rank(p: float) -> float:
        return data[max(0, math.ceil(p / 100 * len(data)) - 1)]

    return {
        "n": len(data),
        "p50": round(rank(50), 3),
        "p95": round(rank(95), 3),
        "p99": round(rank(99), 3),
        "max": round(data[-1], 3),
        "mean": round(sum(data) / len(data), 3),
    }


def parse_ts(value: str) -> float:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def api_client(cluster: Cluster, pool: int) -> k8s.ApiClient:
    """An admin client whose connection pool holds ``pool`` connections (the default is 5 per CPU)."""
    cfg = k8s.Configuration()
    k8s_config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=cfg)  # type: ignore[no-untyped-call]
    cfg.connection_pool_maxsize = pool
    return k8s.ApiClient(cfg)


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> float:
    """Poll ``check``; the seconds it took. Raise TimeoutError after ``timeout``."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - began


@dataclass
class Created:
    """One FineTune create call, timed on the monotonic clock."""

    name: str
    before: float
    after: float
    wall_before: float
    creation_timestamp: str | None = None
    error: str | None = None
