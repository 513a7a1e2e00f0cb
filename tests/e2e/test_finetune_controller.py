"""The FineTune controller end to end: the operator installed with the chart, the real API
server and Job controller, trainer pods from the trainer image on the real node, and S3.

The quickstart's FineTune (the session's ``quickstart``) is trained once and read by several
tests: its status, its log. Tests of the machinery rather than the model train ``quick``
FineTunes (one epoch, a few eval examples).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_trainer import storage
from tests.cluster import Cluster
from tests.conftest import ROOT
from tests.e2e.helpers import (
    ACCESS_KEY,
    SECRET_KEY,
    Operator,
    WatchedRun,
    apply,
    condition,
    example,
    get,
    jobs,
    phase_in,
    pods,
    quick,
    running_pod,
    s3_settings,
    status,
    wait_for,
)

# ----------------------------------------------------------------------------- the happy path


@pytest.mark.real_node
def test_a_training_pod_runs_restricted_as_seen_from_inside(cluster: Cluster, operator: Operator, tenant: str) -> None:
    """The trainer itself is uid 65532 with no capabilities, on a read-only root; the pod's init is pause.

    Training pods share their process namespace, so the trainer is not PID 1 (a SIGTERM that comes
    before its handler stops it): the script finds it by its command line.
    """
    ns = tenant
    apply(cluster, ns, quick("inside", training={"epochs": 8}))
    job = wait_for("the Job", lambda: jobs(cluster, ns))[0]["metadata"]["name"]
    pod = wait_for("the running trainer pod", lambda: running_pod(cluster, ns, job), timeout=300)
    script = r"""
        echo "uid=$(id -u) gid=$(id -g)"
        wanted="kubetune-trainer"" run"  # split: this script's own command line must not match
        for p in /proc/[0-9]*; do
            if tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -q "$wanted"; then pid=${p#/proc/}; break; fi
        done
        grep -E '^(Uid|Gid|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' "/proc/$pid/status"
        echo "cmdline=$(tr '\0' ' ' < "/proc/$pid/cmdline")"
        echo "init=$(tr '\0' ' ' < /proc/1/cmdline)"
        echo "omp=$(tr '\0' '\n' < "/proc/$pid/environ" | sed -n 's/^OMP_NUM_THREADS=//p')"
        awk '$2 == "/" { print "rootmount=" $4 }' /proc/mounts
        if touch /probe 2>/dev/null; then echo root=writable; else echo root=read-only; fi
        if touch /scratch/probe; then echo scratch=writable; fi
    """
    out = cluster.kubectl("exec", pod, "-n", ns, "-c", "trainer", "--", "sh", "-c", script).stdout
    facts = dict(re.findall(r"^(\w+)[:=]\s*(.*?)\s*$", out, flags=re.MULTILINE))
    assert "kubetune-trainer run --config" in facts["cmdline"], out
    assert "pause" in facts["init"], out  # the pod's init, not the trainer
    assert facts["Uid"].split() == ["65532"] * 4, out  # real, effective, saved, filesystem
    assert facts["Gid"].split() == ["65532"] * 4, out
    assert facts["uid"] == "65532 gid=65532", out
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert facts[capabilities] == "0000000000000000", out
    assert facts["NoNewPrivs"] == "1", out
    assert facts["Seccomp"] == "2", out  # a filter: RuntimeDefault
    assert facts["rootmount"].split(",")[0] == "ro", out
    assert facts["root"] == "read-only", out
    assert facts["scratch"] == "writable", out
    assert facts["omp"] == "1", out  # one torch thread for its quarter core (TEST_CPU), rounded up
    cluster.kubectl("delete", "ft", "inside", "-n", ns, "--wait=false")  # seen enough: no need to train


def test_example_finetune_succeeds_with_progress_adapter_and_evaluation(
    cluster: Cluster, operator: Operator, quickstart: WatchedRun
) -> None:
    ns = quickstart.ns
    st = quickstart.finished(cluster)
    waited = cluster.kubectl(
        "wait", "--for=condition=Succeeded", "ft/support-router", "-n", ns, "--timeout=120s", check=False
    )
    assert waited.returncode == 0, (st, operator.log()[-3000:])
    st = status(cluster, ns, "support-router")
    assert len(quickstart.steps) >= 2, f"progress never moved: {quickstart.steps}"

    assert st["phase"] == "Succeeded"
    assert st["observedGeneration"] == 1
    assert st["attempts"] == 1
    assert st["progress"]["percent"] == 100
    adapter = st["adapter"]
    assert adapter["uri"].startswith(f"s3://adapters/{ns}/support-router/")
    assert adapter["promotable"] is True
    fetched = storage.fetch_dir(adapter["uri"], Path(cluster.workdir) / f"{ns}-adapter", s3_settings(cluster))
    assert (fetched / "adapter_config.json").is_file()
    assert storage.digest_of_dir(fetched)[0] == adapter["digest"]

    evaluation = st["evaluation"]
    assert evaluation["passed"] is True
    assert set(evaluation["baselines"]) == {"base", "prompted"}
    assert float(evaluation["metrics"]["exact_match"]) > float(evaluation["baselines"]["prompted"]["exact_match"])
    assert evaluation["score"] == evaluation["metrics"]["exact_match"]
    assert [g["passed"] for g in evaluation["gates"]] == [True, True]
    assert st["data"]["trainExamples"] > 0
    for type_ in ("Ready", "Succeeded", "GatesPassed", "Validated", "DataReady", "Trained", "Evaluated"):
        assert condition(st, type_).get("status") == "True", type_
    assert condition(st, "Stalled")["status"] == "False"

    printed = cluster.kubectl("get", "ft", "support-router", "-n", ns).stdout.splitlines()[1].split()
    assert printed[1:3] == ["Succeeded", "LoRA"]
    events = cluster.kubectl("get", "events", "-n", ns, "--field-selector", "involvedObject.name=support-router").stdout
    assert "Succeeded" in events
    metrics = operator.metrics()
    assert "kubetune_job_launches_total" in metrics
    assert 'kubetune_finetunes{phase="Succeeded"}' in metrics


@pytest.mark.real_node
def test_kubectl_logs_of_the_training_pod_tell_the_run(cluster: Cluster, quickstart: WatchedRun) -> None:
    """The trainer's own account of the run, through the API server and the kubelet (``kubectl logs``)."""
    st = quickstart.finished(cluster)
    (pod,) = pods(cluster, quickstart.ns, st["jobName"])
    log = cluster.pod_log(quickstart.ns, pod["metadata"]["name"], "trainer")
    stages = re.findall(r"kubetune_trainer\.progress: stage (\w+)", log)
    assert [s for i, s in enumerate(stages) if s not in stages[:i]] == [
        "prepare", "train", "evaluate", "publish", "done",
    ], log[-3000:]  # fmt: skip
    steps = [int(n) for n in re.findall(r"kubetune_trainer\.train: step (\d+)/\d+ loss", log)]
    assert len(steps) >= 2, log[-3000:]
    assert steps == sorted(steps), log[-3000:]
    assert f"checkpoint s3://adapters/{quickstart.ns}/support-router/" in log


def test_malformed_dataset_fails_once_with_the_line(cluster: Cluster, operator: Operator, tenant: str) -> None:
    ns = tenant
    lines = (ROOT / "docs/examples/data/support/train.jsonl").read_text().splitlines()[:40]
    for i in (3, 7, 11):
        lines[i] = lines[i][: len(lines[i]) // 2]
    cluster.s3.client().put_object(Bucket="datasets", Key=f"{ns}/train.jsonl", Body="\n".join(lines).encode())
    doc = example("bad-data")
    doc["spec"]["dataset"]["train"] = f"s3://datasets/{ns}/train.jsonl"
    apply(cluster, ns, doc)
    st = wait_for("Failed", phase_in(cluster, ns, "bad-data", "Failed", "Succeeded"))
    assert st["phase"] == "Failed"
    assert condition(st, "Ready")["reason"] == "DataInvalid"
    assert "train.jsonl:4" in st["message"], st["message"]
    assert st["attempts"] == 1, "a bad dataset was retried"
    assert len(pods(cluster, ns, st["jobName"])) == 1
    uid = get(cluster, ns, "finetune", "bad-data")["metadata"]["uid"]  # type: ignore[index]
    keys = cluster.s3.client().list_objects_v2(Bucket="adapters", Prefix=f"{ns}/bad-data/{uid}/").get("Contents", [])
    assert not [k for k in keys if "/checkpoints/" in k["Key"]], "it trained on bad data"
    assert condition(st, "Stalled")["status"] == "True"


def test_killed_trainer_is_retried_and_resumes_from_its_checkpoint(
    cluster: Cluster, operator: Operator, tenant: str
) -> None:
    ns = tenant
    apply(cluster, ns, quick("resume", training={"checkpointEverySteps": 8, "epochs": 3}))
    st = wait_for("a checkpoint", lambda: (s := status(cluster, ns, "resume")).get("checkpoint") and s)
    job = st["jobName"]
    pod = wait_for("the running pod", lambda: running_pod(cluster, ns, job))
    cluster.kill_container(ns, pod, "trainer")
    st = wait_for("the end", phase_in(cluster, ns, "resume", "Succeeded", "Failed"))
    assert st["phase"] == "Succeeded", st
    assert st["attempts"] == 2
    assert st["progress"]["resumedFromStep"] >= 8
    terminated = [
        p["status"]["containerStatuses"][0]["state"]["terminated"]
        for p in pods(cluster, ns, job)
        if p["status"].get("containerStatuses")
    ]
    assert sorted(t["exitCode"] for t in terminated) == [0, 137]


@pytest.mark.exclusive  # restarts the session's operator
def test_operator_restart_mid_run_converges_with_one_job(cluster: Cluster, operator: Operator, tenant: str) -> None:
    ns = tenant
    apply(cluster, ns, quick("restart", training={"epochs": 2}))
    wait_for("training", phase_in(cluster, ns, "restart", "Training", "Evaluating", "Succeeded"))
    operator.restart()
    st = wait_for("the end", phase_in(cluster, ns, "restart", "Succeeded", "Failed"), timeout=300)
    assert st["phase"] == "Succeeded", st
    assert [j["metadata"]["name"] for j in jobs(cluster, ns)] == ["restart-train"]
    assert st["attempts"] == 1


def test_suspend_removes_pods_and_resume_continues_from_the_checkpoint(
    cluster: Cluster, operator: Operator, tenant: str
) -> None:
    ns = tenant
    doc = quick("pausable", training={"checkpointEverySteps": 8, "epochs": 3}, runPolicy={"backoffLimit": 2})
    apply(cluster, ns, doc)
    st = wait_for("a checkpoint", lambda: (s := status(cluster, ns, "pausable")).get("checkpoint") and s)
    job = st["jobName"]
    cluster.kubectl(
        "patch", "ft", "pausable", "-n", ns, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}'
    )
    suspended = wait_for("Suspended", phase_in(cluster, ns, "pausable", "Suspended"))
    # The suspend landed mid-training (a run that had already published has nothing to resume).
    assert suspended["progress"]["step"] < suspended["progress"]["totalSteps"], suspended
    wait_for(
        "no pods", lambda: not [p for p in pods(cluster, ns, job) if p["status"].get("phase") == "Running"] or None
    )
    cluster.kubectl(
        "patch", "ft", "pausable", "-n", ns, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}'
    )
    st = wait_for("the end", phase_in(cluster, ns, "pausable", "Succeeded", "Failed"), timeout=300)
    assert st["phase"] == "Succeeded", st
    assert st["progress"]["resumedFromStep"] >= 8


