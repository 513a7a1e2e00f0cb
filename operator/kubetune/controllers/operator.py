"""Running the operator: kopf settings, API client, metrics and health endpoints."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from prometheus_client import start_http_server

from kubetune.builders.settings import OperatorSettings
from kubetune.controllers import adapterdeployment, finetune
from kubetune.controllers.kube import Kube

log = logging.getLogger("kubetune")


def api_client(workers: int = 8) -> k8s.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG)."""
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
    configuration = k8s.Configuration.get_default_copy()
    # One connection per handler thread, or requests queue for a free connection under load.
    configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize or 0, workers * 2)
    return k8s.ApiClient(configuration)


def build_registry(settings: OperatorSettings, *, workers: int) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    # A registry of our own does not get kopf's default login handlers: log in like api_client() does.
    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
        settings.persistence.finalizer = "kubetune.io/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="kubetune.io", key="last-handled-configuration"
        )
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
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        memo.kube = Kube(api=api_client(workers))
        memo.kube.warm_up()

    finetune.register(settings, registry)
    adapterdeployment.register(settings, registry)
    return registry


def run(
    settings: OperatorSettings,
    *,
    namespaces: list[str],
    peering: str | None,
    workers: int = 8,
) -> None:
    """Run until SIGINT/SIGTERM. With ``peering``, replicas elect one active instance (kopf peering)."""
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
        log.info("metrics on :%d/metrics", settings.metrics_port)
    registry = build_registry(settings, workers=workers)
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    asyncio.run(
        kopf.operator(
            registry=registry,
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=peering is None,
            peering_name=peering,
            liveness_endpoint=liveness,
            memo=kopf.Memo(),
        )
    )
