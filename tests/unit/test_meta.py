"""Child names, label values and owner references: always valid, unique, readable when they can be."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from kubetune.builders import adapterdeployment as adep_build
from kubetune.builders import finetune as ft_build
from kubetune.builders import meta

DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

NAMES = [
    "support-bot-v1",
    "a" * 63,
    "a" * 62 + "-b" + "c" * 7,  # truncation at 63 would end in '-'
    "x" * 253,
    "team.a.support-bot",  # dots: fine for a FineTune, not for a Service or a hostname
    "1st-try",  # a leading digit: not a Service name
    "a.b",
    "a-" * 30 + "z",
]


@pytest.mark.parametrize("name", NAMES)
def test_child_names_are_valid(name: str) -> None:
    job = ft_build.job_name(name)
    assert DNS_1035_LABEL.match(job), job
    assert len(job) <= 60
    assert DNS_1035_LABEL.match(f"{job}-63")
    assert len(f"{job}-63") <= 63
    for role in ("stable", "canary"):
        dep = adep_build.deployment_name(name, role)
        assert DNS_1123_LABEL.match(dep)
        assert len(dep) <= 63
    service = adep_build.service_name(name)
    assert DNS_1035_LABEL.match(service)
    assert len(service) <= 63
    value = meta.label_value(name)
    assert LABEL_VALUE.match(value)
    assert len(value) <= 63


def test_names_that_fit_are_kept_as_they_are() -> None:
    assert ft_build.job_name("support-bot-v1") == "support-bot-v1-train"
    assert adep_build.service_name("support-bot") == "support-bot"
    assert adep_build.deployment_name("support-bot", "canary") == "support-bot-canary"
    assert meta.label_value("support-bot-v1") == "support-bot-v1"


def test_shortened_names_stay_unique() -> None:
    a, b = "x" * 70 + "a", "x" * 70 + "b"
    assert ft_build.job_name(a) != ft_build.job_name(b)
    assert meta.label_value(a) != meta.label_value(b)
    assert adep_build.service_name("a.b") != adep_build.service_name("a-b")


def test_owner_lookups() -> None:
    obj = {"metadata": {"ownerReferences": [meta.owner_reference("FineTune", {"name": "n", "uid": "u1"})]}}
    assert meta.owned_by(obj, "u1")
    assert not meta.owned_by(obj, "u2")
    assert meta.owner_uid(obj, "FineTune") == "u1"
    assert meta.owner_uid(obj, "AdapterDeployment") is None


def test_resources() -> None:
    assert meta.resources(cpu="2", memory="4Gi", gpus=1, gpu_resource_name="nvidia.com/gpu") == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"memory": "4Gi", "nvidia.com/gpu": "1"},
    }
    assert meta.resources(cpu=None, memory=None, gpus=0, gpu_resource_name="nvidia.com/gpu") == {}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("250m", "0.25"),
        ("2", "2"),
        ("1.5", "1.5"),
        ("2000m", "2"),
        ("2k", "2000"),
        ("1Ki", "1024"),
        ("2Gi", "2147483648"),
    ],
)
def test_quantity(value: str, expected: str) -> None:
    assert meta.quantity(value) == Decimal(expected)


@pytest.mark.parametrize("value", ["", "m", "2x", "1.", "-1"])
def test_not_a_quantity(value: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        meta.quantity(value)


@pytest.mark.parametrize(
    ("cpu", "processes", "threads"),
    [
        ("250m", 1, "1"),  # a quarter core still gets one thread
        ("1", 1, "1"),
        ("1500m", 1, "2"),  # rounded up, as the downward API rounds requests.cpu
        ("8", 1, "8"),
        ("8", 4, "2"),  # torchrun's processes share the pod's request
        ("2", 8, "1"),
        (None, 1, None),  # no request: torch's own default, every core
    ],
)
def test_cpu_threads_env_follows_the_cpu_request(cpu: str | None, processes: int, threads: str | None) -> None:
    env = meta.cpu_threads_env(cpu, processes)
    assert env == ([] if threads is None else [{"name": "OMP_NUM_THREADS", "value": threads}])
