"""The real node: what the fake kubelet could never show, asserted from inside running pods.

kubelet + containerd + runc + CNI + kube-proxy + CoreDNS (``tests.cluster.node``)
against the test control plane with PodSecurity and
OwnerReferencesPermissionEnforcement admission. Pods run the node's busybox
tool image; what they print is read back with ``kubectl logs``. Each fact here
is one the operator's pods will depend on: the restricted security context is
enforced by the runtime, Services have endpoints and answer on their
ClusterIP, cluster DNS resolves a headless Service's pod names (torchrun's
rendezvous), a container killed through the CRI is seen by the kubelet, pods
reach the API server and S3 but nothing beyond the machine.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from tests.cluster import GPUS, NODE_NAME, Cluster, KubectlError
from tests.cluster.node import TOOLS_IMAGE
from tests.cluster.node.network import API_SERVICE_IP, NodeNetwork
from tests.conftest import ROOT
from tests.e2e.helpers import raw, wait_for

# standalone: the node alone, no kubetune object (tests/e2e/lanes.py); its GPU tests are exclusive
pytestmark = pytest.mark.standalone

Obj = dict[str, Any]

RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def sh(name: str, script: str, **fields: Any) -> Obj:
    """A restricted container of the tool image running a shell script."""
    return {
        "name": name,
        "image": TOOLS_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["/bin/sh", "-c", script],
        "securityContext": RESTRICTED_CONTAINER,
        **fields,
    }


def pod(name: str, *containers: Obj, restart_policy: str = "Never", labels: dict[str, str] | None = None,
        **spec: Any) -> Obj:  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "restartPolicy": restart_policy,
            # busybox as PID 1 ignores SIGTERM: without this, every deletion waits the whole grace period.
            "terminationGracePeriodSeconds": 1,
            "securityContext": RESTRICTED_POD,
            "containers": list(containers),
            **spec,
        },
    }


def apply(cluster: Cluster, namespace: str, *manifests: Obj) -> None:
    items = {"apiVersion": "v1", "kind": "List", "items": list(manifests)}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(items), namespace=namespace)


def read_pod(api: k8s.ApiClient, namespace: str, name: str) -> Obj:
    return raw(k8s.CoreV1Api(api).read_namespaced_pod(name, namespace, _preload_content=False))


def wait_phase(api: k8s.ApiClient, namespace: str, name: str, *phases: str, timeout: float = 60) -> Obj:
    def reached() -> Obj | None:
        current = read_pod(api, namespace, name)
        return current if current.get("status", {}).get("phase") in phases else None

    return wait_for(f"pod {namespace}/{name} to be {'/'.join(phases)}", reached, timeout=timeout)


def finished_log(cluster: Cluster, api: k8s.ApiClient, namespace: str, name: str) -> str:
    """Wait for the pod to succeed; its output, through the API server and the kubelet."""
    current = wait_phase(api, namespace, name, "Succeeded", "Failed")
    log = cluster.pod_log(namespace, name)
    assert current["status"]["phase"] == "Succeeded", f"pod {name} failed:\n{log}"
    return log


@pytest.fixture(scope="module")
def api(real_cluster: Cluster) -> Iterator[k8s.ApiClient]:
    with real_cluster.api_client() as client:
        yield client


@pytest.fixture
def restricted(real_cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace where Pod Security admission enforces the restricted profile."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    name = f"{slug[:40].rstrip('-')}-{secrets.token_hex(3)}"
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    with real_cluster.api_client() as client:
        core = k8s.CoreV1Api(client)
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name, labels=labels)))
        wait_for(
            f"the default ServiceAccount of {name}",
            lambda: core.list_namespaced_service_account(name, field_selector="metadata.name=default").items,
            timeout=30,
        )
        yield name
        core.delete_namespace(name, propagation_policy="Background")


def test_node_is_ready_with_its_runtime_and_gpus(real_cluster: Cluster, api: k8s.ApiClient) -> None:
    assert real_cluster.node is not None
    node = raw(k8s.CoreV1Api(api).read_node(NODE_NAME, _preload_content=False))
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert ready["Ready"] == "True"
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.34.4"
    assert info["containerRuntimeVersion"] == "containerd://2.4.2"
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == real_cluster.node.network.node_ip
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(GPUS)


def test_pod_security_admission_refuses_a_privileged_pod(real_cluster: Cluster, restricted: str) -> None:
    bad = pod("root", {"name": "main", "image": TOOLS_IMAGE, "command": ["true"]})
    bad["spec"]["securityContext"] = {}
    with pytest.raises(KubectlError) as refused:
        apply(real_cluster, restricted, bad)
    assert 'violates PodSecurity "restricted:latest"' in refused.value.stderr
    assert "runAsNonRoot" in refused.value.stderr


def test_restricted_pod_runs_unprivileged_as_seen_from_inside(
    real_cluster: Cluster, api: k8s.ApiClient, restricted: str
) -> None:
    script = """
        echo "uid=$(id -u) gid=$(id -g)"
        grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status
        if touch /written 2>/dev/null; then echo "root=writable"; else echo "root=read-only"; fi
        if touch /scratch/written; then echo "scratch=writable"; fi
    """
    apply(
        real_cluster,
        restricted,
        pod(
            "facts",
            sh("main", script, volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}]),
            volumes=[{"name": "scratch", "emptyDir": {}}],
        ),
    )
    log = finished_log(real_cluster, api, restricted, "facts")
    facts = dict(re.findall(r"^(\w+)[:=]\s*(\S+)", log, flags=re.MULTILINE))
    assert facts["uid"] == "65532", log
    assert "gid=65532" in log
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert facts[capabilities] == "0000000000000000", log
    assert facts["NoNewPrivs"] == "1", log
    assert facts["Seccomp"] == "2", log  # a seccomp filter is installed (RuntimeDefault)
    assert facts["root"] == "read-only", log
    assert facts["scratch"] == "writable", log


def test_service_cluster_ip_answers_from_another_pod(
    real_cluster: Cluster, api: k8s.ApiClient, restricted: str
) -> None:
    serve = """
        mkdir -p /tmp/www && echo "hello from $(hostname)" > /tmp/www/index.html
        exec httpd -f -p 8080 -h /tmp/www
    """
    server = sh(
        "httpd",
        serve,
        ports=[{"containerPort": 8080}],
        readinessProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 1},
        volumeMounts=[{"name": "tmp", "mountPath": "/tmp"}],
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    apply(
        real_cluster,
        restricted,
        pod("web", server, labels={"app": "web"}, volumes=[{"name": "tmp", "emptyDir": {}}]),
        service,
    )
    web = wait_phase(api, restricted, "web", "Running")
    discovery = k8s.DiscoveryV1Api(api)

    def ready_endpoint() -> list[str] | None:
        slices = discovery.list_namespaced_endpoint_slice(restricted, label_selector="kubernetes.io/service-name=web")
        return [
            address
            for piece in slices.items
            for endpoint in piece.endpoints or []
            if endpoint.conditions and endpoint.conditions.ready
            for address in endpoint.addresses
        ] or None

    assert wait_for("a ready endpoint of Service web", ready_endpoint) == [web["status"]["podIP"]]
    cluster_ip = k8s.CoreV1Api(api).read_namespaced_service("web", restricted).spec.cluster_ip
    assert ipaddress.ip_address(cluster_ip) in ipaddress.ip_network("10.0.0.0/24")
    # (busybox's own `wget -T` crashes when built static; `timeout` bounds it instead.)
    fetch = f"timeout 10 wget -q -O - http://{cluster_ip}/ && timeout 10 wget -q -O - http://web.{restricted}.svc/"
    apply(real_cluster, restricted, pod("client", sh("main", fetch)))
    log = finished_log(real_cluster, api, restricted, "client")
    assert log.splitlines() == ["hello from web", "hello from web"]


def test_cluster_dns_resolves_a_headless_services_pods(
    real_cluster: Cluster, api: k8s.ApiClient, restricted: str
) -> None:
    """torchrun's rendezvous: ``<hostname>.<subdomain>.<namespace>.svc`` of each rank through the headless Service."""
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "peers"},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"app": "ranks"},
            "ports": [{"port": 29500}],
        },
    }
    ranks = [
        pod(f"rank-{i}", sh("main", "exec sleep 600"), labels={"app": "ranks"}, hostname=f"rank-{i}", subdomain="peers")
        for i in range(2)
    ]
    apply(real_cluster, restricted, headless, *ranks)
    ips = [wait_phase(api, restricted, f"rank-{i}", "Running")["status"]["podIP"] for i in range(2)]
    # busybox's nslookup sends the name as given (no search path): the full name.
    lookups = " && ".join(f"nslookup rank-{i}.peers.{restricted}.svc.cluster.local" for i in range(2))
    apply(real_cluster, restricted, pod("resolver", sh("main", f"cat /etc/resolv.conf && {lookups}")))
    log = finished_log(real_cluster, api, restricted, "resolver")
    for i, ip in enumerate(ips):
        assert re.search(rf"Name:\s+rank-{i}\.peers\.{restricted}\.svc\.cluster\.local\s+Address:\s+{ip}\b", log), log


