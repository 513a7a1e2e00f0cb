"""The FineTune kind: what a product team asks for, and what the operator observed.

A FineTune is "train this base model on this data with this method, prove it
beats the baselines, and store the adapter". Sections that a
FineTuneTemplate may default (method, training, evaluation, resources,
output, storage, runPolicy) carry no defaults in the CRD: the operator
resolves spec > template > built-in default, and the built-in defaults are
the pydantic defaults below (each description says them).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

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
    ModelURI,
    Name,
    OutputURI,
    Quantity,
    SchemaHints,
    StorageSpec,
    Timestamp,
)

Method = Literal["LoRA", "QLoRA", "DoRA", "Full"]
LORA_FAMILY: tuple[Method, ...] = ("LoRA", "QLoRA", "DoRA")

Metric = Literal["exact_match", "token_f1", "contains", "json_valid", "json_field_match", "loss", "perplexity"]
# Metrics where lower is better; gate thresholds on them are not fractions.
LOWER_IS_BETTER: tuple[Metric, ...] = ("loss", "perplexity")
FRACTION_METRICS: tuple[Metric, ...] = (
    "exact_match",
    "token_f1",
    "contains",
    "json_valid",
    "json_field_match",
)

Phase = Literal["Pending", "Queued", "Preparing", "Training", "Evaluating", "Succeeded", "Failed", "Suspended"]


class ModelSource(KubeModel):
    """A base model: where its weights and tokenizer are."""

    uri: ModelURI = Field(
        description=(
            "Where the model is: s3://bucket/prefix/ (a Hugging Face-format folder), "
            "hf://org/name (a model hub, when the cluster can reach one), "
            "pvc://claim/path or file:///path."
        )
    )
    revision: str | None = Field(
        default=None, max_length=128, description="Revision (branch, tag or commit) for hf:// models."
    )
    digest: Digest | None = Field(
        default=None,
        description=(
            "Expected sha256 digest of the model folder's manifest. When set, the trainer refuses "
            "a model whose files do not match."
        ),
    )


class Curation(KubeModel):
    """How the training data is cleaned before any GPU time is spent."""

    __cel__: ClassVar[tuple[CEL, ...]] = (
        CEL(
            "!has(self.maxTokens) || !has(self.minTokens) || self.minTokens <= self.maxTokens",
            "minTokens must not be above maxTokens",
            field_path=".minTokens",
        ),
    )

    dedup: Annotated[Literal["none", "exact", "near"], SchemaHints(schema_default=True)] = Field(
        default="near",
        description=(
            "Duplicate removal: none; exact (identical after normalising case and whitespace); "
            "near (exact, plus MinHash near-duplicates above nearDuplicateThreshold)."
        ),
    )
    near_duplicate_threshold: Annotated[Fraction, SchemaHints(schema_default=True)] = Field(
        default="0.85",
        description=(
            "Jaccard similarity above which two examples are near-duplicates (character 5-grams for short "
            "texts, word 5-grams for long ones)."
        ),
    )
    min_tokens: Annotated[int, SchemaHints(schema_default=True)] = Field(
        default=2, ge=1, le=1_000_000, description="Examples with fewer tokens than this are dropped."
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Examples with more tokens than this are dropped. Defaults to training.maxSeqLength.",
    )
    remove_eval_leakage: Annotated[bool, SchemaHints(schema_default=True)] = Field(
        default=True,
        description="Drop training examples that also appear (exactly or nearly) in the eval set.",
    )
    min_train_examples: Annotated[int, SchemaHints(schema_default=True)] = Field(
        default=16,
        ge=1,
        le=1_000_000,
        description=(
            "The run fails DataInvalid before training, naming the drop reasons, when fewer training "
            "examples than this are left after curation and the validation/eval split."
        ),
    )

    @model_validator(mode="after")
    def _min_not_above_max(self) -> Curation:
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("minTokens must not be above maxTokens")
        return self


class DatasetSpec(KubeModel):
    """The training pairs, and the held-out set that proves the fine-tune works."""

    __cel__: ClassVar[tuple[CEL, ...]] = (
        CEL(
            "!has(self.validation) || self.validation != self.train",
            "validation must be a different file from train",
            field_path=".validation",
        ),
        CEL(
            "!has(self.eval) || self.eval != self.train",
            "eval must be a held-out file, not the train file",
            field_path=".eval",
        ),
        CEL(
            "!has(self.validationSplit) || !has(self.evalSplit) "
            "|| double(self.validationSplit) + double(self.evalSplit) < 1.0",
            "validationSplit and evalSplit together must leave some of train to train on (sum below 1)",
            field_path=".evalSplit",
        ),
    )

    train: DataURI = Field(description="JSONL file of training examples.")
    validation: DataURI | None = Field(
        default=None,
        description="JSONL file for validation loss. When absent, validationSplit of train is held out.",
    )
    eval: DataURI | None = Field(
        default=None,
        description=(
            "JSONL file of held-out task examples scored after training. When absent, evalSplit of "
            "train is held out (a separate, curated eval set is strongly recommended)."
        ),
    )
    format: Annotated[Literal["auto", "chat", "instruction", "completion"], SchemaHints(schema_default=True)] = Field(
        default="auto",
        description=(
            "Record format: chat ({messages: [{role, content}]}), instruction ({prompt, response} or "
            "{instruction, input, output}), completion ({text}); auto detects it from the first record."
        ),
    )
    validation_split: Annotated[Fraction, SchemaHints(schema_default=True)] = Field(
        default="0.1", description="Share of train held out for validation loss when validation is absent."
    )
    eval_split: Annotated[Fraction, SchemaHints(schema_default=True)] = Field(
        default="0.1", description="Share of train held out for the task eval when eval is absent."
    )
    curation: Curation = Field(default_factory=Curation, description="Cleaning applied before training.")

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> DatasetSpec:
        if float(self.validation_split) + float(self.eval_split) >= 1.0:
            raise ValueError("validationSplit and evalSplit together must leave some of train to train on")
        return self

    @model_validator(mode="after")
    def _distinct_files(self) -> DatasetSpec:
        if self.validation is not None and self.validation == self.train:
            raise ValueError("dataset.validation must be a different file from train")
        if self.eval is not None and self.eval == self.train:
            raise ValueError("dataset.eval must be a held-out file, not the train file")
        return self


class LoRASpec(KubeModel):
    """Low-rank adapter settings, for LoRA, QLoRA and DoRA."""

    rank: int = Field(default=16, ge=1, le=1024, description="Rank r of the adapter matrices. Default 16.")
    alpha: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="Scaling alpha; the update is scaled by alpha/rank. Default 32.",
    )
    dropout: Fraction = Field(default="0.05", description='Dropout on the adapter input. Default "0.05".')
    target_modules: list[Annotated[str, Field(max_length=128, min_length=1)]] | None = Field(
        default=None,
        max_length=64,
        description=(
            "Module names to adapt, e.g. [q_proj, v_proj]. When absent, the trainer picks the "
            "attention and MLP projections of the model's architecture."
        ),
    )
    last_layers: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description=(
            "Adapt only the model's last N transformer blocks; when absent, every block. Backpropagation "
            "then stops at the lowest adapted block, so a step costs less, and the lower blocks (much of "
            "the base model's general language skill) stay exactly as they were."
        ),
    )


class MethodSpec(KubeModel):
    """How the weights are changed."""

    __cel__: ClassVar[tuple[CEL, ...]] = (
        CEL(
            "!has(self.lora) || self.type != 'Full'",
            "lora may only be set when type is LoRA, QLoRA or DoRA",
            field_path=".lora",
        ),
    )

    type: Method = Field(
        description=(
            "LoRA (low-rank adapters on a frozen base), QLoRA (LoRA on a 4-bit base; needs a CUDA GPU), "
            "DoRA (weight-decomposed LoRA), or Full (every weight; the output is a whole model)."
        )
    )
    lora: LoRASpec | None = Field(default=None, description="Adapter settings for LoRA, QLoRA and DoRA.")

    @model_validator(mode="after")
    def _lora_only_for_adapters(self) -> MethodSpec:
        if self.lora is not None and self.type == "Full":
            raise ValueError("method.lora may only be set when type is LoRA, QLoRA or DoRA")
        return self


class TrainingSpec(KubeModel):
    """Hyperparameters of the training run."""

    __cel__: ClassVar[tuple[CEL, ...]] = (
        CEL(
            "!has(self.learningRate) || (double(self.learningRate) > 0.0 && double(self.learningRate) <= 1.0)",
            'learningRate must be a decimal string in (0, 1], e.g. "2e-4"',
            field_path=".learningRate",
        ),
    )

    epochs: int = Field(default=3, ge=1, le=100, description="Passes over the training data. Default 3.")
    max_steps: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Stop after this many optimizer steps (overrides epochs).",
    )
    learning_rate: Decimal = Field(
        default="2e-4", description='Peak learning rate, a decimal string such as "2e-4". Default "2e-4".'
    )
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        default="cosine", description="Learning-rate schedule after warm-up. Default cosine."
    )
    warmup_ratio: Fraction = Field(default="0.03", description='Share of steps spent warming up. Default "0.03".')
    weight_decay: Fraction = Field(default="0", description='AdamW weight decay. Default "0".')
    batch_size: int = Field(
        default=8,
        ge=1,
        le=4096,
        description=(
            "Examples per micro-batch across all devices (the global batch; each of several pods or GPUs takes "
            "an equal share), so a FineTune takes the same steps on one device or many. Default 8."
        ),
    )
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step. Default 1."
    )
    max_seq_length: int = Field(
        default=2048, ge=16, le=1_048_576, description="Longest tokenized sequence. Default 2048."
    )
    packing: bool = Field(
        default=True, description="Pack short examples into full sequences (no cross-example attention)."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description=(
            "Compute precision; auto picks bf16 autocast where the GPU supports it or the CPU has native bf16 "
            "(avx512_bf16 or AMX), else fp32. On a CPU, bf16 is for training: evaluation runs in fp32. "
            "fp16 needs a CUDA GPU."
        ),
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass: less memory, ~30% slower."
    )
    checkpoint_every_steps: int = Field(
        default=200,
        ge=1,
        le=10_000_000,
        description="Save a resumable checkpoint every N steps. Default 200.",
    )
    eval_every_steps: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Compute validation loss every N steps. Default: once per epoch.",
    )
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Random seed for data order and init. Default 42.")

    @model_validator(mode="after")
    def _learning_rate_range(self) -> TrainingSpec:
        if not 0.0 < float(self.learning_rate) <= 1.0:
            raise ValueError('training.learningRate must be a decimal string in (0, 1], e.g. "2e-4"')
        return self


class PromptedBaseline(KubeModel):
    """The well-prompted baseline a fine-tune has to beat."""

    enabled: bool = Field(default=True, description="Score this baseline. Default true.")
    few_shot: int = Field(default=3, ge=0, le=32, description="Examples from train shown in the prompt. Default 3.")
    shot_selection: Literal["random", "stratified", "retrieved"] = Field(
        default="stratified",
        description=(
            "How the shots are chosen: random; stratified (spread over the labels when the responses are a "
            "small closed set, so fewShot >= labels covers them all); retrieved (per eval example, the fewShot "
            "most similar training examples by BM25). Default stratified."
        ),
    )
    system_prompt: str | None = Field(
        default=None,
        max_length=16384,
        description=(
            "System prompt (or instruction prefix) for the baseline. Default: when the responses are a small "
            "closed set, one that lists every label and asks for exactly one; otherwise a task-neutral prompt."
        ),
    )


class Baselines(KubeModel):
    """What the fine-tune is compared against."""

    base: bool = Field(default=True, description="Score the un-tuned base model zero-shot. Default true.")
    prompted: PromptedBaseline = Field(
        default_factory=PromptedBaseline,
        description="Score the base model with a system prompt and few-shot examples. On by default.",
    )


class LiftOver(KubeModel):
    """A minimum improvement over a baseline."""

    __cel__: ClassVar[tuple[CEL, ...]] = (
        CEL(
            "!has(self.significance) || double(self.significance) > 0.0",
            'significance must be above 0 (no lift is that certain), e.g. "0.05"',
            field_path=".significance",
        ),
    )

    baseline: Literal["base", "prompted"] = Field(description="The baseline to beat.")
    by: Decimal = Field(default="0", description='Required margin, in the metric\'s units. Default "0".')
    significance: Fraction | None = Field(
        default=None,
        description=(
            "Also require a win that chance alone would rarely produce: the one-sided sign test over the "
            "examples where the fine-tune and the baseline score differently (McNemar's exact test for "
            'exact_match) must give a p-value of at most this, e.g. "0.05". Per-example metrics only '
            "(not loss or perplexity). Unset: the margin alone decides."
        ),
    )

    @model_validator(mode="after")
    def _significance_above_zero(self) -> LiftOver:
        if self.significance is not None and float(self.significance) <= 0.0:
            raise ValueError('minLiftOver.significance must be above 0 (no lift is that certain), e.g. "0.05"')
        return self


class Gate(KubeModel):
    """One pass/fail rule on an eval metric. Exactly one of min, max, minLiftOver, maxRegression."""

    __cel__: ClassVar[tuple[CEL, ...]] = (
        CEL(
            "[has(self.min), has(self.max), has(self.minLiftOver), has(self.maxRegression)].filter(x, x).size() == 1",
            "a gate needs exactly one of min, max, minLiftOver or maxRegression",
        ),
        CEL(
            "!has(self.min) || self.metric in ['loss', 'perplexity'] || double(self.min) <= 1.0",
            "min must be between 0 and 1 for this metric",
            field_path=".min",
        ),
        CEL(
            "!has(self.minLiftOver) || self.metric in ['loss', 'perplexity'] || double(self.minLiftOver.by) <= 1.0",
            "minLiftOver.by must be between 0 and 1 for this metric",
            field_path=".minLiftOver.by",
        ),
        CEL(
            "!has(self.minLiftOver) || !has(self.minLiftOver.significance) || !(self.metric in ['loss', 'perplexity'])",
            "minLiftOver.significance needs a per-example metric (loss and perplexity have no per-example scores)",
            field_path=".minLiftOver.significance",
        ),
    )

    metric: Metric = Field(description="The metric the gate reads.")
    min: Decimal | None = Field(default=None, description="The fine-tune's score must be at least this.")
    max: Decimal | None = Field(
        default=None, description="The fine-tune's score must be at most this (loss, perplexity)."
    )
    min_lift_over: LiftOver | None = Field(
        default=None, description="The fine-tune must beat this baseline by at least `by`."
    )
    max_regression: Decimal | None = Field(
        default=None,
        description=(
            "The fine-tune may trail the base model by at most this much. For perplexity it is a relative "
            'increase: "0.1" allows 10% higher general-text perplexity than the base.'
        ),
    )

    @model_validator(mode="after")
    def _one_rule(self) -> Gate:
        rules = [self.min, self.max, self.min_lift_over, self.max_regression]
        if sum(r is not None for r in rules) != 1:
            raise ValueError("a gate needs exactly one of min, max, minLiftOver or maxRegression")
        if self.metric in FRACTION_METRICS:
            if self.min is not None and float(self.min) > 1.0:
                raise ValueError(f"gate min must be between 0 and 1 for {self.metric}")
            if self.min_lift_over is not None and float(self.min_lift_over.by) > 1.0:
                raise ValueError(f"gate minLiftOver.by must be between 0 and 1 for {self.metric}")
        elif self.min_lift_over is not None and self.min_lift_over.significance is not None:
            raise ValueError(
                f"gate minLiftOver.significance needs a per-example metric ({self.metric} has no per-example scores)"
            )
        return self


def _default_metrics() -> list[Metric]:
    return ["exact_match", "token_f1"]


class EvaluationSpec(KubeModel):
    """How the fine-tune proves its worth before it may ship."""

    __cel__: ClassVar[tuple[CEL, ...]] = (
        CEL(
            "!has(self.gates) || !self.gates.exists(g, has(g.minLiftOver) && g.minLiftOver.baseline == 'prompted') "
            "|| !has(self.baselines) || !has(self.baselines.prompted) || !has(self.baselines.prompted.enabled) "
            "|| self.baselines.prompted.enabled",
            "a gate with minLiftOver.baseline: prompted needs the prompted baseline enabled",
            field_path=".baselines.prompted.enabled",
        ),
        CEL(
            "!has(self.gates) || !self.gates.exists(g, has(g.minLiftOver) && g.minLiftOver.baseline == 'base') "
            "|| !has(self.baselines) || !has(self.baselines.base) || self.baselines.base",
            "a gate with minLiftOver.baseline: base needs baselines.base: true",
            field_path=".baselines.base",
        ),
    )

    metrics: list[Metric] = Field(
        default_factory=_default_metrics,
        max_length=16,
        description="Metrics reported for every candidate. Default [exact_match, token_f1].",
    )
    primary_metric: Metric | None = Field(
        default=None, description="The metric shown as the score. Default: the first of metrics."
    )
    baselines: Baselines = Field(default_factory=Baselines, description="What the fine-tune is compared with.")
    gates: list[Gate] = Field(
        default_factory=list,
        max_length=32,
        description=(
            "Rules that must all pass for the FineTune to succeed. With none given, the fine-tune must "
            "beat the prompted baseline (or the base) on the primary metric."
        ),
    )
    max_new_tokens: int = Field(default=128, ge=1, le=32768, description="Generation budget per example. Default 128.")
    max_examples: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Score at most this many eval examples. Default: all."
    )
    general_text: DataURI | None = Field(
        default=None,
        description=(
            "Plain-text sample for the general-capability check (perplexity, fine-tune vs base). "
            "Default: a small built-in sample."
        ),
    )

    @model_validator(mode="after")
    def _lifts_need_their_baseline(self) -> EvaluationSpec:
        for gate in self.gates:
            if gate.min_lift_over is None:
                continue
            wanted = gate.min_lift_over.baseline
            if wanted == "prompted" and not self.baselines.prompted.enabled:
                raise ValueError("a gate with minLiftOver.baseline: prompted needs the prompted baseline enabled")
            if wanted == "base" and not self.baselines.base:
                raise ValueError("a gate with minLiftOver.baseline: base needs baselines.base: true")
        return self


class ResourcesSpec(KubeModel):
    """What the training pods get."""

    gpus: int = Field(default=1, ge=0, le=64, description="GPUs per node. Default 1.")
    nodes: int = Field(default=1, ge=1, le=64, description="Nodes; more than 1 runs an Indexed Job with torchrun.")
    cpu: Quantity | None = Field(
        default=None,
        description=(
            'CPU request per pod, e.g. "8". It also sets the trainer\'s threads (OMP_NUM_THREADS): one per '
            "requested core, rounded up, shared among a pod's GPU processes. Unset: no request, and torch uses "
            "every core of the node."
        ),
    )
    memory: Quantity | None = Field(default=None, description='Memory request and limit per pod, e.g. "40Gi".')
    node_selector: dict[str, Annotated[str, Field(max_length=253)]] | None = Field(
        default=None, description="Node labels the training pods must match."
    )
    tolerations: list[FreeForm] | None = Field(
        default=None, max_length=32, description="Tolerations of the training pods (corev1.Toleration)."
    )
    priority_class_name: Name | None = Field(default=None, description="PriorityClass of the training pods.")


class OutputSpec(KubeModel):
    """Where the adapter and the run's artifacts go."""

    uri: OutputURI | None = Field(
        default=None,
        description=(
            "Prefix for artifacts; the run writes under <uri>/<namespace>/<name>/<uid>/. "
            "Default: the operator's default output."
        ),
    )
    retention: Literal["Retain", "Delete"] = Field(
        default="Retain",
        description="What happens to the artifacts when the FineTune is deleted. Default Retain.",
    )


