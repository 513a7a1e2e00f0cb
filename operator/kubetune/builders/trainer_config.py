"""A resolved FineTune → the trainer's configuration (``kubetune_trainer.config.TrainerConfig``).

The spec comes in fully resolved (:mod:`kubetune.builders.resolve`): this
module only translates. Decimal strings from the API become floats here, at
the boundary to the trainer, and nowhere else.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.finetune import EvaluationSpec, ResolvedFineTuneSpec
from kubetune_trainer import config as tc


def run_prefix(output_root: str, namespace: str, name: str, run_id: str) -> str:
    """``<output>/<namespace>/<name>/<run_id>/``: write-once artifacts of one run."""
    return "/".join([output_root.rstrip("/"), namespace, name, run_id]) + "/"


def _evaluation(evaluation: EvaluationSpec) -> tc.EvaluationConfig:
    prompted = evaluation.baselines.prompted
    return tc.EvaluationConfig(
        metrics=list(evaluation.metrics),
        primary_metric=evaluation.primary_metric,
        base=evaluation.baselines.base,
        prompted=tc.PromptedConfig(
            enabled=prompted.enabled,
            few_shot=prompted.few_shot,
            shot_selection=prompted.shot_selection,
            system_prompt=prompted.system_prompt,
        ),
        gates=[
            tc.GateConfig(
                metric=g.metric,
                min=None if g.min is None else float(g.min),
                max=None if g.max is None else float(g.max),
                min_lift_over=None
                if g.min_lift_over is None
                else tc.LiftOverConfig(
                    baseline=g.min_lift_over.baseline,
                    by=float(g.min_lift_over.by),
                    significance=None if g.min_lift_over.significance is None else float(g.min_lift_over.significance),
                ),
                max_regression=None if g.max_regression is None else float(g.max_regression),
            )
            for g in evaluation.gates
        ],
        max_new_tokens=evaluation.max_new_tokens,
        max_examples=evaluation.max_examples,
        general_text=evaluation.general_text,
    )


def _training(spec: ResolvedFineTuneSpec) -> tc.TrainingConfig:
    t = spec.training
    return tc.TrainingConfig(
        epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=float(t.learning_rate),
        lr_scheduler=t.lr_scheduler,
        warmup_ratio=float(t.warmup_ratio),
        weight_decay=float(t.weight_decay),
        batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_seq_length=t.max_seq_length,
        packing=t.packing,
        precision=t.precision,
        gradient_checkpointing=t.gradient_checkpointing,
        checkpoint_every_steps=t.checkpoint_every_steps,
        eval_every_steps=t.eval_every_steps,
        seed=t.seed,
    )


def _dataset(spec: ResolvedFineTuneSpec) -> tc.DatasetConfig:
    d = spec.dataset
    c = d.curation
    return tc.DatasetConfig(
        train=d.train,
        validation=d.validation,
        eval=d.eval,
        format=d.format,
        validation_split=float(d.validation_split),
        eval_split=float(d.eval_split),
        curation=tc.CurationConfig(
            dedup=c.dedup,
            near_duplicate_threshold=float(c.near_duplicate_threshold),
            min_tokens=c.min_tokens,
            max_tokens=c.max_tokens,
            remove_eval_leakage=c.remove_eval_leakage,
            min_train_examples=c.min_train_examples,
        ),
    )


def build_trainer_config(
    metadata: dict[str, Any],
    spec: ResolvedFineTuneSpec,
    *,
    run_id: str,
    output_root: str,
    work_dir: str,
    progress_interval_seconds: float,
) -> tc.TrainerConfig:
    """The TrainerConfig one run of the FineTune with ``metadata`` executes."""
    namespace = str(metadata.get("namespace") or "default")
    name = str(metadata.get("name") or "finetune")
    lora = spec.lora
    assert spec.storage.region is not None, "resolve_finetune sets the region"
    return tc.TrainerConfig(
        run_id=run_id,
        output_uri=run_prefix(output_root, namespace, name, run_id),
        lineage=tc.Lineage(
            namespace=metadata.get("namespace"),
            name=name,
            uid=metadata.get("uid"),
            generation=metadata.get("generation"),
        ),
        base_model=tc.ModelConfig(
            uri=spec.base_model.uri, revision=spec.base_model.revision, digest=spec.base_model.digest
        ),
        dataset=_dataset(spec),
        method=tc.MethodConfig(
            type=spec.method.type,
            lora=tc.LoRAConfig(
                rank=lora.rank,
                alpha=lora.alpha,
                dropout=float(lora.dropout),
                target_modules=lora.target_modules,
                last_layers=lora.last_layers,
            ),
        ),
        training=_training(spec),
        evaluation=_evaluation(spec.evaluation),
        storage=tc.StorageConfig(endpoint=spec.storage.endpoint, region=spec.storage.region),
        progress_interval_seconds=progress_interval_seconds,
        work_dir=work_dir,
    )