def test_container_killed_through_the_cri_is_restarted_by_the_kubelet(
    real_cluster: Cluster, api: k8s.ApiClient, restricted: str
) -> None:
    apply(real_cluster, restricted, pod("victim", sh("main", "echo started; exec sleep 600"), restart_policy="Always"))
    wait_phase(api, restricted, "victim", "Running")
    real_cluster.kill_container(restricted, "victim", "main")

    def restarted() -> Obj | None:
        statuses = read_pod(api, restricted, "victim")["status"].get("containerStatuses", [])
        # lastState can lag restartCount/ready by a status sync: wait for the whole report.
        again = statuses and statuses[0]["restartCount"] >= 1 and statuses[0]["ready"]
        return statuses[0] if again and statuses[0].get("lastState", {}).get("terminated") else None

    status = wait_for("the kubelet to restart the killed container", restarted)
    terminated = status["lastState"]["terminated"]
    assert terminated["exitCode"] == 137  # 128 + SIGKILL
    assert terminated["reason"] == "Error"
    assert real_cluster.pod_log(restricted, "victim", previous=True).strip() == "started"


def _machine_address() -> str:
    """An address of this machine outside the node's ranges (its default route's source, if it has one)."""
    routes = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True).stdout)
    for link in routes:
        for address in link.get("addr_info", []):
            ip = ipaddress.ip_address(address["local"])
            if not ip.is_loopback and not any(
                ip in ipaddress.ip_network(net) for net in ("10.250.0.0/16", "10.244.0.0/16", "10.0.0.0/24")
            ):
                return str(ip)
    pytest.fail("this machine has no address outside loopback and the node's ranges to test against")


