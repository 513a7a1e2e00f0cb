"""A real Kubernetes node for the test cluster: containerd + runc + CNI + kubelet + kube-proxy.

Upstream's binaries (built from the Go module proxy by ``build-binaries.sh``
and ``build-node-binaries.sh``) with Debian's runc and CNI plugins, in a
network namespace of its own (see ``network``). Pods are real containers from
images imported into containerd: the restricted security context is enforced
by runc, logs come from ``kubectl logs``, Services get endpoints and
ClusterIPs, and cluster DNS is CoreDNS.

Needs root (network namespaces, mounts, iptables) and the Debian packages of
``install-node-packages.sh``. Everything a node makes lives in its working
folder, ``/run/kubetune/<index>`` and its network namespace, and ``stop``
removes it; a node whose process died is cleaned by the next node that claims
its index.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.cluster.node import configs, images, network
from tests.cluster.node.network import NodeNetwork, NodeSlot
from tests.cluster.procs import Service, stop_all, wait_until

BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "build-node-binaries.sh"
NODE_NAME = "kubetune-node"
NAMESPACE = "k8s.io"  # containerd's namespace for the CRI

PAUSE_IMAGE = "localhost/kubetune/pause:test"
TOOLS_IMAGE = "localhost/kubetune/busybox:test"
COREDNS_IMAGE = "localhost/kubetune/coredns:test"
ARCHIVE_LABEL = "io.kubetune.archive"  # on every image a node imports: the archive's file name


def find_node_binaries() -> Path:
    """The folder holding containerd, its shim, ctr, crictl and coredns; builds them on first use."""
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=True)
    return Path(result.stdout.strip().splitlines()[-1])


def cache_root() -> Path:
    """``$KUBETUNE_CACHE``, else ``~/.cache/kubetune``: what test runs keep between them."""
    root = (
        os.environ.get("KUBETUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubetune"
    )
    return Path(root)


class ImageStore:
    """containerd's root (image metadata, content and unpacked snapshots), kept between test runs.

    Importing the trainer's 6 GB archive into an empty containerd takes minutes; a
    node that finds the image already in its root skips the import. The root lives in
    the cache folder and is used by one node at a time (a ``flock``, released when the
    node stops or its process dies); a node that finds it taken, e.g. a second node
    beside the suite's, gets an empty root in its working folder, removed at stop.

    Images are imported with a label naming their archive (whose file name carries a
    hash of its content), so "already imported" is read from containerd itself; a
    rebuilt image replaces the old one under the same name, and containerd's garbage
    collector drops the old layers. Layers are unpacked and then discarded from the
    content store, so an image costs its unpacked size once.
    """

    def __init__(self, root: Path, lock: int | None) -> None:
        self.root = root
        self._lock = lock

    @property
    def persistent(self) -> bool:
        return self._lock is not None

    @classmethod
    def claim(cls, ephemeral: Path) -> ImageStore:
        """The cache's store when no other node holds it, else an empty one at ``ephemeral``."""
        if os.environ.get("KUBETUNE_NODE_IMAGE_STORE", "cache") == "cache":
            folder = cache_root() / "testcluster" / "containerd-store"
            folder.mkdir(parents=True, exist_ok=True)
            lock = os.open(folder / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock)
            else:
                return cls(folder / "root", lock)
        return cls(ephemeral, None)

    def release(self) -> None:
        """Give the cache's store back, or delete an ephemeral one (it may hold gigabytes)."""
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None
        elif self.root.exists():
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.root)], check=False)


@dataclass
class NodePaths:
    """Where a node keeps things: big state in its working folder, sockets under /run (short paths)."""

    workdir: Path
    run_dir: Path
    data_dir: Path
    store: ImageStore | None = None

    @property
    def socket(self) -> Path:
        return self.run_dir / "containerd.sock"

    @property
    def containerd_state(self) -> Path:
        return self.run_dir / "containerd"

    @property
    def containerd_root(self) -> Path:
        return self.store.root if self.store is not None else self.ephemeral_root

    @property
    def ephemeral_root(self) -> Path:
        """containerd's root when the cache's image store is taken by another node."""
        return self.workdir / "containerd"

    @property
    def kubelet_root(self) -> Path:
        return self.data_dir / "kubelet"

    @property
    def pod_logs(self) -> Path:
        return self.workdir / "pod-logs"

    @property
    def config_dir(self) -> Path:
        return self.workdir / "node-config"

    @property
    def image_cache(self) -> Path:
        """The node's own image archives and the pause binary, kept across runs (keyed by content)."""
        return cache_root() / "testcluster" / "images"