class RunPolicy(KubeModel):
    """Scheduling, retries and lifetime of the training Job."""

    queue_name: Annotated[str, Field(max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")] | None = Field(
        default=None, description="Kueue LocalQueue; the Job is created suspended and Kueue admits it."
    )
    suspend: Annotated[bool, SchemaHints(schema_default=True)] = Field(
        default=False,
        description="Suspend training (pods are removed; the run resumes from its newest checkpoint).",
    )
    backoff_limit: int = Field(default=3, ge=0, le=100, description="Retries after failures. Default 3.")
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, le=31_536_000, description="Wall-clock limit of the Job, in seconds."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=31_536_000,
        description="Delete the finished Job (not the FineTune) after this long.",
    )


def _immutable(field: str) -> CEL:
    return CEL(
        f"has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field})",
        f"{field} is immutable once the FineTune exists; create a new FineTune (e.g. a new version suffix) instead",
        field_path=f".{field}",
        reason="FieldValueForbidden",
    )


def _immutable_run_policy(field: str) -> CEL:
    new, old = (
        f"has(self.runPolicy) && has(self.runPolicy.{field})",
        f"has(oldSelf.runPolicy) && has(oldSelf.runPolicy.{field})",
    )
    return CEL(
        f"({new}) == ({old}) && (!({new}) || self.runPolicy.{field} == oldSelf.runPolicy.{field})",
        f"runPolicy.{field} is immutable once the FineTune exists (only runPolicy.suspend may change); "
        "create a new FineTune instead",
        field_path=f".runPolicy.{field}",
        reason="FieldValueForbidden",
    )


