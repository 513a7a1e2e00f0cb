"""Running the operator: kopf settings, API client, metrics and health endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from prometheus_client import start_http_server
from urllib3.util.retry import Retry

from kubetune.api.types import API_GROUP, API_VERSION
from kubetune.builders.meta import ADEP_LABEL, FINETUNE_LABEL
from kubetune.builders.settings import OperatorSettings
from kubetune.controllers import adapterdeployment
from kubetune.controllers.adapterdeployment import AdapterDeploymentController
from kubetune.controllers.finetune import FineTuneController
from kubetune.controllers.informer import Informer
from kubetune.controllers.kube import Kube
from kubetune.controllers.leader import LeaderElection
from kubetune.controllers.scheduler import Scheduler
from kubetune.controllers.transport import ApiTransport

log = logging.getLogger("kubetune")


class TimeoutApiClient(k8s.ApiClient):
    """An API client whose requests all end: ``(connect, read)`` seconds unless a call sets its own.

    Without it a request to an API server that stopped answering hangs a handler thread for
    good; kopf's own requests and watches have their timeouts in kopf's settings.
    """

    def __init__(self, configuration: k8s.Configuration, timeout: tuple[float, float]) -> None:
        # urllib3 would retry a timed-out read three times (a hung call then lasts four read timeouts,
        # and a POST may be sent twice); only connection failures are retried here, and a 429 or 503
        # that says when to come back (Retry-After: the API server refused the request before acting
        # on it, e.g. while the watch cache of a CRD created a moment ago is still filling), the rest by
        # the controllers' own back-off.
        configuration.retries = Retry(total=6, connect=2, read=0, status=4, redirect=0, status_forcelist=())
        super().__init__(configuration)
        self.default_timeout = timeout

    def call_api(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) < 6 and kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = self.default_timeout
        return super().call_api(*args, **kwargs)


API_TIMEOUT = (5.0, 30.0)  # connect, read


def api_configuration() -> k8s.Configuration:
    """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG)."""
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
    return k8s.Configuration.get_default_copy()


def api_client() -> k8s.ApiClient:
    """The Kubernetes client (for the leader election's Lease calls); every request times out."""
    return TimeoutApiClient(api_configuration(), API_TIMEOUT)


def api_transport(workers: int = 8) -> ApiTransport:
    """The controllers' requests; one kept connection per handler thread and scheduler thread."""
    return ApiTransport(api_configuration(), API_TIMEOUT, keep=workers * 2)


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: the controllers register only event handlers, which see every event as it is.

    kopf builds a diff base for every event of every watched object anyway — a deep copy of the whole
    body, status and managedFields included — for change-detecting handlers. With none registered,
    that copy was a fifth of the operator's CPU under a burst of FineTunes.
    """

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: Any) -> Any:
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        return None


def apply_kopf_settings(settings: kopf.OperatorSettings, workers: int) -> None:
    """kopf's settings for this operator: no state in objects, no Events per handler, short batching,
    bounded watches, and kopf's watches of Jobs and Deployments narrowed to the AdapterDeployment
    controller's children."""
    # The controllers keep no kopf state in objects (no change-detecting handlers); were kopf ever to
    # write some, it would be under kubetune.io names. kopf removes its own finalizer from objects
    # that no handler needs it on, so it must not be the one the FineTune controller manages
    # (kubetune.io/delete-artifacts): with the same name, kopf took that off within a second.
    settings.persistence.finalizer = "kubetune.io/kopf"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
    settings.persistence.diffbase_storage = NoDiffBase()
    # kopf would post an Event for every handler run; the controllers post one per transition instead.
    settings.posting.enabled = False
    # No CRD or namespace discovery: the resources are known, and least-privilege RBAC
    # (see the chart) forbids listing CRDs and namespaces, which kopf would retry for a minute.
    settings.scanning.disabled = True
    settings.execution.max_workers = workers
    # kopf waits this long after an object's event for more of its events before handling it;
    # its 0.1 s default is added to every FineTune's time to a Job. The handlers are idempotent
    # and cheap when nothing changed, so a short window costs little.
    settings.batching.batch_window = 0.01
    # kopf keeps a worker (a task and a queue) per object for idle_timeout after its last event; in a
    # burst of a thousand FineTunes that is a thousand of them. The controllers' state is their own,
    # so a worker may go as soon as its object is quiet.
    settings.batching.idle_timeout = 0.5
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = API_TIMEOUT[0]
    settings.networking.connect_timeout = API_TIMEOUT[0]
    settings.networking.request_timeout = API_TIMEOUT[1]
    # kopf filters handlers' labels on its side: its watch of Jobs delivered every training Job (the
    # FineTune controller's informer watches those) and ran each event through its pipeline only to drop
    # it (kopf's event loop was still a quarter of the operator's CPU in a burst of a thousand FineTunes
    # once the FineTune controller had left kopf). The API server filters now.
    settings.watching.label_selectors["batch", "v1", "jobs"] = ADEP_LABEL
    settings.watching.label_selectors["apps", "v1", "deployments"] = ADEP_LABEL


def build_registry(
    operator_settings: OperatorSettings, *, workers: int, namespaces: list[str] | None = None
) -> kopf.OperatorRegistry:
    """kopf's registry with both controllers bound to it, sharing one API client and one scheduler."""
    registry = kopf.OperatorRegistry()

    # A registry of our own does not get kopf's default login handlers: log in like api_client() does.
    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry, backoff=5)  # kopf's default: try again in 60 s
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        apply_kopf_settings(settings, workers)
        kube.warm_up()
        watched = list(namespaces or [])
        adapterdeployments.seed(kube.list_all(f"/apis/{API_GROUP}/{API_VERSION}/adapterdeployments", watched))
        informers.extend(start_finetune_informers(finetunes, api, watched))
        scheduler.start()

    @kopf.on.cleanup(registry=registry)
    def stop(**_: Any) -> None:
        for informer in informers:
            informer.stop()
        scheduler.stop()

    api = api_transport(workers)
    kube = Kube(api=api)
    informers: list[Informer] = []
    # Shared: FineTune reconciles and Job follows, retries, progress polls and rollout checks of both controllers.
    scheduler = Scheduler(workers=workers)
    finetunes = FineTuneController(kube, operator_settings, scheduler)
    adapterdeployments = AdapterDeploymentController(kube, operator_settings, scheduler)
    adapterdeployment.register(adapterdeployments, registry)
    return registry