def test_pods_reach_the_api_and_s3_but_nothing_off_the_node(
    real_cluster: Cluster, api: k8s.ApiClient, restricted: str
) -> None:
    """No default route in a pod: only the pod range, Services and the host's end of the node link.

    The address tried is one of this machine's own (so even a wrong answer sends nothing
    off the machine); the route lookup fails before any packet is sent.
    """
    outside = _machine_address()
    s3 = real_cluster.s3.endpoint_url
    script = f"""
        echo "routes:"; ip -4 route; echo "end"
        timeout 10 wget -q -O /dev/null http://{outside}:9/ 2>&1 && echo "outside=reached"
        timeout 10 wget -q -O /dev/null {s3}/moto-api/ && echo "s3=reached"
        timeout 10 wget -q -O - --no-check-certificate https://{API_SERVICE_IP}/livez && echo " api=reached"
    """
    apply(
        real_cluster,
        restricted,
        pod("probe", sh("main", script)),
    )
    log = finished_log(real_cluster, api, restricted, "probe")
    routes = log.split("routes:", 1)[1].split("end", 1)[0].split()
    assert "default" not in routes, log
    assert f"wget: can't connect to remote host ({outside}): Network is unreachable" in log, log
    assert "outside=reached" not in log, log
    assert "s3=reached" in log, log
    assert "ok api=reached" in log, log


@pytest.mark.exclusive  # the node's GPUs to itself
def test_gpu_requests_are_admitted_and_bound(real_cluster: Cluster, api: k8s.ApiClient, restricted: str) -> None:
    """No device plugin: the node advertises nvidia.com/gpu so GPU pods schedule (no device is given)."""
    gpu = {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}
    apply(real_cluster, restricted, pod("gpu", sh("main", "echo scheduled", resources=gpu)))
    current = wait_phase(api, restricted, "gpu", "Succeeded")
    assert current["spec"]["nodeName"] == NODE_NAME
    too_many = {"limits": {"nvidia.com/gpu": str(GPUS + 1)}, "requests": {"nvidia.com/gpu": str(GPUS + 1)}}
    apply(real_cluster, restricted, pod("greedy", sh("main", "true", resources=too_many)))

    def unschedulable() -> Obj | None:
        conditions = read_pod(api, restricted, "greedy").get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "PodScheduled" and c["status"] == "False"), None)

    assert "nvidia.com/gpu" in wait_for("the scheduler to refuse 9 GPUs", unschedulable)["message"]


def _shims_of(socket: Path) -> set[int]:
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"containerd-shim-runc-v2") and str(socket).encode() in cmdline:
                found.add(int(proc.name))
    return found


