{{/* Names, labels and the values derived from several keys. Templates call these; none renders an object. */}}

{{/* The chart name, or nameOverride. */}}
{{- define "vllm-rayservice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects. Truncated to 47 characters, not the usual 63: KubeRay
rejects a longer RayService name (it appends suffixes to name the RayCluster and its pods).
*/}}
{{- define "vllm-rayservice.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "vllm-rayservice.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The minimal labels that identify this release's objects. */}}
{{- define "vllm-rayservice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vllm-rayservice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The full label set every object carries. */}}
{{- define "vllm-rayservice.labels" -}}
helm.sh/chart: {{ include "vllm-rayservice.chart" . }}
{{ include "vllm-rayservice.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Service KubeRay creates from spec.serveService; clients and the smoke test call it. */}}
{{- define "vllm-rayservice.serveServiceName" -}}
{{- printf "%s-serve-svc" (include "vllm-rayservice.fullname" .) }}
{{- end }}

{{/*
Where `helm test` calls the app. Normally the serve Service. Under NewClusterWithIncrementalUpgrade
KubeRay (1.5 and newer, common/service.go BuildServeService) ignores spec.serveService and makes
one serve Service per cluster, named after the cluster, behind the Gateway `<name>-gateway`
(rayservice_controller.go createGateway, port 80); the Service in front of that Gateway is named by
the Gateway implementation, so no name is known here. The RayService's head Service
(`<name>-head-svc`, BuildHeadServiceForRayService) exists in every mode, follows the active cluster
and carries the head's serve port: the smoke test calls Serve there.
*/}}
{{- define "vllm-rayservice.smokeTestURL" -}}
{{- if eq .Values.cluster.upgradeStrategy "NewClusterWithIncrementalUpgrade" }}
{{- printf "http://%s-head-svc.%s.svc:%s" (include "vllm-rayservice.fullname" .) .Release.Namespace (include "vllm-rayservice.servePort" .) }}
{{- else }}
{{- printf "http://%s.%s.svc:%d" (include "vllm-rayservice.serveServiceName" .) .Release.Namespace (int .Values.service.port) }}
{{- end }}
{{- end }}

{{/* The port Ray Serve's ingress (HAProxy or the proxy) listens on, on every node. */}}
{{- define "vllm-rayservice.servePort" -}}
8000
{{- end }}

{{/* The ConfigMap holding the app code and the smoke-test script. */}}
{{- define "vllm-rayservice.appConfigMapName" -}}
{{- printf "%s-app" (include "vllm-rayservice.fullname" .) }}
{{- end }}

{{/* Where the app ConfigMap is mounted in the Ray containers; PYTHONPATH points here. */}}
{{- define "vllm-rayservice.appDir" -}}
/home/ray/vllm-rayservice
{{- end }}

{{/* The ServiceAccount the Ray pods run as (empty: the namespace default). */}}
{{- define "vllm-rayservice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vllm-rayservice.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret and key holding the endpoint's API key; empty when auth is off. */}}
{{- define "vllm-rayservice.apiKeySecretName" -}}
{{- if .Values.serving.apiKey.existingSecret }}
{{- .Values.serving.apiKey.existingSecret }}
{{- else if .Values.serving.apiKey.value }}
{{- printf "%s-api-key" (include "vllm-rayservice.fullname" .) }}
{{- end }}
{{- end }}

{{- define "vllm-rayservice.apiKeySecretKey" -}}
{{- if .Values.serving.apiKey.existingSecret }}
{{- .Values.serving.apiKey.key }}
{{- else }}
{{- "api-key" }}
{{- end }}
{{- end }}

{{/* Where the named API keys Secret is mounted in the Ray containers; empty when there is none. */}}
{{- define "vllm-rayservice.apiKeysDir" -}}
{{- if .Values.serving.apiKeys.existingSecret }}/etc/vllm-rayservice/api-keys{{ end }}
{{- end }}

{{/* The key policies' file in the app ConfigMap (and so in the app folder of the Ray pods). */}}
{{- define "vllm-rayservice.keyPoliciesFileName" -}}
key_policies.yaml
{{- end }}

{{/* The key policies as the app reads them (files/vllm_app_quotas.py, PolicyFile). */}}
{{- define "vllm-rayservice.keyPolicies" -}}
{{- toYaml (dict "keyPolicies" .Values.serving.keyPolicies "defaultKeyPolicy" .Values.serving.defaultKeyPolicy) }}
{{- end }}

{{/* "true" when a key policy sets a priority: vLLM then schedules by priority (an engine setting). */}}
{{- define "vllm-rayservice.priorityScheduling" -}}
{{- $any := not (kindIs "invalid" (index .Values.serving.defaultKeyPolicy "priority")) }}
{{- range $name, $policy := .Values.serving.keyPolicies }}
{{- if not (kindIs "invalid" (index (default dict $policy) "priority")) }}{{ $any = true }}{{ end }}
{{- end }}
{{- $any }}
{{- end }}

{{/* The environment variable that carries the API key into the app and the smoke test. */}}
{{- define "vllm-rayservice.apiKeyEnvName" -}}
VLLM_RAYSERVICE_API_KEY
{{- end }}

{{/* The model cache claim (empty when the cache is off). */}}
{{- define "vllm-rayservice.cacheClaimName" -}}
{{- if .Values.model.cache.enabled }}
{{- default (printf "%s-model-cache" (include "vllm-rayservice.fullname" .)) .Values.model.cache.existingClaim }}
{{- end }}
{{- end }}

{{/* The LoRA adapters claim (empty when the adapters volume is off). */}}
{{- define "vllm-rayservice.loraClaimName" -}}
{{- if .Values.lora.volume.enabled }}
{{- default (printf "%s-lora-adapters" (include "vllm-rayservice.fullname" .)) .Values.lora.volume.existingClaim }}
{{- end }}
{{- end }}

{{/*
args.lora of the app contract: adapter paths made absolute (a relative one starts at the adapters
volume), and the folder loadOnFirstUse looks in. Rendered as JSON, for fromJson.
*/}}
{{- define "vllm-rayservice.loraArgs" -}}
{{- $mountPath := trimSuffix "/" .Values.lora.volume.mountPath }}
{{- $adapters := list }}
{{- range .Values.lora.adapters }}
{{- $path := ternary .path (printf "%s/%s" $mountPath (trimPrefix "./" .path)) (hasPrefix "/" .path) }}
{{- $adapters = append $adapters (dict "name" .name "path" $path) }}
{{- end }}
{{- toJson (dict
  "enabled" .Values.lora.enabled
  "maxLoras" (int .Values.lora.maxLoras)
  "maxLoraRank" (int .Values.lora.maxLoraRank)
  "maxCpuLoras" (ternary nil (int .Values.lora.maxCpuLoras) (kindIs "invalid" .Values.lora.maxCpuLoras))
  "adapters" $adapters
  "loadOnFirstUse" .Values.lora.loadOnFirstUse
  "folder" (ternary $mountPath "" .Values.lora.volume.enabled)) }}
{{- end }}

{{/* GPUs one model replica needs: every tensor-parallel shard of every pipeline stage. 0 on CPU workers. */}}
{{- define "vllm-rayservice.gpusPerReplica" -}}
{{- if gt (int .Values.workers.gpus) 0 }}
{{- mul (int .Values.engine.tensorParallelSize) (int .Values.engine.pipelineParallelSize) }}
{{- else }}
{{- 0 }}
{{- end }}
{{- end }}

{{/*
The CPUs Ray counts on a GPU worker pod, as KubeRay starts it (common/pod.go
generateRayStartCommand): workers.rayStartParams.num-cpus, else the container's CPU limit, else
its request, rounded up to a whole number (resource.Quantity.Value). 0 when none is set: Ray then
counts the node's CPUs, unknown here.
*/}}
{{- define "vllm-rayservice.workerRayCpus" -}}
{{- $cpu := index .Values.workers.rayStartParams "num-cpus" | default (dig "limits" "cpu" "" .Values.workers.resources) | default (dig "requests" "cpu" "" .Values.workers.resources) | toString }}
{{- if hasSuffix "m" $cpu }}
{{- div (add (atoi (trimSuffix "m" $cpu)) 999) 1000 }}
{{- else if regexMatch `^[0-9]+(\.[0-9]+)?$` $cpu }}
{{- int (ceil (float64 $cpu)) }}
{{- else }}
{{- 0 }}
{{- end }}
{{- end }}

{{/*
Model replicas that fit on one worker pod. On GPU workers, as many as both the pod's GPUs
(workers.gpus / (tensor x pipeline parallel size)) and the CPUs Ray counts there
(workerRayCpus / serving.replicaCpus) allow: Ray places a replica only where both are free. On CPU
workers, one: Ray starts there with num-cpus = serving.replicaCpus.
*/}}
{{- define "vllm-rayservice.replicasPerWorker" -}}
{{- $gpusPerReplica := int (include "vllm-rayservice.gpusPerReplica" .) }}
{{- if gt $gpusPerReplica 0 }}
{{- $byGpus := div (int .Values.workers.gpus) $gpusPerReplica }}
{{- $cpus := int (include "vllm-rayservice.workerRayCpus" .) }}
{{- $replicaCpus := float64 .Values.serving.replicaCpus }}
{{- if and (gt $cpus 0) (gt $replicaCpus 0.0) }}
{{- /* Ray keeps resources to 4 decimals; the margin keeps 3 / 0.3 from flooring to 9. */}}
{{- min $byGpus (int (floor (addf (divf $cpus $replicaCpus) 0.0001))) }}
{{- else }}
{{- $byGpus }}
{{- end }}
{{- else }}
{{- 1 }}
{{- end }}
{{- end }}

{{/* The fewest and the most model replicas Serve runs. */}}
{{- define "vllm-rayservice.minModelReplicas" -}}
{{- if .Values.serving.autoscaling.enabled }}{{ int .Values.serving.autoscaling.minReplicas }}{{ else }}{{ int .Values.serving.replicas }}{{ end }}
{{- end }}

{{- define "vllm-rayservice.maxModelReplicas" -}}
{{- if .Values.serving.autoscaling.enabled }}{{ int .Values.serving.autoscaling.maxReplicas }}{{ else }}{{ int .Values.serving.replicas }}{{ end }}
{{- end }}

{{/* Worker pods needed for n model replicas: ceil(n / replicasPerWorker). Call with (list $ n). */}}
{{- define "vllm-rayservice.workersFor" -}}
{{- $root := index . 0 }}
{{- $replicas := int (index . 1) }}
{{- $perWorker := int (include "vllm-rayservice.replicasPerWorker" $root) }}
{{- div (sub (add $replicas $perWorker) 1) $perWorker }}
{{- end }}

{{/*
Worker pods KubeRay starts with. Only the first value counts: KubeRay ignores later edits of
replicas/minReplicas/maxReplicas in a RayService, and Ray's autoscaler moves the count between
minReplicas and maxReplicas as Serve asks for model replicas.
*/}}
{{- define "vllm-rayservice.initialWorkers" -}}
{{- $needed := int (include "vllm-rayservice.workersFor" (list . (include "vllm-rayservice.minModelReplicas" .))) }}
{{- max $needed (int .Values.workers.minReplicas) }}
{{- end }}

{{/*
The sha256 of the app's files (files/vllm_app*.py, in name order, one after the other), as
files/vllm_app.py computes it (code_digest): a code change restarts the app in place.
*/}}
{{- define "vllm-rayservice.appCodeHash" -}}
{{- $code := "" }}
{{- range $path, $_ := .Files.Glob "files/vllm_app*.py" }}
{{- $code = print $code ($.Files.Get $path) }}
{{- end }}
{{- $code | sha256sum }}
{{- end }}

{{/*
The Ray Serve config KubeRay submits to the cluster (spec.serveConfigV2). `args` is the app
contract (README, "The app contract"): files/vllm_app.py validates it into AppArgs.
*/}}
{{- define "vllm-rayservice.serveConfig" -}}
{{- $model := dict
  "id" .Values.model.id
  "servedName" (default .Values.model.id .Values.model.servedName)
  "revision" .Values.model.revision
  "trustRemoteCode" .Values.model.trustRemoteCode
  "chatTemplate" .Values.model.chatTemplate }}
{{- $engine := dict
  "dtype" .Values.engine.dtype
  "maxModelLen" (int .Values.engine.maxModelLen)
  "gpuMemoryUtilization" .Values.engine.gpuMemoryUtilization
  "tensorParallelSize" (int .Values.engine.tensorParallelSize)
  "pipelineParallelSize" (int .Values.engine.pipelineParallelSize)
  "enforceEager" .Values.engine.enforceEager
  "streamInterval" (int .Values.engine.streamInterval)
  "extraArgs" .Values.engine.extraArgs }}
{{- $openai := dict
  "toolCallParser" .Values.openai.toolCallParser
  "enableAutoToolChoice" .Values.openai.enableAutoToolChoice
  "reasoningParser" .Values.openai.reasoningParser
  "chatTemplateContentFormat" .Values.openai.chatTemplateContentFormat
  "extraArgs" .Values.openai.extraArgs }}
{{- $serving := dict
  "apiKeyEnv" (ternary (include "vllm-rayservice.apiKeyEnvName" .) "" (ne (include "vllm-rayservice.apiKeySecretName" .) ""))
  "apiKeysDir" (include "vllm-rayservice.apiKeysDir" .)
  "logPrompts" .Values.serving.logPrompts
  "warmup" .Values.serving.warmup
  "engineStallSeconds" .Values.serving.engineStallSeconds
  "routing" (dict
    "mode" .Values.serving.routing.mode
    "sessionHeader" (lower .Values.serving.routing.sessionHeader)
    "prefixBlockChars" (int .Values.serving.routing.prefixBlockChars)
    "prefixMinMatchChars" (int .Values.serving.routing.prefixMinMatchChars)
    "prefixMaxBlocks" (int .Values.serving.routing.prefixMaxBlocks)
    "maxImbalance" (int .Values.serving.routing.maxImbalance)
    "adapterAffinity" .Values.serving.routing.adapterAffinity)
  "keyPoliciesFile" (printf "%s/%s" (include "vllm-rayservice.appDir" .) (include "vllm-rayservice.keyPoliciesFileName" .))
  "priorityScheduling" (eq (include "vllm-rayservice.priorityScheduling" .) "true") }}
{{- $deployment := dict
  "name" "VLLMServer"
  "max_ongoing_requests" (int .Values.serving.maxOngoingRequests)
  "max_queued_requests" (int .Values.serving.maxQueuedRequests)
  "health_check_period_s" .Values.serving.healthCheck.periodSeconds
  "health_check_timeout_s" .Values.serving.healthCheck.timeoutSeconds
  "graceful_shutdown_timeout_s" .Values.serving.gracefulShutdownTimeoutSeconds
  "ray_actor_options" (dict
    "num_cpus" .Values.serving.replicaCpus
    "num_gpus" (int (include "vllm-rayservice.gpusPerReplica" .))) }}
{{- if .Values.serving.autoscaling.enabled }}
{{- $_ := set $deployment "autoscaling_config" (dict
  "min_replicas" (int .Values.serving.autoscaling.minReplicas)
  "max_replicas" (int .Values.serving.autoscaling.maxReplicas)
  "target_ongoing_requests" .Values.serving.autoscaling.targetOngoingRequests) }}
{{- else }}
{{- $_ := set $deployment "num_replicas" (int .Values.serving.replicas) }}
{{- end }}
{{- $app := dict
  "name" "llm"
  "import_path" "vllm_app:build_app"
  "route_prefix" "/"
  "runtime_env" (dict "env_vars" (dict "VLLM_APP_SHA256" (include "vllm-rayservice.appCodeHash" .)))
  "args" (dict "model" $model "engine" $engine "openai" $openai "serving" $serving "lora" (include "vllm-rayservice.loraArgs" . | fromJson))
  "deployments" (list $deployment) }}
{{- $config := dict
  "proxy_location" "EveryNode"
  "http_options" (dict "host" "0.0.0.0" "port" (int (include "vllm-rayservice.servePort" .)))
  "applications" (list $app) }}
{{- toYaml $config }}
{{- end }}

{{/*
Ray Serve's ingress, as environment variables of every Ray process (head and workers alike, as in
KubeRay's ray-service.high-throughput-llm sample). With serving.ingress=haproxy (Ray 2.60):
- RAY_SERVE_ENABLE_HA_PROXY=1: each node runs HAProxy on the Serve port (8000) instead of Serve's
  Python ProxyActor. HAProxy answers /-/healthz and /-/routes itself, which KubeRay probes to put
  a pod behind the serve Service, so the Service, the probes and NOTES stay as they are.
- With serving.routing in a routed mode, HAProxy asks the app's router deployment for each POST
  (Serve's ingress request router, files/vllm_app_routing.py).
- It forces Serve's direct ingress: each ingress replica serves HTTP itself on a port from
  30000-31000 (gRPC 40000-41000), bound on all interfaces so HAProxy on any node can reach it.
  Pod-to-pod traffic needs no containerPort; a NetworkPolicy must allow those ranges between the
  release's Ray pods. HAProxy's stats (8404) and metrics (9101) ports listen on every node too.
- RAY_SERVE_THROUGHPUT_OPTIMIZED is left off: it also moves Serve's request logs into a
  1000-line buffer and off stderr (so the per-request log line arrives late), and in an
  alternating A/B on top of HAProxy it did not pay (docs/performance.md).
*/}}
{{- define "vllm-rayservice.ingressEnv" -}}
{{- if eq .Values.serving.ingress "haproxy" }}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
# serving.routing: HAProxy hands the router the request body (prompt, `user`, `model`) and the
# session header, and Serve runs that many router replicas per node. They only act when the app
# has a router, so switching serving.routing.mode
# changes serveConfigV2 alone (an in-place app restart), never the pods.
- name: RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY
  value: "1"
- name: RAY_SERVE_SESSION_ID_HEADER_KEY
  value: {{ .Values.serving.routing.sessionHeader | lower | quote }}
- name: RAY_SERVE_INGRESS_ROUTER_REPLICAS_PER_NODE
  value: {{ .Values.serving.routing.routerReplicasPerNode | int | quote }}
{{- end }}
{{- end }}

{{/* Environment every Ray container gets: the app on PYTHONPATH, the HF cache, the ingress, the secrets. */}}
{{- define "vllm-rayservice.rayEnv" -}}
# Kubernetes does not expand the image's own $PYTHONPATH here, so name the app folder alone.
- name: PYTHONPATH
  value: {{ include "vllm-rayservice.appDir" . }}
- name: HF_HOME
  value: {{ .Values.model.cache.mountPath }}
{{- include "vllm-rayservice.ingressEnv" . }}
{{- if .Values.model.huggingFaceToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.model.huggingFaceToken.existingSecret }}
      key: {{ .Values.model.huggingFaceToken.key }}
{{- end }}
{{- with include "vllm-rayservice.apiKeySecretName" . }}
- name: {{ include "vllm-rayservice.apiKeyEnvName" $ }}
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "vllm-rayservice.apiKeySecretKey" $ }}
{{- end }}
{{- end }}

{{/* Volume mounts every Ray container gets: the app code and, when on, the model cache and the named API keys. */}}
{{- define "vllm-rayservice.rayVolumeMounts" -}}
# A directory mount, not subPath, so the kubelet updates the files when the ConfigMap changes.
- name: app
  mountPath: {{ include "vllm-rayservice.appDir" . }}
  readOnly: true
{{- if .Values.model.cache.enabled }}
- name: model-cache
  mountPath: {{ .Values.model.cache.mountPath }}
{{- end }}
{{- with include "vllm-rayservice.apiKeysDir" . }}
# A directory mount, not subPath, so the kubelet updates the keys when the Secret changes.
- name: api-keys
  mountPath: {{ . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The adapters volume on the worker pods, which run the model replicas (none on the head). */}}
{{- define "vllm-rayservice.loraVolumeMounts" -}}
{{- if .Values.lora.volume.enabled }}
# Read-only: vLLM only reads adapters, and a replica must not change them for the others.
- name: lora-adapters
  mountPath: {{ .Values.lora.volume.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "vllm-rayservice.loraVolumes" -}}
{{- with include "vllm-rayservice.loraClaimName" . }}
- name: lora-adapters
  persistentVolumeClaim:
    claimName: {{ . }}
    readOnly: true
{{- end }}
{{- end }}

{{/* The volumes behind rayVolumeMounts. */}}
{{- define "vllm-rayservice.rayVolumes" -}}
- name: app
  configMap:
    name: {{ include "vllm-rayservice.appConfigMapName" . }}
{{- with include "vllm-rayservice.cacheClaimName" . }}
- name: model-cache
  persistentVolumeClaim:
    claimName: {{ . }}
{{- end }}
{{- with .Values.serving.apiKeys.existingSecret }}
- name: api-keys
  secret:
    secretName: {{ . }}
{{- end }}
{{- end }}

{{/*
The job label of this release's series: the Prometheus Operator labels what a PodMonitor scrapes
"<namespace>/<PodMonitor name>". The alerts select this release's series by it, and the dashboards
open on it.
*/}}
{{- define "vllm-rayservice.metricsJob" -}}
{{- printf "%s/%s" .Release.Namespace (include "vllm-rayservice.fullname" .) }}
{{- end }}

{{/*
A Grafana dashboard from files/dashboards/, made this release's: a uid and a title of its own (the
sidecar loads every release's dashboards into one Grafana, which refuses two with one uid), and its
job variable opening on this release's series. Call with (list $ "files/dashboards/NAME.json").
*/}}
{{- define "vllm-rayservice.dashboard" -}}
{{- $root := index . 0 }}
{{- $path := index . 1 }}
{{- $dashboard := $root.Files.Get $path | fromJson }}
{{- $job := include "vllm-rayservice.metricsJob" $root }}
{{- /* Grafana caps a uid at 40 characters. */}}
{{- $_ := set $dashboard "uid" (printf "vllm-rs-%s" (printf "%s %s" $job $path | sha256sum | trunc 16)) }}
{{- $_ := set $dashboard "title" (printf "%s (%s)" $dashboard.title $job) }}
{{- range $dashboard.templating.list }}
{{- if eq .name "job" }}
{{- $_ := set . "current" (dict "text" $job "value" $job) }}
{{- end }}
{{- end }}
{{- toPrettyJson $dashboard }}
{{- end }}
