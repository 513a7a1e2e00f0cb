"""Start a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) on loopback.

The operator's behaviour depends on what a real API server does: admission,
defaulting, RBAC, the status subresource, the Job and Deployment controllers,
garbage collection. A mock would encode our own assumptions about all of that;
these binaries are upstream's, built by ``build-binaries.sh``.

Everything listens on 127.0.0.1 on free ports and lives in one working folder:
``etcd/`` (data), ``pki/`` (tokens, service-account keys, the API server's
self-signed serving certificate), ``logs/`` and ``kubeconfig``.
"""

from __future__ import annotations

import functools
import secrets
import signal
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.cluster.procs import Service, free_port, stop_all, wait_until

BUILD_SCRIPT = Path(__file__).with_name("build-binaries.sh")

# Only what the operator's workloads need. Left out on purpose: node-lifecycle
# and taint-eviction (they expect kubelet leases and would taint and evict the
# fake node). root-ca-certificate-publisher fills the kube-root-ca.crt ConfigMap
# that every pod's service-account volume mounts.
CONTROLLERS = (
    "job-controller",
    "deployment-controller",
    "replicaset-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "ttl-after-finished-controller",
    "pod-garbage-collector-controller",
)
# With a real node, Services get endpoints (with the fake kubelet they could
# only log errors: validation refuses its loopback pod IPs), and the node's
# lifecycle is watched through its kubelet's Lease: the node-lifecycle
# controller lifts the not-ready taint the kubelet registers with, and sets it
# again when the kubelet stops reporting. (Taint-based eviction stays off.)
REAL_NODE_CONTROLLERS = (
    *CONTROLLERS,
    "endpoints-controller",
    "endpointslice-controller",
    "node-lifecycle-controller",
    # PersistentVolumeClaims bind to PersistentVolumes (pvc:// URIs mount claims).
    "persistentvolume-binder-controller",
)

# With a real node: an owner reference may only block its owner's deletion when
# the writer may update the owner's finalizers (as on hardened clusters), and
# namespaces labelled pod-security.kubernetes.io/enforce=restricted get the
# restricted profile (PodSecurity is on by default; named to be explicit).
REAL_NODE_ADMISSION = ("PodSecurity", "OwnerReferencesPermissionEnforcement")


# What in-cluster workloads (service accounts' tokens) ask of the API server, one JSON line per
# request in ``logs/audit.log``: the tests read the operator pod's requests from it (which
# rules of the chart's RBAC it used, whether any was refused). Nothing else is recorded.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata", "userGroups": ["system:serviceaccounts"]}, {"level": "None"}],
}


def find_binaries() -> Path:
    """The folder holding etcd, kube-apiserver, ...; builds them on first use."""
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=True)
    return Path(result.stdout.strip().splitlines()[-1])


def _write_service_account_keys(pki: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = pki / "sa.key"
    public = pki / "sa.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def _answers(url: str, *, token: str | None = None, context: ssl.SSLContext | None = None) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def write_kubeconfig(path: Path, server: str, token: str, ca_file: Path) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubetune-test", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "kubetune-test", "context": {"cluster": "kubetune-test", "user": "admin"}}],
        "current-context": "kubetune-test",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