def test_a_node_killed_hard_is_cleaned_by_the_next_one(real_cluster: Cluster, tmp_path: Path) -> None:
    """Two nodes side by side, and no leftovers after a SIGKILL: the next node on that index cleans them first.

    The killed node's supervisor gets no chance to clean: its kubelet and containerd die with it
    (parent-death signal), but the shims, the CoreDNS container, the mounts and the network namespace stay.
    """
    assert real_cluster.node is not None
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "tests.cluster", "up", "--workdir", str(tmp_path / "killed")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert supervisor.stdout is not None
        output = ""
        while "Ctrl-C stops everything" not in output:
            line = supervisor.stdout.readline()
            assert line, f"the cluster did not start:\n{output}"
            output += line
    finally:
        supervisor.kill()
        supervisor.wait()
    index = int(re.search(r"network namespace: kubetune-(\d+)", output).group(1))  # type: ignore[union-attr]
    assert index != real_cluster.node.network.index  # it ran beside the module's node
    left = NodeNetwork(index)
    socket = left.run_dir / "containerd.sock"
    wait_for("the killed node's kubelet, containerd and control plane to die", lambda: not _processes_of(str(tmp_path)))
    shims = _shims_of(socket)
    assert shims, "no shim outlived its node: nothing to clean, nothing proven"
    assert left.netns_path.exists()

    successor = Cluster.start(tmp_path / "successor", node="real")
    try:
        assert successor.node is not None
        assert successor.node.network.index == index
        assert not shims & _shims_of(socket), "the killed node's shims are still running"
        assert not any(
            str(tmp_path / "killed") in line for line in Path("/proc/self/mountinfo").read_text().splitlines()
        )
        with successor.api_client() as api:
            wait_phase(api, "kube-system", _coredns_pod(api), "Running")
    finally:
        successor.stop()
    assert not left.netns_path.exists()
    assert not left.run_dir.exists()
    assert not _shims_of(socket)


def _processes_of(workdir: str) -> list[int]:
    """The processes whose command line names ``workdir`` (all the killed cluster's own processes do)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if workdir.encode() in cmdline:
                found.append(int(proc.name))
    return found


def _coredns_pod(api: k8s.ApiClient) -> str:
    pods = k8s.CoreV1Api(api).list_namespaced_pod("kube-system", label_selector="k8s-app=kube-dns").items
    return str(pods[0].metadata.name)


@pytest.mark.exclusive  # the node's GPUs to itself
def test_kueue_admits_two_gpu_jobs_one_after_the_other(
    real_cluster: Cluster, api: k8s.ApiClient, restricted: str, kueue_system: None
) -> None:
    """Kueue itself (built from the Go module proxy) unsuspends queued Jobs within a GPU quota of one."""
    queues = [
        {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "ResourceFlavor", "metadata": {"name": "default"}},
        {
            "apiVersion": "kueue.x-k8s.io/v1beta1",
            "kind": "ClusterQueue",
            "metadata": {"name": f"gpus-{restricted}"[:63]},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": restricted}},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": "default",
                                "resources": [
                                    {"name": "cpu", "nominalQuota": "1"},
                                    {"name": "memory", "nominalQuota": "1Gi"},
                                    {"name": "nvidia.com/gpu", "nominalQuota": 1},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
    ]
    apply(real_cluster, restricted, *queues)
    local = {
        "apiVersion": "kueue.x-k8s.io/v1beta1",
        "kind": "LocalQueue",
        "metadata": {"name": "team"},
        "spec": {"clusterQueue": queues[1]["metadata"]["name"]},
    }
    gpu = {"requests": {"cpu": "100m", "memory": "64Mi", "nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}

    def job(name: str, seconds: int) -> Obj:
        template = pod(name, sh("main", f"sleep {seconds}", resources=gpu))
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "labels": {"kueue.x-k8s.io/queue-name": "team"}},
            # Created suspended, as the operator creates them: only Kueue may start them.
            "spec": {"suspend": True, "backoffLimit": 0, "template": {"spec": template["spec"]}},
        }

    apply(real_cluster, restricted, local, job("first", 4), job("second", 1))
    batch = k8s.BatchV1Api(api)

    def done(name: str) -> k8s.V1Job | None:
        current = batch.read_namespaced_job(name, restricted)
        return current if current.status.completion_time else None

    finished = [
        wait_for(f"Kueue to admit Job {name} and it to finish", functools.partial(done, name))
        for name in ("first", "second")
    ]
    # One GPU of quota: whichever Kueue admitted first (both were created at once), the other
    # started only after it had finished.
    earlier, later = sorted(finished, key=lambda j: j.status.start_time)
    assert later.status.start_time >= earlier.status.completion_time
    workloads = json.loads(real_cluster.kubectl("get", "workloads", "-o", "json", namespace=restricted).stdout)
    admitted = {w["metadata"]["ownerReferences"][0]["name"]: w["status"]["admission"] for w in workloads["items"]}
    assert set(admitted) == {"first", "second"}
    assert {a["clusterQueue"] for a in admitted.values()} == {queues[1]["metadata"]["name"]}
