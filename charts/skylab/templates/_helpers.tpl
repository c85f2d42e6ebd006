{{/* The release's full name, at most 63 characters (a DNS label). */}}
{{- define "skylab.fullname" -}}
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

{{- define "skylab.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "skylab.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "skylab.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The operator's pods. */}}
{{- define "skylab.selectorLabels" -}}
app.kubernetes.io/name: {{ include "skylab.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "skylab.postgresSelectorLabels" -}}
app.kubernetes.io/name: {{ include "skylab.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: database
{{- end -}}

{{- define "skylab.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "skylab.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "skylab.peeringName" -}}
{{- default (include "skylab.fullname" .) .Values.peering.name -}}
{{- end -}}

{{- define "skylab.postgresName" -}}
{{- printf "%s-postgres" (include "skylab.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The Secret holding the built-in PostgreSQL's password (key `password`). */}}
{{- define "skylab.postgresSecret" -}}
{{- default (include "skylab.postgresName" .) .Values.database.builtin.passwordSecret -}}
{{- end -}}

{{- define "skylab.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "skylab.trainerImage" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) -}}
{{- end -}}

{{/* What trainer pods mount at /cache (SKYLAB_COMPILE_CACHE): hostPath:DIR, claim:NAME or nothing. */}}
{{- define "skylab.compileCache" -}}
{{- with .Values.trainer.compileCache -}}
{{- if and .enabled .existingClaim -}}
claim:{{ .existingClaim }}
{{- else if .enabled -}}
hostPath:{{ required "trainer.compileCache.hostPath: a directory, unless existingClaim is set or enabled is false" .hostPath }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Where trainer pods fetch a campaign's commits from: the operator's Service. */}}
{{- define "skylab.gitUrl" -}}
{{- printf "http://%s.%s.svc:%d/git" (include "skylab.fullname" .) .Release.Namespace (int .Values.service.port) -}}
{{- end -}}

{{/* The namespaces trials run in: where trainer pods get a NetworkPolicy. */}}
{{- define "skylab.trialNamespaces" -}}
{{- $namespaces := .Values.networkPolicy.namespaces -}}
{{- if not $namespaces -}}
{{- $namespaces = prepend .Values.watchNamespaces .Release.Namespace -}}
{{- end -}}
{{- $namespaces | uniq | toJson -}}
{{- end -}}