_IMMUTABLE_RUN_POLICY_FIELDS = (
    "queueName",
    "backoffLimit",
    "activeDeadlineSeconds",
    "ttlSecondsAfterFinished",
)

_IMMUTABLE_SPEC_FIELDS = (
    "templateRef",
    "baseModel",
    "dataset",
    "method",
    "training",
    "evaluation",
    "resources",
    "output",
    "storage",
    "image",
)


class FineTuneSpec(KubeModel):
    """Desired fine-tune. Immutable once created, except runPolicy.suspend."""

    __cel__: ClassVar[tuple[CEL, ...]] = (
        *(_immutable(f) for f in _IMMUTABLE_SPEC_FIELDS),
        *(_immutable_run_policy(f) for f in _IMMUTABLE_RUN_POLICY_FIELDS),
        CEL(
            "!has(self.method) || self.method.type != 'QLoRA' || !has(self.resources) "
            "|| !has(self.resources.gpus) || self.resources.gpus >= 1",
            "QLoRA needs at least one GPU (resources.gpus >= 1)",
            field_path=".resources.gpus",
        ),
        CEL(
            "!has(self.dataset.curation) || !has(self.dataset.curation.maxTokens) || !has(self.training) "
            "|| !has(self.training.maxSeqLength) || self.dataset.curation.maxTokens <= self.training.maxSeqLength",
            "dataset.curation.maxTokens must not be above training.maxSeqLength (longer examples would be cut)",
            field_path=".dataset.curation.maxTokens",
        ),
        # In a cluster, pods cannot read the applier's files (`kubetune run` takes them; its models have no
        # such rule).
        CEL("!self.baseModel.uri.startsWith('file://')", NO_LOCAL_FILES, field_path=".baseModel.uri"),
        *(
            CEL(
                f"!has(self.dataset.{split}) || !self.dataset.{split}.startsWith('file://')",
                NO_LOCAL_FILES,
                field_path=f".dataset.{split}",
            )
            for split in ("train", "validation", "eval")
        ),
        CEL(
            "!has(self.output) || !has(self.output.uri) || !self.output.uri.startsWith('file://')",
            NO_LOCAL_FILES,
            field_path=".output.uri",
        ),
    )

    template_ref: LocalObjectReference | None = Field(
        default=None,
        description="FineTuneTemplate whose defaults fill unset fields and whose guardrails apply.",
    )
    base_model: ModelSource = Field(description="The frozen foundation the fine-tune starts from.")
    dataset: DatasetSpec = Field(description="Training, validation and held-out eval data.")
    method: MethodSpec | None = Field(
        default=None, description="How weights change. Default: LoRA with the defaults of method.lora."
    )
    training: TrainingSpec | None = Field(default=None, description="Hyperparameters.")
    evaluation: EvaluationSpec | None = Field(default=None, description="Metrics, baselines and gates.")
    resources: ResourcesSpec | None = Field(default=None, description="GPUs, nodes and placement.")
    output: OutputSpec | None = Field(default=None, description="Where artifacts are stored.")
    storage: StorageSpec | None = Field(default=None, description="S3-compatible store settings.")
    run_policy: RunPolicy | None = Field(default=None, description="Queueing, suspension, retries, deadlines.")
    image: Annotated[str, Field(max_length=512, min_length=1)] | None = Field(
        default=None, description="Trainer image. Default: the operator's trainer image."
    )

    @model_validator(mode="after")
    def _curation_fits_the_sequence(self) -> FineTuneSpec:
        max_tokens = self.dataset.curation.max_tokens
        training = self.training
        if (
            max_tokens is not None
            and training is not None
            and "max_seq_length" in training.model_fields_set
            and max_tokens > training.max_seq_length
        ):
            raise ValueError(
                "dataset.curation.maxTokens must not be above training.maxSeqLength (longer examples would be cut)"
            )
        return self

    @model_validator(mode="after")
    def _qlora_needs_gpu(self) -> FineTuneSpec:
        qlora = self.method is not None and self.method.type == "QLoRA"
        if qlora and self.resources is not None and self.resources.gpus < 1:
            raise ValueError("QLoRA needs at least one GPU (resources.gpus >= 1)")
        return self


