{{/*
Names, labels and the pieces every workload shares. Components are policy, reward, feedback, trainer,
rolloutWorker (values keys) and triton; "rlhf.components" says what each one runs.
*/}}

{{- define "rlhf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rlhf.fullname" -}}
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

{{- define "rlhf.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
What each service is: its Kubernetes name, the `rlhf` subcommand, the prefix of its environment variables, whether
it serves gRPC and whether it mounts the artifact volume. Ports come from values (<key>.ports).
*/}}
{{- define "rlhf.components" -}}
policy: {name: policy, command: policy, envPrefix: RLHF_POLICY_, grpc: true, artifacts: true, kind: Deployment}
reward: {name: reward, command: reward, envPrefix: RLHF_REWARD_, grpc: true, artifacts: true, kind: Deployment}
feedback: {name: feedback, command: feedback, envPrefix: RLHF_FEEDBACK_, grpc: true, artifacts: false, kind: Deployment}
trainer: {name: trainer, command: trainer, envPrefix: RLHF_TRAINER_, grpc: true, artifacts: true, kind: StatefulSet}
rolloutWorker: {name: rollout-worker, command: rollout-worker, envPrefix: RLHF_ROLLOUT_WORKER_, grpc: false, artifacts: true, kind: Deployment}
{{- end }}

{{/* <fullname>-<component>, at most 63 characters. Call with (dict "root" $ "name" "policy"). */}}
{{- define "rlhf.componentFullname" -}}
{{- printf "%s-%s" (include "rlhf.fullname" .root | trunc (int (sub 62 (len .name)))) .name | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object: (dict "root" $ "component" "policy"). */}}
{{- define "rlhf.labels" -}}
helm.sh/chart: {{ include "rlhf.chart" .root }}
{{ include "rlhf.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: rlhf
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "rlhf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rlhf.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{- define "rlhf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rlhf.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "rlhf.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "rlhf.tritonImage" -}}
{{- printf "%s:%s" .Values.triton.image.repository (.Values.triton.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* Whether the Triton Deployment is part of the release. */}}
{{- define "rlhf.tritonEnabled" -}}
{{- if and .Values.policy.enabled (eq .Values.policy.backend "triton") }}true{{ end }}
{{- end }}

{{/* host:port of a component's gRPC Service inside the cluster: (dict "root" $ "name" "reward" "port" 50054). */}}
{{- define "rlhf.grpcAddress" -}}
{{- printf "%s.%s.svc:%v" (include "rlhf.componentFullname" .) .root.Release.Namespace .port }}
{{- end }}

{{- define "rlhf.authSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "rlhf.fullname" .)) }}
{{- end }}

{{- define "rlhf.authEnabled" -}}
{{- if or .Values.auth.existingSecret .Values.auth.authToken .Values.auth.adminToken }}true{{ end }}
{{- end }}

{{- define "rlhf.tlsSecretName" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "rlhf.fullname" .)) }}
{{- end }}

{{/* The bus URL: kafka://brokers?KafkaConfig fields. SASL credentials are $(VAR) references to the pod's env. */}}
{{- define "rlhf.busUrl" -}}
{{- $k := .Values.kafka }}
{{- $q := list }}
{{- if ne $k.securityProtocol "PLAINTEXT" }}
{{- $q = append $q (printf "security_protocol=%s" $k.securityProtocol) }}
{{- end }}
{{- if hasPrefix "SASL" $k.securityProtocol }}
{{- $q = append $q (printf "sasl_mechanism=%s" $k.sasl.mechanism) }}
{{- $q = append $q "sasl_username=$(KAFKA_SASL_USERNAME)" }}
{{- $q = append $q "sasl_password=$(KAFKA_SASL_PASSWORD)" }}
{{- end }}
{{- if hasSuffix "SSL" $k.securityProtocol }}
{{- if $k.tls.caSecret }}
{{- $q = append $q (printf "ssl_cafile=/etc/rlhf/kafka-ca/%s" $k.tls.caKey) }}
{{- end }}
{{- if $k.tls.clientCertSecret }}
{{- $q = append $q "ssl_certfile=/etc/rlhf/kafka-client/tls.crt" }}
{{- $q = append $q "ssl_keyfile=/etc/rlhf/kafka-client/tls.key" }}
{{- end }}
{{- $q = append $q (printf "ssl_check_hostname=%t" $k.tls.checkHostname) }}
{{- end }}
{{- range $name, $value := $k.options }}
{{- $q = append $q (printf "%s=%s" $name $value) }}
{{- end }}
{{- printf "kafka://%s" ($k.bootstrapServers | replace " " "") }}
{{- if $q }}?{{ join "&" $q }}{{ end }}
{{- end }}

{{/* The cache URL: redis[s]://[user:password@]host:port/db?options. The password is a $(VAR) reference. */}}
{{- define "rlhf.cacheUrl" -}}
{{- $r := .Values.redis }}
{{- $scheme := ternary "rediss" "redis" $r.tls.enabled }}
{{- $userinfo := "" }}
{{- if $r.auth.existingSecret }}
{{- $userinfo = printf "%s:$(REDIS_PASSWORD)@" (ternary "$(REDIS_USERNAME)" "" (ne $r.auth.usernameKey "")) }}
{{- end }}
{{- $q := list }}
{{- if and $r.tls.enabled $r.tls.caSecret }}
{{- $q = append $q (printf "ssl_ca_certs=/etc/rlhf/redis-ca/%s" $r.tls.caKey) }}
{{- end }}
{{- range $name, $value := $r.options }}
{{- $q = append $q (printf "%s=%s" $name $value) }}
{{- end }}
{{- printf "%s://%s%s:%v/%v" $scheme $userinfo $r.host $r.port $r.db }}
{{- if $q }}?{{ join "&" $q }}{{ end }}
{{- end }}

{{/*
Environment of every service container, in order: secrets first (the URLs refer to them), then the URLs. The rest
of the configuration comes from the ConfigMap (envFrom) and the component's `env`.
*/}}
{{- define "rlhf.secretEnv" -}}
{{- $v := .Values }}
{{- if hasPrefix "SASL" $v.kafka.securityProtocol }}
- name: KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ $v.kafka.sasl.existingSecret | quote }}, key: {{ $v.kafka.sasl.usernameKey | quote }}}
- name: KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ $v.kafka.sasl.existingSecret | quote }}, key: {{ $v.kafka.sasl.passwordKey | quote }}}
{{- end }}
{{- if $v.redis.auth.existingSecret }}
{{- if $v.redis.auth.usernameKey }}
- name: REDIS_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ $v.redis.auth.existingSecret | quote }}, key: {{ $v.redis.auth.usernameKey | quote }}}
{{- end }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ $v.redis.auth.existingSecret | quote }}, key: {{ $v.redis.auth.passwordKey | quote }}}
{{- end }}
- name: RLHF_BUS_URL
  value: {{ include "rlhf.busUrl" . | quote }}
