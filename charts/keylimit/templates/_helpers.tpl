{{/* Chart name, truncated to the 63 characters a label value may hold. */}}
{{- define "keylimit.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Resource-name prefix. Cluster-scoped objects (ClusterRole, MutatingWebhookConfiguration) carry
it too, so two releases in different namespaces never collide.
*/}}
{{- define "keylimit.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "keylimit.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "keylimit.labels" -}}
helm.sh/chart: {{ include "keylimit.chart" . }}
{{ include "keylimit.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: keylimit
{{- end }}

{{/* The immutable subset used in selectors (a Deployment's selector cannot change on upgrade). */}}
{{- define "keylimit.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keylimit.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "keylimit.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "keylimit.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Service in front of the webhook; its DNS name is in the serving certificate. */}}
{{- define "keylimit.webhookServiceName" -}}
{{- printf "%s-webhook" (include "keylimit.fullname" .) }}
{{- end }}

{{- define "keylimit.webhookCertSecret" -}}
{{- default (printf "%s-webhook-cert" (include "keylimit.fullname" .)) .Values.webhook.certs.secretName }}
{{- end }}

{{- define "keylimit.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "keylimit.sidecarImage" -}}
{{- printf "%s:%s" .Values.sidecar.image.repository (default .Chart.AppVersion .Values.sidecar.image.tag) }}
{{- end }}

{{/* Where sidecars push usage reports: the admin Service of this release. */}}
{{/* Sidecars report over TLS to the webhook Service (the name its certificate carries) and
verify it with the keylimit-ca ConfigMap the operator publishes. */}}
{{- define "keylimit.reportURL" -}}
{{- printf "https://%s.%s.svc/v1/reports" (include "keylimit.webhookServiceName" .) .Release.Namespace }}
{{- end }}

{{/* The part both webhook entries share (templates/mutatingwebhookconfiguration.yaml). */}}
{{- define "keylimit.webhookCommon" -}}
admissionReviewVersions: ["v1"]
clientConfig:
  service:
    name: {{ include "keylimit.webhookServiceName" . }}
    namespace: {{ .Release.Namespace }}
    path: /mutate
    port: 443
  {{- /* caBundle is left out on purpose: the operator patches it in (or cert-manager's CA
  injector does), and helm's three-way merge then leaves the live value alone on upgrade. */}}
rules:
  - apiGroups: [""]
    apiVersions: ["v1"]
    operations: ["CREATE"]
    resources: ["pods"]
    scope: Namespaced
matchPolicy: Equivalent
# Injection only adds containers and volumes; nothing outside the pod changes, so dry-run
# requests are safe.
sideEffects: None
failurePolicy: {{ .Values.webhook.failurePolicy }}
timeoutSeconds: {{ .Values.webhook.timeoutSeconds }}
# Called again if a later webhook adds containers, so the port takeover sees the final pod
# (the mutation is idempotent).
reinvocationPolicy: IfNeeded
{{- end }}