def start_finetune_informers(
    controller: FineTuneController, api: ApiTransport, namespaces: list[str]
) -> list[Informer]:
    """Watch FineTunes and their Jobs for the controller (see controllers/informer.py); the informers, started.

    Both are listed first and the lookups seeded from both lists, so a Job's event always finds its
    FineTune whichever comes first; then every listed object is handed on (what exists is reconciled
    at start-up), and only then do the watches start, from their lists' resourceVersions.
    """
    scopes: list[str | None] = [*namespaces] if namespaces else [None]  # None: the whole cluster
    finetune_informers = [
        Informer(api, f"/apis/{API_GROUP}/{API_VERSION}/finetunes", controller.finetune_seen, namespace=ns)
        for ns in scopes
    ]
    job_informers = [
        Informer(api, "/apis/batch/v1/jobs", controller.job_seen, namespace=ns, label_selector=FINETUNE_LABEL)
        for ns in scopes
    ]
    listed_finetunes = [obj for informer in finetune_informers for obj in informer.list()]
    listed_jobs = [obj for informer in job_informers for obj in informer.list()]
    controller.seed(listed_finetunes, listed_jobs)
    for obj in listed_finetunes:
        controller.finetune_seen("ADDED", obj)
    for obj in listed_jobs:
        controller.job_seen("ADDED", obj)
    informers = [*finetune_informers, *job_informers]
    for informer in informers:
        informer.start()
    return informers


@dataclass(frozen=True)
class LeaderElectionConfig:
    """Where the replicas' Lease lives and how long it lasts (renewals every lease/7.5 s, given up after 2/3)."""

    namespace: str
    name: str = "kubetune-operator"
    lease_seconds: float = 15.0

    @staticmethod
    def default_identity() -> str:
        """The pod's name (or the host's) and a random suffix: a restarted container is a new candidate."""
        base = os.environ.get("POD_NAME") or socket.gethostname()
        return f"{base}_{uuid.uuid4().hex[:8]}"

    @staticmethod
    def default_namespace() -> str:
        """$POD_NAMESPACE, else the service account's namespace, else ``default``."""
        if os.environ.get("POD_NAMESPACE"):
            return os.environ["POD_NAMESPACE"]
        try:
            return SA_NAMESPACE_FILE.read_text(encoding="utf-8").strip() or "default"
        except OSError:
            return "default"


SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@contextlib.contextmanager
def standby_health(port: int | None) -> Iterator[None]:
    """Answer /healthz while a replica waits for the Lease (kopf serves it once the replica leads)."""
    if not port:
        yield
        return

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path.split("?")[0] == "/healthz"
            body = b'{"standby": true}' if ok else b"{}"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Health)
    thread = threading.Thread(target=server.serve_forever, name="standby-health", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def _lost_the_lease() -> None:
    # Another replica may be leading already: stop at once, without finishing handlers
    # (the Deployment restarts this container, which then stands by).
    logging.shutdown()
    os._exit(1)


def run(
    settings: OperatorSettings,
    *,
    namespaces: list[str],
    leader_election: LeaderElectionConfig | None = None,
    workers: int = 8,
) -> None:
    """Run until SIGINT/SIGTERM. With ``leader_election``, only the replica holding the Lease reconciles."""
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
        log.info("metrics on :%d/metrics", settings.metrics_port)
    elector: LeaderElection | None = None
    if leader_election is not None:
        lease = leader_election.lease_seconds
        elector = LeaderElection(
            api=api_client(),
            namespace=leader_election.namespace,
            name=leader_election.name,
            identity=LeaderElectionConfig.default_identity(),
            lease_duration=lease,
            renew_deadline=lease * 2 / 3,
            retry_period=lease / 7.5,
        )
        with standby_health(settings.health_port):
            elector.acquire()
        elector.keep(on_lost=_lost_the_lease)
    registry = build_registry(settings, workers=workers, namespaces=namespaces)
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    try:
        asyncio.run(
            kopf.operator(
                registry=registry,
                clusterwide=not namespaces,
                namespaces=namespaces,
                standalone=True,
                liveness_endpoint=liveness,
                memo=kopf.Memo(),
            )
        )
    finally:
        if elector is not None:
            elector.release()