# ----------------------------------------------------------------------------- refusals and recoveries


def test_template_guardrail_violation_fails_naming_the_rule(cluster: Cluster, operator: Operator, tenant: str) -> None:
    ns = tenant
    template = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneTemplate",
        "metadata": {"name": f"strict-{ns}"[:63]},
        "spec": {"guardrails": {"maxEpochs": 4, "allowedBaseModelPrefixes": ["s3://models/"]}},
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(template))
    try:
        apply(cluster, ns, example("too-long", templateRef={"name": template["metadata"]["name"]}))
        st = wait_for("Failed", phase_in(cluster, ns, "too-long", "Failed"))
        assert condition(st, "Ready")["reason"] == "TemplateViolation"
        assert "spec.training.epochs 8 exceeds maxEpochs 4" in st["message"]
        assert not jobs(cluster, ns)
    finally:
        cluster.kubectl("delete", "finetunetemplate", template["metadata"]["name"], check=False)


def test_template_defaults_apply_under_the_spec(cluster: Cluster, operator: Operator, tenant: str) -> None:
    ns = tenant
    template = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneTemplate",
        "metadata": {"name": f"defaults-{ns}"[:63]},
        "spec": {"defaults": {"runPolicy": {"queueName": "platform", "backoffLimit": 1}, "training": {"seed": 7}}},
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(template))
    try:
        doc = example("templated", templateRef={"name": template["metadata"]["name"]})
        del doc["spec"]["runPolicy"]  # what the FineTune leaves unset, the template fills in
        apply(cluster, ns, doc)
        (job,) = wait_for("the Job", lambda: jobs(cluster, ns))
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "platform"
        assert job["spec"]["backoffLimit"] == 1
        config = json.loads(job["spec"]["template"]["metadata"]["annotations"]["kubetune.io/trainer-config"])
        assert config["training"]["seed"] == 7
        assert config["training"]["epochs"] == 8
    finally:
        cluster.kubectl("delete", "finetunetemplate", template["metadata"]["name"], check=False)


