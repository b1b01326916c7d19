{{/*
Shared building blocks. Each service's own template (ingest.yaml, router.yaml, ...) builds a context with
"esp.component" and includes the pieces it needs, so hardening, probes and labels are written once.

A component context is a dict:
  root         the chart's root context ($)
  component    object-name suffix and app.kubernetes.io/name, e.g. "ingest" or "sender-otp"
  group        app.kubernetes.io/component, e.g. "sender" (defaults to component)
  program      the service the image's entrypoint runs (`esp-service <program>`), e.g. "ingest"
  settings     the component's values (resources, autoscaling, podDisruptionBudget)
  ports        list of dicts {name, port, grpc (bool), exposure}; exposure is "public" (anyone), "mesh" (the
               release's own pods), "callers" (only the release's components named in the port's "callers"
               list) or "none" (kubelet probes only); metrics 9464 is added to every pod
  service      bool: gets a ClusterIP Service for its ports
  postgres     bool: gets ESP_POSTGRES_DSN from the Postgres Secret
  s3           bool: gets AWS keys from the optional S3 Secret
  secretEnv    name of a Secret whose every key becomes an environment variable, or ""
  secretKeyEnv list of {name, secret, key, optional}: one variable from one key of a Secret; optional (bool) lets
               the pod start without the Secret
  extraEnv     list of {name, value}
  egress       NetworkPolicy egress rules as YAML text, or absent: egress stays open (only webhooks, which calls
               customers' URLs, restricts it)
  senderClass  "otp" | "transactional" | "bulk" | ""
  grace        terminationGracePeriodSeconds
*/}}

{{/* Prometheus metrics port; every service serves /metrics here. */}}
{{- define "esp.metricsPort" -}}9464{{- end }}

{{- define "esp.fullname" -}}
{{- /* 42 characters leave room for "-sender-transactional" inside a 63-character DNS label. */ -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 42 | trimSuffix "-" -}}
{{- end }}

{{- define "esp.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{- define "esp.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end }}

{{/* Object name of a component: <fullname>-<component>. Context: dict with root and component. */}}
{{- define "esp.componentName" -}}
{{- printf "%s-%s" (include "esp.fullname" .root) .component -}}
{{- end }}

{{/* host:port of a component's gRPC Service, as the other services dial it. */}}
{{- define "esp.grpcAddress" -}}
{{- printf "%s-%s:%d" (include "esp.fullname" .root) .component (int .port) -}}
{{- end }}

{{- define "esp.selectorLabels" -}}
app.kubernetes.io/name: {{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end }}

{{- define "esp.labels" -}}
helm.sh/chart: {{ include "esp.chart" .root }}
{{ include "esp.selectorLabels" . }}
app.kubernetes.io/component: {{ .group | default .component }}
app.kubernetes.io/part-of: esp-mesh
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .senderClass }}
esp-mesh.io/sender-class: {{ . }}
{{- end }}
{{- end }}

