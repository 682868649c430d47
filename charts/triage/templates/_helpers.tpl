{{/* Names, labels, the image reference, the rendered policy, and install-time checks. */}}

{{- define "triage.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* `<release>-triage`, or `<release>` when the release name already contains the chart name. */}}
{{- define "triage.fullname" -}}
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

{{/* `<fullname>-<suffix>`, shortening the full name (not the suffix) to stay a DNS label.
Call with (dict "ctx" $ "suffix" "redis"). */}}
{{- define "triage.componentName" -}}
{{- $base := include "triage.fullname" .ctx | trunc (int (sub 62 (len .suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $base .suffix }}
{{- end }}

{{- define "triage.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "triage.selectorLabels" -}}
app.kubernetes.io/name: {{ include "triage.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "triage.labels" -}}
helm.sh/chart: {{ include "triage.chart" .ctx }}
{{ include "triage.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: triage
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* An image reference from (dict "image" .Values.image "default" $.Chart.AppVersion). */}}
{{- define "triage.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .default .image.tag) }}
{{- end }}
{{- end }}

{{- define "triage.image" -}}
{{- include "triage.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion) }}
{{- end }}

{{- define "triage.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "triage.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The policy file as the gateway will read it: `.Values.policy` through tpl, ending in one
newline (as the ConfigMap's block scalar stores it, so the checksum is of the exact file). */}}
{{- define "triage.policy" -}}
{{- printf "%s\n" (regexReplaceAll "\\s+\\z" (tpl .Values.policy .) "") }}
{{- end }}

{{/* Key/value pairs of the Secret the chart manages (empty: no Secret). */}}
{{- define "triage.secretData" -}}
{{- $data := dict }}
{{- range $name, $value := .Values.secrets.env }}
{{- $_ := set $data $name $value }}
{{- end }}
{{- if .Values.redis.url }}
{{- $_ := set $data "REDIS_URL" .Values.redis.url }}
{{- end }}
{{- if $data }}{{ toYaml $data }}{{ end }}
{{- end }}

{{- define "triage.redisConfigured" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret .Values.redis.enabled }}true{{ end }}
{{- end }}

{{- define "triage.redisUrl" -}}
{{- printf "redis://%s:6379/0" (include "triage.componentName" (dict "ctx" . "suffix" "redis")) }}
{{- end }}

{{/* Fails the install with a message that says what to change. Renders nothing. */}}
{{- define "triage.validate" -}}
{{- $v := .Values }}
{{- $redisSources := 0 }}
{{- range (list $v.redis.url $v.redis.existingSecret $v.redis.enabled) }}
{{- if . }}{{ $redisSources = add1 $redisSources }}{{ end }}
{{- end }}
{{- if gt $redisSources 1 }}
{{- fail "redis: set only one of redis.url, redis.existingSecret and redis.enabled" }}
{{- end }}
{{- if and $v.sim.enabled (not $v.sim.pools) }}
{{- fail "sim.enabled: define at least one pool in sim.pools, e.g. {small: {profile: small}}" }}
{{- end }}
{{- if hasKey $v.secrets.env "REDIS_URL" }}
{{- fail "secrets.env.REDIS_URL: give the Redis URL as redis.url (or redis.existingSecret)" }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail "autoscaling: minReplicas must not exceed maxReplicas" }}
{{- end }}
{{- $drain := default 30 $v.gateway.gracefulShutdownSeconds | int }}
{{- $needed := add $v.gateway.preStopSleepSeconds $drain }}
{{- if le (int $v.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed gateway.preStopSleepSeconds (%d) + gateway.gracefulShutdownSeconds (%d, default 30), or in-flight streams are killed mid-drain" (int $v.terminationGracePeriodSeconds) (int $v.gateway.preStopSleepSeconds) $drain) }}
{{- end }}
{{- $policy := fromYaml (include "triage.policy" .) }}
{{- if hasKey $policy "Error" }}
{{- fail (printf "policy: not a YAML mapping: %s" $policy.Error) }}
{{- end }}
{{- $sections := list "version" "server" "models" "tiers" "routing" "store" "cache" "auth" "tenants" "budgets" "telemetry" "aliases" "responses" }}
{{- range $key, $_ := $policy }}
{{- if not (has $key $sections) }}
{{- fail (printf "policy.%s: unknown section (valid: %s)" $key (join ", " $sections)) }}
{{- end }}
{{- end }}
{{- range (list "version" "models" "tiers") }}
{{- if not (hasKey $policy .) }}
{{- fail (printf "policy.%s: required" .) }}
{{- end }}
{{- end }}
{{- $store := $policy.store | default dict }}
{{- if and (include "triage.redisConfigured" .) (not (contains "${REDIS_URL" (toString ($store.redis_url | default "")))) }}
{{- fail "policy.store.redis_url: redis is configured but the policy does not use it; add `store: {redis_url: ${REDIS_URL}}`" }}
{{- end }}
{{- $quotas := not (empty (($policy.budgets | default dict).tiers)) }}
{{- $tenants := values ($policy.tenants | default dict) }}
{{- with ($policy.auth | default dict).anonymous }}{{ $tenants = append $tenants . }}{{ end }}
{{- range $tenants }}
{{- $tenant := . | default dict }}
{{- if or $tenant.budget $tenant.limits }}{{ $quotas = true }}{{ end }}
{{- end }}
{{- $processes := or $v.autoscaling.enabled (gt (int $v.replicaCount) 1) (gt (int $v.gateway.workers) 1) }}
{{- $storeUrl := toString ($store.redis_url | default "") }}
{{- $embedded := or (not $storeUrl) (and (hasPrefix "${REDIS_URL" $storeUrl) (not (include "triage.redisConfigured" .))) }}
{{- if and $quotas $processes $embedded }}
{{- fail "policy: budgets or rate limits with more than one gateway process (replicaCount, autoscaling or gateway.workers) need Redis: without it each process counts them on its own, so a tenant could spend its budget once per process. Configure redis (url, existingSecret or enabled), or run one process" }}
{{- end }}
{{- if not (or $v.secrets.existingSecret $v.extraEnvFrom) }}
{{- $provided := keys $v.secrets.env }}
{{- if include "triage.redisConfigured" . }}{{ $provided = append $provided "REDIS_URL" }}{{ end }}
{{- range $v.extraEnv }}{{ $provided = append $provided .name }}{{ end }}
{{- $missing := list }}
{{- range regexFindAll "\\$\\{[A-Za-z_][A-Za-z0-9_]*\\}" (toYaml $policy) -1 }}
{{- $name := trimSuffix "}" (trimPrefix "${" .) }}
{{- if not (has $name $provided) }}{{ $missing = append $missing $name }}{{ end }}
{{- end }}
{{- if $missing }}
{{- fail (printf "policy: needs environment variable(s) %s, which nothing provides: add them to secrets.env, or name a Secret holding them in secrets.existingSecret" (join ", " (uniq $missing))) }}
{{- end }}
{{- end }}
{{- end }}

{{/* A label selector matching the pods of every sim pool. */}}
{{- define "triage.simSelector" -}}
matchLabels:
  app.kubernetes.io/name: {{ include "triage.name" . }}
  app.kubernetes.io/instance: {{ .Release.Name }}
matchExpressions:
  - key: app.kubernetes.io/component
    operator: In
    values:
      {{- range $pool, $_ := .Values.sim.pools }}
      - sim-{{ $pool }}
      {{- end }}
{{- end }}