def test_failing_gates_end_failed_with_an_unpromotable_adapter(
    cluster: Cluster, operator: Operator, tenant: str
) -> None:
    ns = tenant
    doc = example("no-ship", training={"epochs": 1})
    doc["spec"]["evaluation"]["gates"] = [{"metric": "perplexity", "max": "1"}]
    apply(cluster, ns, doc)
    st = wait_for("the end", phase_in(cluster, ns, "no-ship", "Succeeded", "Failed"), timeout=300)
    assert st["phase"] == "Failed"
    assert condition(st, "Ready")["reason"] == "EvalGateFailed"
    assert condition(st, "GatesPassed")["status"] == "False"
    assert st["adapter"]["promotable"] is False
    assert st["adapter"]["uri"], "the adapter is kept for inspection"
    assert st["attempts"] == 1


def test_missing_credentials_secret_waits_and_recovers(cluster: Cluster, operator: Operator, namespace: str) -> None:
    ns = namespace  # no Secret yet
    apply(cluster, ns, quick("needs-creds"))
    st = wait_for(
        "StorageCredentialsMissing",
        lambda: (
            (s := status(cluster, ns, "needs-creds"))
            and condition(s, "Validated").get("reason") == "StorageCredentialsMissing"
            and s
        ),
    )
    assert st["phase"] == "Pending"
    assert "Secret s3-credentials" in condition(st, "Validated")["message"]
    assert condition(st, "Stalled")["status"] == "False"
    assert not jobs(cluster, ns)
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "s3-credentials",
        "-n",
        ns,
        f"--from-literal=AWS_ACCESS_KEY_ID={ACCESS_KEY}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={SECRET_KEY}",
    )
    wait_for("the Job", lambda: jobs(cluster, ns), timeout=60)
    st = wait_for(
        "validation",
        lambda: (s := status(cluster, ns, "needs-creds")) and condition(s, "Validated").get("status") == "True" and s,
    )
    assert st["phase"] != "Failed"