class ResolvedFineTuneSpec(FineTuneSpec):
    """A FineTune spec as the operator runs it: spec, then template defaults, then operator settings,
    then these models' defaults — every section present, so nothing downstream writes a default again.

    Never stored: the CRD is generated from :class:`FineTuneSpec`, where absent sections stay absent
    so that a FineTuneTemplate can still fill them.
    """

    method: MethodSpec = Field(default_factory=lambda: MethodSpec(type="LoRA"), description="How weights change.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Hyperparameters.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Metrics, baselines and gates.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="GPUs, nodes and placement.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where artifacts are stored.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="S3-compatible store settings.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Queueing, suspension, retries, deadlines.")
    image: str = Field(description="Trainer image.")

    @model_validator(mode="after")
    def _lora_defaults(self) -> ResolvedFineTuneSpec:
        if self.method.type != "Full" and self.method.lora is None:
            self.method = self.method.model_copy(update={"lora": LoRASpec()})
        return self

    @property
    def lora(self) -> LoRASpec:
        """The adapter settings (their defaults for Full, where they do not apply)."""
        return self.method.lora or LoRASpec()

    @property
    def total_gpus(self) -> int:
        return self.resources.gpus * self.resources.nodes


# ----------------------------------------------------------------------------- status


class Progress(KubeModel):
    """Training progress, mirrored from the trainer's progress.json."""

    stage: str | None = Field(default=None, max_length=64, description="prepare, train, evaluate or publish.")
    step: int | None = Field(default=None, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, ge=0, description="Optimizer steps planned.")
    percent: int | None = Field(default=None, ge=0, le=100, description="Share of planned steps done.")
    epoch: Decimal | None = Field(default=None, description='Epochs done, e.g. "1.25".')
    loss: Decimal | None = Field(default=None, description="Recent training loss.")
    eval_loss: Decimal | None = Field(default=None, description="Latest validation loss.")
    tokens_per_second: int | None = Field(default=None, ge=0, description="Training throughput (non-padding tokens).")
    eta_seconds: int | None = Field(default=None, ge=0, description="Estimated seconds to the end of training.")
    resumed_from_step: int | None = Field(
        default=None, ge=0, description="The checkpoint step this attempt resumed from, when it resumed."
    )
    updated_at: Timestamp | None = Field(default=None, description="When the trainer last reported.")


