"""The FineTuneTemplate kind: a platform team's defaults and guardrails.

Cluster-scoped, set once by the platform team. A FineTune that names a
template gets the template's defaults under its own spec (its own fields
win) and must pass the template's guardrails, or it fails with reason
TemplateViolation and a message naming the rule it broke.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from kubetune.api.finetune import (
    EvaluationSpec,
    Method,
    MethodSpec,
    OutputSpec,
    ResourcesSpec,
    RunPolicy,
    TrainingSpec,
)
from kubetune.api.types import Conditions, FreeForm, KubeModel, SchemaHints, StorageSpec

_Prefix = Annotated[str, Field(min_length=1, max_length=2048)]
_URIPrefix = Annotated[str, Field(min_length=6, max_length=2048, pattern=r"^(s3|hf|pvc)://")]
"""A storage prefix a cluster can use: ``s3://``, ``hf://`` or ``pvc://`` (``file://`` names the applier's disk)."""


class FineTuneDefaults(KubeModel):
    """Values used where a FineTune leaves a field unset."""

    method: MethodSpec | None = Field(default=None, description="Default method.")
    training: TrainingSpec | None = Field(default=None, description="Default hyperparameters.")
    evaluation: EvaluationSpec | None = Field(default=None, description="Default metrics, baselines and gates.")
    resources: ResourcesSpec | None = Field(default=None, description="Default resources and placement.")
    output: OutputSpec | None = Field(default=None, description="Default output location.")
    storage: StorageSpec | None = Field(default=None, description="Default storage settings.")
    run_policy: RunPolicy | None = Field(default=None, description="Default queue, retries and deadlines.")
    image: Annotated[str, Field(max_length=512, min_length=1)] | None = Field(
        default=None, description="Default trainer image."
    )


class Guardrails(KubeModel):
    """Rules every FineTune using the template must meet (after defaults are applied)."""

    allowed_base_model_prefixes: list[_URIPrefix] | None = Field(
        default=None, max_length=64, description="baseModel.uri must start with one of these."
    )
    allowed_dataset_prefixes: list[_URIPrefix] | None = Field(
        default=None, max_length=64, description="Every dataset URI must start with one of these."
    )
    allowed_images: list[_Prefix] | None = Field(
        default=None, max_length=64, description="The trainer image must start with one of these."
    )
    allowed_methods: list[Method] | None = Field(default=None, max_length=4, description="Permitted methods.")
    max_gpus: int | None = Field(default=None, ge=0, le=1024, description="Most GPUs per node.")
    max_nodes: int | None = Field(default=None, ge=1, le=1024, description="Most nodes.")
    max_epochs: int | None = Field(default=None, ge=1, le=100, description="Most epochs.")
    max_active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=31_536_000,
        description="Longest runPolicy.activeDeadlineSeconds (and its default).",
    )
    require_queue: bool | None = Field(default=None, description="A Kueue queue must be set (runPolicy.queueName).")
    allowed_queues: list[Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, max_length=64, description="Permitted Kueue LocalQueue names."
    )
    require_gates: bool | None = Field(default=None, description="The FineTune must declare at least one gate.")


class FineTuneTemplateSpec(KubeModel):
    """Defaults and guardrails for FineTunes."""

    description: str | None = Field(default=None, max_length=4096, description="What the template is for.")
    defaults: Annotated[FineTuneDefaults, SchemaHints(strip_defaults=True)] | None = Field(
        default=None, description="Values for fields a FineTune leaves unset."
    )
    guardrails: Guardrails | None = Field(default=None, description="Rules FineTunes must meet.")


class FineTuneTemplateStatus(KubeModel):
    """Observed state of a template."""

    observed_generation: int | None = Field(default=None, ge=0, description="The generation last reconciled.")
    conditions: Conditions | None = Field(default=None, description="Ready when the template is valid.")


class FineTuneTemplate(KubeModel):
    """Platform-team defaults and guardrails that FineTunes opt into with spec.templateRef."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(default="kubetune.io/v1alpha1", description="API version.")
    kind: Literal["FineTuneTemplate"] = Field(default="FineTuneTemplate", description="Kind.")
    metadata: FreeForm = Field(default_factory=dict, description="Standard object metadata.")
    spec: FineTuneTemplateSpec = Field(description="Defaults and guardrails.")
    status: FineTuneTemplateStatus | None = Field(default=None, description="What the operator observed.")