def s3_keys(cluster: Cluster, namespace: str, name: str, uid: str) -> list[str]:
    listed = cluster.s3.client().list_objects_v2(Bucket="adapters", Prefix=f"{namespace}/{name}/{uid}/")
    return [o["Key"] for o in listed.get("Contents", [])]


@pytest.mark.exclusive  # stops the session's operator
def test_a_running_finetune_carries_no_operator_state_and_deletes_with_the_operator_down(
    cluster: Cluster, operator: Operator, tenant: str
) -> None:
    ns = tenant
    apply(cluster, ns, quick("stateless", training={"epochs": 8}))
    wait_for("the run", phase_in(cluster, ns, "stateless", "Preparing", "Training", "Evaluating"))
    wait_for("a progress report", lambda: status(cluster, ns, "stateless").get("progress"))
    obj = get(cluster, ns, "finetune", "stateless")
    assert obj is not None
    assert not obj["metadata"].get("finalizers"), obj["metadata"]
    assert not [a for a in obj["metadata"].get("annotations") or {} if a.startswith("kubetune.io/")], obj["metadata"]
    operator.stop()
    try:
        # Nothing of the operator's blocks the deletion: it completes with no operator running.
        cluster.kubectl("delete", "ft", "stateless", "-n", ns, "--timeout=30s")
        assert get(cluster, ns, "finetune", "stateless") is None
    finally:
        operator.start()
    wait_for("no Job", lambda: not jobs(cluster, ns) or None, timeout=60)