class DataReport(KubeModel):
    """What curation kept and dropped."""

    train_examples: int | None = Field(default=None, ge=0, description="Training examples after curation.")
    validation_examples: int | None = Field(default=None, ge=0, description="Validation examples.")
    eval_examples: int | None = Field(default=None, ge=0, description="Held-out eval examples.")
    dropped: dict[str, int] | None = Field(default=None, description="Examples dropped, by reason.")
    digest: Digest | None = Field(default=None, description="Digest of the curated training set.")
    report_uri: str | None = Field(default=None, max_length=4096, description="The full data/report.json.")


class CheckpointStatus(KubeModel):
    """The newest complete checkpoint."""

    uri: str | None = Field(default=None, max_length=4096, description="Where the checkpoint is.")
    step: int | None = Field(default=None, ge=0, description="Optimizer step of the checkpoint.")


class AdapterStatus(KubeModel):
    """The published artifact."""

    uri: str | None = Field(default=None, max_length=4096, description="Folder of the PEFT adapter (or full model).")
    digest: Digest | None = Field(default=None, description="sha256 over the adapter's manifest of file digests.")
    size_bytes: int | None = Field(default=None, ge=0, description="Total size of the adapter files.")
    trainable_params: int | None = Field(default=None, ge=0, description="Parameters that were trained.")
    manifest_uri: str | None = Field(default=None, max_length=4096, description="manifest.json with the lineage.")
    promotable: bool | None = Field(
        default=None, description="False when the eval gates failed: kept for inspection, never deployed."
    )
    lora_rank: int | None = Field(
        default=None, ge=1, description="Rank of the adapter (serving runtimes size their LoRA slots by it)."
    )