@dataclass
class ControlPlane:
    """A running etcd + kube-apiserver + kube-controller-manager."""

    workdir: Path
    bin_dir: Path
    server: str
    token: str
    ca_file: Path
    kubeconfig: Path
    kcm_port: int
    services: list[Service] = field(default_factory=list)
    scheduler_port: int | None = None

    @classmethod
    def start(
        cls,
        workdir: Path,
        bin_dir: Path | None = None,
        timeout: float = 90.0,
        *,
        address: str = "127.0.0.1",
        real_node: bool = False,
    ) -> ControlPlane:
        """Start all three and return once the API server is ready.

        The controller manager is started but not waited for; ``wait_ready``
        does that, so callers can start other things meanwhile.

        ``address`` is where the API server listens and what it advertises.
        ``real_node`` is for a cluster with a real kubelet (``tests.cluster.node``):
        pods must reach the API server (``address`` must not be loopback; the
        ``kubernetes`` Service's endpoint is kept by the lease reconciler, and
        the self-signed serving certificate covers ``address`` and the Service
        IP), a kube-scheduler binds pods, the endpoint controllers run, and
        admission is hardened (``REAL_NODE_ADMISSION``).
        """
        bin_dir = bin_dir or find_binaries()
        workdir = workdir.resolve()
        pki = workdir / "pki"
        logs = workdir / "logs"
        pki.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        (pki / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n')
        sa_key, sa_pub = _write_service_account_keys(pki)
        audit_policy = pki / "audit-policy.yaml"
        audit_policy.write_text(yaml.safe_dump(AUDIT_POLICY))

        services: list[Service] = []
        try:
            etcd_port, peer_port, api_port, kcm_port = (free_port() for _ in range(4))
            etcd_url = f"http://127.0.0.1:{etcd_port}"
            peer_url = f"http://127.0.0.1:{peer_port}"
            etcd = Service.spawn(
                "etcd",
                [
                    str(bin_dir / "etcd"),
                    "--name=default",
                    f"--data-dir={workdir / 'etcd'}",
                    f"--listen-client-urls={etcd_url}",
                    f"--advertise-client-urls={etcd_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=default={peer_url}",
                    "--unsafe-no-fsync=true",
                    "--log-level=warn",
                ],
                logs,
            )
            services.append(etcd)
            wait_until(lambda: _answers(f"{etcd_url}/health"), timeout=timeout, what="etcd", services=services)

            server = f"https://{address}:{api_port}"
            if real_node:
                node_flags = [
                    "--endpoint-reconciler-type=lease",
                    f"--enable-admission-plugins={','.join(REAL_NODE_ADMISSION)}",
                    # kubectl logs/exec: the apiserver dials the kubelet at the node's InternalIP.
                    "--kubelet-preferred-address-types=InternalIP",
                    # Webhooks and aggregated APIs (Kueue's) by their pods' IPs, which the host routes
                    # to; ClusterIPs exist only inside the node's network namespace.
                    "--enable-aggregator-routing=true",
                ]
            else:
                # The "kubernetes" Service would get an Endpoints object with
                # 127.0.0.1, which validation rejects (loopback); it would log
                # that error every ten seconds.
                node_flags = ["--endpoint-reconciler-type=none"]
            apiserver = Service.spawn(
                "kube-apiserver",
                [
                    str(bin_dir / "kube-apiserver"),
                    f"--etcd-servers={etcd_url}",
                    f"--bind-address={address}",
                    f"--advertise-address={address}",
                    f"--secure-port={api_port}",
                    f"--cert-dir={pki}",
                    "--service-cluster-ip-range=10.0.0.0/24",
                    "--allow-privileged=true",
                    "--authorization-mode=RBAC",
                    f"--token-auth-file={pki / 'tokens.csv'}",
                    f"--service-account-issuer={server}/",
                    f"--service-account-key-file={sa_pub}",
                    f"--service-account-signing-key-file={sa_key}",
                    f"--audit-policy-file={audit_policy}",
                    f"--audit-log-path={logs / 'audit.log'}",
                    "--audit-log-format=json",
                    *node_flags,
                ],
                logs,
                # Its graceful stop waits on etcd, which dies at the same moment: it would hang.
                on_parent_death=signal.SIGKILL,
            )
            services.append(apiserver)
            # Self-signed by the API server at start-up: a CA and a serving
            # certificate for the advertise address, localhost and the service IP.
            ca_file = pki / "apiserver.crt"
            wait_until(ca_file.exists, timeout=timeout, what="the API server's certificate", services=services)
            context = ssl.create_default_context(cafile=str(ca_file))
            wait_until(
                lambda: _answers(f"{server}/readyz", token=token, context=context),
                timeout=timeout,
                what="kube-apiserver /readyz",
                services=services,
            )
            kubeconfig = workdir / "kubeconfig"
            write_kubeconfig(kubeconfig, server, token, ca_file)

            services.append(
                Service.spawn(
                    "kube-controller-manager",
                    [
                        str(bin_dir / "kube-controller-manager"),
                        f"--kubeconfig={kubeconfig}",
                        f"--authentication-kubeconfig={kubeconfig}",
                        f"--authorization-kubeconfig={kubeconfig}",
                        "--leader-elect=false",
                        "--bind-address=127.0.0.1",
                        f"--secure-port={kcm_port}",
                        f"--cert-dir={workdir / 'kcm-pki'}",
                        f"--controllers={','.join(REAL_NODE_CONTROLLERS if real_node else CONTROLLERS)}",
                        f"--root-ca-file={ca_file}",
                        f"--service-account-private-key-file={sa_key}",
                    ],
                    logs,
                )
            )
            scheduler_port = None
            if real_node:
                scheduler_port = free_port()
                services.append(
                    Service.spawn(
                        "kube-scheduler",
                        [
                            str(bin_dir / "kube-scheduler"),
                            f"--kubeconfig={kubeconfig}",
                            f"--authentication-kubeconfig={kubeconfig}",
                            f"--authorization-kubeconfig={kubeconfig}",
                            "--leader-elect=false",
                            "--bind-address=127.0.0.1",
                            f"--secure-port={scheduler_port}",
                            f"--cert-dir={workdir / 'scheduler-pki'}",
                        ],
                        logs,
                    )
                )
        except BaseException:
            stop_all(services)
            raise
        return cls(workdir, bin_dir, server, token, ca_file, kubeconfig, kcm_port, services, scheduler_port)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for the controller manager's (and the scheduler's) /healthz."""
        # Their serving certificates are self-signed and only used for this probe.
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        ports = {"kube-controller-manager": self.kcm_port, "kube-scheduler": self.scheduler_port}
        for name, port in ports.items():
            if port is not None:
                url = f"https://127.0.0.1:{port}/healthz"
                wait_until(
                    functools.partial(_answers, url, context=insecure),
                    timeout=timeout,
                    what=f"{name} /healthz",
                    services=self.services,
                )

    @property
    def audit_log(self) -> Path:
        """The requests of service accounts (``AUDIT_POLICY``), one JSON audit event per line."""
        return self.workdir / "logs" / "audit.log"

    def ensure_running(self) -> None:
        for service in self.services:
            service.ensure_running()

    def stop(self) -> None:
        """Stop the scheduler and controller manager, then the API server, then etcd.

        The API server gets two seconds: with the lease endpoint reconciler it
        spends ten removing itself from the ``kubernetes`` Service of a cluster
        that is about to vanish with its etcd.
        """
        for service in reversed(self.services):
            stop_all([service], timeout=2.0 if service.name == "kube-apiserver" else 10.0)
