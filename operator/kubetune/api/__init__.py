"""The kubetune.io/v1alpha1 API: pydantic models of every custom resource.

Pure data: no I/O, no Kubernetes client, no kopf (an import-linter contract
keeps it so). The CRDs in ``crds/`` are generated from these models.
"""

from kubetune.api.adapterdeployment import AdapterDeployment, AdapterDeploymentSpec, AdapterDeploymentStatus
from kubetune.api.finetune import FineTune, FineTuneSpec, FineTuneStatus
from kubetune.api.template import FineTuneTemplate, FineTuneTemplateSpec
from kubetune.api.types import API_GROUP, API_VERSION, GROUP_VERSION, Condition

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "GROUP_VERSION",
    "AdapterDeployment",
    "AdapterDeploymentSpec",
    "AdapterDeploymentStatus",
    "Condition",
    "FineTune",
    "FineTuneSpec",
    "FineTuneStatus",
    "FineTuneTemplate",
    "FineTuneTemplateSpec",
]