@dataclass
class RealNode:
    """A running node; ``prepare`` → ``start_runtime`` → ``start_kubelet(kubeconfig)`` → ``stop``."""

    slot: NodeSlot
    paths: NodePaths
    node_bin: Path
    k8s_bin: Path
    logs: Path
    services: list[Service] = field(default_factory=list)
    _network_created: bool = False

    @property
    def network(self) -> NodeNetwork:
        return self.slot.network

    @property
    def name(self) -> str:
        return NODE_NAME

    def describe(self) -> dict[str, Any]:
        """What ``attach`` needs in another process: the node's index and folders (its CRI socket)."""
        return {
            "index": self.network.index,
            "workdir": str(self.paths.workdir),
            "node_bin": str(self.node_bin),
            "k8s_bin": str(self.k8s_bin),
            "logs": str(self.logs),
        }

    @classmethod
    def attach(cls, description: dict[str, Any]) -> RealNode:
        """A node another process runs: for the CRI (``crictl``, ``kill_container``) and its addresses.

        It holds no slot lock and owns no service; only the process that started the node stops it.
        """
        slot = NodeSlot.attached(int(description["index"]))
        net = slot.network
        paths = NodePaths(Path(description["workdir"]), net.run_dir, net.data_dir)
        return cls(slot, paths, Path(description["node_bin"]), Path(description["k8s_bin"]), Path(description["logs"]))

    # -- start -----------------------------------------------------------------------------

    @classmethod
    def prepare(cls, workdir: Path, k8s_bin: Path, node_bin: Path | None = None) -> RealNode:
        """Claim a node index (cleaning what a dead node left there), an image store, and create the network."""
        _check_host()
        node_bin = node_bin or find_node_binaries()
        slot = NodeSlot.claim()
        net = slot.network
        node = cls(slot, NodePaths(workdir / "node", net.run_dir, net.data_dir), node_bin, k8s_bin, workdir / "logs")
        try:
            if slot.stale:
                previous = net.run_dir / "workdir"
                left = Path(previous.read_text()) if previous.exists() else node.paths.workdir
                dead = cls(slot, NodePaths(left, net.run_dir, net.data_dir), node_bin, k8s_bin, node.logs)
                dead._clean(previous_run=True)
            net.run_dir.mkdir(parents=True)
            (net.run_dir / "workdir").write_text(str(node.paths.workdir))
            node.paths.store = ImageStore.claim(node.paths.ephemeral_root)
            network.create(slot.network)
            node._network_created = True
        except BaseException:
            node._clean()
            raise
        return node

    def start_runtime(self) -> None:
        """Write the configs and start containerd (``wait_runtime`` waits for it)."""
        paths, net = self.paths, self.network
        for folder in (paths.config_dir, paths.containerd_root, paths.containerd_state, paths.pod_logs):
            folder.mkdir(parents=True, exist_ok=True)
        cni_dir = paths.config_dir / "cni"
        cni_dir.mkdir(exist_ok=True)
        (cni_dir / "10-kubetune.conflist").write_text(configs.cni_conflist(net, paths.workdir / "cni-ipam"))
        config = paths.config_dir / "containerd.toml"
        config.write_text(
            configs.containerd_toml(
                root=paths.containerd_root,
                state=paths.containerd_state,
                socket=paths.socket,
                cni_conf_dir=cni_dir,
                opt_dir=paths.workdir / "containerd-opt",
                net=net,
                sandbox_image=PAUSE_IMAGE,
            )
        )
        # The shim is started by containerd from PATH: ours first.
        env = {**os.environ, "PATH": f"{self.node_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
        argv = net.in_netns([str(self.node_bin / "containerd"), f"--config={config}", "--log-level=warn"])
        self.services.append(Service.spawn("containerd", argv, self.logs, env=env))

    def wait_runtime(self, timeout: float = 60.0) -> None:
        """Wait for containerd's CRI to answer, then import the node's own images."""

        def answers() -> bool:
            return self.crictl("info", check=False, timeout=5).returncode == 0

        wait_until(answers, timeout=timeout, what="containerd's CRI", services=self.services, interval=0.2)
        # A kept root may hold the pods of a run that died: none of them is this node's.
        self.crictl("rmp", "--all", "--force", timeout=120)
        cache = self.paths.image_cache
        archives = [
            images.cached_archive(images.pause_image(PAUSE_IMAGE, cache), cache),
            images.cached_archive(images.busybox_image(TOOLS_IMAGE), cache),
            images.cached_archive(images.coredns_image(COREDNS_IMAGE, self.node_bin / "coredns"), cache),
        ]
        self.import_images(archives)

    def import_images(self, archives: Sequence[Path]) -> dict[str, float]:
        """Import image archives (OCI or docker-archive, e.g. from ``podman save``) for the kubelet to run.

        An archive already imported into this node's image store is skipped (see ``ImageStore``).
        Returns the seconds each archive took, by file name (0 when skipped).
        """
        present = self.imported_archives()
        took: dict[str, float] = {}
        for archive in archives:
            began = time.monotonic()
            if archive.name not in present:
                # --discard-unpacked-layers: the layers' blobs go once unpacked (the snapshots stay);
                # it needs --local (ctr imports through the content API rather than the transfer service).
                label = f"--label={ARCHIVE_LABEL}={archive.name}"
                self.ctr("images", "import", "--local", "--discard-unpacked-layers", label, str(archive), timeout=1800)
            took[archive.name] = round(time.monotonic() - began, 2)
        return took

    def imported_archives(self) -> set[str]:
        """The archives (file names) whose images this node's containerd holds."""
        listed = self.ctr("images", "list").stdout.splitlines()[1:]
        found = set()
        for line in listed:
            for label in line.split()[-1].split(","):
                key, _, value = label.partition("=")
                if key == ARCHIVE_LABEL:
                    found.add(value)
        return found

    def start_kubelet(self, kubeconfig: Path) -> None:
        """Start the kubelet and kube-proxy in the node's namespace, talking to the API server of ``kubeconfig``."""
        paths, net = self.paths, self.network
        resolv_conf = paths.config_dir / "resolv.conf"
        resolv_conf.write_text("")  # pods get cluster DNS only
        kubelet_config = paths.config_dir / "kubelet.yaml"
        kubelet_config.write_text(
            configs.kubelet_config(net=net, socket=paths.socket, pod_logs=paths.pod_logs, resolv_conf=resolv_conf)
        )
        kubelet = [
            str(self.k8s_bin / "kubelet"),
            f"--config={kubelet_config}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={paths.kubelet_root}",
            f"--cert-dir={paths.kubelet_root / 'pki'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={net.node_ip}",
            "--v=1",
        ]
        self.services.append(Service.spawn("kubelet", net.in_netns(kubelet), self.logs))
        proxy_config = paths.config_dir / "kube-proxy.yaml"
        proxy_config.write_text(configs.kube_proxy_config(net=net, kubeconfig=kubeconfig, node_name=NODE_NAME))
        proxy = [str(self.k8s_bin / "kube-proxy"), f"--config={proxy_config}", "--v=1"]
        self.services.append(Service.spawn("kube-proxy", net.in_netns(proxy), self.logs))

    # -- the CRI, as an operator of a node would use it -------------------------------------------

    def crictl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        endpoint = f"unix://{self.paths.socket}"
        argv = [str(self.node_bin / "crictl"), f"--runtime-endpoint={endpoint}", f"--image-endpoint={endpoint}"]
        return _run([*argv, *args], check=check, timeout=timeout)

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [str(self.node_bin / "ctr"), f"--address={self.paths.socket}", f"--namespace={NAMESPACE}"]
        return _run([*argv, *args], check=check, timeout=timeout)

    def container_id(self, namespace: str, pod: str, container: str) -> str:
        """The running container's id (the newest attempt), found through the CRI by its pod labels."""
        result = self.crictl(
            "ps",
            "--quiet",
            "--state=running",
            f"--name=^{container}$",
            f"--label=io.kubernetes.pod.namespace={namespace}",
            f"--label=io.kubernetes.pod.name={pod}",
        )
        ids = result.stdout.split()
        if not ids:
            raise LookupError(f"no running container {container} in pod {namespace}/{pod} on {NODE_NAME}")
        return ids[0]

    def kill_container(self, namespace: str, pod: str, container: str, sig: signal.Signals = signal.SIGKILL) -> str:
        """Send ``sig`` to a container's processes through containerd (as the OOM killer or a crash would).

        Returns the container's id; the kubelet only learns of the death from the runtime.
        """
        container_id = self.container_id(namespace, pod, container)
        self.ctr("tasks", "kill", "--all", f"--signal={sig.name}", container_id)
        return container_id

    # -- stop ---------------------------------------------------------------------------------

    def ensure_running(self) -> None:
        for service in self.services:
            service.ensure_running()

    def stop(self) -> None:
        """Stop the kubelet, remove every pod, stop the runtime, then remove everything the node made."""
        self._clean()

    def _clean(self, previous_run: bool = False) -> None:
        by_name = {s.name: s for s in self.services}
        stop_all([s for s in (by_name.get("kubelet"), by_name.get("kube-proxy")) if s is not None])
        if "containerd" in by_name and by_name["containerd"].popen.poll() is None:
            # Stops every container (SIGKILL after no grace) and tears down the pods' networks.
            self.crictl("rmp", "--all", "--force", check=False, timeout=60)
        stop_all([s for s in self.services if s.name == "containerd"])
        self.services.clear()
        _kill_runc_containers(self.paths.containerd_state / "runc")
        _kill_shims(self.paths.socket)
        _unmount_under([self.paths.containerd_state, self.paths.run_dir, self.paths.data_dir, self.paths.workdir])
        if previous_run or self._network_created:
            network.delete(self.network)
            self._network_created = False
        _remove_log_links(self.paths.pod_logs)
        _remove_empty_cgroups()
        # A dead run's root in its working folder is an ephemeral one (the cache's store is not
        # under it); this node's own store is released (kept) or deleted (ephemeral).
        leftovers = [self.paths.run_dir, self.paths.data_dir, *([self.paths.ephemeral_root] if previous_run else [])]
        for folder in leftovers:
            if folder.exists():
                subprocess.run(["rm", "-rf", "--one-file-system", str(folder)], check=False)
        if self.paths.store is not None:
            self.paths.store.release()
            self.paths.store = None
        if not previous_run:
            self.slot.release()


def _check_host() -> None:
    """Fail with what to do, before anything is created, when this machine cannot run a node."""
    if os.geteuid() != 0:
        raise PermissionError("a real test node needs root (network namespaces, mounts, iptables)")
    needed = [configs.RUNC, configs.CNI_BIN_DIR / "bridge", images.BUSYBOX, Path("/usr/sbin/iptables")]
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}: run `make node-packages` (Debian packages)")


