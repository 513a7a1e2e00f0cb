"""The floor: the least any operator must do to turn FineTunes into Jobs, on the same machine, in the same run.

Why: the latency of a burst is shared between the operator and everything else on the cores (the API
server creating the FineTunes, the Jobs and their pods, etcd, the controller manager). This process is
what an operator that costs nothing would add: one watch of the namespace's FineTunes and, for each
new one, one POST of a Job prepared in advance (the Job kubetune created for the same manifest in
the run just before), from ``--workers`` threads on kept TLS connections straight to the API server
(no recording proxy between them). No validation, no status, no Events, no finalizer. Its
apply→Job latency is what the machine allows; kubetune's figure is read against it.

Run by ``bench/operator_scale.py --floor``; prints ``watching`` on stdout once its watch is open.
Usage: ``KUBE_TOKEN=... python -m bench.scale.floor --server URL --ca CA --namespace NS --job JOB.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import secrets
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import yaml
from kubernetes import client as k8s

from bench.scale.common import FINETUNE_LABEL, GROUP, PLURAL, ROOT, VERSION, percentiles
from bench.scale.jobs import JobWatch
from bench.scale.processes import process_cpu_s
from tests.cluster import Cluster


def job_template(job: dict[str, Any]) -> dict[str, Any]:
    """A Job as the API server returned it, back to what a client sends (no server-set fields)."""
    metadata = job["metadata"]
    spec = dict(job["spec"])
    spec.pop("selector", None)  # generated from the controller-uid label, which the server adds again
    template = dict(spec["template"])
    labels = {
        k: v
        for k, v in ((template.get("metadata") or {}).get("labels") or {}).items()
        if "controller-uid" not in k and "job-name" not in k
    }
    spec["template"] = {**template, "metadata": {**(template.get("metadata") or {}), "labels": labels}}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {k: metadata[k] for k in ("name", "labels", "annotations", "ownerReferences") if k in metadata},
        "spec": spec,
    }


def job_for(template: dict[str, Any], name: str, uid: str) -> dict[str, Any]:
    """The template, named and owned for one FineTune (what the bench's Job watch reads: the label)."""
    metadata = template["metadata"]
    owners = [{**ref, "name": name, "uid": uid} for ref in metadata.get("ownerReferences") or []]
    return {
        **template,
        "metadata": {
            **metadata,
            "name": f"{name}-train",
            "labels": {**(metadata.get("labels") or {}), FINETUNE_LABEL: name},
            "ownerReferences": owners,
        },
    }


class Floor:
    def __init__(self, server: str, token: str, ca: str, namespace: str, job: dict[str, Any], workers: int) -> None:
        url = urlsplit(server)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 443
        self.context = ssl.create_default_context(cafile=ca)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.namespace, self.template, self.workers = namespace, job_template(job), workers
        self.todo: queue.Queue[tuple[str, str]] = queue.Queue()

    def connect(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=60)

    def post_jobs(self) -> None:
        conn = self.connect()
        path = f"/apis/batch/v1/namespaces/{self.namespace}/jobs"
        while True:
            name, uid = self.todo.get()
            body = json.dumps(job_for(self.template, name, uid))
            conn.request("POST", path, body=body, headers=self.headers)
            answer = conn.getresponse()
            answer.read()
            if answer.status >= 300:
                print(f"POST job for {name}: {answer.status}", file=sys.stderr, flush=True)

    def watch(self) -> None:
        base = f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}"
        conn = self.connect()
        conn.request("GET", base, headers=self.headers)
        listed = json.loads(conn.getresponse().read())
        version = listed["metadata"]["resourceVersion"]
        conn.request("GET", f"{base}?watch=1&resourceVersion={version}", headers=self.headers)
        stream = conn.getresponse()
        print("watching", flush=True)
        for line in stream:
            event = json.loads(line)
            if event["type"] == "ADDED":
                metadata = event["object"]["metadata"]
                self.todo.put((metadata["name"], metadata["uid"]))

    def run(self) -> None:
        for i in range(self.workers):
            threading.Thread(target=self.post_jobs, daemon=True, name=f"post-{i}").start()
        self.watch()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--server", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--job", required=True, help="a JSON file: a Job as the API server returned it")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    job = json.loads(Path(args.job).read_text(encoding="utf-8"))
    Floor(args.server, os.environ["KUBE_TOKEN"], args.ca, args.namespace, job, args.workers).run()
    return 0


# ---------------------------------------------------------------------------------------------- the bench's side


def measure_floor(
    cluster: Cluster, api: k8s.ApiClient, size: int, job: dict[str, Any], args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """One burst of ``size`` FineTunes turned into Jobs by this module's process instead of the operator:
    the same creates, the same Job watch, the same CPU accounting as the operator's run of that size."""
    from bench.operator_scale import MANIFEST, cleanup_namespace, create_all, setup_namespace, wait_for_a_clean_cluster

    namespace = f"floor-{size}-{secrets.token_hex(3)}"
    workdir = workdir / namespace
    workdir.mkdir(parents=True)
    result: dict[str, Any] = {"size": size, "namespace": namespace}
    result["clean_start"] = wait_for_a_clean_cluster(api, args.cleanup_timeout)
    setup_namespace(api, namespace)
    (workdir / "job.json").write_text(json.dumps(job), encoding="utf-8")
    template = yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))
    command = [sys.executable, "-m", "bench.scale.floor", f"--server={cluster.server}",
               f"--ca={cluster.control_plane.ca_file}", f"--namespace={namespace}", f"--job={workdir / 'job.json'}",
               f"--workers={args.operator_workers or 8}"]  # fmt: skip
    env = {**os.environ, "KUBE_TOKEN": cluster.token}
    with (workdir / "floor.err").open("ab") as err:
        floor = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    watch = JobWatch(api, namespace)
    try:
        assert floor.stdout is not None
        if floor.stdout.readline().strip() != "watching":
            raise RuntimeError(f"the floor process did not start; see {workdir / 'floor.err'}")
        watch.start()
        watch.ready.wait(30)
        time.sleep(1.0)
        procs = {
            **{s.name: psutil.Process(s.popen.pid) for s in cluster.control_plane.services},
            "floor": psutil.Process(floor.pid),
            "bench": psutil.Process(),
        }
        cpu_before = {name: process_cpu_s(p) for name, p in procs.items()}
        t_apply = time.monotonic()
        created = create_all(api, namespace, template, size, args.create_concurrency)
        expected = size - sum(1 for c in created if c.error)
        complete = watch.wait_count(expected, args.timeout, lambda: floor.poll() is None)
        cpu_after = {name: process_cpu_s(p) for name, p in procs.items()}
        t_jobs = time.monotonic()
    finally:
        watch.stop()
        floor.kill()
        floor.wait()
    latencies, by_name = [], {(obj["metadata"].get("labels") or {}).get(FINETUNE_LABEL): t
                              for t, obj in watch.first_seen.values()}  # fmt: skip
    for c in created:
        if not c.error and c.name in by_name:
            latencies.append(by_name[c.name] - c.before)
    result["jobs"] = {"seen": len(watch.first_seen), "all_seen": complete, "window_s": round(t_jobs - t_apply, 2)}
    result["latency_s"] = {"from_create_start": percentiles(latencies)}
    result["cpu_s_up_to_jobs"] = {name: round(cpu_after[name] - cpu_before[name], 2) for name in procs}
    result["cleanup"] = cleanup_namespace(api, namespace, args.cleanup_timeout)
    return result


if __name__ == "__main__":
    sys.exit(main())