class GateResult(KubeModel):
    """The outcome of one gate."""

    metric: str = Field(max_length=64, description="The metric the gate read.")
    rule: str = Field(max_length=256, description="The rule, e.g. 'min 0.80' or 'minLiftOver prompted by 0.05'.")
    value: Decimal | None = Field(default=None, description="The fine-tune's score.")
    threshold: str | None = Field(default=None, max_length=64, description="The value the score was held to.")
    passed: bool = Field(description="Whether the gate passed.")
    message: str | None = Field(default=None, max_length=1024, description="Why, in words.")


class EvaluationStatus(KubeModel):
    """Scores of the fine-tune and its baselines on the held-out eval."""

    score: str | None = Field(default=None, max_length=64, description="The primary metric of the fine-tune.")
    metrics: dict[str, Annotated[str, Field(max_length=64)]] | None = Field(
        default=None, description="The fine-tune's metrics (decimal strings)."
    )
    baselines: dict[str, dict[str, Annotated[str, Field(max_length=64)]]] | None = Field(
        default=None, description="Each baseline's metrics (base, prompted)."
    )
    gates: list[GateResult] | None = Field(default=None, max_length=32, description="Each gate's outcome.")
    passed: bool | None = Field(default=None, description="True when every gate passed.")
    report_uri: str | None = Field(default=None, max_length=4096, description="The full eval/report.json.")


