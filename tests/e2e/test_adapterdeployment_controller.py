"""The AdapterDeployment controller end to end: serving pods of the trainer image run the reference server.

One story, in order: serve a first adapter, reachable through its Service from
another pod; refuse one whose gates failed and one whose server cannot start,
without a single failed request; promote a second good adapter through a canary
that an online eval Job scores through its endpoint; roll back a canary whose
online eval fails; revert by spec to the first.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.cluster import Cluster
from tests.conftest import ROOT
from tests.e2e.helpers import (
    WatchedRun,
    adapter_deployment,
    apply,
    condition,
    example,
    get,
    image_refs,
    list_items,
    phase_in,
    pods,
    quick,
    run_pod,
    wait_for,
)

# The first test's setup trains the story's FineTunes (the session's quickstart may still be training):
# up to 900 s each by the fixture's own waits, more than the suite's 600 s default.
pytestmark = pytest.mark.timeout(1800)

SERVED = "support-bot"  # the AdapterDeployment, and the model name it serves
A = "support-router"  # the session's quickstart FineTune: the first good adapter
QUEUES = {
    "BILLING/REFUND", "BILLING/INVOICE", "ACCOUNT/PASSWORD", "ACCOUNT/DELETE",
    "SHIPPING/DELAY", "SHIPPING/DAMAGED", "PRODUCT/BUG", "PRODUCT/FEATURE",
}  # fmt: skip
PROMPT = "Route this support ticket: Hello, the tracking for my headphones has not moved for days."


def adep_status(cluster: Cluster, ns: str, adep: str = SERVED) -> dict[str, Any]:
    obj = get(cluster, ns, "adapterdeployment", adep) or {}
    found: dict[str, Any] = obj.get("status") or {}
    return found


def stable_pods(cluster: Cluster, ns: str, adep: str = SERVED) -> list[dict[str, Any]]:
    return [
        p
        for p in list_items(cluster, ns, "pods", f"kubetune.io/adapterdeployment={adep},kubetune.io/role=stable")
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

    def __init__(self, cluster: Cluster, ns: str, adep: str = SERVED) -> None:
        self.cluster, self.ns, self.adep = cluster, ns, adep
        self.sent = 0
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            pods = stable_pods(self.cluster, self.ns, self.adep)
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
def story(cluster: Cluster, quickstart: WatchedRun) -> str:
    """The quickstart's namespace, with three finished FineTunes: two good adapters (the quickstart's, b)
    and one whose gates failed."""
    ns = quickstart.ns
    apply(cluster, ns, example("adapter-b", training={"seed": 7}))
    bad = quick("adapter-bad")  # its only use: an adapter whose gates failed (no baselines to score)
    bad["spec"]["evaluation"]["gates"] = [{"metric": "perplexity", "max": "1"}]
    apply(cluster, ns, bad)
    for name in (A, "adapter-b", "adapter-bad"):
        wait_for(f"{name} to finish", phase_in(cluster, ns, name, "Succeeded", "Failed"), timeout=900)
    return ns


def deployment_doc(
    fine_tune: str | None = None,
    uri: str | None = None,
    digest: str | None = None,
    online_eval: str | None = None,
    adep: str = SERVED,
) -> dict[str, Any]:
    """The story's AdapterDeployment; ``online_eval``: a dataset the canary is scored on (exact_match >= 0.5)."""
    adapter: dict[str, Any] = {"fineTuneRef": {"name": fine_tune}} if fine_tune else {"uri": uri, "digest": digest}
    doc = adapter_deployment(adep, adapter, served=SERVED)
    if online_eval:
        doc["spec"]["rollout"]["onlineEval"] = {
            "dataset": online_eval, "metric": "exact_match", "min": "0.5", "maxExamples": 24,
        }  # fmt: skip
    return doc


def history(status: dict[str, Any]) -> list[tuple[str, str]]:
    return [(h["outcome"], h["reason"]) for h in status.get("history") or []]


