"""Steady state: what hundreds of running FineTunes cost the operator, the API server and the store.

``bench/operator_scale.py --steady N`` creates N FineTunes whose Jobs stay
active (their pods are never run: no kubelet, so each Job has one Pending pod,
which the Job controller counts as active) and plays their trainers: every
``--progress-interval`` seconds each run's ``progress.json`` is rewritten in S3
with the step moving on, as a real trainer does. After a warm-up, it measures
for ``--steady-seconds``:

- the operator's CPU (per cent of one core) and peak RSS;
- its API requests per second (reads, writes) through the counting proxy;
- its storage GETs per second (through a counting proxy in front of S3);
- each figure per 100 active FineTunes, against the targets.

The simulated trainers run long jobs (a million steps), so the percentage
moves rarely: what is measured is the cost of watching, not of news.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import yaml
from kubernetes import client as k8s

from bench.scale.common import GROUP, PLURAL, VERSION, WRITE_METHODS, log, wait_for
from bench.scale.jobs import JobWatch
from bench.scale.processes import OperatorProcess, ProxyProcess, RssSampler, tree_cpu_s
from bench.scale.profile import summarize as summarize_profile
from tests.cluster import Cluster
from tests.cluster.faults import FaultProxy, cluster_kubeconfig

TARGET_WRITES_PER_S_PER_100 = 0.2
TARGET_CORE_PERCENT_PER_100 = 1.0
TOTAL_STEPS = 1_000_000


class Trainers(threading.Thread):
    """Plays the trainers of running FineTunes: rewrites each run's progress.json every ``interval`` seconds."""

    def __init__(self, cluster: Cluster, runs: list[str], interval: float) -> None:
        super().__init__(name="trainers", daemon=True)
        self.client = cluster.s3.client()
        self.runs, self.interval = runs, interval
        self.stop_event = threading.Event()
        self.writes = 0
        self.errors = 0

    def write(self, key: str, step: int) -> None:
        doc = {"stage": "train", "step": step, "total_steps": TOTAL_STEPS, "percent": 100 * step // TOTAL_STEPS,
               "epoch": step / TOTAL_STEPS, "loss": 2.0 - step * 1e-7, "tokens_per_second": 5000.0,
               "eta_seconds": (TOTAL_STEPS - step) * 0.1, "message": "training",
               "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        try:
            self.client.put_object(Bucket="adapters", Key=key, Body=json.dumps(doc).encode())
            self.writes += 1
        except Exception:
            self.errors += 1

    def run(self) -> None:
        step = 0
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="trainer") as pool:
            while not self.stop_event.is_set():
                began = time.monotonic()
                step += 100
                # Spread the writes over the interval, as independent trainers would.
                gap = self.interval / max(len(self.runs), 1)
                for i, key in enumerate(self.runs):
                    if self.stop_event.wait(max(0.0, began + i * gap - time.monotonic())):
                        return
                    pool.submit(self.write, key, step)
                self.stop_event.wait(max(0.0, began + self.interval - time.monotonic()))


def run_steady(cluster: Cluster, api: k8s.ApiClient, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One steady-state measurement with ``args.steady`` running FineTunes (see the module's docstring)."""
    from bench.operator_scale import MANIFEST, create_all, operator_args, setup_namespace, wait_for_a_clean_cluster

    size = args.steady
    clean_start = wait_for_a_clean_cluster(api, args.cleanup_timeout)
    namespace = f"steady-{size}-{secrets.token_hex(3)}"
    workdir = workdir / namespace
    workdir.mkdir(parents=True)
    setup_namespace(api, namespace)
    template = yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))
    proxy = ProxyProcess.start(cluster, workdir)
    kubeconfig = cluster_kubeconfig(workdir / "operator.kubeconfig", f"http://127.0.0.1:{proxy.port}", cluster.token)
    store = FaultProxy(cluster.s3.endpoint_url, host=cluster.s3.host).start()  # counts the operator's GETs
    profile = workdir / "operator.pstat" if args.profile else None
    operator = OperatorProcess.start(
        cluster, workdir, kubeconfig, operator_args(args), store=store.url, profile=profile
    )
    sampler = RssSampler(operator.popen.pid)
    sampler.start()
    watch = JobWatch(api, namespace)
    trainers: Trainers | None = None
    try:
        wait_for(operator.healthy, 60, "the operator's /healthz", 0.1)
        watch.start()
        watch.ready.wait(30)
        log(f"steady: creating {size} FineTunes in {namespace}")
        created = create_all(api, namespace, template, size, args.create_concurrency)
        watch.wait_count(size, args.timeout, lambda: operator.popen.poll() is None)
        pods_running(api, namespace, size, args.timeout)
        custom = k8s.CustomObjectsApi(api)
        items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        runs = [f"{namespace}/{i['metadata']['name']}/{i['metadata']['uid']}/progress.json" for i in items]
        trainers = Trainers(cluster, runs, args.progress_interval)
        trainers.start()
        all_training(custom, namespace, size, args.timeout)
        warm = args.progress_interval * 4
        log(f"steady: {len(runs)} running; warming up {warm:.0f}s, then measuring {args.steady_seconds:.0f}s")
        time.sleep(warm)
        if profile is not None:
            os.kill(operator.popen.pid, signal.SIGUSR1)  # the profile covers the measured window only
        window = measure(operator, proxy, store, sampler, args.steady_seconds)
        phases = [((i.get("status") or {}).get("phase")) for i in
                  custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]]  # fmt: skip
        window["phases"] = {p: phases.count(p) for p in set(phases)}
        window["trainer_progress_writes"] = trainers.writes
        window["created"] = len([c for c in created if not c.error])
        result = {
            "size": size,
            "namespace": namespace,
            "clean_start": clean_start,
            **window,
            "targets": steady_targets(window, size, clean_start["finetunes_left"]),
        }
    finally:
        if trainers is not None:
            trainers.stop_event.set()
        watch.stop()
        operator.stop()
        sampler.stop()
        proxy.stop()
        store.stop()
    if profile is not None and profile.exists():
        result["profile"] = summarize_profile(profile)
    return result


