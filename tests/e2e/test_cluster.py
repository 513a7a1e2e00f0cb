"""The test cluster itself: real controllers acting on what the node reports.

Every later end-to-end test trusts this machinery (a Job completes, a failing
pod fails, a Deployment becomes available, a namespace can be deleted), so each
behaviour the operator relies on is proven here against the real API server
and the real Job, ReplicaSet, Deployment and namespace controllers — with the
real node's kubelet (pods of the operator image, restricted), and in the fast
lane (``KUBETUNE_TEST_NODE=fake``) with the fake kubelet, whose fidelity this
module is the measure of.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import textwrap
import urllib.request
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from kubetune.builders.security import restricted_container, restricted_pod
from tests.cluster import Cluster, KubectlError
from tests.e2e.helpers import apply, image_refs, raw, wait_for

# standalone: the cluster alone, no kubetune object (tests/e2e/lanes.py)
pytestmark = pytest.mark.standalone

T = TypeVar("T")
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> Iterator[k8s.ApiClient]:
    with cluster.api_client() as client:
        yield client


def pod(name: str, *containers: Obj, restart_policy: str = "Never", **spec: Any) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"team": "fine-tuning"}},
        "spec": {
            "restartPolicy": restart_policy,
            "terminationGracePeriodSeconds": 5,
            "securityContext": restricted_pod(65532),
            "containers": list(containers),
            **spec,
        },
    }


def python(name: str, code: str, **fields: Any) -> Obj:
    """A restricted container that runs a Python snippet with the operator image's Python."""
    return {
        "name": name,
        "image": image_refs()["operator"],
        "imagePullPolicy": "Never",
        "command": ["python", "-c", textwrap.dedent(code)],
        "securityContext": restricted_container(),
        **fields,
    }


def job(name: str, code: str, backoff_limit: int = 6) -> Obj:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": restricted_pod(65532),
                    "containers": [python("main", code)],
                }
            },
        },
    }


def read_pod(api: k8s.ApiClient, namespace: str, name: str) -> Obj:
    return raw(k8s.CoreV1Api(api).read_namespaced_pod(name, namespace, _preload_content=False))


def pods(api: k8s.ApiClient, namespace: str, selector: str) -> list[Obj]:
    items: list[Obj] = raw(
        k8s.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
    )["items"]
    return items


def phase_in(api: k8s.ApiClient, namespace: str, name: str, *phases: str) -> Obj | None:
    current = read_pod(api, namespace, name)
    return current if current["status"].get("phase") in phases else None


def job_condition(api: k8s.ApiClient, namespace: str, name: str, kind: str) -> Obj | None:
    status = raw(k8s.BatchV1Api(api).read_namespaced_job_status(name, namespace, _preload_content=False))["status"]
    return next((c for c in status.get("conditions", []) if c["type"] == kind and c["status"] == "True"), None)


def log_of(cluster: Cluster, namespace: str, name: str) -> str:
    """The pod's log, or "" while the kubelet has not started it."""
    try:
        return cluster.pod_log(namespace, name)
    except (FileNotFoundError, KubectlError):
        return ""


def container_status(current: Obj, name: str) -> Obj:
    return next(s for s in current["status"]["containerStatuses"] if s["name"] == name)


def test_job_completes_and_its_output_is_readable(cluster: Cluster, namespace: str, api: k8s.ApiClient) -> None:
    apply(cluster, namespace, job("hello", "print('hello from job')"))

    wait_for("Job hello to complete", lambda: job_condition(api, namespace, "hello", "Complete"), timeout=60)

    [finished] = pods(api, namespace, "job-name=hello")
    assert finished["status"]["phase"] == "Succeeded"
    assert container_status(finished, "main")["state"]["terminated"]["exitCode"] == 0
    assert cluster.pod_log(namespace, finished["metadata"]["name"]) == "hello from job\n"


def test_failing_job_is_retried_then_fails(cluster: Cluster, namespace: str, api: k8s.ApiClient) -> None:
    apply(cluster, namespace, job("doomed", "raise SystemExit(3)", backoff_limit=1))

    failed = wait_for("Job doomed to fail", lambda: job_condition(api, namespace, "doomed", "Failed"), timeout=60)

    assert failed["reason"] == "BackoffLimitExceeded"
    attempts = pods(api, namespace, "job-name=doomed")
    assert len(attempts) == 2
    for attempt in attempts:
        assert attempt["status"]["phase"] == "Failed"
        assert container_status(attempt, "main")["state"]["terminated"]["exitCode"] == 3