def serving(cluster: Cluster, ns: str, fine_tune: str, adep: str = SERVED) -> dict[str, Any]:
    """Point the AdapterDeployment at ``fine_tune`` and wait until it serves as stable (Healthy).

    Each test starts from here, so the tests share the story's FineTunes but not an order.
    """
    apply(cluster, ns, deployment_doc(fine_tune, adep=adep))
    return wait_for(
        f"{fine_tune} to serve",
        lambda: (
            (s := adep_status(cluster, ns, adep)).get("phase") == "Healthy"
            and (s.get("stable") or {}).get("fineTune") == fine_tune
            and s
        ),
        timeout=240,
    )


def test_first_adapter_serves_and_changes_the_answers(cluster: Cluster, story: str) -> None:
    ns = story
    st = serving(cluster, ns, A)
    assert condition(st, "Ready")["status"] == "True"
    assert st["stable"]["fineTune"] == A
    assert st["readyReplicas"] == 1
    (pod,) = stable_pods(cluster, ns)
    ip = pod["status"]["podIP"]
    tuned, base = complete(ip, SERVED), complete(ip, f"{SERVED}-base")
    assert tuned != base, "the adapter did not change the model's answer"
    # Through the chat template it was trained with, the adapter answers with a queue name.
    assert chat(ip, SERVED).strip() in QUEUES
    assert chat(ip, f"{SERVED}-base").strip() not in QUEUES


@pytest.mark.real_node
def test_the_stable_service_answers_from_another_pod(cluster: Cluster, story: str) -> None:
    """In-cluster clients use the Service: ClusterIP, kube-proxy, EndpointSlices of the ready stable pods."""
    ns = story
    st = serving(cluster, ns, A)
    endpoint = st["endpoint"]
    assert endpoint == f"http://{SERVED}.{ns}.svc/v1", st
    client = f"""
import json, urllib.request
body = json.dumps({{"model": "{SERVED}", "messages": [{{"role": "user", "content": {PROMPT!r}}}],
                   "max_tokens": 8, "temperature": 0}}).encode()
request = urllib.request.Request("{endpoint}/chat/completions", data=body,
                                 headers={{"Content-Type": "application/json"}})
with urllib.request.urlopen(request, timeout=60) as response:
    print(json.loads(response.read())["choices"][0]["message"]["content"].strip())
"""
    answer = run_pod(cluster, ns, "client", image_refs()["operator"], ["python", "-c", client]).strip()
    assert answer in QUEUES, answer
    (pod,) = stable_pods(cluster, ns)
    assert answer == chat(pod["status"]["podIP"], SERVED).strip(), "the Service answered differently from its pod"


def test_a_finetune_whose_gates_failed_is_rejected_while_stable_serves(cluster: Cluster, story: str) -> None:
    ns = story
    serving(cluster, ns, A)
    with Traffic(cluster, ns) as traffic:
        apply(cluster, ns, deployment_doc("adapter-bad"))
        st = wait_for("Rejected", lambda: (s := adep_status(cluster, ns)).get("phase") == "Degraded" and s)
        time.sleep(2)
    assert history(st)[0] == ("Rejected", "EvalGateFailed")
    assert condition(st, "Stalled")["status"] == "True"
    assert st["stable"]["fineTune"] == A
    assert traffic.sent > 0
    assert traffic.failed == []


def test_a_revision_that_cannot_start_rolls_back_without_failed_requests(cluster: Cluster, story: str) -> None:
    ns = story
    serving(cluster, ns, A)
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
    assert st["stable"]["fineTune"] == A
    assert traffic.sent > 0
    assert traffic.failed == []
    wait_for("the canary Deployment to go", lambda: get(cluster, ns, "deployment", f"{SERVED}-canary") is None or None)
    print(f"\nspec change -> rollback: {rollback_seconds:.1f}s")


def test_a_good_second_adapter_is_promoted_through_a_canary_and_a_revert_cuts_back(
    cluster: Cluster, story: str
) -> None:
    ns = story
    serving(cluster, ns, A)
    b_digest = (get(cluster, ns, "finetune", "adapter-b") or {})["status"]["adapter"]["digest"]
    a_digest = (get(cluster, ns, "finetune", A) or {})["status"]["adapter"]["digest"]
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
    apply(cluster, ns, deployment_doc(A))
    st = wait_for(
        "the revert",
        lambda: (s := adep_status(cluster, ns)).get("phase") == "Healthy" and s["stable"]["fineTune"] == A and s,
        timeout=180,
    )
    revert_seconds = time.monotonic() - started
    assert history(st)[0] == ("Promoted", "Revert")
    assert st["stable"]["adapterDigest"] == a_digest
    assert st["stable"]["revision"] == 1, "a revert reuses the revision from history"
    print(f"\nspec change -> promotion: {promotion_seconds:.1f}s; revert -> cut-over: {revert_seconds:.1f}s")


