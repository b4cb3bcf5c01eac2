{{- define "kubedistill.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubedistill.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubedistill.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kubedistill.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubedistill.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* What the operator does in a namespace it watches: each rule says why. */}}
{{- define "kubedistill.namespacedRules" -}}
# Watch DistillationRuns (the operator never writes a run itself: no finalizer, no annotations; only its status).
- apiGroups: [kubedistill.io]
  resources: [distillationruns]
  verbs: [get, list, watch]
# Write .status (phase, stages, conditions) through the status subresource.
- apiGroups: [kubedistill.io]
  resources: [distillationruns/status]
  verbs: [get, patch]
# One RayJob per batch stage and a RayService for serving: create them, follow their status,
# delete a RayJob to rerun or retry its stage, patch the RayService to update serving in place.
- apiGroups: [ray.io]
  resources: [rayjobs, rayservices]
  verbs: [get, list, watch, create, delete, patch]
# Record what happened to a run as Kubernetes Events (kubectl describe dr NAME).
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
# Read the Secret named by a run's spec.storage.secretRef (the operator uses it only when labelled
# kubedistill.io/storage-credentials=true; never listed), and create each run's Ray-token Secret.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create]
# One NetworkPolicy per run: only its own pods, the operator and KubeRay reach its Ray clusters.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, patch]
{{- end -}}

{{/* The namespaces the operator watches (a JSON list): watchNamespaces, else the release's namespace. */}}
{{- define "kubedistill.namespaces" -}}
{{- if .Values.watchNamespaces }}{{ toJson .Values.watchNamespaces }}{{ else }}{{ list .Release.Namespace | toJson }}{{ end -}}
{{- end -}}