def test_termination_messages_reach_the_pod_status(cluster: Cluster, namespace: str, api: k8s.ApiClient) -> None:
    apply(
        cluster,
        namespace,
        pod(
            "reporter",
            python("file", "open('/dev/termination-log', 'w').write('adapter sha256:1234')"),
            python(
                "custom-path",
                "open('/run/result/message', 'w').write('custom path')",
                terminationMessagePath="/run/result/message",
            ),
            python(
                "from-logs",
                # Both lines on stderr: stdout and stderr are two pipes to the runtime's log, so a line on
                # each may reach the log in either order (it did, once in ~10 runs).
                "import sys; print('loading', file=sys.stderr, flush=True); sys.exit('boom: CUDA out of memory')",
                terminationMessagePolicy="FallbackToLogsOnError",
            ),
        ),
    )

    done = wait_for(
        "pod reporter to finish", lambda: phase_in(api, namespace, "reporter", "Succeeded", "Failed"), timeout=60
    )

    assert done["status"]["phase"] == "Failed"
    file = container_status(done, "file")["state"]["terminated"]
    assert (file["exitCode"], file["reason"], file["message"]) == (0, "Completed", "adapter sha256:1234")
    assert container_status(done, "custom-path")["state"]["terminated"]["message"] == "custom path"
    from_logs = container_status(done, "from-logs")["state"]["terminated"]
    assert (from_logs["exitCode"], from_logs["reason"]) == (1, "Error")
    assert from_logs["message"] == "loading\nboom: CUDA out of memory\n"


def test_env_and_config_volumes_reach_the_process(cluster: Cluster, namespace: str, api: k8s.ApiClient) -> None:
    settings = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings"},
        "data": {"greeting": "hello", "model.yaml": "base: tiny\n"},
    }
    credentials = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "creds"},
        "stringData": {"token": "s3cr3t"},
    }
    names = ["GREETING", "TOKEN", "POD_NAME", "POD_IP", "NODE", "TEAM", "ABSENT", "COMBINED", "ESCAPED", "CFG_greeting"]
    code = f"""
        import json, os, sys
        print(json.dumps({{
            "env": {{name: os.environ.get(name) for name in {names!r}}},
            "arg": sys.argv[1],
            "model": open("/etc/kubetune/model.yaml").read(),
            "nested": open("/etc/kubetune/extra/nested/hello.txt").read(),
        }}))
        """
    container = python(
        "main",
        code,
        args=["$(GREETING) world"],
        env=[
            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['team']"}}},
            {
                "name": "ABSENT",
                "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "nope", "optional": True}},
            },
            {"name": "COMBINED", "value": "$(GREETING)-$(POD_NAME)"},
            {"name": "ESCAPED", "value": "$$(GREETING)"},
        ],
        envFrom=[{"prefix": "CFG_", "configMapRef": {"name": "settings"}}],
        volumeMounts=[
            {"name": "config", "mountPath": "/etc/kubetune"},
            {"name": "extra", "mountPath": "/etc/kubetune/extra"},
        ],
    )
    volumes = [
        {"name": "config", "configMap": {"name": "settings"}},
        {
            "name": "extra",
            "configMap": {"name": "settings", "items": [{"key": "greeting", "path": "nested/hello.txt"}]},
        },
    ]
    apply(cluster, namespace, settings, credentials, pod("env-check", container, volumes=volumes))

    done = wait_for(
        "pod env-check to finish", lambda: phase_in(api, namespace, "env-check", "Succeeded", "Failed"), timeout=60
    )

    log = cluster.pod_log(namespace, "env-check")
    assert done["status"]["phase"] == "Succeeded", log
    seen = json.loads(log)
    assert seen["env"] == {
        "GREETING": "hello",
        "TOKEN": "s3cr3t",
        "POD_NAME": "env-check",
        "POD_IP": done["status"]["podIP"],
        "NODE": done["spec"]["nodeName"],
        "TEAM": "fine-tuning",
        "ABSENT": None,
        "COMBINED": "hello-env-check",
        "ESCAPED": "$(GREETING)",
        "CFG_greeting": "hello",
    }
    assert seen["arg"] == "hello world"
    assert seen["model"] == "base: tiny\n"
    assert seen["nested"] == "hello"


