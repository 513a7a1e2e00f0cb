"""The floor operator of bench/operator_scale.py --floor: the Job it posts is the operator's, as a client sends it."""

from __future__ import annotations

import copy
from typing import Any

from bench.scale.common import FINETUNE_LABEL
from bench.scale.floor import job_for, job_template


def served_job() -> dict[str, Any]:
    """A Job as the API server returns it: server-set metadata, a generated selector, controller labels."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "ft-0001-train",
            "namespace": "bench",
            "uid": "job-uid",
            "resourceVersion": "123",
            "creationTimestamp": "2026-12-01T19:00:00Z",
            "managedFields": [{"manager": "kubetune"}],
            "labels": {FINETUNE_LABEL: "ft-0001", "app.kubernetes.io/name": "kubetune-trainer"},
            "annotations": {"kubetune.io/trainer-config": "{}"},
            "ownerReferences": [
                {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTune", "name": "ft-0001", "uid": "ft-uid-1",
                 "controller": True, "blockOwnerDeletion": True}
            ],
        },
        "spec": {
            "backoffLimit": 3,
            "selector": {"matchLabels": {"batch.kubernetes.io/controller-uid": "job-uid"}},
            "template": {
                "metadata": {
                    "labels": {
                        "batch.kubernetes.io/controller-uid": "job-uid",
                        "controller-uid": "job-uid",
                        "batch.kubernetes.io/job-name": "ft-0001-train",
                        "job-name": "ft-0001-train",
                        "app.kubernetes.io/name": "kubetune-trainer",
                    }
                },
                "spec": {"restartPolicy": "Never", "containers": [{"name": "trainer", "image": "trainer:dev"}]},
            },
        },
        "status": {"active": 1},
    }  # fmt: skip


def test_the_template_is_what_a_client_sends() -> None:
    served = served_job()
    template = job_template(served)
    assert set(template["metadata"]) == {"name", "labels", "annotations", "ownerReferences"}
    assert "status" not in template
    assert "selector" not in template["spec"]  # the server generates it again from the uid it assigns
    assert template["spec"]["template"]["metadata"]["labels"] == {"app.kubernetes.io/name": "kubetune-trainer"}
    assert template["spec"]["template"]["spec"] == served["spec"]["template"]["spec"]
    assert template["spec"]["backoffLimit"] == 3
    assert served == served_job()  # the Job it was made from is left as it was


def test_each_finetune_gets_its_own_named_and_owned_job() -> None:
    template = job_template(served_job())
    before = copy.deepcopy(template)
    job = job_for(template, "ft-0002", "ft-uid-2")
    assert job["metadata"]["name"] == "ft-0002-train"
    assert job["metadata"]["labels"][FINETUNE_LABEL] == "ft-0002"  # what the bench's Job watch reads
    (owner,) = job["metadata"]["ownerReferences"]
    assert (owner["name"], owner["uid"], owner["kind"]) == ("ft-0002", "ft-uid-2", "FineTune")
    assert owner["controller"] is True
    assert template == before  # the template serves every FineTune of the burst unchanged
