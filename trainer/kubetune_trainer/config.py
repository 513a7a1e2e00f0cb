"""The trainer's configuration: the contract between the operator and the pod.

The operator (and ``kubetune run`` on a laptop) resolves a FineTune — spec,
template defaults, operator settings — into one ``TrainerConfig`` and hands it
to ``kubetune-trainer`` as JSON. Everything here is concrete: no optional
"use the default" fields, so a run's behaviour is fully written down in the
config it ran with (the manifest of the adapter records it).

Unlike the CRD, this is internal JSON: fractions are plain floats.

Deviations from transformers' ``TrainingArguments`` defaults, and why:

- ``learning_rate`` 2e-4 (transformers: 5e-5): adapters train far fewer
  weights and need a larger step; 2e-4 is the usual LoRA starting point.
- ``lr_scheduler`` cosine (transformers: linear) with ``warmup_ratio`` 0.03
  (transformers: 0): a short warm-up keeps the first adapter updates from
  overshooting.
- ``weight_decay`` 0 (same as transformers), ``max_grad_norm`` 1.0 (same).
- ``packing`` on: fewer padding tokens; examples never attend to each other.
- ``eval_strategy``: validation loss once per epoch unless
  ``eval_every_steps`` is set (transformers: no evaluation).
- ``save_steps`` 200 (transformers: 500), and checkpoints go to the artifact
  store, not the local disk, so a rescheduled pod resumes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Method = Literal["LoRA", "QLoRA", "DoRA", "Full"]
Metric = Literal["exact_match", "token_f1", "contains", "json_valid", "json_field_match", "loss", "perplexity"]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageConfig(_Config):
    """How to reach the S3-compatible store. Credentials come from the environment
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never from this file."""

    endpoint: str | None = Field(default=None, description="S3 endpoint URL; None means AWS.")
    region: str = Field(default="us-east-1", description="Region for the S3 client.")
    attempts: int = Field(default=6, ge=1, le=20, description="Tries per storage call before giving up.")
    outage_wait_seconds: float = Field(
        default=600.0,
        ge=0,
        le=86_400,
        description=(
            "How long the run waits for an unreachable store once training is done (final checkpoint, "
            "eval report, adapter) before it exits 75 and the next pod resumes; checkpoint uploads during "
            "training are retried in the background and never stop training."
        ),
    )


class ModelConfig(_Config):
    uri: str = Field(description="s3://, hf://, pvc:// or file:// location of the base model folder.")
    revision: str | None = Field(default=None, description="Revision for hf:// models.")
    digest: str | None = Field(default=None, description="Expected digest of the model files (sha256:...).")


class CurationConfig(_Config):
    dedup: Literal["none", "exact", "near"] = Field(default="near", description="Duplicate removal.")
    near_duplicate_threshold: float = Field(default=0.85, ge=0, le=1, description="MinHash Jaccard threshold.")
    min_tokens: int = Field(default=2, ge=1, description="Drop shorter examples.")
    max_tokens: int | None = Field(default=None, ge=1, description="Drop longer examples; None: max_seq_length.")
    remove_eval_leakage: bool = Field(default=True, description="Drop train examples found in eval.")
    min_train_examples: int = Field(
        default=16, ge=1, description="Fail DataInvalid when fewer training examples are left after curation."
    )


class DatasetConfig(_Config):
    train: str = Field(description="Training JSONL URI.")
    validation: str | None = Field(default=None, description="Validation JSONL URI; None: split from train.")
    eval: str | None = Field(default=None, description="Held-out eval JSONL URI; None: split from train.")
    format: Literal["auto", "chat", "instruction", "completion"] = Field(default="auto", description="Format.")
    validation_split: float = Field(default=0.1, ge=0, le=1, description="Share of train for validation.")
    eval_split: float = Field(default=0.1, ge=0, le=1, description="Share of train for eval.")
    curation: CurationConfig = Field(default_factory=CurationConfig, description="Cleaning.")


class LoRAConfig(_Config):
    rank: int = Field(default=16, ge=1, description="Adapter rank.")
    alpha: int = Field(default=32, ge=1, description="Adapter alpha.")
    dropout: float = Field(default=0.05, ge=0, le=1, description="Adapter dropout.")
    target_modules: list[str] | None = Field(default=None, description="Modules to adapt; None: per architecture.")
    last_layers: int | None = Field(default=None, ge=1, description="Adapt only the last N blocks; None: all.")


class MethodConfig(_Config):
    type: Method = Field(default="LoRA", description="LoRA, QLoRA, DoRA or Full.")
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="Adapter settings (ignored for Full).")


class TrainingConfig(_Config):
    epochs: int = Field(default=3, ge=1, description="Passes over the data.")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps; overrides epochs.")
    learning_rate: float = Field(default=2e-4, gt=0, le=1, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(default="cosine", description="Schedule.")
    warmup_ratio: float = Field(default=0.03, ge=0, le=1, description="Warm-up share of steps.")
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    batch_size: int = Field(default=8, ge=1, description="Sequences per micro-batch.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per step.")
    max_seq_length: int = Field(default=2048, ge=16, description="Longest sequence.")
    packing: bool = Field(default=True, description="Pack short examples together.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(default="auto", description="Compute precision.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations.")
    checkpoint_every_steps: int = Field(default=200, ge=1, description="Checkpoint interval.")
    eval_every_steps: int | None = Field(default=None, ge=1, description="Validation interval; None: per epoch.")
    seed: int = Field(default=42, ge=0, description="Random seed.")


class LiftOverConfig(_Config):
    baseline: Literal["base", "prompted"] = Field(description="Baseline to beat.")
    by: float = Field(default=0.0, ge=0, description="Required margin.")
    significance: float | None = Field(
        default=None, gt=0, le=1, description="Largest p-value of the one-sided sign test that still passes."
    )


class GateConfig(_Config):
    metric: Metric = Field(description="Metric the gate reads.")
    min: float | None = Field(default=None, description="Score must be at least this.")
    max: float | None = Field(default=None, description="Score must be at most this.")
    min_lift_over: LiftOverConfig | None = Field(default=None, description="Beat a baseline by a margin.")
    max_regression: float | None = Field(default=None, ge=0, description="Trail the base by at most this.")


class PromptedConfig(_Config):
    enabled: bool = Field(default=True, description="Score the prompted baseline.")
    few_shot: int = Field(default=3, ge=0, le=32, description="Few-shot examples from train.")
    shot_selection: Literal["random", "stratified", "retrieved"] = Field(
        default="stratified", description="How shots are chosen: at random, covering the labels, or BM25-nearest."
    )
    system_prompt: str | None = Field(
        default=None, description="System prompt; None: one listing the labels (closed answer sets), else neutral."
    )


def _default_metrics() -> list[Metric]:
    return ["exact_match", "token_f1"]


class EvaluationConfig(_Config):
    metrics: list[Metric] = Field(default_factory=_default_metrics, description="Metrics.")
    primary_metric: Metric | None = Field(default=None, description="Headline metric; None: first of metrics.")
    base: bool = Field(default=True, description="Score the base model zero-shot.")
    prompted: PromptedConfig = Field(default_factory=PromptedConfig, description="Prompted baseline.")
    gates: list[GateConfig] = Field(default_factory=list, description="Gates; empty: beat the best baseline.")
    max_new_tokens: int = Field(default=128, ge=1, description="Generation budget per example.")
    batch_size: int = Field(default=16, ge=1, le=1024, description="Examples generated together (left-padded).")
    max_examples: int | None = Field(default=None, ge=1, description="Cap on scored examples.")
    general_text: str | None = Field(default=None, description="General-text URI; None: the built-in sample.")

    @property
    def headline(self) -> Metric:
        return self.primary_metric or (self.metrics[0] if self.metrics else "exact_match")


class Lineage(_Config):
    """Where the run came from, recorded in the adapter's manifest."""

    namespace: str | None = Field(default=None, description="FineTune namespace (None for local runs).")
    name: str = Field(description="FineTune name.")
    uid: str | None = Field(default=None, description="FineTune uid.")
    generation: int | None = Field(default=None, description="FineTune generation.")


class TrainerConfig(_Config):
    """Everything one run needs, resolved."""

    run_id: str = Field(description="Unique run id; artifacts go under output_uri, which already contains it.")
    output_uri: str = Field(description="The run's artifact prefix, e.g. s3://adapters/ns/name/uid/.")
    lineage: Lineage = Field(description="Where the run came from.")
    base_model: ModelConfig = Field(description="The base model.")
    dataset: DatasetConfig = Field(description="The data.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="The method.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Hyperparameters.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Eval and gates.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="S3 settings.")
    progress_interval_seconds: float = Field(default=5.0, gt=0, description="How often progress.json is written.")
    work_dir: str = Field(default="/tmp/kubetune", description="Local scratch space (an emptyDir in the pod).")
