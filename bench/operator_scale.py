"""Operator scale: how fast and how frugally the kubetune operator turns a burst of FineTunes into Jobs.

Why: a platform team submits FineTunes in bursts (a sweep, a nightly batch of
tenants). What a user feels is the time from ``create`` to a training Job
existing; what the API server feels is how many requests the operator spends
per FineTune to get there. Both are measured here against a real control plane
(the test cluster of ``tests/cluster``: etcd, kube-apiserver and the
controller manager, a loopback S3), with the operator as its own process,
exactly as ``kubetune operator`` runs in a pod. The Job controller creates the
trainer pods, but they are not run: on a real cluster kubelets run on the GPU
nodes, not on the cores the API server and the operator share here
(``--run-pods`` keeps the fake kubelet, which runs each pod as a no-op process).

What one run does, per size N (``--sizes 100,500``), each in a fresh namespace
and with a fresh operator process:

1. start the operator with its kubeconfig pointing at a counting reverse proxy
   (``bench/_proxy.py``: plain HTTP on 127.0.0.1 to the operator, verified TLS
   to the API server, responses streamed chunk by chunk so watches are live),
   and wait for its ``/healthz`` and for its FineTune and Job watches;
2. create the N FineTunes (``docs/examples/finetune-support-router.yaml``,
   named ``ft-0001``...) "at once": concurrent creates through the API from a
   thread pool (``--create-concurrency``), each timed on the monotonic clock
   just before and just after its call;
3. watch Jobs in the namespace and take the arrival time of each Job's ADDED
   event; the latency of a FineTune is that arrival minus its create call;
4. sample the operator's RSS (with children) every 0.2 s, and the CPU time of
   every process of the setup;
5. after the last Job, keep watching for ``--settle`` seconds (requests that
   follow Job creation: status mirroring, events), then stop the operator,
   strip the FineTunes' finalizers (nobody is left to remove them), delete
   the namespace.

How to read the output (one JSON document on stdout; progress on stderr):

- ``runs[].latency_s.from_create_start`` is the conservative latency (the
  object may have been committed up to the create call's duration later);
  ``from_create_end`` is the optimistic one. The 1 s resolution server
  timestamps are given as a cross-check only. The targets use the
  conservative figure.
- ``runs[].requests.up_to_jobs`` counts the operator's requests from its
  start until the moment the last Job was seen; ``writes_per_finetune`` is
  POST+PUT+PATCH+DELETE of that window divided by N. ``startup`` and
  ``settle`` are the windows before the first create and after the last Job.
  ``by_category`` classifies by resource path (``finetunes/status`` is the
  status subresource; ``other`` is discovery, CRDs and the like).
- ``runs[].per_finetune`` attributes writes to the FineTune named in their
  path or body: ``writes_up_to_own_job`` (each object's writes until its own
  Job appeared), ``writes_per_finetune_by_purpose`` (what each write set,
  e.g. ``metadata.finalizers``, ``status.phase``, an Event's reason; ``-> 4xx``
  marks refused ones) and ``create_to_job_breakdown_s``: create → the
  operator's first write about the object (waiting to be picked up), → the
  Job POST's response (handling), → the Job's watch event (delivery).
- ``runs[].cpu_s_up_to_jobs`` tells where this machine's CPU went between
  the first create and the last Job (the operator competes with the API
  server, etcd and the controller manager; with ``--run-pods``, the fake kubelet's pods);
  ``not_this_benchmark_cpu_s`` is CPU used by anything else on the machine
  (a busy machine makes every latency longer: compare before concluding).
- ``targets`` says pass/fail against the goals, per size: apply→Job p99
  ≤ 0.5 s at 100 and ≤ 8 s at 1000; create → the operator's first write p99
  ≤ 0.3 s at 100; operator CPU ≤ 4 ms per FineTune from create to Job and
  ≤ 25% of the API server's for the same burst; ≤ 3 writes per FineTune up to
  Job-created; no refused request; peak RSS ≤ 150 MiB at 1000, growing
  ≤ 40 KiB per FineTune between the smallest and the largest size.
- ``steady`` (with ``--steady N``): N FineTunes running, their trainers
  writing progress.json every ``--progress-interval`` seconds; operator CPU,
  API requests and writes per second, storage GETs per second, per 100
  active FineTunes (goals: ≤ 0.2 API writes/s and ≤ 1% of a core).
- ``runs[].operator.rss_mib_before_burst`` / ``rss_mib_after_settle``: the
  operator idle, and once the burst is over (what stays is kept, not transient).
- ``runs[].profile`` (with ``--profile``): where the operator's CPU went, by
  function (``bench/scale/profile.py``).
- ``runs[].floor`` (with ``--floor``): the same burst once more, in a fresh
  namespace, with ``bench/scale/floor.py`` in place of the operator: one
  watch and one POST of a ready Job per FineTune, straight to the API server.
  Its apply→Job latency is what the machine allows whatever the operator
  does; ``targets`` shows it beside each latency goal (``floor``).

Usage: ``.venv/bin/python bench/operator_scale.py [--sizes 100,1000] [--steady 1000] [--settle 10] [--keep]
[--profile] [--floor]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import secrets
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kubernetes import client as k8s  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from bench.scale.common import (  # noqa: E402
    FINETUNE_LABEL,
    GROUP,
    PLURAL,
    VERSION,
    Created,
    api_client,
    log,
    parse_ts,
    percentiles,
    wait_for,
)
from bench.scale.environment import machine, versions  # noqa: E402
from bench.scale.floor import measure_floor  # noqa: E402
from bench.scale.jobs import JobWatch  # noqa: E402
from bench.scale.processes import (  # noqa: E402
    OperatorProcess,
    ProxyProcess,
    RssSampler,
    process_cpu_s,
    tree_cpu_s,
)
from bench.scale.profile import summarize as summarize_profile  # noqa: E402
from bench.scale.requests import operator_log_summary, per_finetune, scrape_metrics, summarize_requests  # noqa: E402
from bench.scale.steady import run_steady  # noqa: E402
from tests.cluster import Cluster  # noqa: E402
from tests.cluster.faults import cluster_kubeconfig  # noqa: E402
from tests.cluster.procs import stop_all  # noqa: E402

MANIFEST = ROOT / "docs" / "examples" / "finetune-support-router.yaml"
TARGET_JOB_P99_S = {100: 0.5, 1000: 8.0}
TARGET_PICKUP_P99_S = 0.3
TARGET_CPU_MS = 4.0
TARGET_CPU_SHARE = 0.25
TARGET_WRITES_PER_FINETUNE = 3.0
TARGET_RSS_MIB = 150.0
TARGET_RSS_GROWTH_KIB = 40.0
# Fake credentials: the loopback S3 accepts any key.
ACCESS_KEY, SECRET_KEY = "AKIAKUBETUNEBENCH001", "kubetune-bench-secret"


# ---------------------------------------------------------------------------------------------- one size


@dataclass
class SizeRun:
    size: int
    namespace: str
    workdir: Path
    result: dict[str, Any] = field(default_factory=dict)


def finetune_body(template: dict[str, Any], name: str, namespace: str) -> dict[str, Any]:
    body = copy.deepcopy(template)
    body["metadata"] = {"name": name, "namespace": namespace}
    return body


def create_all(
    api: k8s.ApiClient, namespace: str, template: dict[str, Any], size: int, concurrency: int
) -> list[Created]:
    custom = k8s.CustomObjectsApi(api)

    def create(i: int) -> Created:
        name = f"ft-{i:04d}"
        body = finetune_body(template, name, namespace)
        wall = time.time()
        before = time.monotonic()
        try:
            obj = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        except ApiException as e:
            return Created(name, before, time.monotonic(), wall, error=f"{e.status} {e.reason}")
        after = time.monotonic()
        return Created(name, before, after, wall, creation_timestamp=obj["metadata"]["creationTimestamp"])

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="create") as pool:
        return list(pool.map(create, range(1, size + 1)))


def setup_namespace(api: k8s.ApiClient, namespace: str) -> None:
    core = k8s.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": namespace}})
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-credentials"},
            "stringData": {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY},
        },
    )
    wait_for(lambda: bool(core.list_namespaced_service_account(namespace).items), 60, f"ServiceAccount in {namespace}")


def cleanup_namespace(api: k8s.ApiClient, namespace: str, timeout: float) -> dict[str, Any]:
    """Strip finalizers (the operator is stopped), delete the namespace, wait (bounded) for it to go."""
    began = time.monotonic()
    custom, core = k8s.CustomObjectsApi(api), k8s.CoreV1Api(api)
    items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]

    def strip(name: str) -> None:
        with contextlib.suppress(ApiException):
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, {"metadata": {"finalizers": None}}
            )

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(strip, [i["metadata"]["name"] for i in items if i["metadata"].get("finalizers")]))
    core.delete_namespace(namespace)

    def gone() -> bool:
        try:
            core.read_namespace(namespace)
        except ApiException as e:
            return e.status == 404
        return False

    try:
        wait_for(gone, timeout, f"namespace {namespace} to be deleted", interval=1.0)
        deleted = True
    except TimeoutError:
        deleted = False
    return {"seconds": round(time.monotonic() - began, 1), "namespace_gone": deleted}


def wait_for_a_clean_cluster(api: k8s.ApiClient, timeout: float) -> dict[str, Any]:
    """Wait until no FineTune of an earlier run is left (a deleted namespace goes slowly at 1000 objects).

    A fresh operator watches the whole cluster: leftovers would be reconciled, and written to, inside
    the next measurement. Returns the wait and what was still there when it gave up (0: clean)."""
    custom = k8s.CustomObjectsApi(api)
    began = time.monotonic()

    def left(limit: int | None = None) -> int:
        kwargs = {} if limit is None else {"limit": limit}
        return len(custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kwargs)["items"])

    with contextlib.suppress(TimeoutError):
        # While waiting, one object answers the question; the full count only for the report.
        wait_for(lambda: left(limit=1) == 0, timeout, "the FineTunes of earlier runs to be gone", interval=2.0)
    return {"waited_s": round(time.monotonic() - began, 1), "finetunes_left": left()}


def run_size(
    cluster: Cluster, api: k8s.ApiClient, size: int, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    namespace = f"bench-{size}-{secrets.token_hex(3)}"
    workdir = workdir / namespace
    workdir.mkdir(parents=True)
    template = yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))
    result: dict[str, Any] = {"size": size, "namespace": namespace}
    result["clean_start"] = wait_for_a_clean_cluster(api, args.cleanup_timeout)
    setup_namespace(api, namespace)

    proxy = ProxyProcess.start(cluster, workdir)
    kubeconfig = workdir / "operator.kubeconfig"
    cluster_kubeconfig(kubeconfig, f"http://127.0.0.1:{proxy.port}", cluster.token)
    operator: OperatorProcess | None = None
    sampler: RssSampler | None = None
    watch = JobWatch(api, namespace)
    try:
        t_start = time.monotonic()
        profile = workdir / "operator.pstat" if args.profile else None
        operator = OperatorProcess.start(cluster, workdir, kubeconfig, operator_args(args), profile=profile)
        sampler = RssSampler(operator.popen.pid)
        sampler.start()
        result["operator_healthy_after_s"] = round(wait_for(operator.healthy, 60, "the operator's /healthz", 0.1), 2)

        def watching() -> bool:
            operator.healthy()  # raises if it died
            seen = {r["c"] for r in proxy.requests() if r["w"]}
            return {"finetunes", "jobs"} <= seen

        wait_for(watching, 30, "the operator's FineTune and Job watches", 0.1)
        result["operator_watching_after_s"] = round(time.monotonic() - t_start, 2)

        watch.start()
        watch.ready.wait(30)
        time.sleep(1.0)  # let startup requests settle, so the startup window is the operator's alone

        procs = {
            **{s.name: psutil.Process(s.popen.pid) for s in cluster.control_plane.services},
            **({"fake-kubelet (+pods)": psutil.Process(cluster.kubelet.popen.pid)} if args.run_pods else {}),
            "s3": psutil.Process(cluster.s3.service.popen.pid),
            "operator": psutil.Process(operator.popen.pid),
            "proxy": psutil.Process(proxy.popen.pid),
            "bench": psutil.Process(),
        }
        cpu_of = dict.fromkeys(procs, tree_cpu_s)
        cpu_of["bench"] = process_cpu_s  # its children are everything else
        cpu_before = {name: cpu_of[name](p) for name, p in procs.items()}
        machine_before = psutil.cpu_times()

        log(f"N={size}: creating {size} FineTunes in {namespace} ({args.create_concurrency} concurrent creates)")
        sampler.start_of_burst()
        t_apply = time.monotonic()
        created = create_all(api, namespace, template, size, args.create_concurrency)
        t_applied = time.monotonic()
        failed = [c for c in created if c.error]
        all_jobs = watch.wait_count(size - len(failed), args.timeout, lambda: operator.popen.poll() is None)
        t_jobs = time.monotonic()
        sampler.mark()
        cpu_after = {name: cpu_of[name](p) for name, p in procs.items()}
        machine_after = psutil.cpu_times()
        operator_alive = operator.popen.poll() is None

        seen = dict(watch.first_seen)
        if seen:
            result["_job"] = next(iter(seen.values()))[1]  # for --floor, which posts the same Job; not printed
        by_finetune = {(obj["metadata"].get("labels") or {}).get(FINETUNE_LABEL): (t, obj) for t, obj in seen.values()}
        last_job = max((t for t, _ in seen.values()), default=t_jobs)
        window_end = last_job if all_jobs else t_jobs
        log(
            f"N={size}: {len(seen)}/{size} Jobs after {window_end - t_apply:.1f}s"
            + ("" if all_jobs else f" (timed out after {args.timeout:.0f}s)")
        )

        if args.settle > 0 and operator_alive:
            time.sleep(args.settle)
        t_settled = time.monotonic()
        sampler.sample()
        settled_rss = sampler.last
        custom = k8s.CustomObjectsApi(api)
        phases = Counter(
            (item.get("status") or {}).get("phase", "<none>")
            for item in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        )
        result["operator_metrics"] = scrape_metrics(operator.metrics_port)
    finally:
        watch.stop()
        exit_code = operator.stop() if operator is not None else None
        if profile is not None and profile.exists():
            result["profile"] = summarize_profile(profile)
        if sampler is not None:
            sampler.stop()
        proxy.stop()

    # ------------------------------------------------------------------ results
    upper, lower, server = [], [], []
    missing = []
    for c in created:
        if c.error:
            continue
        hit = by_finetune.get(c.name)
        if hit is None:
            missing.append(c.name)
            continue
        t_seen, job = hit
        upper.append(t_seen - c.before)
        lower.append(t_seen - c.after)
        if c.creation_timestamp and job["metadata"].get("creationTimestamp"):
            server.append(parse_ts(job["metadata"]["creationTimestamp"]) - parse_ts(c.creation_timestamp))
    requests = proxy.requests()
    result["apply"] = {
        "method": f"concurrent creates through the API (CustomObjectsApi, {args.create_concurrency} threads)",
        "wall_s": round(t_applied - t_apply, 3),
        "create_call_s": percentiles(c.after - c.before for c in created),
        "errors": dict(Counter(c.error for c in failed if c.error)),
    }
    result["jobs"] = {
        "seen": len(seen),
        "expected": size - len(failed),
        "missing": len(missing),
        "missing_examples": missing[:10],
        "all_seen": all_jobs,
        "first_after_create_start_s": round(min((t for t, _ in seen.values()), default=t_apply) - t_apply, 3),
        "last_after_create_start_s": round(window_end - t_apply, 3),
        "jobs_per_s": round(len(seen) / max(window_end - t_apply, 1e-9), 1),
        "watch_events": dict(watch.events),
        "watch_restarts": watch.restarts,
        "watch_error": watch.error,
    }
    result["latency_s"] = {
        "from_create_start": percentiles(upper),
        "from_create_end": percentiles(lower),
        "server_timestamps_1s_resolution": percentiles(server),
    }
    result["requests"] = {
        "up_to_jobs": summarize_requests([r for r in requests if r["t"] <= window_end], size),
        "startup": summarize_requests([r for r in requests if r["t"] < t_apply], size),
        "create_to_jobs": summarize_requests([r for r in requests if t_apply <= r["t"] <= window_end], size),
        "settle": {
            "seconds": round(t_settled - window_end, 1),
            **summarize_requests([r for r in requests if window_end < r["t"] <= t_settled], size),
        },
    }
    job_seen = {name: t for name, (t, _) in by_finetune.items() if name}
    result["per_finetune"] = {
        "note": (
            "writes attributed by the object named in the path or body; whole run up to the end of the "
            "settle window (purposes), or up to the FineTune's own Job (writes_up_to_own_job)"
        ),
        **per_finetune([r for r in requests if r["t"] <= t_settled], created, job_seen, size),
    }
    busy = sum(
        getattr(machine_after, f) - getattr(machine_before, f) for f in ("user", "system", "nice", "irq", "softirq")
    )
    span = t_jobs - t_apply
    ours = sum(cpu_after[name] - cpu_before[name] for name in procs)
    result["cpu_s_up_to_jobs"] = {
        "window_s": round(span, 2),
        "machine_busy_fraction": round(busy / max(span * (os.cpu_count() or 1), 1e-9), 3),
        "machine_busy_cpu_s": round(busy, 2),
        "not_this_benchmark_cpu_s": round(max(0.0, busy - ours), 2),
        "by_process": {
            name: round(cpu_after[name] - cpu_before[name], 2)
            for name in sorted(procs, key=lambda n: cpu_before[n] - cpu_after[n])
        },
    }
    result["operator"] = {
        "peak_rss_mib": round((sampler.peak if sampler else 0) / 2**20, 1),
        "peak_rss_mib_up_to_jobs": round((sampler.marked_peak or 0) / 2**20, 1),
        "rss_mib_before_burst": round((sampler.before_burst or 0) / 2**20, 1) if sampler else None,
        "rss_mib_after_settle": round(settled_rss / 2**20, 1),
        "rss_samples": sampler.samples if sampler else 0,
        "exit_code": exit_code,
        "alive_at_last_job": operator_alive,
        "log": operator_log_summary(operator.log() if operator else ""),
    }
    result["finetune_phases_after_settle"] = dict(phases)
    result["cleanup"] = cleanup_namespace(api, namespace, args.cleanup_timeout)
    return result


def operator_args(args: argparse.Namespace) -> list[str]:
    extra = ["--log-level", args.operator_log_level]
    if args.operator_workers is not None:
        extra += ["--workers", str(args.operator_workers)]
    return extra


def _target(value: float | None, limit: float, measured: bool = True) -> dict[str, Any]:
    return {"value": value, "limit": limit, "pass": bool(measured and value is not None and value <= limit)}


def targets(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pass/fail against the scale goals, for the sizes that were run (100 and 1000 carry latency goals)."""
    out: dict[str, Any] = {}
    for run in runs:
        size, complete = run["size"], run["jobs"]["all_seen"]
        p99 = run["latency_s"]["from_create_start"]["p99"] if complete else None
        goals: dict[str, Any] = {}
        if size in TARGET_JOB_P99_S:
            goals["apply_to_job_p99_s"] = _target(p99, TARGET_JOB_P99_S[size])
            if "floor" in run:
                goals["apply_to_job_p99_s"]["floor"] = run["floor"]["latency_s"]["from_create_start"]["p99"]
        if size == 100:
            pickup = run["per_finetune"]["create_to_job_breakdown_s"]["create_end_to_first_operator_write"]["p99"]
            goals["create_to_first_write_p99_s"] = _target(pickup, TARGET_PICKUP_P99_S)
        operator_cpu = run["cpu_s_up_to_jobs"]["by_process"].get("operator", 0.0)
        apiserver_cpu = run["cpu_s_up_to_jobs"]["by_process"].get("kube-apiserver", 0.0)
        goals["operator_cpu_ms_per_finetune"] = _target(round(1000 * operator_cpu / size, 2), TARGET_CPU_MS)
        goals["operator_cpu_share_of_apiserver"] = _target(
            round(operator_cpu / apiserver_cpu, 3) if apiserver_cpu else None, TARGET_CPU_SHARE
        )
        goals["writes_per_finetune_up_to_job"] = _target(
            run["requests"]["up_to_jobs"]["writes_per_finetune"], TARGET_WRITES_PER_FINETUNE, complete
        )
        refused = sum(v for k, v in run["per_finetune"]["writes_per_finetune_by_purpose"].items() if " -> " in k)
        goals["refused_requests"] = _target(refused, 0)
        if size >= 1000:
            goals["peak_rss_mib"] = _target(run["operator"]["peak_rss_mib"], TARGET_RSS_MIB)
        out[str(size)] = goals
    growth = rss_growth_kib_per_finetune(runs)
    if growth is not None:
        out["rss_growth_kib_per_finetune"] = _target(growth, TARGET_RSS_GROWTH_KIB)
    return out