class FineTuneStatus(KubeModel):
    """Observed state of a FineTune."""

    observed_generation: int | None = Field(default=None, ge=0, description="The generation last reconciled.")
    phase: Phase | None = Field(default=None, description="Coarse lifecycle phase.")
    conditions: Conditions | None = Field(
        default=None,
        description=(
            "Ready, Reconciling and Stalled (kstatus), plus Validated, Queued, DataReady, Trained, "
            "Evaluated, GatesPassed and Succeeded."
        ),
    )
    message: str | None = Field(default=None, max_length=4096, description="The latest noteworthy event, in words.")
    run_id: str | None = Field(default=None, max_length=128, description="Run id: artifacts live under it.")
    job_name: str | None = Field(default=None, max_length=253, description="The training Job.")
    attempts: int | None = Field(default=None, ge=0, description="Pods started for the Job so far.")
    start_time: Timestamp | None = Field(default=None, description="When the Job started.")
    completion_time: Timestamp | None = Field(default=None, description="When the FineTune finished.")
    progress: Progress | None = Field(default=None, description="Progress of the running stage.")
    data: DataReport | None = Field(default=None, description="Curation results.")
    checkpoint: CheckpointStatus | None = Field(default=None, description="Newest complete checkpoint.")
    adapter: AdapterStatus | None = Field(default=None, description="The published adapter.")
    evaluation: EvaluationStatus | None = Field(default=None, description="Eval results and gate outcomes.")


