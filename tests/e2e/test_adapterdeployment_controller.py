"""The AdapterDeployment controller end to end: serving pods run the reference server as local processes.

One story, in order: serve a first adapter; refuse one whose gates failed and
one whose server cannot start, without a single failed request; promote a
second good adapter through a canary; revert by spec to the first.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster import Cluster
from tests.e2e.helpers import (
    ACCESS_KEY,
    SECRET_KEY,
    Operator,
    adapter_deployment,
    apply,
    condition,
    example,
    get,
    phase_in,
    wait_for,
)

SERVED = "support-bot"
QUEUES = {
    "BILLING/REFUND", "BILLING/INVOICE", "ACCOUNT/PASSWORD", "ACCOUNT/DELETE",
    "SHIPPING/DELAY", "SHIPPING/DAMAGED", "PRODUCT/BUG", "PRODUCT/FEATURE",
}  # fmt: skip
PROMPT = "Route this support ticket: Hello, the tracking for my headphones has not moved for days."


def adep_status(cluster: Cluster, ns: str) -> dict[str, Any]:
    obj = get(cluster, ns, "adapterdeployment", SERVED) or {}
    found: dict[str, Any] = obj.get("status") or {}
    return found


def stable_pods(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "pods", "-n", ns, "-l", f"kubetune.io/adapterdeployment={SERVED},kubetune.io/role=stable", "-o", "json"
    )
    return [
        p
        for p in json.loads(out.stdout)["items"]
        if not p["metadata"].get("deletionTimestamp")
        and any(c.get("type") == "Ready" and c.get("status") == "True" for c in p["status"].get("conditions") or [])
    ]


def complete(ip: str, model: str, prompt: str = PROMPT, timeout: float = 30) -> str:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}).encode()
    request = urllib.request.Request(
        f"http://{ip}:8000/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return str(json.loads(response.read())["choices"][0]["text"])


def chat(ip: str, model: str, prompt: str = PROMPT) -> str:
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0}
    )
    request = urllib.request.Request(
        f"http://{ip}:8000/v1/chat/completions", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.loads(response.read())["choices"][0]["message"]["content"])


class Traffic:
    """Clients sending requests to the stable pods the whole time; counts every failure."""

    def __init__(self, cluster: Cluster, ns: str) -> None:
        self.cluster, self.ns = cluster, ns
        self.sent = 0
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            pods = stable_pods(self.cluster, self.ns)
            for pod in pods:
                try:
                    complete(pod["status"]["podIP"], SERVED)
                except (urllib.error.URLError, OSError, KeyError) as e:
                    self.failed.append(f"{pod['metadata']['name']}: {e}")
                self.sent += 1

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


@pytest.fixture(scope="module")
def story(cluster: Cluster, operator: Operator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A namespace with three finished FineTunes: two good adapters (a, b) and one whose gates failed."""
    ns = f"serving-{int(time.time()) % 100000}"
    cluster.kubectl("create", "namespace", ns)
    wait_for("the default ServiceAccount", lambda: get(cluster, ns, "serviceaccount", "default"))
    cluster.kubectl(
        "create", "secret", "generic", "s3-credentials", "-n", ns,
        f"--from-literal=AWS_ACCESS_KEY_ID={ACCESS_KEY}", f"--from-literal=AWS_SECRET_ACCESS_KEY={SECRET_KEY}",
    )  # fmt: skip
    apply(cluster, ns, example("adapter-a"))
    apply(cluster, ns, example("adapter-b", training={"seed": 7}))
    bad = example("adapter-bad", training={"epochs": 1})
    bad["spec"]["evaluation"]["gates"] = [{"metric": "perplexity", "max": "1"}]
    apply(cluster, ns, bad)
    for name in ("adapter-a", "adapter-b", "adapter-bad"):
        wait_for(f"{name} to finish", phase_in(cluster, ns, name, "Succeeded", "Failed"), timeout=400)
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def deployment_doc(fine_tune: str | None = None, uri: str | None = None, digest: str | None = None) -> dict[str, Any]:
    adapter: dict[str, Any] = {"fineTuneRef": {"name": fine_tune}} if fine_tune else {"uri": uri, "digest": digest}
    return adapter_deployment(SERVED, adapter)


def history(status: dict[str, Any]) -> list[tuple[str, str]]:
    return [(h["outcome"], h["reason"]) for h in status.get("history") or []]


def serving(cluster: Cluster, ns: str, fine_tune: str) -> dict[str, Any]:
    """Point the AdapterDeployment at ``fine_tune`` and wait until it serves as stable (Healthy).

    Each test starts from here, so the tests share the story's FineTunes but not an order.
    """
    apply(cluster, ns, deployment_doc(fine_tune))
    return wait_for(
        f"{fine_tune} to serve",
        lambda: (
            (s := adep_status(cluster, ns)).get("phase") == "Healthy"
            and (s.get("stable") or {}).get("fineTune") == fine_tune
            and s
        ),
        timeout=180,
    )


