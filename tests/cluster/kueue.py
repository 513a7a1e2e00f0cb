"""Kueue on the test cluster: upstream's manager and manifests, built from the Go module proxy.

``build-node-binaries.sh kueue`` builds ``sigs.k8s.io/kueue/cmd/kueue`` and
copies the module's ``config/`` (kustomize sources). ``install`` renders
``config/default`` with kubectl's built-in kustomize, swaps the upstream
image for a local one (the static binary on an empty root, imported into the
node), applies it and waits until the manager is ready and its webhooks
answer. Everything else is upstream's: CRDs, RBAC, the mutating and
validating webhooks with Kueue's own certificate rotation, the visibility
API. Needs a real node (the manager is a pod; the API server calls its
webhooks by pod IP).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from tests.cluster import Cluster
from tests.cluster.node import images

BUILD_SCRIPT = Path(__file__).with_name("build-node-binaries.sh")
VERSION = "v0.17.0"
IMAGE = f"localhost/kubetune/kueue:{VERSION}"
NAMESPACE = "kueue-system"
DEPLOYMENT = "kueue-controller-manager"


def find_kueue() -> Path:
    """The folder holding the ``kueue`` binary (its manifests' sources are in ``../config``); builds on first use."""
    result = subprocess.run(["bash", str(BUILD_SCRIPT), "kueue"], stdout=subprocess.PIPE, text=True, check=True)
    return Path(result.stdout.strip().splitlines()[-1])


def manifests(cluster: Cluster, config: Path) -> list[dict[str, Any]]:
    """Upstream's ``config/default``, rendered, with the manager's image replaced by the local one."""
    rendered = cluster.kubectl("kustomize", str(config / "default")).stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    for obj in objects:
        if obj["kind"] == "Deployment" and obj["metadata"]["name"] == DEPLOYMENT:
            for container in obj["spec"]["template"]["spec"]["containers"]:
                container["image"] = IMAGE
                container["imagePullPolicy"] = "Never"
    return objects


def install(cluster: Cluster, timeout: float = 180.0) -> None:
    """Install Kueue and return once its webhooks admit objects."""
    if cluster.node is None:
        raise RuntimeError("Kueue runs as a pod: start the cluster with a real node")
    bin_dir = find_kueue()
    cache = cluster.node.paths.image_cache
    manager = images.Image(IMAGE, files={"manager": bin_dir / "kueue"}, entrypoint=["/manager"])
    cluster.node.import_images([images.cached_archive(manager, cache)])
    objects = manifests(cluster, bin_dir.parent / "config")
    cluster.kubectl(
        "apply", "--server-side", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )
    cluster.kubectl(
        "rollout", "status", f"deployment/{DEPLOYMENT}", f"--namespace={NAMESPACE}", f"--timeout={timeout}s"
    )
    _wait_for_webhooks(cluster, timeout)


def _wait_for_webhooks(cluster: Cluster, timeout: float) -> None:
    """Ready pods can still refuse webhook calls for a moment (certificates being injected): probe with a dry run."""
    probe = {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "ResourceFlavor", "metadata": {"name": "webhook-probe"}}
    deadline = time.monotonic() + timeout
    while True:
        result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(probe), check=False)
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"Kueue's webhooks did not answer within {timeout:.0f}s: {result.stderr.strip()}")
        time.sleep(1)
