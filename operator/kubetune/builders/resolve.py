"""Where every default of a FineTune and an AdapterDeployment comes from, in one place.

Resolution order for each field: the object's own value, else its template's
default (FineTunes only), else the operator's settings (what a platform team
configures once: image, output, storage, queue), else the API models' own
defaults. The result is fully resolved — every section present — so builders
and controllers read values and never write a default of their own.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.adapterdeployment import AdapterDeploymentSpec, CanarySpec, ServingResources
from kubetune.api.finetune import ResolvedFineTuneSpec
from kubetune.api.template import FineTuneTemplate
from kubetune.api.types import SecretReference, StorageSpec
from kubetune.builders.settings import OperatorSettings

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


def settings_defaults(settings: OperatorSettings) -> dict[str, Any]:
    """The FineTune fields the operator's settings default, as a spec fragment."""
    storage: dict[str, Any] = {"region": settings.default_storage_region}
    if settings.default_storage_endpoint:
        storage["endpoint"] = settings.default_storage_endpoint
    if settings.default_storage_secret:
        storage["secretRef"] = {"name": settings.default_storage_secret}
    out: dict[str, Any] = {"image": settings.trainer_image, "storage": storage}
    if settings.default_output_uri:
        out["output"] = {"uri": settings.default_output_uri}
    if settings.default_queue:
        out["runPolicy"] = {"queueName": settings.default_queue}
    return out


def resolve_finetune(
    spec: dict[str, Any], template: FineTuneTemplate | None, settings: OperatorSettings
) -> ResolvedFineTuneSpec:
    """The FineTune's spec over its template's defaults over the settings' defaults, validated."""
    layers = settings_defaults(settings)
    if template is not None and template.spec.defaults is not None:
        defaults = template.spec.defaults.model_dump(by_alias=True, exclude_unset=True, exclude_none=True)
        layers = deep_merge(layers, {k: v for k, v in defaults.items() if k in TEMPLATED_SECTIONS})
    return ResolvedFineTuneSpec.model_validate(deep_merge(layers, spec))


def resolve_storage(storage: StorageSpec | None, settings: OperatorSettings) -> StorageSpec:
    """An object's storage settings with the operator's defaults under them."""
    own = storage or StorageSpec()
    secret = own.secret_ref or (
        SecretReference(name=settings.default_storage_secret) if settings.default_storage_secret else None
    )
    return StorageSpec(
        endpoint=own.endpoint or settings.default_storage_endpoint,
        region=own.region or settings.default_storage_region,
        secret_ref=secret,
    )


def resolve_adapter_deployment(spec: AdapterDeploymentSpec, settings: OperatorSettings) -> AdapterDeploymentSpec:
    """The AdapterDeployment's spec with every default filled in (GPUs by runtime, canary, storage, image)."""
    runtime = spec.runtime
    resources = runtime.resources or ServingResources()
    if resources.gpus is None:
        resources = resources.model_copy(update={"gpus": 1 if runtime.type == "vllm" else 0})
    image = runtime.image or (settings.vllm_image if runtime.type == "vllm" else settings.trainer_image)
    rollout = spec.rollout
    if rollout.canary is None:
        rollout = rollout.model_copy(update={"canary": CanarySpec()})
    return spec.model_copy(
        update={
            "runtime": runtime.model_copy(update={"resources": resources, "image": image}),
            "rollout": rollout,
            "storage": resolve_storage(spec.storage, settings),
        }
    )