def all_training(custom: k8s.CustomObjectsApi, namespace: str, size: int, timeout: float) -> None:
    """Wait until every FineTune says Training: each one's transition (a status write and an Event) is
    burst work, so the measured window starts after the last of them."""

    def training() -> bool:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        return sum((i.get("status") or {}).get("phase") == "Training" for i in items) >= size

    wait_for(training, timeout, f"{size} FineTunes Training", 2.0)
    log(f"steady: {size} FineTunes Training")


def pods_running(api: k8s.ApiClient, namespace: str, size: int, timeout: float) -> None:
    """Play the kubelet: every trainer pod Running and Ready (nothing runs; no kubelet overwrites it), then
    wait until the Job controller counts them ready, so the measured window has only steady work in it."""
    core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
    wait_for(lambda: len(core.list_namespaced_pod(namespace).items) >= size, timeout, f"{size} trainer pods", 1.0)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = {
        "phase": "Running",
        "startTime": now,
        "conditions": [{"type": t, "status": "True", "lastTransitionTime": now}
                       for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
        "containerStatuses": [{"name": "trainer", "ready": True, "restartCount": 0, "image": "trainer",
                               "imageID": "", "started": True, "state": {"running": {"startedAt": now}}}],
    }  # fmt: skip

    def ready(name: str) -> None:
        core.patch_namespaced_pod_status(name, namespace, {"status": status})

    names = [p.metadata.name for p in core.list_namespaced_pod(namespace).items]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(ready, names))

    def counted() -> bool:
        return sum(int(j.status.ready or 0) for j in batch.list_namespaced_job(namespace).items) >= size

    wait_for(counted, timeout, "the Job controller to count the pods ready", 2.0)
    log(f"steady: {size} trainer pods running and ready")


def measure(
    operator: OperatorProcess, proxy: ProxyProcess, store: FaultProxy, sampler: RssSampler, seconds: float
) -> dict[str, Any]:
    process = psutil.Process(operator.popen.pid)
    cpu_before, gets_before = tree_cpu_s(process), store.forwarded
    began = time.monotonic()
    time.sleep(seconds)
    ended = time.monotonic()
    cpu = tree_cpu_s(process) - cpu_before
    gets = store.forwarded - gets_before
    requests = [r for r in proxy.requests() if began <= r["t"] <= ended and not r["w"]]
    writes = [r for r in requests if r["m"] in WRITE_METHODS]
    span = ended - began
    return {
        "window_s": round(span, 1),
        "operator_cpu_s": round(cpu, 2),
        "operator_core_percent": round(100 * cpu / span, 2),
        "operator_peak_rss_mib": round(sampler.peak / 2**20, 1),
        "api_requests_per_s": round(len(requests) / span, 2),
        "api_writes_per_s": round(len(writes) / span, 3),
        "api_writes_by_resource": {c: sum(1 for r in writes if r["c"] == c) for c in {r["c"] for r in writes}},
        "storage_gets_per_s": round(gets / span, 2),
    }


def steady_targets(window: dict[str, Any], size: int, left_over: int = 0) -> dict[str, Any]:
    """Pass/fail per 100 active FineTunes; nothing passes when an earlier run's FineTunes were still there
    (the operator would have been measured reconciling them)."""
    per100 = 100 / max(size, 1)
    writes = window["api_writes_per_s"] * per100
    core = window["operator_core_percent"] * per100
    clean = left_over == 0
    return {
        "clean_start": {"value": left_over, "limit": 0, "pass": clean},
        "api_writes_per_s_per_100_active": {
            "value": round(writes, 3),
            "limit": TARGET_WRITES_PER_S_PER_100,
            "pass": clean and writes <= TARGET_WRITES_PER_S_PER_100,
        },
        "operator_core_percent_per_100_active": {
            "value": round(core, 3),
            "limit": TARGET_CORE_PERCENT_PER_100,
            "pass": clean and core <= TARGET_CORE_PERCENT_PER_100,
        },
        "api_requests_per_s_per_100_active": round(window["api_requests_per_s"] * per100, 3),
        "storage_gets_per_s_per_100_active": round(window["storage_gets_per_s"] * per100, 3),
    }