def test_first_adapter_serves_and_changes_the_answers(cluster: Cluster, story: str) -> None:
    ns = story
    st = serving(cluster, ns, "adapter-a")
    assert condition(st, "Ready")["status"] == "True"
    assert st["stable"]["fineTune"] == "adapter-a"
    assert st["readyReplicas"] == 1
    (pod,) = stable_pods(cluster, ns)
    ip = pod["status"]["podIP"]
    tuned, base = complete(ip, SERVED), complete(ip, f"{SERVED}-base")
    assert tuned != base, "the adapter did not change the model's answer"
    # Through the chat template it was trained with, the adapter answers with a queue name.
    assert chat(ip, SERVED).strip() in QUEUES
    assert chat(ip, f"{SERVED}-base").strip() not in QUEUES


def test_a_finetune_whose_gates_failed_is_rejected_while_stable_serves(cluster: Cluster, story: str) -> None:
    ns = story
    serving(cluster, ns, "adapter-a")
    with Traffic(cluster, ns) as traffic:
        apply(cluster, ns, deployment_doc("adapter-bad"))
        st = wait_for("Rejected", lambda: (s := adep_status(cluster, ns)).get("phase") == "Degraded" and s)
        time.sleep(2)
    assert history(st)[0] == ("Rejected", "EvalGateFailed")
    assert condition(st, "Stalled")["status"] == "True"
    assert st["stable"]["fineTune"] == "adapter-a"
    assert traffic.sent > 0
    assert traffic.failed == []


def test_a_revision_that_cannot_start_rolls_back_without_failed_requests(cluster: Cluster, story: str) -> None:
    ns = story
    serving(cluster, ns, "adapter-a")
    good = (get(cluster, ns, "finetune", "adapter-b") or {})["status"]["adapter"]["uri"]
    corrupted = "sha256:" + "0" * 64
    started = time.monotonic()
    with Traffic(cluster, ns) as traffic:
        apply(cluster, ns, deployment_doc(uri=good, digest=corrupted))
        st = wait_for(
            "RolledBack",
            lambda: (s := adep_status(cluster, ns)).get("history") and s["history"][0]["outcome"] == "RolledBack" and s,
            timeout=180,
        )
        rollback_seconds = time.monotonic() - started
        time.sleep(2)
    assert st["history"][0]["reason"] in ("CanaryCrashLoop", "CanaryNotReady")
    assert "canary" not in st
    assert st["stable"]["fineTune"] == "adapter-a"
    assert traffic.sent > 0
    assert traffic.failed == []
    wait_for("the canary Deployment to go", lambda: get(cluster, ns, "deployment", f"{SERVED}-canary") is None or None)
    print(f"\nspec change -> rollback: {rollback_seconds:.1f}s")


def test_a_good_second_adapter_is_promoted_through_a_canary_and_a_revert_cuts_back(
    cluster: Cluster, story: str
) -> None:
    ns = story
    serving(cluster, ns, "adapter-a")
    b_digest = (get(cluster, ns, "finetune", "adapter-b") or {})["status"]["adapter"]["digest"]
    a_digest = (get(cluster, ns, "finetune", "adapter-a") or {})["status"]["adapter"]["digest"]
    started = time.monotonic()
    apply(cluster, ns, deployment_doc("adapter-b"))
    saw_canary = wait_for("a canary", lambda: adep_status(cluster, ns).get("canary"))
    assert saw_canary["fineTune"] == "adapter-b"
    st = wait_for(
        "promotion",
        lambda: (
            (s := adep_status(cluster, ns)).get("phase") == "Healthy" and s["stable"]["fineTune"] == "adapter-b" and s
        ),
        timeout=180,
    )
    promotion_seconds = time.monotonic() - started
    assert history(st)[:2] == [("Promoted", "CanaryPassed"), ("Superseded", "Replaced")]
    pods = wait_for(
        "the new stable pods",
        lambda: (
            [
                p
                for p in stable_pods(cluster, ns)
                if p["metadata"]["annotations"]["kubetune.io/adapter-digest"] == b_digest
            ]
            and all(
                p["metadata"]["annotations"]["kubetune.io/adapter-digest"] == b_digest for p in stable_pods(cluster, ns)
            )
            and stable_pods(cluster, ns)
        ),
    )
    assert complete(pods[0]["status"]["podIP"], SERVED)

    started = time.monotonic()
    apply(cluster, ns, deployment_doc("adapter-a"))
    st = wait_for(
        "the revert",
        lambda: (
            (s := adep_status(cluster, ns)).get("phase") == "Healthy" and s["stable"]["fineTune"] == "adapter-a" and s
        ),
        timeout=180,
    )
    revert_seconds = time.monotonic() - started
    assert history(st)[0] == ("Promoted", "Revert")
    assert st["stable"]["adapterDigest"] == a_digest
    assert st["stable"]["revision"] == 1, "a revert reuses the revision from history"
    print(f"\nspec change -> promotion: {promotion_seconds:.1f}s; revert -> cut-over: {revert_seconds:.1f}s")