{{- define "esp.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "esp.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* Fails the render when an autoscaler's range is empty. Context: dict with name and autoscaling. */}}
{{- define "esp.checkReplicaRange" -}}
{{- if gt (int .autoscaling.minReplicas) (int .autoscaling.maxReplicas) -}}
{{- fail (printf "%s: autoscaling.minReplicas (%d) is above maxReplicas (%d)" .name (int .autoscaling.minReplicas) (int .autoscaling.maxReplicas)) -}}
{{- end -}}
{{- end }}

{{- define "esp.serviceAccount" -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "esp.componentName" . }}
  labels:
    {{- include "esp.labels" . | nindent 4 }}
# The services never call the Kubernetes API.
automountServiceAccountToken: false
{{- end }}

{{- define "esp.deployment" -}}
{{- $root := .root -}}
{{- $grpc := dict -}}
{{- range .ports }}{{ if .grpc }}{{ $grpc = . }}{{ end }}{{ end -}}
{{- $probePort := (index .ports 0).port -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "esp.componentName" . }}
  labels:
    {{- include "esp.labels" . | nindent 4 }}
spec:
  # No spec.replicas: the autoscaler owns the replica count, so an upgrade never resets it.
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "esp.selectorLabels" . | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 25%
      maxUnavailable: 0
  template:
    metadata:
      labels:
        {{- include "esp.labels" . | nindent 8 }}
      annotations:
        # Roll the pods when the shared settings change.
        checksum/config: {{ include (print $root.Template.BasePath "/config.yaml") $root | sha256sum }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ include "esp.metricsPort" . | quote }}
        prometheus.io/path: /metrics
        {{- with $root.Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "esp.componentName" . }}
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: {{ .grace }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "esp.podSecurityContext" $root | nindent 8 }}
      {{- with $root.Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      topologySpreadConstraints:
        {{- range list "topology.kubernetes.io/zone" "kubernetes.io/hostname" }}
        - maxSkew: 1
          topologyKey: {{ . }}
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              {{- include "esp.selectorLabels" $ | nindent 14 }}
        {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "esp.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["esp-service", {{ .program | quote }}]
          ports:
            {{- range .ports }}
            - name: {{ .name }}
              containerPort: {{ .port }}
              protocol: TCP
            {{- end }}
            - name: metrics
              containerPort: {{ include "esp.metricsPort" . }}
              protocol: TCP
          {{- if or $grpc .extraEnv .postgres .s3 }}
          env:
            {{- with $grpc }}
            - name: ESP_GRPC_PORT
              value: {{ .port | quote }}
            {{- end }}
            {{- range .extraEnv }}
            - name: {{ .name }}
              value: {{ .value | quote }}
            {{- end }}
            {{- range .secretKeyEnv }}
            - name: {{ .name }}
              valueFrom:
                secretKeyRef:
                  name: {{ .secret }}
                  key: {{ .key }}
                  {{- if .optional }}
                  optional: true
                  {{- end }}
            {{- end }}
            {{- if .postgres }}
            - name: ESP_POSTGRES_DSN
              valueFrom:
                secretKeyRef:
                  name: {{ $root.Values.secrets.postgres.name }}
                  key: {{ $root.Values.secrets.postgres.dsnKey }}
            {{- end }}
            {{- if .s3 }}
            - name: ESP_S3_ACCESS_KEY
              valueFrom:
                secretKeyRef:
                  name: {{ $root.Values.secrets.s3.name }}
                  key: {{ $root.Values.secrets.s3.accessKeyIdKey }}
                  optional: true
            - name: ESP_S3_SECRET_KEY
              valueFrom:
                secretKeyRef:
                  name: {{ $root.Values.secrets.s3.name }}
                  key: {{ $root.Values.secrets.s3.secretAccessKeyKey }}
                  optional: true
            {{- end }}
          {{- end }}
          envFrom:
            - configMapRef:
                name: {{ include "esp.fullname" $root }}-config
            {{- with .secretEnv }}
            - secretRef:
                name: {{ . }}
            {{- end }}
          securityContext:
            {{- include "esp.containerSecurityContext" . | nindent 12 }}
          resources:
            {{- toYaml .settings.resources | nindent 12 }}
          {{- if $grpc }}
          # Native gRPC probes against grpc.health.v1.
          {{- $handler := printf "grpc:\n  port: %d" (int $grpc.port) }}
          {{- include "esp.probes" $handler | nindent 10 }}
          {{- else }}
          # HTTP-only component: a TCP probe needs no route of its own.
          {{- $handler := printf "tcpSocket:\n  port: %d" (int $probePort) }}
          {{- include "esp.probes" $handler | nindent 10 }}
          {{- end }}
          volumeMounts:
            # The root filesystem is read-only; Python and boto3 still want a scratch /tmp.
            - name: tmp
              mountPath: /tmp
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
{{- end }}

{{/* Startup, readiness and liveness probes sharing one handler (given as YAML text). */}}
{{- define "esp.probes" -}}
startupProbe:
  {{- . | nindent 2 }}
  periodSeconds: 2
  failureThreshold: 30
readinessProbe:
  {{- . | nindent 2 }}
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 2
livenessProbe:
  {{- . | nindent 2 }}
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
{{- end }}

{{- define "esp.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "esp.componentName" . }}
  labels:
    {{- include "esp.labels" . | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "esp.selectorLabels" . | nindent 4 }}
  ports:
    {{- range .ports }}
    - name: {{ .name }}
      port: {{ .port }}
      targetPort: {{ .name }}
      protocol: TCP
      {{- if .grpc }}
      appProtocol: kubernetes.io/h2c
      {{- end }}
    {{- end }}
{{- end }}

{{- define "esp.hpa" -}}
{{- include "esp.checkReplicaRange" (dict "name" .component "autoscaling" .settings.autoscaling) -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "esp.componentName" . }}
  labels:
    {{- include "esp.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "esp.componentName" . }}
  minReplicas: {{ .settings.autoscaling.minReplicas }}
  maxReplicas: {{ .settings.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ .settings.autoscaling.targetCPUUtilizationPercentage }}
  behavior:
    scaleDown:
      stabilizationWindowSeconds: 300
{{- end }}

{{/* A sender class's KEDA ScaledObject: JetStream consumer lag plus CPU, in the one HPA KEDA manages. */}}
{{- define "esp.scaledObject" -}}
{{- include "esp.checkReplicaRange" (dict "name" .component "autoscaling" .settings.autoscaling) -}}
{{- $values := .root.Values -}}
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ include "esp.componentName" . }}
  labels:
    {{- include "esp.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "esp.componentName" . }}
  pollingInterval: {{ .settings.autoscaling.pollingInterval }}
  cooldownPeriod: {{ $values.sender.keda.cooldownPeriod }}
  minReplicaCount: {{ .settings.autoscaling.minReplicas }}
  maxReplicaCount: {{ .settings.autoscaling.maxReplicas }}
  advanced:
    horizontalPodAutoscalerConfig:
      behavior:
        scaleDown:
          stabilizationWindowSeconds: 300
  triggers:
    - type: nats-jetstream
      metadata:
        natsServerMonitoringEndpoint: {{ $values.nats.monitoringEndpoint | quote }}
        account: {{ $values.nats.account | quote }}
        stream: SEND_{{ upper .senderClass }}
        consumer: sender-{{ .senderClass }}
        lagThreshold: {{ .settings.autoscaling.lagThreshold | quote }}
        activationLagThreshold: "0"
        useHttps: {{ $values.nats.monitoringUseHttps | toString | quote }}
    - type: cpu
      metricType: Utilization
      metadata:
        value: {{ .settings.autoscaling.targetCPUUtilizationPercentage | quote }}
{{- end }}

{{- define "esp.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "esp.componentName" . }}
  labels:
    {{- include "esp.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ .settings.podDisruptionBudget.maxUnavailable }}
  unhealthyPodEvictionPolicy: AlwaysAllow
  selector:
    matchLabels:
      {{- include "esp.selectorLabels" . | nindent 6 }}
{{- end }}

{{/* Opens a component's public ports to everyone, its other gRPC ports to the mesh (or to the components named
as their callers), metrics to Prometheus. */}}
{{- define "esp.networkPolicy" -}}
{{- $public := list -}}
{{- $internal := list -}}
{{- $restricted := list -}}
{{- range .ports -}}
{{- if eq .exposure "public" }}{{ $public = append $public .port }}{{ end -}}
{{- if eq .exposure "mesh" }}{{ $internal = append $internal .port }}{{ end -}}
{{- if eq .exposure "callers" }}{{ $restricted = append $restricted . }}{{ end -}}
{{- end -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "esp.componentName" . }}
  labels:
    {{- include "esp.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "esp.selectorLabels" . | nindent 6 }}
  policyTypes:
    - Ingress
    {{- if .egress }}
    - Egress
    {{- end }}
  ingress:
    {{- with $public }}
    - ports:
        {{- range . }}
        - port: {{ . }}
          protocol: TCP
        {{- end }}
    {{- end }}
    {{- with $internal }}
    - from:
        - podSelector:
            matchLabels:
              app.kubernetes.io/part-of: esp-mesh
              app.kubernetes.io/instance: {{ $.root.Release.Name }}
      ports:
        {{- range . }}
        - port: {{ . }}
          protocol: TCP
        {{- end }}
    {{- end }}
    {{- range $restricted }}
    - from:
        {{- range .callers }}
        - podSelector:
            matchLabels:
              app.kubernetes.io/name: {{ . }}
              app.kubernetes.io/part-of: esp-mesh
              app.kubernetes.io/instance: {{ $.root.Release.Name }}
        {{- end }}
      ports:
        - port: {{ .port }}
          protocol: TCP
    {{- end }}
    - from:
        - namespaceSelector:
            matchLabels:
              kubernetes.io/metadata.name: {{ .root.Values.networkPolicy.monitoringNamespace }}
      ports:
        - port: {{ include "esp.metricsPort" . }}
          protocol: TCP
  {{- with .egress }}
  egress:
    {{- . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* Everything one component needs: ServiceAccount, Deployment, Service, autoscaler, PDB, NetworkPolicy. */}}
{{- define "esp.component" -}}
{{ include "esp.serviceAccount" . }}
---
{{ include "esp.deployment" . }}
{{- if .service }}
---
{{ include "esp.service" . }}
{{- end }}
---
{{- if and .senderClass .root.Values.sender.keda.enabled }}
{{ include "esp.scaledObject" . }}
{{- else }}
{{ include "esp.hpa" . }}
{{- end }}
---
{{ include "esp.pdb" . }}
{{- if .root.Values.networkPolicy.enabled }}
---
{{ include "esp.networkPolicy" . }}
{{- end }}
{{- end }}
