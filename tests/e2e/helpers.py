"""What the end-to-end tests share: waiting, applying and reading objects, the operator process, credentials.

Test modules import from here, never from each other, so any one of them (or any
one test) runs on its own.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import urllib3
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from kubetune.builders.security import restricted_container, restricted_pod
from kubetune.controllers.kube import Kube
from kubetune.controllers.operator import API_TIMEOUT
from kubetune.controllers.transport import ApiTransport
from kubetune_trainer import storage
from tests.cluster import Cluster, KubectlError, images
from tests.conftest import RESTRICTED, ROOT

EXAMPLE = ROOT / "docs" / "examples" / "finetune-support-router.yaml"
T = TypeVar("T")

# Short polls, so tests wait seconds rather than minutes: the operator's settings for the suite.
FAST_SETTINGS = {
    "KUBETUNE_STATUS_INTERVAL_SECONDS": "1",
    "KUBETUNE_PROGRESS_INTERVAL_SECONDS": "0.5",
    "KUBETUNE_ROLLOUT_INTERVAL_SECONDS": "1",
}


@functools.cache
def image_refs() -> dict[str, str]:
    """The references of the images `make images` builds (``operator``, ``trainer``), as images.sh names them."""
    return images.refs()


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 240, interval: float = 0.25) -> T:
    """Poll ``probe`` until it returns something truthy (returned); fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# What a test's trainer pod asks of the node: the example's memory, but a quarter of a core
# rather than one. The node has this machine's 2 cores, so the FineTunes one test starts
# together run side by side instead of queueing for the scheduler; a multi-node FineTune's pods
# must all fit at once. No CPU limit is set, and the request gives each trainer one torch thread
# (OMP_NUM_THREADS), so two trainings side by side use a core each instead of spinning four
# threads on two cores.
TEST_CPU = "250m"


def raw(response: Any) -> dict[str, Any]:
    """The JSON of a client call made with ``_preload_content=False``: plain dicts, as kubectl shows them."""
    result: dict[str, Any] = json.loads(response.data)
    return result


def example(name: str, **spec_changes: Any) -> dict[str, Any]:
    """The docs' support-router FineTune, renamed, with ``spec_changes`` merged into its sections."""
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["resources"]["cpu"] = TEST_CPU
    for key, value in spec_changes.items():
        if isinstance(value, dict) and isinstance(doc["spec"].get(key), dict):
            doc["spec"][key] = {**doc["spec"][key], **value}
        else:
            doc["spec"][key] = value
    return doc


def quick(name: str, **spec_changes: Any) -> dict[str, Any]:
    """The example cut to what a test of the machinery (not of the model) needs: one epoch, eight eval
    examples, no baselines, a gate any adapter passes. ``spec_changes`` are merged in as in ``example``."""
    training = {"epochs": 1, **spec_changes.pop("training", {})}
    doc = example(name, training=training, **spec_changes)
    doc["spec"]["evaluation"] = {
        "maxNewTokens": 8,
        "maxExamples": 8,
        "baselines": {"base": False, "prompted": {"enabled": False}},
        "gates": [{"metric": "exact_match", "min": "0"}],
    }
    return doc