class FineTune(KubeModel):
    """A fine-tune of a base model on a curated dataset, gated by evaluation against baselines."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(default="kubetune.io/v1alpha1", description="API version.")
    kind: Literal["FineTune"] = Field(default="FineTune", description="Kind.")
    metadata: FreeForm = Field(default_factory=dict, description="Standard object metadata.")
    spec: FineTuneSpec = Field(description="The desired fine-tune.")
    status: FineTuneStatus | None = Field(default=None, description="What the operator observed.")


__all__ = [
    "FRACTION_METRICS",
    "LORA_FAMILY",
    "LOWER_IS_BETTER",
    "AdapterStatus",
    "Baselines",
    "CheckpointStatus",
    "Curation",
    "DataReport",
    "DatasetSpec",
    "EvaluationSpec",
    "EvaluationStatus",
    "FineTune",
    "FineTuneSpec",
    "FineTuneStatus",
    "Gate",
    "GateResult",
    "LiftOver",
    "LoRASpec",
    "Method",
    "MethodSpec",
    "Metric",
    "ModelSource",
    "Name",
    "OutputSpec",
    "Phase",
    "Progress",
    "PromptedBaseline",
    "ResolvedFineTuneSpec",
    "ResourcesSpec",
    "RunPolicy",
    "TrainingSpec",
]
