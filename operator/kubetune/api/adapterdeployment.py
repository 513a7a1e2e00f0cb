"""The AdapterDeployment kind: serve a fine-tune's adapter and roll it safely.

The controller resolves ``spec.adapter`` to an immutable revision, gates it,
runs it as a canary and promotes it, or rolls back. It never writes ``spec``,
so a GitOps tool's self-heal never fights it; everything it decides is in
``status``.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from kubetune.api.finetune import Metric, ModelSource
from kubetune.api.types import (
    CEL,
    NO_LOCAL_FILES,
    Conditions,
    DataURI,
    Decimal,
    Digest,
    Fraction,
    FreeForm,
    KubeModel,
    LocalObjectReference,
    Name,
    OutputURI,
    Quantity,
    SchemaHints,
    StorageSpec,
    Timestamp,
)

DeploymentPhase = Literal["Healthy", "Progressing", "Paused", "Degraded"]
Outcome = Literal["Promoted", "RolledBack", "Rejected", "Superseded"]


class AdapterSource(KubeModel):
    """Which adapter to serve: a FineTune's, or one at a URI. Exactly one."""

    __cel__: ClassVar[tuple[CEL, ...]] = (
        CEL(
            "has(self.fineTuneRef) != has(self.uri)",
            "set exactly one of adapter.fineTuneRef or adapter.uri",
        ),
        CEL(
            "!has(self.uri) || has(self.digest)",
            "adapter.digest is required with adapter.uri, so that what is served is what was evaluated",
            field_path=".digest",
        ),
    )

    fine_tune_ref: LocalObjectReference | None = Field(
        default=None,
        description="A FineTune in this namespace; its published adapter is served once it succeeds.",
    )
    uri: OutputURI | None = Field(
        default=None, description="Folder of a PEFT adapter, for adapters published outside kubetune."
    )
    digest: Digest | None = Field(default=None, description="Digest of the adapter at uri (sha256:...).")

    @model_validator(mode="after")
    def _one_source(self) -> AdapterSource:
        if (self.fine_tune_ref is None) == (self.uri is None):
            raise ValueError("set exactly one of adapter.fineTuneRef or adapter.uri")
        if self.uri is not None and self.digest is None:
            raise ValueError("adapter.digest is required with adapter.uri")
        return self


class ServingResources(KubeModel):
    """Resources of each serving pod."""

    gpus: int | None = Field(
        default=None, ge=0, le=16, description="GPUs per serving pod. Default 1 for vllm, 0 for kubetune."
    )
    cpu: Quantity | None = Field(
        default=None,
        description='CPU request, e.g. "2"; the server runs one torch thread per requested core (OMP_NUM_THREADS).',
    )
    memory: Quantity | None = Field(default=None, description='Memory request and limit, e.g. "16Gi".')


class RuntimeSpec(KubeModel):
    """The inference server."""

    __cel__: ClassVar[tuple[CEL, ...]] = (
        CEL(
            "self.type != 'vllm' || !has(self.resources) || !has(self.resources.gpus) || self.resources.gpus >= 1",
            "the vllm runtime needs resources.gpus >= 1",
            field_path=".resources.gpus",
        ),
    )

    type: Annotated[Literal["vllm", "kubetune"], SchemaHints(schema_default=True)] = Field(
        default="vllm",
        description=(
            "vllm (vLLM's OpenAI server with --enable-lora; production) or kubetune (the reference "
            "server from the trainer image; CPU-capable, for small models and tests). Default vllm."
        ),
    )
    image: Annotated[str, Field(max_length=512, min_length=1)] | None = Field(
        default=None, description="Server image. Default: the operator's image for the runtime."
    )
    replicas: Annotated[int, SchemaHints(schema_default=True)] = Field(
        default=1, ge=0, le=1000, description="Serving pods of the stable revision. Default 1."
    )
    port: Annotated[int, SchemaHints(schema_default=True)] = Field(
        default=8000, ge=1024, le=65535, description="Port the server listens on. Default 8000."
    )
    max_loras: Annotated[int, SchemaHints(schema_default=True)] = Field(
        default=1, ge=1, le=64, description="Adapters a vLLM batch may mix. Default 1."
    )
    args: list[Annotated[str, Field(max_length=1024)]] | None = Field(
        default=None, max_length=64, description="Extra server arguments, appended as given."
    )
    resources: ServingResources | None = Field(default=None, description="Resources per pod.")
    node_selector: dict[str, Annotated[str, Field(max_length=253)]] | None = Field(
        default=None, description="Node labels the serving pods must match."
    )
    tolerations: list[FreeForm] | None = Field(default=None, max_length=32, description="Tolerations.")

    @model_validator(mode="after")
    def _vllm_needs_gpu(self) -> RuntimeSpec:
        if self.type == "vllm" and self.resources is not None and self.resources.gpus == 0:
            raise ValueError("the vllm runtime needs resources.gpus >= 1")
        return self


