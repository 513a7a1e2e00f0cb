"""Building blocks shared by every kubetune kind.

The CRD schemas are generated from these pydantic models (see
:mod:`kubetune.api.schema`), so the models carry everything the generated
OpenAPI needs: descriptions, bounds, patterns and CEL rules. Two small marker
classes, :class:`SchemaHints` and :class:`CEL`, hold what pydantic has no word for.

Following the Kubernetes API conventions, fractions are decimal *strings*
(``"2e-4"``, ``"0.05"``), never floats, and enums are strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, AliasGenerator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.alias_generators import to_camel

API_GROUP = "kubetune.io"
API_VERSION = "v1alpha1"
GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"


@dataclass(frozen=True)
class CEL:
    """One ``x-kubernetes-validations`` rule.

    ``field_path`` (relative, e.g. ``.lora``) makes the API server name that
    field in the error, which is what a user reading ``kubectl apply`` output
    needs.
    """

    rule: str
    message: str
    field_path: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class SchemaHints:
    """Schema facts that pydantic cannot express, attached with ``Annotated``."""

    int_or_string: bool = False
    preserve_unknown_fields: bool = False
    embedded_resource: bool = False
    format: str | None = None
    # Emit the pydantic default into the CRD. Off by default on purpose: fields
    # that a FineTuneTemplate may default must stay absent in stored objects,
    # or the API server's defaulting would hide the template's value.
    schema_default: bool = False
    # Emit no defaults anywhere below this field (a FineTuneTemplate's defaults
    # must not be filled in by the API server either).
    strip_defaults: bool = False
    list_type: Literal["atomic", "set", "map"] | None = None
    list_map_keys: tuple[str, ...] = ()
    validations: tuple[CEL, ...] = field(default_factory=tuple)


class KubeModel(BaseModel):
    """Base of every API object: camelCase on the wire, unknown fields rejected.

    ``__cel__`` lists object-level CEL rules of the model.
    """

    model_config = ConfigDict(
        alias_generator=AliasGenerator(alias=to_camel),
        populate_by_name=True,
        extra="forbid",
        frozen=False,
    )
    __cel__: ClassVar[tuple[CEL, ...]] = ()


def _at_most_one(value: str) -> str:
    if float(value) > 1.0:
        raise ValueError('must be a decimal between 0 and 1, e.g. "0.05"')
    return value


def _number_to_str(value: Any) -> Any:
    # YAML turns `learningRate: 0.0002` into a float; the API server rejects it,
    # and so do we, but an int such as `1` is harmless to accept as "1".
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    return value


DECIMAL_PATTERN = r"^[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$"

Decimal = Annotated[
    str,
    BeforeValidator(_number_to_str),
    Field(pattern=DECIMAL_PATTERN, max_length=32),
]
"""A non-negative decimal number written as a string, e.g. ``"0.05"`` or ``"2e-4"``."""

Fraction = Annotated[
    str,
    BeforeValidator(_number_to_str),
    Field(pattern=DECIMAL_PATTERN, max_length=32),
    AfterValidator(_at_most_one),
    SchemaHints(validations=(CEL("double(self) <= 1.0", 'must be a decimal between 0 and 1, e.g. "0.05"'),)),
]
"""A decimal string between 0 and 1 inclusive."""

Quantity = Annotated[
    str,
    BeforeValidator(_number_to_str),
    Field(max_length=64, pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E)?$"),
    SchemaHints(int_or_string=True),
]
"""A Kubernetes resource quantity (``"40Gi"``, ``"500m"``, ``2``)."""

Name = Annotated[
    str,
    Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
]
"""A DNS-1123 subdomain: the name of a Kubernetes object."""

Digest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$", max_length=71)]
"""A content digest, ``sha256:`` followed by 64 hex digits."""


def _safe_uri(value: str) -> str:
    if "$(" in value:
        raise ValueError("must not contain '$(': Kubernetes would expand it as a variable reference")
    if ".." in value.split("://", 1)[-1].split("/"):
        raise ValueError("must not contain '..' path segments")
    return value


SAFE_URI = (
    CEL("!self.contains('$(')", "must not contain '$(': Kubernetes would expand it as a variable reference"),
    CEL("!self.matches('(^|/)[.][.](/|$)')", "must not contain '..' path segments"),
)
"""What no URI may hold: a ``$(VAR)`` reference (Kubernetes expands those in commands and env, where the
credentials live) or a ``..`` segment (it could climb out of a local cache folder)."""

ModelURI = Annotated[
    str,
    Field(min_length=6, max_length=2048, pattern=r"^(s3|hf|pvc|file)://[^\s]+$"),
    AfterValidator(_safe_uri),
    SchemaHints(validations=SAFE_URI),
]
"""Where a model lives: ``s3://bucket/key``, ``hf://org/name``, ``pvc://claim/path``, ``file:///path``."""

