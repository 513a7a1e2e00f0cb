"""Structural OpenAPI v3 schemas for CRDs, generated from the pydantic models.

pydantic's own JSON Schema output uses ``$ref``, ``anyOf`` for optionals and
``title`` everywhere; Kubernetes wants a *structural* schema: every node typed,
no references, ``nullable``-free optionals, and its own extensions
(``x-kubernetes-validations``, ``x-kubernetes-int-or-string``, ...). This
module walks the models' type annotations directly, so the CRD says exactly
what the models say and nothing else.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from kubetune.api.types import CEL, KubeModel, SchemaHints

Schema = dict[str, Any]


@dataclass
class _Facts:
    """Everything gathered about one node while unwrapping Annotated/Optional layers."""

    constraints: list[Any] = field(default_factory=list)
    kube: list[SchemaHints] = field(default_factory=list)
    description: str | None = None

    def merged_kube(self) -> SchemaHints:
        validations: tuple[CEL, ...] = ()
        flags: dict[str, Any] = {}
        for k in self.kube:
            validations += k.validations
            for name in ("int_or_string", "preserve_unknown_fields", "embedded_resource", "schema_default"):
                if getattr(k, name):
                    flags[name] = True
            for name in ("format", "list_type"):
                if getattr(k, name) is not None:
                    flags[name] = getattr(k, name)
            if k.list_map_keys:
                flags["list_map_keys"] = k.list_map_keys
            if k.strip_defaults:
                flags["strip_defaults"] = True
        return SchemaHints(validations=validations, **flags)


def _unwrap(annotation: Any, facts: _Facts) -> Any:
    """Peel Annotated and ``X | None`` layers, collecting metadata on the way."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            base, *extra = get_args(annotation)
            for item in extra:
                _collect(item, facts)
            annotation = base
            continue
        if origin in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                raise TypeError(f"unions other than Optional are not representable in a CRD: {annotation}")
            annotation = members[0]
            continue
        return annotation


def _collect(item: Any, facts: _Facts) -> None:
    if isinstance(item, SchemaHints):
        facts.kube.append(item)
    elif isinstance(item, FieldInfo):
        if item.description and facts.description is None:
            facts.description = item.description
        for meta in item.metadata:
            _collect(meta, facts)
    else:
        facts.constraints.append(item)


def _apply_constraints(schema: Schema, constraints: list[Any]) -> None:
    kind = schema.get("type")
    for c in constraints:
        if isinstance(c, annotated_types.Ge):
            schema["minimum"] = c.ge
        elif isinstance(c, annotated_types.Gt):
            schema["minimum"] = c.gt
            schema["exclusiveMinimum"] = True
        elif isinstance(c, annotated_types.Le):
            schema["maximum"] = c.le
        elif isinstance(c, annotated_types.Lt):
            schema["maximum"] = c.lt
            schema["exclusiveMaximum"] = True
        elif isinstance(c, annotated_types.MinLen):
            key = {"array": "minItems", "object": "minProperties"}.get(str(kind), "minLength")
            schema[key] = c.min_length
        elif isinstance(c, annotated_types.MaxLen):
            key = {"array": "maxItems", "object": "maxProperties"}.get(str(kind), "maxLength")
            schema[key] = c.max_length
        elif getattr(c, "pattern", None) is not None:
            schema["pattern"] = c.pattern


def _validations(rules: typing.Iterable[CEL]) -> list[Schema]:
    out = []
    for r in rules:
        v: Schema = {"rule": r.rule, "message": r.message}
        if r.field_path:
            v["fieldPath"] = r.field_path
        if r.reason:
            v["reason"] = r.reason
        out.append(v)
    return out


def schema_for(annotation: Any, *, facts: _Facts | None = None, defaults: bool = True) -> Schema:
    """The structural schema of one annotated type."""
    facts = facts or _Facts()
    tp = _unwrap(annotation, facts)
    kube = facts.merged_kube()
    defaults = defaults and not kube.strip_defaults
    origin = get_origin(tp)
    schema: Schema
    if kube.int_or_string:
        # kubebuilder's shape for resource.Quantity: the pattern applies to the string form.
        schema = {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}
    elif origin is Literal:
        values = list(get_args(tp))
        if not all(isinstance(v, str) for v in values):
            raise TypeError(f"only string enums are allowed in the API: {tp}")
        schema = {"type": "string", "enum": values}
    elif tp is str:
        schema = {"type": "string"}
    elif tp is bool:
        schema = {"type": "boolean"}
    elif tp is int:
        schema = {"type": "integer", "format": "int64"}
    elif tp is float:
        raise TypeError("floats are not allowed in the API; use a decimal string")
    elif origin is list:
        (item,) = get_args(tp)
        schema = {"type": "array", "items": schema_for(item, defaults=defaults)}
    elif origin is dict:
        key, value = get_args(tp)
        if key is not str:
            raise TypeError(f"map keys must be strings: {tp}")
        if value is Any:
            schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        else:
            schema = {"type": "object", "additionalProperties": schema_for(value, defaults=defaults)}
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        schema = model_schema(tp, defaults=defaults)
    else:
        raise TypeError(f"no CRD schema for {tp!r}")

    if kube.preserve_unknown_fields:
        schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    if kube.format:
        schema["format"] = kube.format
    if kube.list_type:
        schema["x-kubernetes-list-type"] = kube.list_type
    if kube.list_map_keys:
        schema["x-kubernetes-list-map-keys"] = list(kube.list_map_keys)
    _apply_constraints(schema, facts.constraints)
    if kube.validations:
        schema.setdefault("x-kubernetes-validations", []).extend(_validations(kube.validations))
    if facts.description:
        schema = {"description": facts.description, **{k: v for k, v in schema.items() if k != "description"}}
    return schema


def model_schema(model: type[BaseModel], *, defaults: bool = True) -> Schema:
    """The structural schema of a model: properties by wire name, required, CEL rules."""
    properties: Schema = {}
    required: list[str] = []
    for name, info in model.model_fields.items():
        wire = info.alias or name
        facts = _Facts(description=info.description)
        for meta in info.metadata:
            _collect(meta, facts)
        prop = schema_for(info.annotation, facts=facts, defaults=defaults)
        if info.is_required():
            required.append(wire)
        elif defaults and facts.merged_kube().schema_default and info.default is not PydanticUndefined:
            prop["default"] = info.default
        if "description" not in prop:
            raise TypeError(f"{model.__name__}.{name} has no description")
        properties[wire] = prop
    schema: Schema = {"type": "object", "properties": properties}
    if model.__doc__ and model.__doc__.strip():
        schema = {"description": model.__doc__.strip().splitlines()[0], **schema}
    if required:
        schema["required"] = required
    if issubclass(model, KubeModel) and model.__cel__:
        schema["x-kubernetes-validations"] = _validations(model.__cel__)
    return schema
