"""AdapterDeployment builders: source resolution, gates, and the rendered serving objects."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from kubetune.api import AdapterDeployment
from kubetune.api.adapterdeployment import DeploymentGate
from kubetune.builders import adapterdeployment as build
from kubetune.builders.settings import OperatorSettings
from tests.conftest import ROOT

SETTINGS = OperatorSettings(
    trainer_image="registry.example/kubetune/trainer:1.0",
    default_storage_endpoint="http://minio.storage:9000",
    default_storage_secret="s3-credentials",
)
DIGEST = "sha256:" + "b" * 64


def adep(**spec: Any) -> AdapterDeployment:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docs/examples/adapterdeployment.yaml").read_text())
    doc["metadata"].update(namespace="team-a", uid="4d2c0000-0000-4000-8000-000000000002", generation=1)
    for key, value in spec.items():
        doc["spec"][key] = value
    return build.resolved(AdapterDeployment.model_validate(doc), SETTINGS)


def finetune(phase: str, *, promotable: bool = True, rank: int = 16, reason: str = "Succeeded") -> dict[str, Any]:
    return {
        "metadata": {"name": "support-bot-v3", "uid": "ft-uid"},
        "spec": {"method": {"type": "LoRA", "lora": {"rank": rank}}},
        "status": {
            "phase": phase,
            "message": "m",
            "conditions": [{"type": "Ready", "status": "False", "reason": reason}],
            "adapter": {"uri": "s3://adapters/a/", "digest": DIGEST, "promotable": promotable, "loraRank": rank},
            "evaluation": {"metrics": {"exact_match": "0.91"}},
        },
    }


CANDIDATE = build.Candidate(
    adapter_uri="s3://adapters/a/",
    adapter_digest=DIGEST,
    fine_tune="support-bot-v3",
    metrics={"exact_match": "0.91"},
    lora_rank=16,
)


def test_resolution_waits_rejects_and_resolves() -> None:
    a = adep()
    assert build.resolve_source(a, None).waiting == "FineTune support-bot-v3 does not exist (yet)"
    assert "waiting for it to succeed" in str(build.resolve_source(a, finetune("Training")).waiting)
    failed = build.resolve_source(a, finetune("Failed", reason="EvalGateFailed"))
    assert failed.rejected == "EvalGateFailed"
    assert build.resolve_source(a, finetune("Succeeded", promotable=False)).rejected == "EvalGateFailed"
    ok = build.resolve_source(a, finetune("Succeeded", rank=64)).candidate
    assert ok is not None
    assert (ok.adapter_digest, ok.fine_tune, ok.lora_rank, ok.metrics) == (
        DIGEST,
        "support-bot-v3",
        64,
        {"exact_match": "0.91"},
    )
    by_uri = build.resolve_source(adep(adapter={"uri": "s3://x/a/", "digest": DIGEST}), None).candidate
    assert by_uri is not None
    assert by_uri.adapter_uri == "s3://x/a/"


@pytest.mark.parametrize(
    ("gate", "stable_metrics", "passes"),
    [
        ({"metric": "exact_match", "min": "0.9"}, None, True),
        ({"metric": "exact_match", "min": "0.95"}, None, False),
        ({"metric": "exact_match", "maxRegressionVsStable": "0.01"}, {"exact_match": "0.915"}, True),
        ({"metric": "exact_match", "maxRegressionVsStable": "0.01"}, {"exact_match": "0.95"}, False),
        ({"metric": "exact_match", "maxRegressionVsStable": "0.01"}, None, True),
        ({"metric": "token_f1", "min": "0.5"}, None, False),
    ],
)
def test_deployment_gates(gate: dict[str, str], stable_metrics: dict[str, str] | None, passes: bool) -> None:
    stable = {"metrics": stable_metrics} if stable_metrics else None
    failures = build.check_gates(CANDIDATE, [DeploymentGate.model_validate(gate)], stable)
    assert (not failures) is passes, failures


def _server(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_vllm_deployment() -> None:
    a = adep(runtime={"type": "vllm", "replicas": 2, "resources": {"gpus": 1, "memory": "24Gi"}, "maxLoras": 4})
    d = build.build_deployment(a, build.Candidate("s3://adapters/a/", DIGEST, lora_rank=24), 3, "stable", 2, SETTINGS)
    c = _server(d)
    assert c["image"] == "vllm/vllm-openai:v0.11.0"
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    args = c["args"]
    flags = {
        args[i]: args[i + 1]
        for i in range(0, len(args) - 1)
        if args[i].startswith("--") and not args[i + 1].startswith("--")
    }
    assert "--enable-lora" in args
    assert flags["--lora-modules"] == "support-bot=/models/adapters/support-bot"
    assert flags["--max-lora-rank"] == "32"  # the smallest rank vLLM accepts that holds 24
    assert flags["--max-loras"] == "4"
    assert flags["--model"] == "/models/base"
    assert flags["--port"] == "8000"
    assert c["resources"] == {"requests": {"memory": "24Gi"}, "limits": {"memory": "24Gi", "nvidia.com/gpu": "1"}}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 300
    fetch = d["spec"]["template"]["spec"]["initContainers"][1]
    assert fetch["command"] == [
        "kubetune-trainer",
        "fetch",
        "s3://adapters/a/",
        "/models/adapters/support-bot",
        "--digest",
        DIGEST,
    ]
    assert d["spec"]["replicas"] == 2
    assert d["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert d["metadata"]["annotations"]["kubetune.io/revision"] == "3"
    assert d["spec"]["selector"]["matchLabels"] == {
        "kubetune.io/adapterdeployment": "support-bot",
        "kubetune.io/role": "stable",
    }


def test_vllm_defaults_to_one_gpu_and_splits_several() -> None:
    one = _server(build.build_deployment(adep(runtime={"type": "vllm"}), CANDIDATE, 1, "stable", 1, SETTINGS))
    assert one["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    four = _server(
        build.build_deployment(
            adep(runtime={"type": "vllm", "resources": {"gpus": 4}}), CANDIDATE, 1, "stable", 1, SETTINGS
        )
    )
    assert four["args"][four["args"].index("--tensor-parallel-size") + 1] == "4"


def test_reference_server_deployment() -> None:
    d = build.build_deployment(adep(), CANDIDATE, 1, "canary", 1, SETTINGS)
    c = _server(d)
    assert c["image"] == "registry.example/kubetune/trainer:1.0"
    assert c["command"] == ["kubetune-trainer", "serve"]
    assert c["args"][c["args"].index("--adapter-digest") + 1] == f"support-bot={DIGEST}"
    assert c["args"][c["args"].index("--host") + 1] == "$(POD_IP)"
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in c["env"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert "resources" in c
    assert {"name": "OMP_NUM_THREADS", "value": "1"} in c["env"]  # the example's "1" core
    assert d["metadata"]["name"] == "support-bot-canary"
    pod = d["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert pod["shareProcessNamespace"] is True  # the server is not PID 1: an early SIGTERM is not lost
    init_env = {e["name"]: e for e in pod["initContainers"][0]["env"]}
    assert init_env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-credentials",
        "key": "AWS_SECRET_ACCESS_KEY",
        "optional": False,
    }
    assert init_env["KUBETUNE_STORAGE_ENDPOINT"]["value"] == "http://minio.storage.svc:9000"  # the spec wins


def test_service_selects_only_stable_pods() -> None:
    svc = build.build_service(adep(), SETTINGS)
    assert svc["spec"]["selector"] == {"kubetune.io/adapterdeployment": "support-bot", "kubetune.io/role": "stable"}
    assert svc["spec"]["ports"][0]["targetPort"] == 8000


def test_online_eval_job() -> None:
    job = build.build_online_eval_job(adep(), 4, "http://10.0.0.7:8000", SETTINGS)
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["kubetune-trainer", "eval-endpoint"]
    assert command[command.index("--endpoint") + 1] == "http://10.0.0.7:8000"
    assert command[command.index("--min") + 1] == "0.8"
    assert job["metadata"]["name"] == "support-bot-eval-r4"
    assert job["spec"]["template"]["spec"]["shareProcessNamespace"] is True


def test_pvc_base_model_and_adapter_are_mounted_where_fetch_reads_them() -> None:
    a = adep(baseModel={"uri": "pvc://models/tiny/"})
    candidate = build.Candidate("pvc://adapters/run-1/adapter/", DIGEST)
    d = build.build_deployment(a, candidate, 1, "stable", 1, SETTINGS)
    pod = d["spec"]["template"]["spec"]
    claims = sorted(v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert claims == ["adapters", "models"]
    for init in pod["initContainers"]:
        paths = {m["mountPath"]: m["readOnly"] for m in init["volumeMounts"] if "readOnly" in m}
        assert paths == {"/mnt/pvc/models": True, "/mnt/pvc/adapters": True}


def test_user_values_are_never_expanded_by_kubernetes() -> None:
    """A $(VAR) in a URI that got past admission (an older CRD) is passed on literally, never expanded."""
    a = build.resolved(
        adep(storage={"endpoint": "http://minio/$(AWS_SECRET_ACCESS_KEY)", "secretRef": {"name": "s3"}}), SETTINGS
    )
    candidate = build.Candidate("s3://adapters/$(AWS_SECRET_ACCESS_KEY)/", DIGEST)
    d = build.build_deployment(a, candidate, 1, "stable", 1, SETTINGS)
    for init in d["spec"]["template"]["spec"]["initContainers"]:
        words = " ".join(init["command"]) + " ".join(str(e.get("value", "")) for e in init["env"])
        assert "$(AWS_SECRET_ACCESS_KEY)" not in words.replace("$$(", "")
    fetch = d["spec"]["template"]["spec"]["initContainers"][1]["command"]
    assert "s3://adapters/$$(AWS_SECRET_ACCESS_KEY)/" in fetch
