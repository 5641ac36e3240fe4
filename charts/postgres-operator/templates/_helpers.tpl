{{/* Name of every object of the release (ServiceAccount, RBAC, Deployment). */}}
{{- define "postgres-operator.fullname" -}}
{{- default "postgres-operator" .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels the Deployment selects its pods by. */}}
{{- define "postgres-operator.selectorLabels" -}}
app.kubernetes.io/name: postgres-operator
app.kubernetes.io/component: manager
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "postgres-operator.labels" -}}
{{ include "postgres-operator.selectorLabels" . }}
app.kubernetes.io/part-of: postgres-operator
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The watched namespace: empty when watching every namespace. */}}
{{- define "postgres-operator.watchNamespace" -}}
{{- if not .Values.watchAllNamespaces -}}
{{- default .Release.Namespace .Values.watchNamespace -}}
{{- end -}}
{{- end -}}

{{/* Namespaces that get the namespaced Role: the watched one and the release namespace (leader Lease). */}}
{{- define "postgres-operator.roleNamespaces" -}}
{{- list .Release.Namespace (default .Release.Namespace .Values.watchNamespace) | uniq | toJson -}}
{{- end -}}

{{/* Operator image reference: digest when set, else tag (default appVersion). */}}
{{- define "postgres-operator.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}
{{- end -}}
