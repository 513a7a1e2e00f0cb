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

import secrets
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
# fake node), and endpoints/endpointslice (validation refuses the loopback pod
# IPs, so they could only log errors and leave every Service without endpoints).
# root-ca-certificate-publisher fills the kube-root-ca.crt ConfigMap that every
# pod's service-account volume mounts.
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

    @classmethod
    def start(cls, workdir: Path, bin_dir: Path | None = None, timeout: float = 90.0) -> ControlPlane:
        """Start all three and return once the API server is ready.

        The controller manager is started but not waited for; ``wait_ready``
        does that, so callers can start other things meanwhile.
        """
        bin_dir = bin_dir or find_binaries()
        workdir = workdir.resolve()
        pki = workdir / "pki"
        logs = workdir / "logs"
        pki.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        (pki / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n')
        sa_key, sa_pub = _write_service_account_keys(pki)

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

            server = f"https://127.0.0.1:{api_port}"
            apiserver = Service.spawn(
                "kube-apiserver",
                [
                    str(bin_dir / "kube-apiserver"),
                    f"--etcd-servers={etcd_url}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={api_port}",
                    f"--cert-dir={pki}",
                    "--service-cluster-ip-range=10.0.0.0/24",
                    "--allow-privileged=true",
                    "--authorization-mode=RBAC",
                    f"--token-auth-file={pki / 'tokens.csv'}",
                    f"--service-account-issuer={server}/",
                    f"--service-account-key-file={sa_pub}",
                    f"--service-account-signing-key-file={sa_key}",
                    # The "kubernetes" Service would get an Endpoints object with
                    # 127.0.0.1, which validation rejects (loopback); it would log
                    # that error every ten seconds.
                    "--endpoint-reconciler-type=none",
                ],
                logs,
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
                        f"--controllers={','.join(CONTROLLERS)}",
                        f"--root-ca-file={ca_file}",
                        f"--service-account-private-key-file={sa_key}",
                    ],
                    logs,
                )
            )
        except BaseException:
            stop_all(services)
            raise
        return cls(workdir, bin_dir, server, token, ca_file, kubeconfig, kcm_port, services)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for the controller manager's /healthz."""
        # Its serving certificate is self-signed and only used for this probe.
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        wait_until(
            lambda: _answers(f"https://127.0.0.1:{self.kcm_port}/healthz", context=insecure),
            timeout=timeout,
            what="kube-controller-manager /healthz",
            services=self.services,
        )

    def ensure_running(self) -> None:
        for service in self.services:
            service.ensure_running()

    def stop(self) -> None:
        """Stop the controller manager, then the API server, then etcd."""
        stop_all(list(reversed(self.services)))
