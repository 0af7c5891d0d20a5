{{/*
meshaccel.name: the chart's name, or nameOverride. Used in labels.
*/}}
{{- define "meshaccel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
meshaccel.fullname: the name of the chart's objects: fullnameOverride, else "<release>", when
the release name already contains the chart name, else "<release>-<chart>". At most 63
characters (a DNS label).
*/}}
{{- define "meshaccel.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "meshaccel.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
meshaccel.chart: "<chart>-<version>", the value of the helm.sh/chart label.
*/}}
{{- define "meshaccel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
meshaccel.selectorLabels: the labels that select the operator's pods. They are part of the
Deployment's immutable selector: never add to them.
*/}}
{{- define "meshaccel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshaccel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/*
meshaccel.labels: the labels every object of the chart carries (selector labels, chart,
version, manager, and commonLabels).
*/}}
{{- define "meshaccel.labels" -}}
helm.sh/chart: {{ include "meshaccel.chart" . }}
app.kubernetes.io/name: {{ include "meshaccel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshaccel
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
meshaccel.serviceAccountName: the operator's ServiceAccount, made by the chart or given.
*/}}
{{- define "meshaccel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "meshaccel.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
meshaccel.repository: an image repository, its registry replaced by global.imageRegistry when
that is set. Its first path component is a registry when it names a host (a "." or ":" in it,
or "localhost", as container runtimes read it): it is replaced; otherwise the registry is put
in front. Called with (list ROOT REPOSITORY).
*/}}
{{- define "meshaccel.repository" -}}
{{- $root := index . 0 -}}
{{- $repository := index . 1 -}}
{{- $registry := dig "imageRegistry" "" ($root.Values.global | default dict) | trimSuffix "/" -}}
{{- if not $registry -}}
{{- $repository -}}
{{- else -}}
{{- $parts := splitn "/" 2 $repository -}}
{{- $first := $parts._0 -}}
{{- if and $parts._1 (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) -}}
{{- printf "%s/%s" $registry $parts._1 -}}
{{- else -}}
{{- printf "%s/%s" $registry $repository -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
meshaccel.operatorImage: "<repository>@<digest>" when a digest is given, else
"<repository>:<tag or appVersion>" (the repository through meshaccel.repository). The
uninstall hook's Job runs it too.
*/}}
{{- define "meshaccel.operatorImage" -}}
{{- $image := .Values.operator.image -}}
{{- $repository := include "meshaccel.repository" (list . $image.repository) -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (default .Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
meshaccel.agentImage: the image every node agent runs (the operator's MESHACCEL_AGENT_IMAGE and
the admission policy's only allowed image): "<repository>@<digest>" when a digest is given, else
"<repository>:<tag or appVersion>" (operator and agents from one release; the repository
through meshaccel.repository).
*/}}
{{- define "meshaccel.agentImage" -}}
{{- $image := .Values.agent.image -}}
{{- $repository := include "meshaccel.repository" (list . $image.repository) -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (default .Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
meshaccel.uninstallHookName: the name of the uninstall hook's Job, ServiceAccount and RBAC.
*/}}
{{- define "meshaccel.uninstallHookName" -}}
{{- printf "%s-uninstall" (include "meshaccel.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
meshaccel.uninstallHookAnnotations: what makes the hook's ServiceAccount and RBAC part of Helm's
pre-delete hook: created before the Job (a lower weight), deleted once the hook succeeded (or
before the next run, when it failed). Called with the weight.
*/}}
{{- define "meshaccel.uninstallHookAnnotations" -}}
helm.sh/hook: pre-delete
helm.sh/hook-weight: {{ . | quote }}
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end -}}

{{/*
meshaccel.operatorUser: the user name the API server gives the operator's ServiceAccount
(request.userInfo.username), which the admission policies match.
*/}}
{{- define "meshaccel.operatorUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "meshaccel.serviceAccountName" .) -}}
{{- end -}}

{{/*
meshaccel.validate: fails the render, with a message that says what to change, on values that
are each valid (values.schema.json checks those) but impossible together.
*/}}
{{- define "meshaccel.validate" -}}
{{- $op := .Values.operator -}}
{{- if and (gt (int $op.replicas) 1) (not $op.peering) -}}
{{- fail (printf "operator.replicas=%d needs operator.peering: without Kopf peering every replica would handle every MeshAcceleration. Set operator.peering (for example \"meshaccel\") or operator.replicas=1." (int $op.replicas)) -}}
{{- end -}}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) -}}
{{- fail "serviceAccount.create=false needs serviceAccount.name: the name of an existing ServiceAccount for the operator." -}}
{{- end -}}
{{- if eq (int $op.ports.health) (int $op.ports.metrics) -}}
{{- fail (printf "operator.ports.health and operator.ports.metrics are both %d: they must differ." (int $op.ports.health)) -}}
{{- end -}}
{{- $agent := .Values.defaultAcceleration.agent | default dict -}}
{{- if and (hasKey $agent "image") (not (kindIs "invalid" $agent.image)) -}}
{{- fail (printf "defaultAcceleration.agent.image (%v) is no longer read: the agents' image is the operator's setting, not the MeshAcceleration's. Set agent.image.repository and agent.image.tag (or agent.image.digest) instead, and remove defaultAcceleration.agent.image." $agent.image) -}}
{{- end -}}
{{- $image := .Values.agent.image -}}
{{- if and (eq $image.tag "latest") (not $image.digest) -}}
{{- fail "agent.image.tag=latest is a moving tag: nodes pulling at different times would run different agents (the operator refuses it). Pin a version, or set agent.image.digest." -}}
{{- end -}}
{{- $pdb := $op.podDisruptionBudget | default dict -}}
{{- if and $pdb.enabled (gt (int $op.replicas) 1) (ge (int $pdb.maxUnavailable) (int $op.replicas)) -}}
{{- fail (printf "operator.podDisruptionBudget.maxUnavailable=%d would let a drain take all %d operator replicas at once: set it below operator.replicas." (int $pdb.maxUnavailable) (int $op.replicas)) -}}
{{- end -}}
{{- range $key, $_ := .Values.agent.podLabels -}}
{{- if or (has $key (list "app.kubernetes.io/name" "app.kubernetes.io/component" "app.kubernetes.io/managed-by")) (hasPrefix "meshaccel.io/" $key) -}}
{{- fail (printf "agent.podLabels: %s is one of the labels that select the agents (the operator sets it): choose another key." $key) -}}
{{- end -}}
{{- end -}}
{{- range $key, $_ := .Values.agent.podAnnotations -}}
{{- if or (eq $key "kubectl.kubernetes.io/default-container") (hasPrefix "meshaccel.io/" $key) -}}
{{- fail (printf "agent.podAnnotations: %s is an annotation the operator sets on the agents' pods: choose another key." $key) -}}
{{- end -}}
{{- end -}}
{{- $hook := .Values.uninstallHook -}}
{{- if and $hook.enabled (gt (int $hook.operatorGraceSeconds) (int $hook.timeoutSeconds)) -}}
{{- fail (printf "uninstallHook.operatorGraceSeconds=%d is longer than uninstallHook.timeoutSeconds=%d: the wait would end first. Lower the grace or raise the timeout." (int $hook.operatorGraceSeconds) (int $hook.timeoutSeconds)) -}}
{{- end -}}
{{- $actions := .Values.admissionPolicy.validationActions -}}
{{- if and (has "Deny" $actions) (has "Warn" $actions) -}}
{{- fail "admissionPolicy.validationActions: Deny and Warn cannot be used together (the API server refuses such a binding). Use [Deny], [Deny, Audit], [Warn] or [Warn, Audit]." -}}
{{- end -}}
{{- $datapath := .Values.defaultAcceleration.datapath | default dict -}}
{{- /* An empty selector ({}) selects every pod: only a missing or null one is "not set". */ -}}
{{- $toAppsSelector := and (hasKey $datapath "skMsgToAppsSelector") (not (kindIs "invalid" $datapath.skMsgToAppsSelector)) -}}
{{- $redirectOff := and (hasKey $datapath "skMsgRedirect") (not $datapath.skMsgRedirect) -}}
{{- if and $toAppsSelector $redirectOff -}}
{{- fail "defaultAcceleration.datapath.skMsgToAppsSelector needs defaultAcceleration.datapath.skMsgRedirect=true (its default): without sk_msg redirection nothing is delivered into application sockets. Remove the selector or the skMsgRedirect=false." -}}
{{- end -}}
{{- end -}}