- name: RLHF_CACHE_URL
  value: {{ include "rlhf.cacheUrl" . | quote }}
{{- if include "rlhf.authEnabled" . }}
- name: RLHF_AUTH_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ include "rlhf.authSecretName" . | quote }}, key: {{ $v.auth.authTokenKey | quote }}, optional: true}
- name: RLHF_ADMIN_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ include "rlhf.authSecretName" . | quote }}, key: {{ $v.auth.adminTokenKey | quote }}, optional: true}
{{- end }}
{{- if $v.tls.enabled }}
- name: RLHF_TLS_CERT_FILE
  value: /etc/rlhf/tls/tls.crt
- name: RLHF_TLS_KEY_FILE
  value: /etc/rlhf/tls/tls.key
{{- if $v.tls.requireClientCert }}
- name: RLHF_TLS_CLIENT_CA_FILE
  value: /etc/rlhf/tls/ca.crt
{{- end }}
{{- end }}
{{- end }}

{{/* A component's own `env` map as EnvVars. */}}
{{- define "rlhf.extraEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}

{{/* Volumes of a service pod: (dict "root" $ "artifacts" true). */}}
{{- define "rlhf.volumes" -}}
{{- $v := .root.Values }}
- name: tmp
  emptyDir:
    sizeLimit: {{ $v.tmpDir.sizeLimit }}
{{- if .artifacts }}
- name: artifacts
{{- if $v.artifacts.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ $v.artifacts.persistence.existingClaim | default (printf "%s-artifacts" (include "rlhf.fullname" .root)) }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}
{{- if $v.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "rlhf.tlsSecretName" .root }}
    defaultMode: 0440
{{- end }}
{{- if and (hasSuffix "SSL" $v.kafka.securityProtocol) $v.kafka.tls.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ $v.kafka.tls.caSecret }}
    defaultMode: 0440
{{- end }}
{{- if and (hasSuffix "SSL" $v.kafka.securityProtocol) $v.kafka.tls.clientCertSecret }}
- name: kafka-client
  secret:
    secretName: {{ $v.kafka.tls.clientCertSecret }}
    defaultMode: 0440
{{- end }}
{{- if and $v.redis.tls.enabled $v.redis.tls.caSecret }}
- name: redis-ca
  secret:
    secretName: {{ $v.redis.tls.caSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "rlhf.volumeMounts" -}}
{{- $v := .root.Values }}
- name: tmp
  mountPath: /tmp
{{- if .artifacts }}
- name: artifacts
  mountPath: {{ $v.artifacts.mountPath }}
{{- end }}
{{- if $v.tls.enabled }}
- name: tls
  mountPath: /etc/rlhf/tls
  readOnly: true
{{- end }}
{{- if and (hasSuffix "SSL" $v.kafka.securityProtocol) $v.kafka.tls.caSecret }}
- name: kafka-ca
  mountPath: /etc/rlhf/kafka-ca
  readOnly: true
{{- end }}
{{- if and (hasSuffix "SSL" $v.kafka.securityProtocol) $v.kafka.tls.clientCertSecret }}
- name: kafka-client
  mountPath: /etc/rlhf/kafka-client
  readOnly: true
{{- end }}
{{- if and $v.redis.tls.enabled $v.redis.tls.caSecret }}
- name: redis-ca
  mountPath: /etc/rlhf/redis-ca
  readOnly: true
{{- end }}
{{- end }}

{{/*
The flags of deploy/docker/health_check.py for TLS: (dict "root" $ "name" "policy"). The kubelet's native gRPC
probe cannot speak TLS, so with tls.enabled the probes and `helm test` run the script instead.
*/}}
{{- define "rlhf.healthTlsArgs" -}}
{{- $v := .root.Values }}
- --tls
- --ca
- /etc/rlhf/tls/ca.crt
{{- if $v.tls.requireClientCert }}
- --cert
- /etc/rlhf/tls/tls.crt
- --key
- /etc/rlhf/tls/tls.key
{{- end }}
- --server-name
- {{ $v.tls.serverName | default (printf "%s.%s.svc" (include "rlhf.componentFullname" .) .root.Release.Namespace) | quote }}
{{- end }}

{{/*
A probe of a gRPC service: (dict "root" $ "name" "policy" "port" 50052 "probe" .startupProbe). Native gRPC on
grpc.health.v1 (the whole server: NOT_SERVING while a dependency it needs is down), tcpSocket for type tcp, or
the health script over TLS.
*/}}
{{- define "rlhf.grpcProbe" -}}
{{- $p := .probe }}
{{- if .root.Values.tls.enabled }}
exec:
  command:
    - grpc-health
    {{- include "rlhf.healthTlsArgs" . | nindent 4 }}
    - --timeout
    - {{ $p.timeoutSeconds | quote }}
    - {{ printf "127.0.0.1:%v" .port | quote }}
{{- else if eq ($p.type | default "grpc") "tcp" }}
tcpSocket:
  port: grpc
{{- else }}
grpc:
  port: {{ .port }}
  service: ""
{{- end }}
{{- include "rlhf.probeTiming" $p }}
{{- end }}

{{- define "rlhf.probeTiming" -}}
{{- with .initialDelaySeconds }}
initialDelaySeconds: {{ . }}
{{- end }}
periodSeconds: {{ .periodSeconds }}
timeoutSeconds: {{ .timeoutSeconds }}
failureThreshold: {{ .failureThreshold }}
{{- end }}

{{/* Resources with the component's GPUs as nvidia.com/gpu limits: (dict "resources" .resources "gpu" 1). */}}
{{- define "rlhf.resources" -}}
{{- $res := deepCopy (.resources | default dict) }}
{{- if gt (int .gpu) 0 }}
{{- $limits := $res.limits | default dict }}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpu) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* Checks that span several values (the schema checks each value alone). */}}
{{- define "rlhf.validate" -}}
{{- $v := .Values }}
{{- if and (hasPrefix "SASL" $v.kafka.securityProtocol) (or (not $v.kafka.sasl.existingSecret) (not $v.kafka.sasl.mechanism)) }}
{{- fail "kafka.securityProtocol SASL_* needs kafka.sasl.mechanism and kafka.sasl.existingSecret (a Secret with the user and password)" }}
{{- end }}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) (or (not $v.tls.cert) (not $v.tls.key) (not $v.tls.ca)) }}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret with ca.crt) or tls.cert, tls.key and tls.ca" }}
{{- end }}
{{- if include "rlhf.tritonEnabled" . }}
{{- if or (gt (int $v.policy.replicaCount) 1) $v.policy.autoscaling.enabled }}
{{- fail "policy.backend=triton: one Triton server serves one policy replica (the policy service loads and unloads its versions on it), so policy.replicaCount must be 1 and policy.autoscaling.enabled false" }}
{{- end }}
{{- end }}
{{- range $key := list "policy" "reward" "trainer" "rolloutWorker" }}
{{- $c := index $v $key }}
{{- if and $c.enabled (gt (int $c.gpu) 0) (ne $v.image.variant "cuda") }}
{{- fail (printf "%s.gpu > 0 needs image.variant cuda (the cpu image has no CUDA torch)" $key) }}
{{- end }}
{{- end }}
{{- range $key := list "policy" "reward" "rolloutWorker" }}
{{- $a := (index $v $key).autoscaling }}
{{- if and $a.enabled $a.queueDepth.enabled (not $a.queueDepth.metric) }}
{{- fail (printf "%s.autoscaling.queueDepth.enabled needs %s.autoscaling.queueDepth.metric" $key $key) }}
{{- end }}
{{- if and $a.enabled (gt (int $a.minReplicas) (int $a.maxReplicas)) }}
{{- fail (printf "%s.autoscaling.minReplicas must not exceed maxReplicas" $key) }}
{{- end }}
{{- end }}
{{- if and $v.trainJob.enabled (not (has $v.trainJob.stage (list "sft" "rm" "ppo"))) }}
{{- fail "trainJob.stage must be sft, rm or ppo" }}
{{- end }}
{{- end }}
