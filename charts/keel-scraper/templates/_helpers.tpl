{{/*
Names, labels and the few derived numbers every template shares.
*/}}

{{- define "keel-scraper.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Release-scoped name for the Deployment, Service, PDB and ServiceAccount. The store
Components are not named from it: the worker finds them by name, so their names are values.
*/}}
{{- define "keel-scraper.fullname" -}}
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

{{- define "keel-scraper.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "keel-scraper.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keel-scraper.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "keel-scraper.labels" -}}
helm.sh/chart: {{ include "keel-scraper.chart" . }}
{{ include "keel-scraper.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tkeel
{{- end }}

{{- define "keel-scraper.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "keel-scraper.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Seconds the sidecar keeps its API up after SIGTERM (dapr.io/block-shutdown-duration):
the worker's whole shutdown grace plus a margin, so the lease release at the end of the
grace still reaches the store.
*/}}
{{- define "keel-scraper.sidecarBlockSeconds" -}}
{{- add (int .Values.worker.shutdownGraceSeconds) (int .Values.dapr.blockShutdownMarginSeconds) }}
{{- end }}

{{/*
Seconds the pod needs to stop cleanly: the sidecar's block, then its drain.
terminationGracePeriodSeconds must exceed this, or the kubelet kills the sidecar (and with
it the worker's last store write) early.
*/}}
{{- define "keel-scraper.stopSeconds" -}}
{{- if .Values.dapr.enabled }}
{{- add (include "keel-scraper.sidecarBlockSeconds" . | int) (int .Values.dapr.gracefulShutdownSeconds) }}
{{- else }}
{{- int .Values.worker.shutdownGraceSeconds }}
{{- end }}
{{- end }}

{{- define "keel-scraper.terminationGracePeriodSeconds" -}}
{{- $need := include "keel-scraper.stopSeconds" . | int }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $need 5 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) $need }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed %d: the worker's shutdown grace plus the sidecar's shutdown block margin and drain" (int .Values.terminationGracePeriodSeconds) $need) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
The state.redis metadata both store Components share: host, password (from a Secret,
never inline) and any extra items.
*/}}
{{- define "keel-scraper.redisMetadata" -}}
- name: redisHost
  value: {{ .Values.stores.redis.host | quote }}
{{- with .Values.stores.redis.passwordSecret }}
{{- if .name }}
- name: redisPassword
  secretKeyRef:
    name: {{ .name | quote }}
    key: {{ .key | quote }}
{{- end }}
{{- end }}
{{- with .Values.stores.redis.extraMetadata }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Cross-value rules the JSON schema cannot express.
*/}}
{{- define "keel-scraper.validate" -}}
{{- if and (eq .Values.worker.backend "dapr") (not .Values.dapr.enabled) }}
{{- fail "worker.backend=dapr needs the sidecar: set dapr.enabled=true" }}
{{- end }}
{{- if and (eq .Values.worker.backend "redis") (not .Values.worker.redisUrlSecret.name) }}
{{- fail "worker.backend=redis needs worker.redisUrlSecret.name (a Secret holding the Redis URL)" }}
{{- end }}
{{- if and .Values.dapr.enabled (eq (int .Values.worker.port) (int .Values.dapr.metricsPort)) }}
{{- fail (printf "worker.port and dapr.metricsPort are both %d: the worker and its sidecar share the pod's network" (int .Values.worker.port)) }}
{{- end }}
{{- if and (not .Values.dapr.enabled) (not .Values.worker.statusUrl) (not .Values.worker.daprHttpEndpoint) }}
{{- fail "without the sidecar (dapr.enabled=false) set worker.statusUrl or worker.daprHttpEndpoint: the default status URL goes through the sidecar" }}
{{- end }}
{{- if and (eq .Values.worker.backend "dapr") (eq .Values.stores.private.name .Values.stores.public.name) }}
{{- fail "stores.private.name and stores.public.name must differ: the two stores use different key prefixes" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.service.enabled" }}
{{- end }}
{{- end }}