class DeploymentGate(KubeModel):
    """A rule a new revision must meet before it replaces the stable one. Exactly one of min, maxRegressionVsStable."""

    __cel__: ClassVar[tuple[CEL, ...]] = (
        CEL(
            "has(self.min) != has(self.maxRegressionVsStable)",
            "a rollout gate needs exactly one of min or maxRegressionVsStable",
        ),
        CEL(
            "!has(self.min) || self.metric in ['loss', 'perplexity'] || double(self.min) <= 1.0",
            "min must be between 0 and 1 for this metric",
            field_path=".min",
        ),
    )

    metric: Metric = Field(description="An eval metric of the FineTune's report.")
    min: Decimal | None = Field(default=None, description="The new revision's score must be at least this.")
    max_regression_vs_stable: Decimal | None = Field(
        default=None,
        description="The new revision may score at most this much below the stable revision on the metric.",
    )

    @model_validator(mode="after")
    def _one_rule(self) -> DeploymentGate:
        if (self.min is None) == (self.max_regression_vs_stable is None):
            raise ValueError("a rollout gate needs exactly one of min or maxRegressionVsStable")
        return self


class OnlineEval(KubeModel):
    """An eval Job run against the canary's endpoint before promotion."""

    dataset: DataURI = Field(description="JSONL file of held-out examples sent to the canary.")
    metric: Metric = Field(description="The metric to compute.")
    min: Fraction = Field(description="The canary must score at least this.")
    max_examples: Annotated[int, SchemaHints(schema_default=True)] = Field(
        default=100, ge=1, le=100_000, description="Examples sent. Default 100."
    )


class CanarySpec(KubeModel):
    """The canary of a Canary rollout."""

    replicas: Annotated[int, SchemaHints(schema_default=True)] = Field(
        default=1, ge=1, le=100, description="Canary pods. Default 1."
    )


class RolloutSpec(KubeModel):
    """How a new adapter replaces the serving one."""

    strategy: Annotated[Literal["Canary", "Immediate"], SchemaHints(schema_default=True)] = Field(
        default="Canary",
        description="Canary (new revision beside the stable one, promoted once ready and evaluated) or Immediate.",
    )
    canary: CanarySpec | None = Field(default=None, description="Canary settings.")
    gates: list[DeploymentGate] | None = Field(
        default=None, max_length=32, description="Rules on top of the FineTune's own gates."
    )
    online_eval: OnlineEval | None = Field(default=None, description="Evaluate the canary through its endpoint.")
    progress_deadline_seconds: Annotated[int, SchemaHints(schema_default=True)] = Field(
        default=600, ge=10, le=86_400, description="Time a revision has to become ready. Default 600."
    )
    paused: Annotated[bool, SchemaHints(schema_default=True)] = Field(
        default=False, description="Hold rollouts: the stable revision keeps serving, nothing new is started."
    )


