"""The real test node's costs: start-up, pod start latency, idle CPU. Prints one JSON object.

    python bench/node_startup.py [--pods 5] [--idle-seconds 30]

- ``cluster_start_s``: ``Cluster.start(node="real")`` wall time, from nothing to
  a Ready node with CoreDNS serving (control plane, containerd, image imports,
  kubelet, kube-proxy, scheduler included), and the same for the fake kubelet
  (``fake_cluster_start_s``), measured in the same run for comparison.
- ``pod_running_s``: ``kubectl apply`` of a one-container pod (the busybox tool
  image) → phase Running, per pod, started one after the other.
- ``idle_cpu_percent_of_one_core``: CPU used by each component (and all of them)
  over ``--idle-seconds`` with nothing to do but CoreDNS and the pods' sleep,
  from /proc/<pid>/stat; containers' processes are counted under ``pods``.
Needs root (a real node).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kubernetes import client as k8s

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cluster import Cluster
from tests.cluster.node import TOOLS_IMAGE

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its waited-for children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / TICKS


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(proc.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def shim_pids(socket: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and str(socket).encode() in cmdline:
                pids.append(int(proc.name))
    return pids


def pod_manifest(name: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {"name": "main", "image": TOOLS_IMAGE, "imagePullPolicy": "Never", "command": ["sleep", "600"]}
                ],
            },
        }
    )


def measure_pods(cluster: Cluster, count: int) -> list[float]:
    latencies = []
    with cluster.api_client() as api:
        core = k8s.CoreV1Api(api)
        for i in range(count):
            began = time.monotonic()
            cluster.kubectl("apply", "-f", "-", input=pod_manifest(f"bench-{i}"), namespace="default")
            while core.read_namespaced_pod(f"bench-{i}", "default").status.phase != "Running":
                time.sleep(0.05)
            latencies.append(round(time.monotonic() - began, 2))
    return latencies


def measure_idle(cluster: Cluster, seconds: float) -> dict[str, float]:
    assert cluster.node is not None
    groups: dict[str, list[int]] = {s.name: [s.popen.pid] for s in cluster.control_plane.services}
    groups.update({s.name: [s.popen.pid] for s in cluster.node.services})
    groups["s3"] = [cluster.s3.service.popen.pid]
    shims = shim_pids(cluster.node.paths.socket)
    groups["pods"] = shims + [d for shim in shims for d in descendants(shim)]

    def sample() -> dict[str, float]:
        totals = {}
        for name, pids in groups.items():
            total = 0.0
            for pid in pids:
                try:
                    total += cpu_seconds(pid)
                except OSError:
                    continue
            totals[name] = total
        return totals

    before = sample()
    time.sleep(seconds)
    after = sample()
    usage = {name: round(100 * (after[name] - before[name]) / seconds, 2) for name in groups}
    usage["all"] = round(sum(usage.values()), 2)
    return usage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pods", type=int, default=5)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    args = parser.parse_args()
    result: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-node-") as tmp:
        began = time.monotonic()
        fake = Cluster.start(Path(tmp) / "fake", node="fake")
        result["fake_cluster_start_s"] = round(time.monotonic() - began, 2)
        fake.stop()
        began = time.monotonic()
        cluster = Cluster.start(Path(tmp) / "real", node="real")
        result["cluster_start_s"] = round(time.monotonic() - began, 2)
        try:
            result["pod_running_s"] = measure_pods(cluster, args.pods)
            result["pod_running_median_s"] = statistics.median(result["pod_running_s"])  # type: ignore[arg-type]
            time.sleep(5)  # let the start-up work settle
            result["idle_seconds"] = args.idle_seconds
            result["idle_cpu_percent_of_one_core"] = measure_idle(cluster, args.idle_seconds)
        finally:
            began = time.monotonic()
            cluster.stop()
            result["cluster_stop_s"] = round(time.monotonic() - began, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
