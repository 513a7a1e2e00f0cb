"""The node's network: a network namespace of its own, joined to the host by one veth link.

Why a namespace and not the host's network: the machine is shared (other test
runs, podman builds) and has a default route to the outside. In its own
namespace the node's iptables (kube-proxy's chains), its CNI bridge, its
forwarding switch and its conntrack entries touch nothing of the host's, two
nodes can run side by side (one index each), and stopping is ``ip netns del``.
The namespace has no default route and the host does not forward
(``net.ipv4.ip_forward`` stays as it is), so nothing a pod sends can leave the
machine; pods get routes only to the pod range, the service range and the
host's end of the link, where the API server and S3 listen.

Addresses, for node index N (0-15)::

    10.250.N.1   host end of the link: kube-apiserver, S3 (the address pods and the tests use)
    10.250.N.2   node end of the link: the kubelet (InternalIP), kube-proxy's health port
    10.244.N.0/24   pods, on the CNI bridge in the namespace (gateway 10.244.N.1)
    10.0.0.0/24  Services (kube-apiserver's range; 10.0.0.1 the API, 10.0.0.10 DNS)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO

MAX_NODES = 16
SERVICE_CIDR = "10.0.0.0/24"
API_SERVICE_IP = "10.0.0.1"
DNS_SERVICE_IP = "10.0.0.10"
CLUSTER_DOMAIN = "cluster.local"
RUN_ROOT = Path("/run/kubetune")
DATA_ROOT = Path("/var/lib/kubetune")


@dataclass(frozen=True)
class NodeNetwork:
    """The names and addresses of node ``index``; pure data, see ``create``/``delete``."""

    index: int

    @property
    def netns(self) -> str:
        return f"kubetune-{self.index}"

    @property
    def netns_path(self) -> Path:
        return Path("/run/netns") / self.netns

    @property
    def host_link(self) -> str:
        return f"ktnode{self.index}"

    node_link = "ktlink"  # inside the namespace
    bridge = "ktbr0"  # inside the namespace

    @property
    def host_ip(self) -> str:
        return f"10.250.{self.index}.1"

    @property
    def node_ip(self) -> str:
        return f"10.250.{self.index}.2"

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def pod_gateway(self) -> str:
        return f"10.244.{self.index}.1"

    @property
    def run_dir(self) -> Path:
        """Sockets and runtime state (short paths: unix sockets allow 107 bytes)."""
        return RUN_ROOT / str(self.index)

    @property
    def data_dir(self) -> Path:
        """The kubelet's root, on disk (emptyDir volumes) but at a short path: it holds sockets too."""
        return DATA_ROOT / str(self.index)

    def in_netns(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the node's network namespace (and only that: mounts stay shared)."""
        return ["nsenter", f"--net={self.netns_path}", "--", *argv]


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def create(net: NodeNetwork) -> None:
    """Create the namespace, the link and the host's route to the pods."""
    _ip("netns", "add", net.netns)
    try:
        _ip("link", "add", net.host_link, "type", "veth", "peer", "name", net.node_link, "netns", net.netns)
        _ip("addr", "add", f"{net.host_ip}/30", "dev", net.host_link)
        _ip("link", "set", net.host_link, "up")
        _ip("addr", "add", f"{net.node_ip}/30", "dev", net.node_link, netns=net.netns)
        _ip("link", "set", net.node_link, "up", netns=net.netns)
        _ip("link", "set", "lo", "up", netns=net.netns)
        # The host reaches pods (and pods' replies reach the API server and S3) through the node.
        _ip("route", "add", net.pod_cidr, "via", net.node_ip, "dev", net.host_link)
        # The node forwards between its link and its bridge; the host's own setting is untouched.
        subprocess.run(
            net.in_netns(["sysctl", "-qw", "net.ipv4.ip_forward=1"]), check=True, capture_output=True, text=True
        )
    except BaseException:
        delete(net)
        raise


def delete(net: NodeNetwork) -> None:
    """Remove the namespace: its bridge, veth (and the host's end), routes and iptables go with it."""
    if net.netns_path.exists():
        _ip("netns", "delete", net.netns, check=False)
    # Only left when the namespace was deleted by hand: the veth pair dies with its peer.
    if Path(f"/sys/class/net/{net.host_link}").exists():
        _ip("link", "delete", net.host_link, check=False)


class NodeSlot:
    """An exclusive claim on a node index, held (flock) for as long as the node runs.

    The lock dies with the process that holds it, so a slot whose lock is free
    but whose namespace or state is still there belongs to a run that died:
    ``claim`` reports that as ``stale`` for the caller to clean.
    """

    def __init__(self, index: int, lock: IO[str] | None) -> None:
        self.network = NodeNetwork(index)
        self._lock = lock

    @classmethod
    def attached(cls, index: int) -> NodeSlot:
        """The slot of a node another process holds (and releases)."""
        return cls(index, None)

    @property
    def stale(self) -> bool:
        net = self.network
        return net.netns_path.exists() or net.run_dir.exists() or net.data_dir.exists()

    @classmethod
    def claim(cls) -> NodeSlot:
        RUN_ROOT.mkdir(parents=True, exist_ok=True)
        for index in range(MAX_NODES):
            lock = (RUN_ROOT / f"{index}.lock").open("a+")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            lock.seek(0)
            lock.truncate()
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            return cls(index, lock)
        raise RuntimeError(f"all {MAX_NODES} test node slots in {RUN_ROOT} are taken by running nodes")

    def release(self) -> None:
        if self._lock is None:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()