def test_init_containers_run_first_and_share_an_empty_dir(cluster: Cluster, namespace: str, api: k8s.ApiClient) -> None:
    mount = [{"name": "work", "mountPath": "/work"}]
    apply(
        cluster,
        namespace,
        pod(
            "staged",
            python("main", "print(open('/work/steps').read(), end='')", volumeMounts=mount),
            initContainers=[
                python("fetch", "open('/work/steps', 'a').write('fetch\\n')", volumeMounts=mount),
                python("prepare", "open('/work/steps', 'a').write('prepare\\n')", volumeMounts=mount),
            ],
            volumes=[{"name": "work", "emptyDir": {}}],
        ),
    )

    done = wait_for(
        "pod staged to finish", lambda: phase_in(api, namespace, "staged", "Succeeded", "Failed"), timeout=60
    )

    assert done["status"]["phase"] == "Succeeded"
    assert cluster.pod_log(namespace, "staged", "main") == "fetch\nprepare\n"


def test_deployment_with_readiness_probe_becomes_available(
    cluster: Cluster, namespace: str, api: k8s.ApiClient
) -> None:
    server = {
        **python("web", ""),
        "command": ["python", "-m", "http.server", "8080", "--bind", "$(POD_IP)"],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"securityContext": restricted_pod(65532), "containers": [server]},
            },
        },
    }
    apply(cluster, namespace, deployment)

    def available() -> Obj | None:
        status = raw(k8s.AppsV1Api(api).read_namespaced_deployment_status("web", namespace, _preload_content=False))[
            "status"
        ]
        conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
        return status if status.get("readyReplicas") == 2 and conditions.get("Available") == "True" else None

    wait_for("Deployment web to have 2 ready replicas", available, timeout=60)

    ips = {p["status"]["podIP"] for p in pods(api, namespace, "app=web")}
    assert len(ips) == 2
    for ip in ips:
        with urllib.request.urlopen(f"http://{ip}:8080/", timeout=5) as response:
            assert response.status == 200


def test_crash_looping_container_backs_off(cluster: Cluster, namespace: str, api: k8s.ApiClient) -> None:
    apply(cluster, namespace, pod("crasher", python("main", "raise SystemExit(1)"), restart_policy="Always"))

    def backing_off() -> Obj | None:
        current = read_pod(api, namespace, "crasher")
        if not current["status"].get("containerStatuses"):
            return None
        status = container_status(current, "main")
        waiting = status["state"].get("waiting", {})
        return status if status["restartCount"] >= 2 and waiting.get("reason") == "CrashLoopBackOff" else None

    # A real kubelet waits 10 s before the first restart and 20 s before the second.
    status = wait_for("pod crasher to be restarted twice and back off", backing_off, timeout=120)

    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert read_pod(api, namespace, "crasher")["status"]["phase"] == "Running"


def test_namespace_with_running_pod_is_deleted(cluster: Cluster, namespace: str, api: k8s.ApiClient) -> None:
    code = """
        import signal, sys, time
        def stop(*_):
            print("got SIGTERM", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("serving", flush=True)
        time.sleep(3600)
        """
    apply(cluster, namespace, pod("sleeper", python("main", code), restart_policy="Always"))
    wait_for("pod sleeper to run", lambda: "serving" in log_of(cluster, namespace, "sleeper"), timeout=60)
    core = k8s.CoreV1Api(api)
    # A real kubelet removes a deleted pod's log with it: follow the log until the container ends.
    follow = None
    if cluster.node is not None:
        argv = [str(cluster.bin_dir / "kubectl"), f"--kubeconfig={cluster.kubeconfig}", "logs", "-f", "sleeper"]
        follow = subprocess.Popen([*argv, "-n", namespace], stdout=subprocess.PIPE, text=True)
        assert follow.stdout is not None
        assert follow.stdout.readline() == "serving\n"

    core.delete_namespace(namespace)

    def gone() -> bool:
        try:
            core.read_namespace(namespace)
        except ApiException as e:
            return bool(e.status == 404)
        return False

    wait_for(f"namespace {namespace} to disappear", gone, timeout=60)
    if follow is not None:
        rest, _ = follow.communicate(timeout=30)
        assert rest == "got SIGTERM\n"
    else:
        assert cluster.pod_log(namespace, "sleeper").endswith("got SIGTERM\n")


def test_s3_round_trip(cluster: Cluster) -> None:
    bucket = f"adapters-{secrets.token_hex(4)}"
    cluster.s3.create_bucket(bucket)
    s3 = cluster.s3.client()

    s3.put_object(Bucket=bucket, Key="runs/1/adapter.safetensors", Body=b"weights")
    s3.put_object(Bucket=bucket, Key="runs/1/eval.json", Body=b"{}")

    assert s3.get_object(Bucket=bucket, Key="runs/1/adapter.safetensors")["Body"].read() == b"weights"
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="runs/1/")
    assert [o["Key"] for o in listed["Contents"]] == ["runs/1/adapter.safetensors", "runs/1/eval.json"]
