{{/* Chart name, truncated to 63 characters (a DNS label). */}}
{{- define "recupdate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, prefixed with the chart name unless it already contains it. */}}
{{- define "recupdate.fullname" -}}
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

{{- define "recupdate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "recupdate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "recupdate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "recupdate.labels" -}}
helm.sh/chart: {{ include "recupdate.chart" . }}
{{ include "recupdate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: recupdate
{{- end }}

{{- define "recupdate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "recupdate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "recupdate.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "recupdate.peeringName" -}}
{{- default (include "recupdate.fullname" .) .Values.peering.name }}
{{- end }}

{{/* More than one replica: kopf peering with a priority per pod (the StatefulSet ordinal). */}}
{{- define "recupdate.ha" -}}
{{- if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{/* The namespaces watched with rbac.scope=namespace, as a JSON list (use with fromJsonArray). */}}
{{- define "recupdate.watchNamespaces" -}}
{{- if .Values.rbac.watchNamespaces }}
{{- .Values.rbac.watchNamespaces | uniq | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{/*
RBAC rules generated from operator/recupdate_operator/generate/rbac.py by `make manifests`
(files/rbac-rules.yaml). Keys: namespaced, cluster, peeringNamespaced, peeringCluster.
Usage: include "recupdate.rules" (list . "namespaced")
*/}}
{{- define "recupdate.rules" -}}
{{- $root := index . 0 }}
{{- $key := index . 1 }}
{{- $all := $root.Files.Get "files/rbac-rules.yaml" | fromYaml }}
{{- if not $all }}
{{- fail "files/rbac-rules.yaml is missing or empty: run `make manifests`" }}
{{- end }}
{{- $rules := index $all $key | default list }}
{{- if $rules }}
{{- toYaml $rules }}
{{- end }}
{{- end }}

{{/* Checks that values.schema.json cannot express (or that --skip-schema-validation skipped). */}}
{{- define "recupdate.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.peering.enabled) }}
{{- fail "replicaCount > 1 requires peering.enabled=true: without kopf peering every replica would reconcile every policy" }}
{{- end }}
{{- if not (has .Values.rbac.scope (list "cluster" "namespace")) }}
{{- fail (printf "rbac.scope must be cluster or namespace, not %q" .Values.rbac.scope) }}
{{- end }}
{{- if and (eq .Values.rbac.scope "cluster") .Values.rbac.watchNamespaces }}
{{- fail "rbac.watchNamespaces is only used with rbac.scope=namespace" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled requires metrics.enabled" }}
{{- end }}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.port) (int .Values.health.port)) }}
{{- fail "metrics.port and health.port must differ" }}
{{- end }}
{{- end }}

{{/* The operator's command-line flags (after `recupdate operator`). */}}
{{- define "recupdate.args" -}}
{{- if eq .Values.rbac.scope "cluster" }}
- --all-namespaces
{{- else }}
{{- range (include "recupdate.watchNamespaces" . | fromJsonArray) }}
- --namespace={{ . }}
{{- end }}
{{- end }}
{{- if .Values.metrics.enabled }}
- --metrics-port={{ .Values.metrics.port }}
{{- else }}
- --metrics-port=0
{{- end }}
- --liveness=http://0.0.0.0:{{ .Values.health.port }}/healthz
{{- if .Values.peering.enabled }}
- --peering={{ include "recupdate.peeringName" . }}
{{- if include "recupdate.ha" . }}
- --priority=$(POD_INDEX)
{{- end }}
{{- else }}
- --standalone
{{- end }}
{{- with .Values.operator.defaultStoreSecret.name }}
- --default-store-secret={{ . }}:{{ $.Values.operator.defaultStoreSecret.key }}
{{- end }}
{{- with .Values.operator.extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end }}
