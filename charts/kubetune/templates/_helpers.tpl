{{/* Name of the chart, or nameOverride. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects: <release>-kubetune, or just <release> when it contains the name. */}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{/* Labels the Deployment and Services select pods by; never change them (selectors are immutable). */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubetune.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "kubetune.trainerImage" -}}
{{- default (printf "ghcr.io/kubetune/trainer:%s" .Chart.AppVersion) .Values.trainerImage }}
{{- end }}

{{/* True ("true") when replicas elect one active operator through a coordination.k8s.io Lease. */}}
{{- define "kubetune.leaderElection" -}}
{{- if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{/*
The operator's API access, in one place so the cluster-wide ClusterRole and the
per-namespace Roles cannot drift apart. The operator needs exactly:
  kubetune.io  finetunes                  get list watch patch   (patch: the finalizer of retention Delete)
  kubetune.io  finetunes/status           patch
  kubetune.io  adapterdeployments         list watch   (never patched outside status: no kopf state)
  kubetune.io  adapterdeployments/status  patch
  kubetune.io  finetunes/finalizers           update   (blockOwnerDeletion in owner references, where
  kubetune.io  adapterdeployments/finalizers  update   (OwnerReferencesPermissionEnforcement is on, e.g. OpenShift)
  kubetune.io  finetunetemplates          get   (cluster-scoped: always a ClusterRole)
  batch        jobs                       get list watch create patch   (owners' GC deletes them)
  ""           services                   get create
  ""           pods                       list
  ""           secrets                    get   (storage credentials; never list or watch)
  ""           events                     create
  apps         deployments                get list watch create patch delete   (watched: rollouts move on readiness)
and, only with leader election (replicaCount > 1), in the release's namespace:
  coordination.k8s.io  leases             get create update   (the replicas' Lease)
No wildcard anywhere, and no list/watch of CRDs or namespaces: kopf's run-time
scanning of those (new CRDs, namespaces matching glob patterns) is not needed by
an operator that watches its own CRDs in named namespaces. The operator should
set settings.scanning.disabled; until it does, kopf retries those lists for
about a minute at start-up, logging 403s, before falling back.
*/}}
{{- define "kubetune.namespacedRules" -}}
- apiGroups: ["kubetune.io"]
  resources: ["finetunes"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kubetune.io"]
  resources: ["adapterdeployments"]
  verbs: ["list", "watch"]
- apiGroups: ["kubetune.io"]
  resources: ["finetunes/status", "adapterdeployments/status"]
  verbs: ["patch"]
- apiGroups: ["kubetune.io"]
  resources: ["finetunes/finalizers", "adapterdeployments/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{- define "kubetune.clusterScopedRules" -}}
- apiGroups: ["kubetune.io"]
  resources: ["finetunetemplates"]
  verbs: ["get"]
{{- end }}
