"""The test cluster: a real control plane, a node and an S3 server, started together.

End-to-end tests (and ``make cluster-up`` for a person) need all three at once;
``Cluster`` starts them in the right order, waits until pods can actually run
(Node Ready, the default ServiceAccount present, with a real node cluster DNS
too) and stops them all again.

Two kinds of node:

- ``"real"`` (``tests.cluster.node``): kubelet, containerd, runc, CNI,
  kube-proxy, kube-scheduler and CoreDNS; pods are containers from images
  imported into containerd. Needs root. Everything listens on the host's end
  of the node's link (``10.250.N.1``), which pods reach too.
- ``"fake"`` (``tests.cluster.kubelet``): runs each container's command as a
  local process; no root, no images, everything on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from tests.cluster.controlplane import ControlPlane, find_binaries
from tests.cluster.node import COREDNS_IMAGE, RealNode, coredns
from tests.cluster.procs import Service, stop_all, wait_until
from tests.cluster.s3 import S3Server

__all__ = ["Cluster", "KubectlError", "NodeKind", "S3Server"]

NODE_NAME = "kubetune-node"
NodeKind = Literal["real", "fake"]
# What the operator's pods may request of the node (the fake kubelet reports the same).
GPUS = 8


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call whose message includes kubectl's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr}"


@dataclass
class Cluster:
    """A running test cluster; build one with ``Cluster.start(workdir)``."""

    workdir: Path
    bin_dir: Path
    control_plane: ControlPlane
    kubelet: Service | None
    s3: S3Server
    node: RealNode | None = None
    # Seconds each image archive given to ``start`` took to import, by file name (0: already there).
    imported: dict[str, float] = field(default_factory=dict)
    # False for a cluster another process started (``attach``): this one neither checks nor stops it.
    owned: bool = True

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    @property
    def server(self) -> str:
        return self.control_plane.server

    @property
    def token(self) -> str:
        """The admin (system:masters) bearer token."""
        return self.control_plane.token

    @classmethod
    def start(
        cls,
        workdir: Path,
        timeout: float = 120.0,
        node: NodeKind = "fake",
        images: Sequence[Path] = (),
    ) -> Cluster:
        """Start everything in ``workdir``; return once a pod would run.

        ``images``: archives (``podman save``, OCI) to import into a real node's containerd
        (skipped when its kept image store already holds them; see ``node.ImageStore``).
        """
        began = time.monotonic()
        workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        bin_dir = find_binaries()
        if node == "real":
            return cls._start_real(workdir, bin_dir, images, deadline=began + timeout)
        if images:
            raise ValueError("the fake kubelet runs no images; start a real node to import them")
        logs = workdir / "logs"
        s3 = S3Server.start(logs)
        started: list[Service] = [s3.service]
        try:
            plane = ControlPlane.start(workdir, bin_dir)
            started.extend(plane.services)
            # The venv's bin first: pods' "python" must be the one with the project installed.
            env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
            kubelet = Service.spawn(
                "kubelet",
                [
                    sys.executable,
                    "-m",
                    "tests.cluster.kubelet",
                    f"--kubeconfig={plane.kubeconfig}",
                    f"--workdir={workdir}",
                    f"--node-name={NODE_NAME}",
                ],
                logs,
                env=env,
                cwd=Path(__file__).resolve().parents[2],
            )
            started.append(kubelet)
            cluster = cls(workdir, bin_dir, plane, kubelet, s3)
            plane.wait_ready()
            s3.wait_ready()
            cluster._wait_schedulable(max(10.0, timeout - (time.monotonic() - began)))
        except BaseException:
            stop_all([*reversed(started)])
            raise
        return cluster

    @classmethod
    def _start_real(cls, workdir: Path, bin_dir: Path, images: Sequence[Path], deadline: float) -> Cluster:
        """containerd starts while the control plane does; the kubelet once the API server answers."""
        logs = workdir / "logs"
        real = RealNode.prepare(workdir, bin_dir)
        started: list[Service] = []
        try:
            address = real.network.host_ip
            s3 = S3Server.start(logs, host=address)
            started.append(s3.service)
            real.start_runtime()
            plane = ControlPlane.start(workdir, bin_dir, address=address, real_node=True)
            started.extend(plane.services)
            real.wait_runtime()
            imported = real.import_images(images)
            real.start_kubelet(plane.kubeconfig)
            cluster = cls(workdir, bin_dir, plane, None, s3, real, imported)
            plane.wait_ready()
            s3.wait_ready()
            cluster._wait_real_node(max(30.0, deadline - time.monotonic()))
            cluster._wait_schedulable(max(10.0, deadline - time.monotonic()))
        except BaseException:
            real.stop()
            stop_all([*reversed(started)])
            raise
        return cluster

    def _wait_real_node(self, timeout: float) -> None:
        """Node registered → GPU capacity patched → CoreDNS ready behind the kube-dns Service."""
        assert self.node is not None
        services = [*self.control_plane.services, *self.node.services]
        with self.api_client() as api:
            core = k8s.CoreV1Api(api)

            def registered() -> bool:
                return bool(core.list_node(field_selector=f"metadata.name={NODE_NAME}").items)

            wait_until(registered, timeout=timeout, what="the kubelet's Node", services=services, interval=0.2)
            # No device plugin: the node advertises GPUs so that GPU requests schedule (no device is given).
            gpus = {"nvidia.com/gpu": str(GPUS)}
            core.patch_node_status(NODE_NAME, {"status": {"capacity": gpus, "allocatable": gpus}})
        self.kubectl("apply", "--server-side", "-f", "-", input=_as_list(coredns.manifests(COREDNS_IMAGE)))
        self.kubectl(
            "rollout", "status", "deployment/coredns", f"--namespace={coredns.NAMESPACE}", f"--timeout={int(timeout)}s"
        )

    def _wait_schedulable(self, timeout: float) -> None:
        with self.api_client() as api:
            core = k8s.CoreV1Api(api)

            def node_ready() -> bool:
                nodes = core.list_node(field_selector=f"metadata.name={NODE_NAME}").items
                conditions = [c for n in nodes if n.status is not None for c in n.status.conditions or []]
                return any(c.type == "Ready" and c.status == "True" for c in conditions)

            def default_account() -> bool:
                return bool(core.list_namespaced_service_account("default").items)

            services = [*self.control_plane.services, *self._node_services()]
            wait_until(node_ready, timeout=timeout, what="the Node to be Ready", services=services, interval=0.2)
            wait_until(default_account, timeout=timeout, what="the default ServiceAccount", services=services)

    def api_client(self) -> k8s.ApiClient:
        """A new synchronous ``kubernetes.client.ApiClient`` for the admin kubeconfig (close it, or use ``with``)."""
        api: k8s.ApiClient = k8s_config.new_client_from_config(config_file=str(self.kubeconfig))  # type: ignore[no-untyped-call]
        return api

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, namespace: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this cluster; on failure, the error carries stderr."""
        argv = [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}"]
        if namespace is not None:
            argv.append(f"--namespace={namespace}")
        result = subprocess.run([*argv, *args], input=input, capture_output=True, text=True, timeout=120, check=False)
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, result.args, result.stdout, result.stderr)
        return result

    def pod_dir(self, namespace: str, pod: str) -> Path:
        """The fake kubelet's folder of a pod (the newest one, when a name was reused)."""
        candidates = sorted((self.workdir / "pods").glob(f"{namespace}_{pod}_*"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(f"the fake kubelet never ran pod {namespace}/{pod}")
        return candidates[-1]

    def pod_log(self, namespace: str, pod: str, container: str | None = None, previous: bool = False) -> str:
        """A container's output.

        Real node: ``kubectl logs`` (the current attempt, or the one before with ``previous``).
        Fake kubelet: its log file, which holds all attempts.
        """
        if self.node is not None:
            args = [
                "logs",
                pod,
                *(["--container", container] if container else []),
                *(["--previous"] if previous else []),
            ]
            return self.kubectl(*args, namespace=namespace).stdout
        folder = self.pod_dir(namespace, pod)
        if container is None:
            logs = sorted(folder.glob("*.log"))
            if not logs:
                raise FileNotFoundError(f"no container of pod {namespace}/{pod} has started yet")
            if len(logs) > 1:
                raise ValueError(f"pod {namespace}/{pod} has logs of {[p.stem for p in logs]}; name the container")
            return logs[0].read_text(errors="replace")
        return (folder / f"{container}.log").read_text(errors="replace")

    def kill_container(self, namespace: str, pod: str, container: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal a running container's processes, as an OOM killer or a node failure would.

        Real node: through containerd (the kubelet learns of it from the runtime, as in production).
        Fake kubelet: the container's process group.
        """
        if self.node is not None:
            self.node.kill_container(namespace, pod, container, sig)
            return
        pid = int((self.pod_dir(namespace, pod) / f"{container}.pid").read_text())
        os.killpg(pid, sig)

    def describe(self) -> dict[str, Any]:
        """What another process needs to use this cluster (``attach``): addresses, paths, credentials."""
        plane, node = self.control_plane, self.node
        return {
            "workdir": str(self.workdir),
            "bin_dir": str(self.bin_dir),
            "control_plane": {
                "server": plane.server,
                "token": plane.token,
                "ca_file": str(plane.ca_file),
                "kubeconfig": str(plane.kubeconfig),
                "kcm_port": plane.kcm_port,
                "scheduler_port": plane.scheduler_port,
            },
            "s3": self.s3.endpoint_url,
            "node": None if node is None else node.describe(),
        }

    @classmethod
    def attach(cls, description: dict[str, Any]) -> Cluster:
        """A cluster another process started and stops (the parallel e2e suite's workers use the
        one their controller started): everything but ``ensure_running`` and ``stop`` works."""
        workdir, bin_dir = Path(description["workdir"]), Path(description["bin_dir"])
        cp = description["control_plane"]
        plane = ControlPlane(
            workdir, bin_dir, cp["server"], cp["token"], Path(cp["ca_file"]), Path(cp["kubeconfig"]),
            cp["kcm_port"], [], cp["scheduler_port"],
        )  # fmt: skip
        node = None if description["node"] is None else RealNode.attach(description["node"])
        return cls(workdir, bin_dir, plane, None, S3Server.attach(description["s3"]), node, owned=False)

    def _node_services(self) -> list[Service]:
        if self.node is not None:
            return list(self.node.services)
        return [self.kubelet] if self.kubelet is not None else []

    def ensure_running(self) -> None:
        """Raise if a component died (its log's tail is in the message); the owner checks an attached one."""
        if not self.owned:
            return
        self.control_plane.ensure_running()
        for service in self._node_services():
            service.ensure_running()
        self.s3.service.ensure_running()

    def stop(self) -> None:
        """Stop the node first (it stops the pods), then the control plane, then S3 (the owner's job)."""
        if not self.owned:
            return
        if self.node is not None:
            self.node.stop()
        if self.kubelet is not None:
            stop_all([self.kubelet])
        self.control_plane.stop()
        self.s3.stop()


def _as_list(manifests: Sequence[dict[str, object]]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": list(manifests)})