def test_artifacts_are_retained_on_delete_unless_retention_is_delete(
    cluster: Cluster, operator: Operator, tenant: str
) -> None:
    ns = tenant
    apply(cluster, ns, quick("retains"))
    apply(cluster, ns, quick("drops", output={"retention": "Delete"}))
    uids = {}
    for name in ("retains", "drops"):
        st = wait_for("the end", phase_in(cluster, ns, name, "Succeeded", "Failed"), timeout=300)
        assert st["adapter"]["uri"], st
        obj = get(cluster, ns, "finetune", name)
        assert obj is not None
        uids[name] = obj["metadata"]["uid"]
        # Only the FineTune whose artifacts the operator must delete carries its finalizer.
        expected = ["kubetune.io/delete-artifacts"] if name == "drops" else []
        assert (obj["metadata"].get("finalizers") or []) == expected, obj["metadata"]
    retained = s3_keys(cluster, ns, "retains", uids["retains"])
    assert any(k.endswith("adapter_config.json") for k in retained), retained
    assert s3_keys(cluster, ns, "drops", uids["drops"])
    cluster.kubectl("delete", "ft", "retains", "drops", "-n", ns, "--timeout=60s")
    assert s3_keys(cluster, ns, "drops", uids["drops"]) == []
    assert s3_keys(cluster, ns, "retains", uids["retains"]) == retained


def test_a_job_deleted_under_a_running_finetune_is_created_again(
    cluster: Cluster, operator: Operator, tenant: str
) -> None:
    ns = tenant
    apply(cluster, ns, quick("rerun"))
    (job,) = wait_for("the Job", lambda: jobs(cluster, ns))
    cluster.kubectl("delete", "job", job["metadata"]["name"], "-n", ns, "--wait=true", "--timeout=60s")

    def replaced() -> list[dict[str, Any]] | None:
        found = [j for j in jobs(cluster, ns) if j["metadata"]["uid"] != job["metadata"]["uid"]]
        return found or None

    (again,) = wait_for("a new Job", replaced, timeout=60)
    assert again["metadata"]["name"] == job["metadata"]["name"]
    st = wait_for("the end", phase_in(cluster, ns, "rerun", "Succeeded", "Failed"), timeout=300)
    # One epoch may or may not beat prompting; either way the run finished, in the new Job.
    assert condition(st, "Ready")["reason"] in ("Succeeded", "EvalGateFailed"), st
    assert st["adapter"]["uri"], st
    (last,) = jobs(cluster, ns)
    assert last["metadata"]["uid"] == again["metadata"]["uid"]
    ended = {c["type"] for c in last["status"].get("conditions") or [] if c["status"] == "True"}
    assert ended & {"Complete", "Failed"}, last["status"]  # a failing gate fails the Job (podFailurePolicy)


def test_secrets_never_leak(cluster: Cluster, operator: Operator, tenant: str) -> None:
    # Runs after the others in this module: everything they left behind is searched too.
    ns = tenant
    apply(cluster, ns, quick("leakcheck"))
    wait_for("the end", phase_in(cluster, ns, "leakcheck", "Succeeded", "Failed"), timeout=300)
    haystacks = {
        "configmaps": cluster.kubectl("get", "configmaps", "-A", "-o", "yaml").stdout,
        "finetunes": cluster.kubectl("get", "finetunes", "-A", "-o", "yaml").stdout,
        "events": cluster.kubectl("get", "events", "-A", "-o", "yaml").stdout,
        "jobs": cluster.kubectl("get", "jobs", "-A", "-o", "yaml").stdout,
        "operator log": operator.log(),
    }
    for where, text in haystacks.items():
        for secret in (SECRET_KEY, ACCESS_KEY):
            assert secret not in text, f"a credential leaked into {where}"
    assert "secretKeyRef" in haystacks["jobs"]


def test_deleting_a_finetune_removes_its_job(cluster: Cluster, operator: Operator, tenant: str) -> None:
    ns = tenant
    apply(cluster, ns, quick("short-lived"))
    wait_for("the Job", lambda: jobs(cluster, ns))
    cluster.kubectl("delete", "ft", "short-lived", "-n", ns, "--timeout=60s")
    # The garbage collector removes what the FineTune owned.
    wait_for("no Job", lambda: not jobs(cluster, ns) or None, timeout=60)