# ----------------------------------------------------------------------------- online eval
# Each test has an AdapterDeployment of its own: in one whose history holds adapter-b (promoted, then
# superseded by the revert above), going back to it is a revert, cut over at once without a canary.


def eval_jobs(cluster: Cluster, ns: str, adep: str) -> list[dict[str, Any]]:
    jobs = list_items(cluster, ns, "jobs", f"kubetune.io/adapterdeployment={adep}")
    return [j for j in jobs if "-eval" in j["metadata"]["name"]]


@pytest.mark.real_node
def test_a_canary_whose_online_eval_passes_is_promoted(cluster: Cluster, story: str) -> None:
    """The eval Job scores the canary through its endpoint on the held-out set; it passes, the canary is promoted."""
    ns, adep = story, "evaluated-bot"
    serving(cluster, ns, A, adep)
    apply(cluster, ns, deployment_doc("adapter-b", online_eval="s3://datasets/support/heldout.jsonl", adep=adep))
    st = wait_for(
        "promotion after the online eval",
        lambda: (
            (s := adep_status(cluster, ns, adep)).get("phase") == "Healthy"
            and s["stable"]["fineTune"] == "adapter-b"
            and s
        ),
        timeout=300,
    )
    assert history(st)[0] == ("Promoted", "CanaryPassed")
    (job,) = eval_jobs(cluster, ns, adep)
    assert any(c["type"] == "Complete" and c["status"] == "True" for c in job["status"]["conditions"])
    (pod,) = pods(cluster, ns, job["metadata"]["name"])
    summary = json.loads(pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"])
    assert summary["reason"] == "Succeeded", summary
    assert summary["examples"] == 24
    assert summary["score"] >= 0.5, summary
    assert f"model {SERVED} at http://" in summary["message"], summary
    cluster.kubectl("delete", "adapterdeployment", adep, "-n", ns, "--wait=false")


@pytest.mark.real_node
def test_a_canary_whose_online_eval_fails_is_rolled_back(cluster: Cluster, story: str) -> None:
    """Scored on a held-out set whose labels are all wrong, the canary fails its online eval: rolled back."""
    ns, adep = story, "checked-bot"
    serving(cluster, ns, A, adep)
    lines = (ROOT / "docs/examples/data/support/heldout.jsonl").read_text().splitlines()
    wrong = [json.dumps({**json.loads(line), "response": "NOT/A_QUEUE"}) for line in lines]
    cluster.s3.client().put_object(Bucket="datasets", Key=f"{ns}/mislabelled.jsonl", Body="\n".join(wrong).encode())
    with Traffic(cluster, ns, adep) as traffic:
        apply(cluster, ns, deployment_doc("adapter-b", online_eval=f"s3://datasets/{ns}/mislabelled.jsonl", adep=adep))
        st = wait_for(
            "RolledBack",
            lambda: (
                (s := adep_status(cluster, ns, adep)).get("history")
                and s["history"][0]["outcome"] == "RolledBack"
                and s
            ),
            timeout=300,
        )
    assert history(st)[0] == ("RolledBack", "OnlineEvalFailed"), history(st)
    assert "exact_match 0.0000 < 0.5 over 24 examples" in st["history"][0]["message"], st["history"][0]
    assert st["stable"]["fineTune"] == A
    assert "canary" not in st
    assert traffic.sent > 0
    assert traffic.failed == []
    (job,) = eval_jobs(cluster, ns, adep)
    assert any(c["type"] == "Failed" and c["status"] == "True" for c in job["status"]["conditions"])
    cluster.kubectl("delete", "adapterdeployment", adep, "-n", ns, "--wait=false")
