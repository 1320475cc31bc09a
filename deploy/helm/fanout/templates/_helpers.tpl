{{/* The chart's name, or nameOverride. */}}
{{- define "fanout.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The objects' name: fullnameOverride, else the release name if it contains the chart's name
(release "fanout" gives "fanout"), else "<release>-<chart>".
*/}}
{{- define "fanout.fullname" -}}
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

{{- define "fanout.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* What the DaemonSet, the Service and the ServiceMonitor select pods by. */}}
{{- define "fanout.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fanout.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fanout.labels" -}}
helm.sh/chart: {{ include "fanout.chart" . }}
{{ include "fanout.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "fanout.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fanout.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "fanout.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
A TOML value: strings as JSON strings (a JSON string is a valid TOML basic string, escapes
included), numbers and booleans as they are.
*/}}
{{- define "fanout.toml" -}}
{{- if kindIs "string" . }}{{ toJson . }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{/* A worker rule's or a Redis exclusion's matchers (comm, exe, cmdline), one TOML key a line. */}}
{{- define "fanout.matchers" -}}
{{- $lines := list }}
{{- range $key := list "comm" "exe" "cmdline" }}
{{- with index $ $key }}
{{- $lines = append $lines (printf "%s = %s" $key (toJson .)) }}
{{- end }}
{{- end }}
{{- join "\n" $lines }}
{{- end }}