@dataclass
class WatchedRun:
    """A FineTune whose ``status.progress.step`` is sampled, from its creation to its end, by a thread."""

    ns: str
    name: str
    steps: set[int] = field(default_factory=set)
    done: threading.Event = field(default_factory=threading.Event)
    # Where the sampled steps are written once it ended, for another worker's ``follow`` (lanes.py).
    record: Path | None = None

    def watch(self, cluster: Cluster, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                st = status(cluster, self.ns, self.name)
                if (st.get("progress") or {}).get("step") is not None:
                    self.steps.add(st["progress"]["step"])
                if st.get("phase") in ("Succeeded", "Failed"):
                    break
                time.sleep(0.2)
        finally:
            if self.record is not None:  # whole or not at all: the follower polls for it
                partial = self.record.with_suffix(".partial")
                partial.write_text(json.dumps(sorted(self.steps)))
                partial.replace(self.record)
            self.done.set()

    def start(self, cluster: Cluster) -> WatchedRun:
        threading.Thread(target=self.watch, args=(cluster,), name=f"watch-{self.name}", daemon=True).start()
        return self

    def follow(self, record: Path, timeout: float = 900) -> WatchedRun:
        """The run another worker watches: its steps and end come from the file it records them in."""

        def wait() -> None:
            deadline = time.monotonic() + timeout
            try:
                while not record.exists() and time.monotonic() < deadline:
                    time.sleep(0.5)
                if record.exists():
                    self.steps.update(json.loads(record.read_text()))
            finally:
                self.done.set()

        threading.Thread(target=wait, name=f"follow-{self.name}", daemon=True).start()
        return self

    def finished(self, cluster: Cluster, timeout: float = 900) -> dict[str, Any]:
        """Its status once it ended (Succeeded or Failed)."""
        assert self.done.wait(timeout=timeout), f"FineTune {self.ns}/{self.name} never finished"
        return status(cluster, self.ns, self.name)


def adapter_deployment(
    name: str, adapter: dict[str, Any], *, served: str | None = None, deadline: int = 90
) -> dict[str, Any]:
    """An AdapterDeployment on the tiny base model, served by the reference server (one replica, a canary)."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny-llama/"},
            "adapter": adapter,
            "servedModelName": served or name,
            "runtime": {"type": "kubetune", "replicas": 1},
            "rollout": {"strategy": "Canary", "canary": {"replicas": 1}, "progressDeadlineSeconds": deadline},
        },
    }


def apply(cluster: Cluster, namespace: str, *docs: dict[str, Any]) -> None:
    """``kubectl apply`` of one or more objects, as a user would."""
    # JSON, not YAML: PyYAML writes "3e-3" unquoted, and kubectl reads that back as a number.
    payload = docs[0] if len(docs) == 1 else {"apiVersion": "v1", "kind": "List", "items": list(docs)}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(payload))


# The kinds tests read while they wait, by the names they use: (API prefix, plural).
_RESOURCES: dict[str, tuple[str, str]] = {
    **dict.fromkeys(("finetune", "finetunes", "ft"), ("/apis/kubetune.io/v1alpha1", "finetunes")),
    **dict.fromkeys(("adapterdeployment", "adapterdeployments", "adep"), ("/apis/kubetune.io/v1alpha1",
                                                                          "adapterdeployments")),
    **dict.fromkeys(("job", "jobs"), ("/apis/batch/v1", "jobs")),
    **dict.fromkeys(("deployment", "deployments"), ("/apis/apps/v1", "deployments")),
    **dict.fromkeys(("lease", "leases"), ("/apis/coordination.k8s.io/v1", "leases")),
    **{kind: ("/api/v1", plural) for kind, plural in (
        ("pod", "pods"), ("pods", "pods"), ("service", "services"), ("services", "services"),
        ("serviceaccount", "serviceaccounts"), ("pvc", "persistentvolumeclaims"),
        ("configmap", "configmaps"), ("secret", "secrets"),
    )},
}  # fmt: skip
_READERS: dict[str, Kube] = {}


def reader(cluster: Cluster) -> Kube:
    """One kept API connection per cluster for the tests' polling reads.

    A ``kubectl get`` costs ~0.08 s of CPU (a process start); a test waiting on it every
    0.25 s kept a third of a core busy on a 2-core machine that the pods under test need.
    """
    key = str(cluster.kubeconfig)
    if key not in _READERS:
        configuration = k8s.Configuration()
        k8s_config.load_kube_config(config_file=key, client_configuration=configuration)  # type: ignore[no-untyped-call]
        _READERS[key] = Kube(ApiTransport(configuration, API_TIMEOUT))  # every poll ends
    return _READERS[key]


def get(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    """The object as ``kubectl get -o json`` shows it; None when it is not there or the API does not answer."""
    if kind not in _RESOURCES:
        result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None
    prefix, plural = _RESOURCES[kind]
    try:
        return reader(cluster)._get(f"{prefix}/namespaces/{namespace}/{plural}/{name}")
    except (ApiException, urllib3.exceptions.HTTPError):  # a restarting API server: the next poll tries again
        return None


def list_items(cluster: Cluster, namespace: str, kind: str, label_selector: str | None = None) -> list[dict[str, Any]]:
    """The objects of ``kind`` in ``namespace`` (matching ``label_selector``), as ``kubectl get -o json`` lists them."""
    prefix, plural = _RESOURCES[kind]
    query = [("labelSelector", label_selector)] if label_selector else None
    found: dict[str, Any] = reader(cluster).request("GET", f"{prefix}/namespaces/{namespace}/{plural}", query=query)
    items: list[dict[str, Any]] = found["items"]
    return items


def status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    obj = get(cluster, namespace, "finetune", name) or {}
    found: dict[str, Any] = obj.get("status") or {}
    return found


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == type_), {})


def phase_in(cluster: Cluster, namespace: str, name: str, *phases: str) -> Callable[[], dict[str, Any] | None]:
    def probe() -> dict[str, Any] | None:
        st = status(cluster, namespace, name)
        return st if st.get("phase") in phases else None

    return probe


def jobs(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    return list_items(cluster, namespace, "jobs")


def pods(cluster: Cluster, namespace: str, job: str) -> list[dict[str, Any]]:
    return list_items(cluster, namespace, "pods", f"batch.kubernetes.io/job-name={job}")


def running_pod(cluster: Cluster, namespace: str, job: str) -> str | None:
    for pod in pods(cluster, namespace, job):
        if pod["status"].get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp"):
            return str(pod["metadata"]["name"])
    return None


def create_tenant(cluster: Cluster, prefix: str) -> str:
    """A namespace (restricted Pod Security) with the storage credentials Secret the operator's defaults name.

    For module-scoped fixtures; tests take the ``tenant`` fixture. Named ``<prefix>-<random>``.
    """
    name = f"{prefix[:50].rstrip('-')}-{secrets.token_hex(3)}"
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": RESTRICTED}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(ns))
    wait_for("the default ServiceAccount", lambda: get(cluster, name, "serviceaccount", "default"), timeout=30)
    cluster.kubectl(
        "create", "secret", "generic", "s3-credentials", "-n", name,
        f"--from-literal=AWS_ACCESS_KEY_ID={ACCESS_KEY}", f"--from-literal=AWS_SECRET_ACCESS_KEY={SECRET_KEY}",
    )  # fmt: skip
    return name


def delete_namespace(cluster: Cluster, name: str) -> None:
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def run_pod(
    cluster: Cluster, namespace: str, name: str, image: str, command: Sequence[str], timeout: float = 180
) -> str:
    """Run ``command`` in a restricted pod of ``image`` (one the node has) to its end; its ``kubectl logs``.

    Fails the test, with the log, when the command fails.
    """
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": restricted_pod(65532),
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": list(command),
                    "securityContext": restricted_container(),
                }
            ],
        },
    }
    apply(cluster, namespace, pod)

    def ended() -> str | None:
        phase = ((get(cluster, namespace, "pod", name) or {}).get("status") or {}).get("phase")
        return str(phase) if phase in ("Succeeded", "Failed") else None

    phase = wait_for(f"pod {name} to finish", ended, timeout=timeout)
    log = cluster.pod_log(namespace, name, "main")
    assert phase == "Succeeded", f"pod {name} failed:\n{log}"
    cluster.kubectl("delete", "pod", name, "-n", namespace, "--wait=false")
    return log


def s3_settings(cluster: Cluster) -> storage.S3Settings:
    return storage.S3Settings(
        endpoint=cluster.s3.endpoint_url, region=cluster.s3.region, access_key=ACCESS_KEY, secret_key=SECRET_KEY
    )


# Distinctive credentials: the leak test greps ConfigMaps, status, events and logs for them.
# (The loopback S3 server accepts any key.)
ACCESS_KEY = "AKIAKUBETUNETEST0001"
SECRET_KEY = "kt-secret-never-to-be-seen-9f3a7c"


RUNNING: list[Operator] = []


class Operator:
    """The operator the tests talk to: started, stopped, restarted (crashed), its log and metrics.

    :class:`ChartOperator` is the operator as users run it (``helm install`` of the chart,
    a pod on the node); :class:`HostOperator` is ``kubetune operator`` as a process on
    this machine, for tests that must control its connections (fault proxies) or run
    several replicas side by side.
    """

    def start(self) -> None:
        raise NotImplementedError

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        """A crash: killed with SIGKILL, then running (and healthy) again."""
        raise NotImplementedError

    def log(self) -> str:
        """Everything the operator wrote since it was first started (every restart included)."""
        raise NotImplementedError

    def metrics(self) -> str:
        """The Prometheus text of its /metrics endpoint."""
        raise NotImplementedError


class HostOperator(Operator):
    """``kubetune operator`` as a subprocess against the test cluster; restartable mid-test."""

    def __init__(
        self, cluster: Cluster, workdir: Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None
    ) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.args = list(args)
        self.extra_env = dict(env or {})
        self.log_path = workdir / "operator.log"
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ["PATH"],
            "HOME": str(self.workdir),
            "KUBECONFIG": str(self.cluster.kubeconfig),
            "KUBETUNE_DEFAULT_STORAGE_ENDPOINT": self.cluster.s3.endpoint_url,
            "KUBETUNE_DEFAULT_STORAGE_SECRET": "s3-credentials",
            "KUBETUNE_DEFAULT_OUTPUT_URI": "s3://adapters/",
            # The fake kubelet runs commands on this machine and ignores images.
            "KUBETUNE_TRAINER_IMAGE": image_refs()["trainer"] if self.cluster.node else "kubetune-trainer:test",
            **FAST_SETTINGS,
            "KUBETUNE_METRICS_PORT": str(self.metrics_port),
            "KUBETUNE_HEALTH_PORT": str(self.health_port),
            **self.extra_env,
        }

    def start(self) -> None:
        log = self.log_path.open("ab")
        RUNNING.append(self)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune.cli", "operator", "--log-level", "INFO", *self.args],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the operator never became healthy:\n{self.log()[-4000:]}") from None
                time.sleep(0.2)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self in RUNNING:
            RUNNING.remove(self)
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop(signal.SIGKILL)
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())


class ChartOperator(Operator):
    """The operator installed with the chart (``helm install``): its image, ServiceAccount and RBAC, one pod.

    ``stop``/``start`` scale the Deployment to 0 and back; ``restart`` kills the container
    through the CRI (as a crash would) and waits for the kubelet to restart it. Logs come
    from ``kubectl logs``, saved before a container or pod goes so that ``log`` has them all.
    """

    RELEASE = "kubetune"
    NAMESPACE = "kubetune-system"
    SERVICE_ACCOUNT = "kubetune"
    DEPLOYMENT = "kubetune"
    CONTAINER = "operator"

    def __init__(self, cluster: Cluster, workdir: Path, operator_image: str, values: Mapping[str, Any]) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.operator_image = operator_image
        self.values = dict(values)
        self.saved = workdir / "operator-earlier.log"
        self.installed = False

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.cluster.bin_dir / "helm"), f"--kubeconfig={self.cluster.kubeconfig}", *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def install(self) -> None:
        """``helm install`` into a namespace that enforces the restricted Pod Security profile."""
        ns = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": self.NAMESPACE, "labels": RESTRICTED},
        }
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(ns))
        repository, tag = self.operator_image.rsplit(":", 1)
        values = {"image": {"repository": repository, "tag": tag, "pullPolicy": "Never"}, **self.values}
        values_file = self.workdir / "values.json"
        values_file.write_text(json.dumps(values, indent=2))
        self.helm("install", self.RELEASE, str(ROOT / "charts/kubetune"), "--namespace", self.NAMESPACE,
                  "--values", str(values_file), "--wait", "--timeout=180s")  # fmt: skip
        self.installed = True
        RUNNING.append(self)

    def install_once(self) -> dict[str, Any]:
        """``install`` for ``lanes.once`` (what the other workers need to know: nothing)."""
        self.install()
        return {}

    def attach(self) -> None:
        """Use the release another worker installed (stop, start and restart act on it all the same)."""
        if self not in RUNNING:
            RUNNING.append(self)

    def uninstall(self) -> None:
        if self.installed:
            self._save_logs()
            self.helm("uninstall", self.RELEASE, "--namespace", self.NAMESPACE, "--wait", "--timeout=120s")
            self.installed = False
        if self in RUNNING:
            RUNNING.remove(self)

    def _pods(self) -> list[dict[str, Any]]:
        """The release's pods, those being deleted included."""
        return list_items(self.cluster, self.NAMESPACE, "pods", f"app.kubernetes.io/instance={self.RELEASE}")

    def pod(self) -> dict[str, Any] | None:
        """The operator's pod (not one being deleted), or None when scaled to 0."""
        found = [p for p in self._pods() if not p["metadata"].get("deletionTimestamp")]
        return found[0] if found else None

    def _scale(self, replicas: int) -> None:
        self.cluster.kubectl("scale", f"deployment/{self.DEPLOYMENT}", f"--replicas={replicas}", "-n", self.NAMESPACE)

    def start(self) -> None:
        if self not in RUNNING:
            RUNNING.append(self)
        self._scale(1)
        self.cluster.kubectl("rollout", "status", f"deployment/{self.DEPLOYMENT}", "-n", self.NAMESPACE,
                             "--timeout=120s")  # fmt: skip

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Scale to 0 and wait until no operator pod is left (SIGKILL: killed first, through the CRI)."""
        if self in RUNNING:
            RUNNING.remove(self)
        pod = self.pod()
        if pod is not None and sig == signal.SIGKILL:
            self._kill(pod)
        self._save_logs()
        self._scale(0)
        # Every pod gone, the terminating one too: until its container has exited, the operator
        # inside it may still be writing (kopf finishes the handlers under way on SIGTERM).
        wait_for("the operator pod to go", lambda: not self._pods() or None, timeout=90)

    def restart(self) -> None:
        pod = self.pod()
        assert pod is not None, "the operator is not running"
        restarts = _restart_count(pod)
        self._kill(pod)

        def running_again() -> bool:
            current = self.pod()
            return bool(current and _restart_count(current) > restarts and _ready(current))

        wait_for("the operator's container to be restarted and ready", running_again, timeout=120)
        self._append(self._logs(pod["metadata"]["name"], previous=True))

    def _kill(self, pod: dict[str, Any]) -> None:
        self.cluster.kill_container(self.NAMESPACE, pod["metadata"]["name"], self.CONTAINER)

    def _logs(self, pod: str, previous: bool = False) -> str:
        try:
            return self.cluster.pod_log(self.NAMESPACE, pod, self.CONTAINER, previous=previous)
        except KubectlError:
            return ""

    def _append(self, text: str) -> None:
        with self.saved.open("a") as f:
            f.write(text)

    def _save_logs(self) -> None:
        pod = self.pod()
        if pod is not None:
            self._append(self._logs(pod["metadata"]["name"]))

    def log(self) -> str:
        earlier = self.saved.read_text(errors="replace") if self.saved.exists() else ""
        pod = self.pod()
        return earlier + (self._logs(pod["metadata"]["name"]) if pod is not None else "")

    def metrics(self) -> str:
        pod = self.pod()
        assert pod is not None, "the operator is not running"
        port = self.values.get("metrics", {}).get("port", 8080)
        url = f"http://{pod['status']['podIP']}:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())


def _restart_count(pod: dict[str, Any]) -> int:
    return sum(int(c.get("restartCount") or 0) for c in pod["status"].get("containerStatuses") or [])


def _ready(pod: dict[str, Any]) -> bool:
    conditions = pod["status"].get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
