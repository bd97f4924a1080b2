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

{{/*
The numbers the alert rules depend on, from the schedule and the lease.

keel-scraper.intervalSeconds: rules.intervalSeconds when set, else the period of
worker.schedule when it is a regular one the chart can read: every second, every N
seconds (seconds field "star-slash-N" or "0/N", N dividing 60, the other fields any), or at
one second every M minutes (minutes field any, "star-slash-M" or "0/M", M dividing 60).
Anything else is refused with a message naming rules.intervalSeconds.
*/}}
{{- define "keel-scraper.intervalSeconds" -}}
{{- if .Values.rules.intervalSeconds }}
{{- int .Values.rules.intervalSeconds }}
{{- else }}
{{- $f := regexSplit "\\s+" (trim .Values.worker.schedule) -1 }}
{{- $sec := index $f 0 }}
{{- $min := index $f 1 }}
{{- $rest := rest (rest $f) }}
{{- $restAny := true }}
{{- range $rest }}{{- if not (has . (list "*" "?")) }}{{- $restAny = false }}{{- end }}{{- end }}
{{- $step := 0 }}
{{- if and $restAny (eq $min "*") (eq $sec "*") }}
{{- $step = 1 }}
{{- else if and $restAny (eq $min "*") (regexMatch "^(\\*|0)/[0-9]+$" $sec) }}
{{- $n := int (regexReplaceAll "^.*/" $sec "") }}
{{- if and (gt $n 0) (eq (mod 60 $n) 0) }}{{- $step = $n }}{{- end }}
{{- else if and $restAny (regexMatch "^[0-9]+$" $sec) (eq $min "*") }}
{{- $step = 60 }}
{{- else if and $restAny (regexMatch "^[0-9]+$" $sec) (regexMatch "^(\\*|0)/[0-9]+$" $min) }}
{{- $m := int (regexReplaceAll "^.*/" $min "") }}
{{- if and (gt $m 0) (eq (mod 60 $m) 0) }}{{- $step = mul 60 $m }}{{- end }}
{{- end }}
{{- if eq $step 0 }}
{{- fail (printf "cannot derive the tick interval of worker.schedule %q for the alert rules: set rules.intervalSeconds to its period in seconds" .Values.worker.schedule) }}
{{- end }}
{{- $step }}
{{- end }}
{{- end }}

{{/*
keel-scraper.leaseMs: worker.lease in milliseconds (ms, s, m, min, h units), else the
interval (the worker's own default lease).
*/}}
{{- define "keel-scraper.leaseMs" -}}
{{- $lease := .Values.worker.lease | default "" | toString | replace " " "" }}
{{- if $lease }}
{{- $units := dict "ms" 1 "s" 1000 "m" 60000 "min" 60000 "h" 3600000 }}
{{- $total := 0 }}
{{- range regexFindAll "[0-9]+(ms|min|s|m|h|ns|us|d)" $lease -1 }}
{{- $u := regexReplaceAll "^[0-9]+" . "" }}
{{- if not (hasKey $units $u) }}
{{- fail (printf "worker.lease %q: the alert rules understand ms, s, m, min and h" $lease) }}
{{- end }}
{{- $total = add $total (mul (int (regexReplaceAll "[a-z]+$" . "")) (get $units $u)) }}
{{- end }}
{{- $total }}
{{- else }}
{{- mul (include "keel-scraper.intervalSeconds" . | int) 1000 }}
{{- end }}
{{- end }}

{{/*
The `job` label Prometheus gives the worker's series: rules.jobLabel, else the
ServiceMonitor's (prometheus-operator names the job after the Service). With neither the
PrometheusRule is refused: rules on a job nobody scrapes would never fire.
*/}}
{{- define "keel-scraper.jobLabel" -}}
{{- if .Values.rules.jobLabel }}
{{- .Values.rules.jobLabel }}
{{- else if .Values.metrics.serviceMonitor.enabled }}
{{- include "keel-scraper.fullname" . }}
{{- else }}
{{- fail "rules.prometheus.enabled needs the job label the worker's series carry: set rules.jobLabel, or enable metrics.serviceMonitor (its job is the Service's name)" }}
{{- end }}
{{- end }}

{{/*
The PromQL rules (files/prometheus-rules.yaml) with the chart's job, schedule and lease
filled in. Every number is in seconds.
  no_tick_seconds   no completed tick for three intervals, or for the lease plus two
                    intervals when that is longer (a crashed holder's lease blocks the
                    others until it expires)
  window            5 minutes or 5 intervals, whichever is longer
  long_window       twice that
  dup_window        10 minutes or 20 intervals; dup_limit = 1.5 x the slots in it
  near_lease        80 % of the lease
*/}}
{{- define "keel-scraper.prometheusRules" -}}
{{- $i := include "keel-scraper.intervalSeconds" . | int }}
{{- $leaseMs := include "keel-scraper.leaseMs" . | int }}
{{- $noTick := max (mul 3 $i) (add (div (add $leaseMs 999) 1000) (mul 2 $i)) }}
{{- $window := max 300 (mul 5 $i) }}
{{- $dupWindow := max 600 (mul 20 $i) }}
{{- $dupLimit := div (mul 3 (div $dupWindow $i)) 2 }}
{{- $nearLeaseMs := div (mul $leaseMs 4) 5 }}
{{- $nearLease := printf "%d.%03d" (div $nearLeaseMs 1000) (mod $nearLeaseMs 1000) }}
{{- .Files.Get "files/prometheus-rules.yaml"
  | replace "${selector}" (printf "job=%q" (include "keel-scraper.jobLabel" .))
  | replace "${no_tick_seconds}" (toString $noTick)
  | replace "${long_window}" (printf "%ds" (mul 2 $window))
  | replace "${window}" (printf "%ds" $window)
  | replace "${dup_window}" (printf "%ds" $dupWindow)
  | replace "${dup_limit}" (toString $dupLimit)
  | replace "${near_lease_seconds}" $nearLease }}
{{- end }}

{{/*
The LogQL rules (files/loki-rules.yaml) with the stream selector filled in: the worker's
container name unless rules.loki.streamSelector says otherwise.
*/}}
{{- define "keel-scraper.lokiRules" -}}
{{- $selector := .Values.rules.loki.streamSelector | default (printf "container=%q" (include "keel-scraper.containerName" .)) }}
{{- .Files.Get "files/loki-rules.yaml" | replace "${stream_selector}" $selector }}
{{- end }}

{{- define "keel-scraper.containerName" -}}
keel-scraper
{{- end }}
