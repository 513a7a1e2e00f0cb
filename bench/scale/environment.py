"""What the benchmark ran on: package versions, the machine."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from bench.scale.common import ROOT
from tests.cluster import Cluster

# ---------------------------------------------------------------------------------------------- environment


def versions(cluster: Cluster | None) -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("kubetune", "kopf", "kubernetes", "aiohttp", "psutil", "moto"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    git = ["git", "-C", str(ROOT)]
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out["git_commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        porcelain = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
        out["git_dirty"] = bool(porcelain.strip())
    if cluster is not None:
        with contextlib.suppress(Exception):
            server = json.loads(cluster.kubectl("version", "-o", "json").stdout).get("serverVersion", {})
            out["kube_apiserver"] = server.get("gitVersion")
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            etcd = subprocess.run(
                [str(cluster.bin_dir / "etcd"), "--version"], capture_output=True, text=True, check=True
            )
            out["etcd"] = etcd.stdout.splitlines()[0].split(":", 1)[-1].strip()
    return out


def machine() -> dict[str, Any]:
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "platform": platform.platform(),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