@pytest.mark.real_node
def test_an_oom_killed_trainer_fails_at_once_naming_the_memory_to_raise(
    cluster: Cluster, operator: Operator, tenant: str
) -> None:
    """The kernel kills the trainer at its memory limit (cgroup); retrying with the same memory is pointless."""
    ns = tenant
    apply(cluster, ns, quick("starved", resources={"memory": "128Mi"}))
    st = wait_for("the end", phase_in(cluster, ns, "starved", "Failed", "Succeeded"), timeout=300)
    assert st["phase"] == "Failed", st
    assert condition(st, "Ready")["reason"] == "OutOfMemory", st
    assert "(128Mi); raise spec.resources.memory" in st["message"], st["message"]
    assert st["attempts"] == 1
    (pod,) = pods(cluster, ns, st["jobName"])
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137)
    (job,) = jobs(cluster, ns)
    assert job["spec"]["suspend"] is True, "the Job kept retrying"


# ----------------------------------------------------------------------------- pvc://


@pytest.fixture
def claim(cluster: Cluster, tenant: str, tiny_model: Path) -> Iterator[tuple[str, Path]]:
    """A PersistentVolumeClaim ``data`` bound to a hostPath volume holding the base model and the data.

    The folder belongs to the trainers' uid (a hostPath volume gets no fsGroup), as a platform
    team's storage would be set up for the pods that use it.
    """
    folder = cluster.workdir / "volumes" / tenant
    (folder / "models").mkdir(parents=True)
    (folder / "datasets").mkdir()
    (folder / "adapters").mkdir()
    shutil.copytree(tiny_model, folder / "models" / "tiny-llama")
    for name in ("train.jsonl", "val.jsonl", "heldout.jsonl"):
        (folder / "datasets" / name).write_bytes((ROOT / "docs/examples/data/support" / name).read_bytes())
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, 65532, 65532)
    volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": tenant},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": str(folder), "type": "Directory"},
            "claimRef": {"namespace": tenant, "name": "data"},
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "",
            "volumeName": tenant,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(volume))
    apply(cluster, tenant, pvc)
    wait_for("the claim to be bound", lambda: (get(cluster, tenant, "pvc", "data") or {}).get("status", {})
             .get("phase") == "Bound" or None, timeout=60)  # fmt: skip
    yield tenant, folder
    cluster.kubectl("delete", "pv", tenant, "--wait=false", check=False)


@pytest.mark.real_node
def test_a_finetune_on_a_claim_reads_and_writes_through_the_mounted_volume(
    cluster: Cluster, operator: Operator, claim: tuple[str, Path]
) -> None:
    """Base model, data and output on a pvc://: nothing of the run goes through S3."""
    ns, folder = claim
    doc = quick("on-a-claim", training={"epochs": 2, "checkpointEverySteps": 4})
    doc["spec"]["baseModel"]["uri"] = "pvc://data/models/tiny-llama/"
    doc["spec"]["dataset"] = {
        "train": "pvc://data/datasets/train.jsonl",
        "validation": "pvc://data/datasets/val.jsonl",
        "eval": "pvc://data/datasets/heldout.jsonl",
    }
    doc["spec"]["output"] = {"uri": "pvc://data/adapters/"}
    apply(cluster, ns, doc)
    st = wait_for("the end", phase_in(cluster, ns, "on-a-claim", "Succeeded", "Failed"), timeout=400)
    assert st["phase"] == "Succeeded", st
    uid = (get(cluster, ns, "finetune", "on-a-claim") or {})["metadata"]["uid"]
    assert st["adapter"]["uri"] == f"pvc://data/adapters/{ns}/on-a-claim/{uid}/adapter/"
    written = folder / "adapters" / ns / "on-a-claim" / uid
    assert (written / "adapter" / "adapter_config.json").is_file()
    assert storage.digest_of_dir(written / "adapter")[0] == st["adapter"]["digest"]
    manifest = json.loads((written / "manifest.json").read_text())
    assert manifest["artifact"]["digest"] == st["adapter"]["digest"]
    assert list((written / "checkpoints").glob("step-*")), "no checkpoint on the claim"
    keys = cluster.s3.client().list_objects_v2(Bucket="adapters", Prefix=f"{ns}/").get("Contents", [])
    assert not keys, "the run wrote to S3"
