{{/*
The chart name.
*/}}
{{- define "palaver.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name prefix of every resource: <release>-<chart>, or <release> when it contains the
chart name. Kept to 40 characters so that "<prefix>-node-headless" and the StatefulSet's pod
names stay within Kubernetes' limits.
*/}}
{{- define "palaver.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
chart label: name-version.
*/}}
{{- define "palaver.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource. Call with (dict "ctx" $ "component" "gateway").
*/}}
{{- define "palaver.labels" -}}
helm.sh/chart: {{ include "palaver.chart" .ctx }}
{{ include "palaver.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Values.image.tag | default .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: palaver
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels. Call with (dict "ctx" $ "component" "gateway").
*/}}
{{- define "palaver.selectorLabels" -}}
app.kubernetes.io/name: {{ include "palaver.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{/*
The image reference; the tag defaults to the chart's appVersion.
*/}}
{{- define "palaver.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/*
Resource names.
*/}}
{{- define "palaver.configName" -}}
{{- printf "%s-config" (include "palaver.fullname" .) }}
{{- end }}

{{- define "palaver.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- printf "%s-secret" (include "palaver.fullname" .) }}
{{- end }}
{{- end }}

{{- define "palaver.nodeHeadlessName" -}}
{{- printf "%s-node-headless" (include "palaver.fullname" .) }}
{{- end }}

{{/*
PALAVER_NODES: the DNS name of the nodes' headless Service and their cluster port.
*/}}
{{- define "palaver.nodes" -}}
{{- printf "%s.%s.svc.%s:%v" (include "palaver.nodeHeadlessName" .) .Release.Namespace .Values.clusterDomain .Values.node.clusterPort }}
{{- end }}

{{/*
"true" when a push provider is configured and the push workers are rendered.
*/}}
{{- define "palaver.pushWorkerEnabled" -}}
{{- if and .Values.pushWorker.enabled (or .Values.push.fcm.enabled .Values.push.webhook.url) }}true{{ end }}
{{- end }}

{{/*
Where PALAVER_POSTGRES_URL comes from: a dict with "name" and "key" (empty when the store is
not PostgreSQL).
*/}}
{{- define "palaver.postgresSecretRef" -}}
{{- if eq .Values.store.type "postgres" }}
{{- if .Values.store.postgres.existingSecret }}
name: {{ .Values.store.postgres.existingSecret }}
key: {{ .Values.store.postgres.existingSecretKey }}
{{- else }}
name: {{ include "palaver.secretName" . }}
key: postgres-url
{{- end }}
{{- end }}
{{- end }}

{{/*
Environment of every long-running Palaver container: the secret settings, each read from the
Secret with optional: true (a key that is absent leaves the variable unset).
*/}}
{{- define "palaver.secretEnv" -}}
{{- $secret := include "palaver.secretName" . }}
{{- range $var, $key := dict "PALAVER_JWT_SECRET" "jwt-secret" "PALAVER_JWT_PUBLIC_KEY" "jwt-public-key" "PALAVER_ADMIN_TOKEN" "admin-token" "PALAVER_PUSH_WEBHOOK_SECRET" "webhook-secret" "AWS_ACCESS_KEY_ID" "aws-access-key-id" "AWS_SECRET_ACCESS_KEY" "aws-secret-access-key" }}
- name: {{ $var }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $key }}
      optional: true
{{- end }}
{{- with (include "palaver.postgresSecretRef" . | fromYaml) }}
- name: PALAVER_POSTGRES_URL
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end }}
{{- end }}

{{/*
Volumes shared by every pod: /tmp, /data (the data volume given) and the Secret (for the FCM
key file). Call with (dict "ctx" $ "data" <volume source>).
*/}}
{{- define "palaver.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .ctx.Values.tmpSizeLimit }}
- name: data
  {{- toYaml (.data | default (dict "emptyDir" (dict))) | nindent 2 }}
{{- end }}

{{- define "palaver.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /data
{{- end }}

{{/*
Probes on the named port "http".
*/}}
{{- define "palaver.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: http
  {{- toYaml .Values.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: http
  {{- toYaml .Values.probes.readiness | nindent 2 }}
{{- end }}

{{/*
Pod-level settings shared by every pod. Call with (dict "ctx" $ "component" "gateway" "values" .Values.gateway).
*/}}
{{- define "palaver.podSpecCommon" -}}
{{- $ctx := .ctx }}
{{- with $ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $ctx.Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- toYaml $ctx.Values.podSecurityContext | nindent 2 }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $ctx.Values.topologySpreadConstraints }}
topologySpreadConstraints:
{{- range $ctx.Values.topologySpreadConstraints }}
  - {{ toYaml . | indent 4 | trim }}
    labelSelector:
      matchLabels:
        {{- include "palaver.selectorLabels" (dict "ctx" $ctx "component" $.component) | nindent 8 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Pod template annotations: checksums of the ConfigMap and the Secret, so pods roll when either
changes, then the component's own annotations.
*/}}
{{- define "palaver.podAnnotations" -}}
checksum/config: {{ include (print .ctx.Template.BasePath "/configmap.yaml") .ctx | sha256sum }}
checksum/secret: {{ include (print .ctx.Template.BasePath "/secret.yaml") .ctx | sha256sum }}
{{- with .values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
PALAVER_COMPAT_LISTEN from gateway.compatListeners: dialect=0.0.0.0:port,...
*/}}
{{- define "palaver.compatListen" -}}
{{- $out := list }}
{{- range .compatListeners }}
{{- $out = append $out (printf "%s=0.0.0.0:%v" .dialect .port) }}
{{- end }}
{{- join "," $out }}
{{- end }}

{{/*
"true" when the migrate hook runs: enabled, and a shared store is configured.
*/}}
{{- define "palaver.migrateEnabled" -}}
{{- $s := .Values.store }}
{{- if .Values.migrate.enabled }}
{{- if and (eq $s.type "scylla") $s.scylla.nodes }}true
{{- else if and (eq $s.type "postgres") (or $s.postgres.url $s.postgres.existingSecret .Values.secrets.existingSecret) }}true
{{- end }}
{{- end }}
{{- end }}

{{/*
The Secret holding the PostgreSQL URL for the migrate hook, which runs before the chart's own
Secret exists on a first install: a user-managed Secret when there is one, else the hook's own.
*/}}
{{- define "palaver.migratePostgresRef" -}}
{{- if .Values.store.postgres.existingSecret }}
name: {{ .Values.store.postgres.existingSecret }}
key: {{ .Values.store.postgres.existingSecretKey }}
{{- else if .Values.secrets.existingSecret }}
name: {{ .Values.secrets.existingSecret }}
key: postgres-url
{{- else }}
name: {{ include "palaver.fullname" . }}-migrate
key: postgres-url
{{- end }}
{{- end }}