class AdapterDeploymentSpec(KubeModel):
    """Desired serving of an adapter on a frozen base model."""

    __cel__: ClassVar[tuple[CEL, ...]] = (
        CEL("!self.baseModel.uri.startsWith('file://')", NO_LOCAL_FILES, field_path=".baseModel.uri"),
        CEL(
            "!has(self.adapter.uri) || !self.adapter.uri.startsWith('file://')",
            NO_LOCAL_FILES,
            field_path=".adapter.uri",
        ),
    )

    base_model: ModelSource = Field(description="The base model the adapter was trained on.")
    adapter: AdapterSource = Field(description="The adapter to serve.")
    served_model_name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.:]*$")] = (
        Field(description="The `model` that OpenAI clients send.")
    )
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec, description="The inference server.")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="How new revisions roll out.")
    storage: StorageSpec | None = Field(default=None, description="S3-compatible store settings.")
    revision_history_limit: Annotated[int, SchemaHints(schema_default=True)] = Field(
        default=10, ge=1, le=100, description="Revisions kept in status.history. Default 10."
    )


class Revision(KubeModel):
    """An immutable adapter revision."""

    revision: int = Field(ge=1, description="Monotonic revision number.")
    fine_tune: Name | None = Field(default=None, description="The FineTune it came from.")
    fine_tune_uid: str | None = Field(default=None, max_length=64, description="UID of that FineTune.")
    adapter_uri: str = Field(max_length=4096, description="Where the adapter is.")
    adapter_digest: Digest = Field(description="Digest of the adapter.")
    metrics: dict[str, Annotated[str, Field(max_length=64)]] | None = Field(
        default=None, description="Eval metrics of the revision."
    )
    since: Timestamp | None = Field(default=None, description="When it took this role.")


class HistoryEntry(KubeModel):
    """What happened to one revision."""

    revision: int = Field(ge=1, description="Revision number.")
    fine_tune: Name | None = Field(default=None, description="The FineTune it came from.")
    adapter_uri: str | None = Field(default=None, max_length=4096, description="Where the adapter is.")
    adapter_digest: Digest = Field(description="Digest of the adapter.")
    outcome: Outcome = Field(description="Promoted, RolledBack, Rejected or Superseded.")
    reason: str = Field(max_length=128, description="CamelCase reason.")
    message: str | None = Field(default=None, max_length=1024, description="Details.")
    at: Timestamp = Field(description="When.")


class AdapterDeploymentStatus(KubeModel):
    """Observed serving state."""

    observed_generation: int | None = Field(default=None, ge=0, description="The generation last reconciled.")
    phase: DeploymentPhase | None = Field(default=None, description="Healthy, Progressing, Paused or Degraded.")
    conditions: Conditions | None = Field(default=None, description="Ready, Reconciling, Stalled, GatesPassed.")
    message: str | None = Field(default=None, max_length=4096, description="The latest noteworthy event.")
    stable: Revision | None = Field(default=None, description="The revision serving traffic.")
    canary: Revision | None = Field(default=None, description="The revision under trial.")
    history: list[HistoryEntry] | None = Field(default=None, max_length=100, description="Past revisions.")
    ready_replicas: int | None = Field(default=None, ge=0, description="Ready pods of the stable revision.")
    endpoint: str | None = Field(default=None, max_length=1024, description="In-cluster URL of the OpenAI API.")
    progressing_since: Timestamp | None = Field(default=None, description="When the current rollout started.")


class AdapterDeployment(KubeModel):
    """Serves a fine-tuned adapter on a frozen base model, rolled forward or back on eval results."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(default="kubetune.io/v1alpha1", description="API version.")
    kind: Literal["AdapterDeployment"] = Field(default="AdapterDeployment", description="Kind.")
    metadata: FreeForm = Field(default_factory=dict, description="Standard object metadata.")
    spec: AdapterDeploymentSpec = Field(description="The desired serving.")
    status: AdapterDeploymentStatus | None = Field(default=None, description="What the operator observed.")