DataURI = Annotated[
    str,
    Field(min_length=6, max_length=2048, pattern=r"^(s3|pvc|file)://[^\s]+$"),
    AfterValidator(_safe_uri),
    SchemaHints(validations=SAFE_URI),
]
"""Where a dataset file lives: ``s3://``, ``pvc://`` or ``file://`` (``hf://`` holds models, not files)."""

OutputURI = Annotated[
    str,
    Field(min_length=6, max_length=2048, pattern=r"^(s3|pvc|file)://[^\s]+$"),
    AfterValidator(_safe_uri),
    SchemaHints(validations=SAFE_URI),
]
"""Where artifacts are written. ``hf://`` is read-only, so it is not allowed here."""

NO_LOCAL_FILES = "file:// URIs only work with `kubetune run` on one machine; in a cluster use s3://, pvc:// or hf://"

FreeForm = Annotated[dict[str, Any], SchemaHints(preserve_unknown_fields=True)]
"""An object passed through to Kubernetes as written (e.g. a toleration)."""

Timestamp = Annotated[str, SchemaHints(format="date-time"), Field(max_length=64)]


class LocalObjectReference(KubeModel):
    """A reference to an object by name."""

    name: Name = Field(description="Name of the referenced object.")


class SecretReference(KubeModel):
    """A Secret in the same namespace."""

    name: Name = Field(description="Name of the Secret in the object's namespace.")


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(KubeModel):
    """A ``metav1.Condition``: one aspect of the object's observed state."""

    type: str = Field(
        description="Type of condition in CamelCase, e.g. Ready or Succeeded.",
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
    )
    status: ConditionStatus = Field(description="Status of the condition: True, False or Unknown.")
    reason: str = Field(
        description="A programmatic identifier, in CamelCase, of the reason for the last transition.",
        max_length=1024,
        min_length=1,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
    )
    message: str = Field(default="", description="A human-readable message about the transition.", max_length=32768)
    last_transition_time: Timestamp = Field(description="When the condition last changed status.")
    observed_generation: int | None = Field(
        default=None,
        ge=0,
        description="The .metadata.generation the condition was set against.",
    )


Conditions = Annotated[
    list[Condition],
    Field(max_length=32),
    SchemaHints(list_type="map", list_map_keys=("type",)),
]


class StorageSpec(KubeModel):
    """How to reach the S3-compatible store that holds models, data and artifacts."""

    endpoint: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
        description=(
            "URL of the S3-compatible endpoint (MinIO, Ceph RGW, AWS S3). "
            "Empty means the operator's default; AWS when that is empty too."
        ),
    )
    region: str | None = Field(
        default=None, max_length=64, description="Region passed to the S3 client. Defaults to us-east-1."
    )
    secret_ref: SecretReference | None = Field(
        default=None,
        description=(
            "Secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally "
            "AWS_SESSION_TOKEN). The keys reach the trainer as environment variables from the "
            "Secret and are never copied into the trainer's config, status or events."
        ),
    )