def rss_growth_kib_per_finetune(runs: list[dict[str, Any]]) -> float | None:
    """Peak RSS growth between the smallest and the largest size, per FineTune added."""
    if len(runs) < 2:
        return None
    small, large = min(runs, key=lambda r: r["size"]), max(runs, key=lambda r: r["size"])
    added = large["size"] - small["size"]
    delta = large["operator"]["peak_rss_mib"] - small["operator"]["peak_rss_mib"]
    return round(delta * 1024 / added, 1) if added else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="100,500", help="comma-separated numbers of FineTunes (default 100,500)")
    parser.add_argument("--create-concurrency", type=int, default=32, help="concurrent create calls (default 32)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds to wait for all Jobs of one size")
    parser.add_argument("--settle", type=float, default=10, help="seconds to keep counting after the last Job")
    parser.add_argument(
        "--cleanup-timeout", type=float, default=900, help="seconds to wait for a run's namespace to go (default 900)"
    )
    parser.add_argument("--operator-log-level", default="INFO", help="the operator's --log-level (default INFO)")
    parser.add_argument(
        "--operator-workers", type=int, help="the operator's --workers (default: not passed, its own default)"
    )
    parser.add_argument(
        "--run-pods",
        action="store_true",
        help="keep the fake kubelet, which runs every trainer pod as a no-op process on this machine's cores "
        "(default: pods are created by the Job controller but not run)",
    )
    parser.add_argument(
        "--steady",
        type=int,
        default=0,
        help="also measure the steady state with this many running FineTunes (see bench/scale/steady.py)",
    )
    parser.add_argument("--steady-seconds", type=float, default=120, help="the steady-state measuring window")
    parser.add_argument("--progress-interval", type=float, default=10, help="simulated trainers' progress interval")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="after each size, the same burst with bench/scale/floor.py in place of the operator (one watch, "
        "one POST per FineTune): the latency the machine allows, read beside the operator's",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the operator under yappi (CPU clock, every thread; see bench/scale/profile.py): its "
        "pstats file in the working folder, the top functions in the JSON; latencies of such a run mean "
        "nothing; implies --keep",
    )
    parser.add_argument("--workdir", help="where the cluster and logs go (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs) afterwards")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.keep = args.keep or args.profile

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kubetune-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "operator_scale",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {
            "sizes": sizes,
            "manifest": str(MANIFEST.relative_to(ROOT)),
            "apply": "concurrent creates through the API server (kubernetes CustomObjectsApi from a thread pool)",
            "create_concurrency": args.create_concurrency,
            "timeout_s": args.timeout,
            "settle_s": args.settle,
            "operator": "python -m kubetune.cli operator, cluster-wide, one fresh process per size",
            "operator_args": operator_args(args),
            "operator_env": {
                "KUBETUNE_TRAINER_COMMAND": "true",
                "KUBETUNE_DEFAULT_OUTPUT_URI": "s3://adapters/",
                "KUBETUNE_DEFAULT_STORAGE_SECRET": "s3-credentials",
            },
            "trainer_pods": "run as no-op processes by the fake kubelet"
            if args.run_pods
            else "created by the Job controller, not run (no kubelet)",
            "api_path": "operator -> counting proxy (plain HTTP, 127.0.0.1) -> kube-apiserver (TLS)",
        },
        "machine": machine(),
        "workdir": str(workdir) if args.keep else None,
        "runs": [],
    }
    cluster: Cluster | None = None
    error: BaseException | None = None
    began = time.monotonic()
    try:
        log(f"starting the test cluster in {workdir}")
        cluster = Cluster.start(workdir / "cluster")
        report["cluster_start_s"] = round(time.monotonic() - began, 1)
        report["versions"] = versions(cluster)
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(ROOT / "crds"))
        cluster.s3.create_bucket("adapters")
        # Right after a CRD is Established its storage may still answer 429 ("storage is (re)initializing"):
        # wait that out here, so that the first operator's start-up is not charged with it.
        with api_client(cluster, pool=4) as api:
            custom = k8s.CustomObjectsApi(api)

            def listable() -> bool:
                try:
                    for plural in ("finetunes", "finetunetemplates", "adapterdeployments"):
                        custom.list_cluster_custom_object(GROUP, VERSION, plural, limit=1)
                except ApiException:
                    return False
                return True

            wait_for(listable, 60, "kubetune objects to be listable", interval=0.5)
        if not args.run_pods:
            # Trainer pods are not run: the Job controller still creates them, but with no kubelet
            # they stay Pending. On a real cluster kubelets run on the GPU nodes, not on the cores
            # the API server and the operator share here.
            stop_all([cluster.kubelet])
        with api_client(cluster, pool=max(8, args.create_concurrency + 4)) as api:
            for size in sizes:
                run = run_size(cluster, api, size, args, workdir)
                report["runs"].append(run)
                cluster.control_plane.ensure_running()
                job = run.pop("_job", None)
                if args.floor and job is not None:
                    log(f"N={size}: the floor (bench/scale/floor.py) in place of the operator")
                    run["floor"] = measure_floor(cluster, api, size, job, args, workdir)
                if args.run_pods:
                    cluster.kubelet.ensure_running()
            if args.steady:
                report["steady"] = run_steady(cluster, api, args, workdir)
    except BaseException as e:
        error = e
        report["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        if cluster is not None:
            log("stopping the test cluster")
            cluster.stop()
        report["targets"] = targets(report["runs"])
        report["total_s"] = round(time.monotonic() - began, 1)
        print(json.dumps(report, indent=2))
        if not args.keep and error is None:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