def _run(argv: list[str], *, check: bool, timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _kill_runc_containers(runc_root: Path) -> None:
    """Kill and delete containers a dead containerd left running (runc keeps its own state)."""
    for namespace_root in sorted(runc_root.glob("*")) if runc_root.exists() else []:
        for state in sorted(namespace_root.iterdir()):
            runc = [str(configs.RUNC), f"--root={namespace_root}"]
            subprocess.run([*runc, "kill", state.name, "KILL"], capture_output=True, check=False)
            subprocess.run([*runc, "delete", "--force", state.name], capture_output=True, check=False)


def _kill_shims(socket: Path) -> None:
    """SIGKILL this node's containerd shims (they run in sessions of their own), found by their -address."""
    needle = f"\0{socket}\0".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"containerd-shim" in cmdline and needle in b"\0" + cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def _unmount_under(roots: Sequence[Path]) -> None:
    """Unmount (lazily, deepest first) every mount below ``roots``: overlay rootfs, pod netns, tmpfs volumes."""
    prefixes = [str(root.resolve()) + "/" for root in roots]
    for _ in range(3):
        mounts = []
        with open("/proc/self/mountinfo") as mountinfo:
            for line in mountinfo:
                point = line.split()[4].encode().decode("unicode_escape")
                if any(point.startswith(prefix) or point + "/" == prefix for prefix in prefixes):
                    mounts.append(point)
        if not mounts:
            return
        for point in sorted(set(mounts), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
        time.sleep(0.1)


def _remove_empty_cgroups() -> None:
    """containerd puts containers under /k8s.io in each cgroup hierarchy (no per-QoS cgroups); drop it once empty.

    rmdir only succeeds on a cgroup without tasks or children, so another node's is never touched.
    """
    for hierarchy in Path("/sys/fs/cgroup").glob("*/k8s.io"):
        with contextlib.suppress(OSError):
            hierarchy.rmdir()


def _remove_log_links(pod_logs: Path) -> None:
    """The kubelet links each container's log into /var/log/containers; drop the links into this node's logs."""
    links = Path("/var/log/containers")
    if not links.is_dir():
        return
    for link in links.iterdir():
        with contextlib.suppress(OSError):
            if link.is_symlink() and os.readlink(link).startswith(str(pod_logs)):
                link.unlink()
