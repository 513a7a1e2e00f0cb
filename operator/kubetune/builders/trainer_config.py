"""FineTune (+ FineTuneTemplate) → the trainer's resolved configuration.

Resolution order for every field: the FineTune's own value, else the
template's default, else the built-in default (the API models' defaults).
Decimal strings from the API become floats here, at the boundary to the
trainer, and nowhere else.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.finetune import FineTune, FineTuneSpec
from kubetune.api.template import FineTuneTemplate
from kubetune_trainer import config as tc

# The sections a template may default; everything else comes from the FineTune alone.
TEMPLATED_SECTIONS = ("method", "training", "evaluation", "resources", "output", "storage", "runPolicy", "image")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``; nested objects merge, lists and scalars replace."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_spec(spec: dict[str, Any], template: FineTuneTemplate | None) -> FineTuneSpec:
    """The FineTune's spec with the template's defaults under it, validated."""
    if template is None or template.spec.defaults is None:
        return FineTuneSpec.model_validate(spec)
    defaults = template.spec.defaults.model_dump(by_alias=True, exclude_unset=True, exclude_none=True)
    merged = deep_merge({k: v for k, v in defaults.items() if k in TEMPLATED_SECTIONS}, spec)
    return FineTuneSpec.model_validate(merged)


def run_prefix(output_root: str, namespace: str, name: str, run_id: str) -> str:
    """``<output>/<namespace>/<name>/<run_id>/``: write-once artifacts of one run."""
    return "/".join([output_root.rstrip("/"), namespace, name, run_id]) + "/"


def build_trainer_config(
    finetune: FineTune,
    spec: FineTuneSpec,
    *,
    run_id: str,
    output_root: str,
    default_storage_endpoint: str | None = None,
    work_dir: str = "/tmp/kubetune",
) -> tc.TrainerConfig:
    """The TrainerConfig one run of ``finetune`` executes (``spec`` already resolved)."""
    meta = finetune.metadata
    namespace = str(meta.get("namespace") or "default")
    name = str(meta.get("name") or "finetune")
    method = spec.method
    lora = method.lora if method is not None and method.lora is not None else None
    training = spec.training
    evaluation = spec.evaluation
    storage = spec.storage
    curation = spec.dataset.curation

    method_cfg = tc.MethodConfig(
        type=method.type if method is not None else "LoRA",
        lora=tc.LoRAConfig(
            rank=lora.rank,
            alpha=lora.alpha,
            dropout=float(lora.dropout),
            target_modules=lora.target_modules,
        )
        if lora is not None
        else tc.LoRAConfig(),
    )
    training_cfg = (
        tc.TrainingConfig(
            epochs=training.epochs,
            max_steps=training.max_steps,
            learning_rate=float(training.learning_rate),
            lr_scheduler=training.lr_scheduler,
            warmup_ratio=float(training.warmup_ratio),
            weight_decay=float(training.weight_decay),
            batch_size=training.batch_size,
            gradient_accumulation_steps=training.gradient_accumulation_steps,
            max_seq_length=training.max_seq_length,
            packing=training.packing,
            precision=training.precision,
            gradient_checkpointing=training.gradient_checkpointing,
            checkpoint_every_steps=training.checkpoint_every_steps,
            eval_every_steps=training.eval_every_steps,
            seed=training.seed,
        )
        if training is not None
        else tc.TrainingConfig()
    )
    evaluation_cfg = tc.EvaluationConfig()
    if evaluation is not None:
        evaluation_cfg = tc.EvaluationConfig(
            metrics=list(evaluation.metrics),
            primary_metric=evaluation.primary_metric,
            base=evaluation.baselines.base,
            prompted=tc.PromptedConfig(
                enabled=evaluation.baselines.prompted.enabled,
                few_shot=evaluation.baselines.prompted.few_shot,
                system_prompt=evaluation.baselines.prompted.system_prompt,
            ),
            gates=[
                tc.GateConfig(
                    metric=g.metric,
                    min=None if g.min is None else float(g.min),
                    max=None if g.max is None else float(g.max),
                    min_lift_over=None
                    if g.min_lift_over is None
                    else tc.LiftOverConfig(baseline=g.min_lift_over.baseline, by=float(g.min_lift_over.by)),
                    max_regression=None if g.max_regression is None else float(g.max_regression),
                )
                for g in evaluation.gates
            ],
            max_new_tokens=evaluation.max_new_tokens,
            max_examples=evaluation.max_examples,
            general_text=evaluation.general_text,
        )
    return tc.TrainerConfig(
        run_id=run_id,
        output_uri=run_prefix(output_root, namespace, name, run_id),
        lineage=tc.Lineage(
            namespace=meta.get("namespace"),
            name=name,
            uid=meta.get("uid"),
            generation=meta.get("generation"),
        ),
        base_model=tc.ModelConfig(
            uri=spec.base_model.uri, revision=spec.base_model.revision, digest=spec.base_model.digest
        ),
        dataset=tc.DatasetConfig(
            train=spec.dataset.train,
            validation=spec.dataset.validation,
            eval=spec.dataset.eval,
            format=spec.dataset.format,
            validation_split=float(spec.dataset.validation_split),
            eval_split=float(spec.dataset.eval_split),
            curation=tc.CurationConfig(
                dedup=curation.dedup,
                near_duplicate_threshold=float(curation.near_duplicate_threshold),
                min_tokens=curation.min_tokens,
                max_tokens=curation.max_tokens,
                remove_eval_leakage=curation.remove_eval_leakage,
            ),
        ),
        method=method_cfg,
        training=training_cfg,
        evaluation=evaluation_cfg,
        storage=tc.StorageConfig(
            endpoint=(storage.endpoint if storage is not None else None) or default_storage_endpoint,
            region=(storage.region if storage is not None else None) or "us-east-1",
        ),
        work_dir=work_dir,
    )
