{{/* Names, labels and derived settings shared by the templates. */}}

{{- define "casakv.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "casakv.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "casakv.selectorLabels" -}}
app.kubernetes.io/name: {{ include "casakv.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "casakv.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "casakv.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference
{{- end -}}

{{- define "casakv.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "casakv.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest is given */}}
{{- define "casakv.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The directory vllm serve loads the model from. */}}
{{- define "casakv.modelDir" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "hub" -}}
{{- printf "%s/hub/%s" $m.volume.mountPath ($m.hubId | replace "/" "--") -}}
{{- else if eq $m.source "path" -}}
{{- printf "%s/%s" $m.volume.mountPath ($m.path | trimPrefix "/") -}}
{{- else -}}
{{- printf "%s/smollm2-135m-instruct" $m.volume.mountPath -}}
{{- end -}}
{{- end -}}

{{- define "casakv.servedName" -}}
{{- $m := .Values.model -}}
{{- if $m.servedName -}}{{ $m.servedName }}
{{- else if eq $m.source "hub" -}}{{ $m.hubId }}
{{- else if eq $m.source "path" -}}{{ $m.path | trimPrefix "/" }}
{{- else -}}demo
{{- end -}}
{{- end -}}

{{/* GPUs per pod: gpu.count, else the tensor-parallel size; 0 on the CPU build. */}}
{{- define "casakv.gpuCount" -}}
{{- if .Values.cpu.enabled -}}0
{{- else if .Values.gpu.count -}}{{ int .Values.gpu.count }}
{{- else -}}{{ int .Values.vllm.tensorParallelSize }}
{{- end -}}
{{- end -}}

{{/* The model volume's claim name (existing or created by the chart). */}}
{{- define "casakv.modelClaim" -}}
{{- default (printf "%s-models" (include "casakv.fullname" .)) .Values.model.volume.existingClaim -}}
{{- end -}}
