{{/*
Rules that span several values, which values.schema.json cannot express. Each message names the
keys and says what to change. Rendered (to nothing) at the top of rayservice.yaml.
*/}}
{{- define "vllm-rayservice.validate" -}}
{{- $shards := mul (int .Values.engine.tensorParallelSize) (int .Values.engine.pipelineParallelSize) }}
{{- $gpus := int .Values.workers.gpus }}
{{- if and (eq $gpus 0) (gt $shards 1) }}
{{- fail (printf "engine.tensorParallelSize x engine.pipelineParallelSize is %d, but workers.gpus is 0: parallelism across devices needs GPU workers. Set workers.gpus, or both sizes to 1." $shards) }}
{{- end }}
{{- if gt $shards $gpus | and (gt $gpus 0) }}
{{- fail (printf "a model replica needs engine.tensorParallelSize x engine.pipelineParallelSize = %d GPUs, but a worker pod has workers.gpus = %d: a replica must fit on one worker pod. Raise workers.gpus to at least %d or lower the parallel sizes." $shards $gpus $shards) }}
{{- end }}
{{- if eq $gpus 0 }}
{{- $cpus := float64 .Values.serving.replicaCpus }}
{{- if or (lt $cpus 1.0) (ne $cpus (float64 (int $cpus))) }}
{{- fail (printf "serving.replicaCpus is %v, but on CPU workers (workers.gpus = 0) Ray starts each worker pod with num-cpus = serving.replicaCpus, so that one model replica fills a pod: it must be a whole number of at least 1. Set serving.replicaCpus to 1, 2, ..." .Values.serving.replicaCpus) }}
{{- end }}
{{- if hasKey .Values.workers.rayStartParams "num-cpus" }}
{{- fail "workers.rayStartParams.num-cpus is set, but on CPU workers (workers.gpus = 0) the chart sets it from serving.replicaCpus, so that one model replica fills a pod. Remove it and set serving.replicaCpus instead." }}
{{- end }}
{{- end }}
{{- if hasKey .Values.workers.rayStartParams "num-gpus" }}
{{- fail "workers.rayStartParams.num-gpus is set, but the chart sets it from workers.gpus (the GPUs each worker pod requests). Remove it and set workers.gpus instead." }}
{{- end }}
{{- if and .Values.serving.autoscaling.enabled (gt (int .Values.serving.autoscaling.minReplicas) (int .Values.serving.autoscaling.maxReplicas)) }}
{{- fail (printf "serving.autoscaling.minReplicas (%d) is larger than serving.autoscaling.maxReplicas (%d)." (int .Values.serving.autoscaling.minReplicas) (int .Values.serving.autoscaling.maxReplicas)) }}
{{- end }}
{{- if gt (int .Values.workers.minReplicas) (int .Values.workers.maxReplicas) }}
{{- fail (printf "workers.minReplicas (%d) is larger than workers.maxReplicas (%d)." (int .Values.workers.minReplicas) (int .Values.workers.maxReplicas)) }}
{{- end }}
{{- if and (gt $gpus 0) (eq (int (include "vllm-rayservice.replicasPerWorker" .)) 0) }}
{{- fail (printf "serving.replicaCpus is %v, but Ray counts only %s CPUs on a worker pod (workers.rayStartParams.num-cpus, else workers.resources.limits.cpu or requests.cpu, rounded up as KubeRay does): no model replica fits. Lower serving.replicaCpus or give the workers more CPUs." .Values.serving.replicaCpus (include "vllm-rayservice.workerRayCpus" .)) }}
{{- end }}
{{- $maxModelReplicas := int (include "vllm-rayservice.maxModelReplicas" .) }}
{{- $workersNeeded := int (include "vllm-rayservice.workersFor" (list . $maxModelReplicas)) }}
{{- if gt $workersNeeded (int .Values.workers.maxReplicas) }}
{{- $key := ternary "serving.autoscaling.maxReplicas" "serving.replicas" .Values.serving.autoscaling.enabled }}
{{- fail (printf "%s = %d model replicas need %d worker pods (%s per pod), but workers.maxReplicas is %d. Raise workers.maxReplicas to at least %d or lower %s." $key $maxModelReplicas $workersNeeded (include "vllm-rayservice.replicasPerWorker" .) (int .Values.workers.maxReplicas) $workersNeeded $key) }}
{{- end }}
{{- /* Under HAProxy a request goes straight to a replica, and Ray Serve 2.60 counts it against
max_queued_requests from its arrival until it takes a slot, a step that waits for the replica's
event loop. So requests that arrive together are all "queued" for an instant: a queue shorter than
the burst sheds requests the replica has room for (measured: 32 at once with 32 slots and a queue
of 16 shed up to 9 of them). A queue of at least maxOngoingRequests keeps every request that finds a
free slot. */}}
{{- $queue := int .Values.serving.maxQueuedRequests }}
{{- if and (ne .Values.serving.routing.mode "leastconn") (ne .Values.serving.ingress "haproxy") }}
{{- fail (printf "serving.routing.mode is %s, which needs serving.ingress: haproxy (HAProxy asks the router which replica takes each request; Serve's Python proxy has no such hook). Set serving.ingress: haproxy, or serving.routing.mode: leastconn." .Values.serving.routing.mode) }}
{{- end }}
{{- if and (eq .Values.serving.routing.mode "prefix") (lt (int .Values.serving.routing.prefixMinMatchChars) (int .Values.serving.routing.prefixBlockChars)) }}
{{- fail (printf "serving.routing.prefixMinMatchChars (%d) is below prefixBlockChars (%d): prompts are compared in whole blocks, so no match could be that short. Raise prefixMinMatchChars or lower prefixBlockChars." (int .Values.serving.routing.prefixMinMatchChars) (int .Values.serving.routing.prefixBlockChars)) }}
{{- end }}
{{- if and (eq .Values.serving.ingress "haproxy") (ne $queue -1) (lt $queue (int .Values.serving.maxOngoingRequests)) }}
{{- fail (printf "serving.maxQueuedRequests is %d, below serving.maxOngoingRequests (%d): under serving.ingress haproxy, Ray Serve counts requests that arrive together as queued until each takes a slot, so this queue would refuse bursts the replica has room for. Set serving.maxQueuedRequests to -1 or at least %d, or use serving.ingress: proxy." $queue (int .Values.serving.maxOngoingRequests) (int .Values.serving.maxOngoingRequests)) }}
{{- end }}
{{- if and .Values.openai.enableAutoToolChoice (not .Values.openai.toolCallParser) }}
{{- fail "openai.enableAutoToolChoice is true but openai.toolCallParser is empty: vLLM needs the parser that reads the model's tool calls. Set openai.toolCallParser (e.g. hermes) or turn auto tool choice off." }}
{{- end }}
{{- range $name := list "api_key" "enable_request_id_headers" "disable_fastapi_docs" }}
{{- if hasKey $.Values.openai.extraArgs $name }}
{{- fail (printf "openai.extraArgs.%s is set by the app itself (README, \"The app contract\"): remove it%s." $name (ternary "; set serving.apiKey for an API key" "" (eq $name "api_key"))) }}
{{- end }}
{{- end }}
{{- if and .Values.serving.apiKey.existingSecret .Values.serving.apiKey.value }}
{{- fail "serving.apiKey.existingSecret and serving.apiKey.value are both set: keep the one that holds the key you mean." }}
{{- end }}
{{- if and .Values.model.cache.existingClaim (not .Values.model.cache.enabled) }}
{{- fail "model.cache.existingClaim is set but model.cache.enabled is false: set model.cache.enabled=true to mount it, or drop the claim." }}
{{- end }}
{{- include "vllm-rayservice.validateLora" . }}
{{- if and (ne .Values.service.type "LoadBalancer") .Values.service.loadBalancerSourceRanges }}
{{- fail (printf "service.loadBalancerSourceRanges only applies to service.type LoadBalancer, not %s." .Values.service.type) }}
{{- end }}
{{- if and (eq .Values.service.type "ClusterIP") (not (kindIs "invalid" .Values.service.nodePort)) }}
{{- fail "service.nodePort needs service.type NodePort or LoadBalancer." }}
{{- end }}
{{- if and .Values.monitoring.prometheusRule.enabled (not .Values.monitoring.podMonitor.enabled) }}
{{- fail (printf "monitoring.prometheusRule.enabled is true but monitoring.podMonitor.enabled is false: the alerts select this release's series by the job label the chart's PodMonitor gives them (%s). Set monitoring.podMonitor.enabled=true too." (include "vllm-rayservice.metricsJob" .)) }}
{{- end }}
{{- include "vllm-rayservice.validateKubeRay" . }}
{{- include "vllm-rayservice.validateKubeRayVersion" . }}
{{- end }}

{{/* The LoRA rules; each message names the key and what to change. */}}
{{- define "vllm-rayservice.validateLora" -}}
{{- $lora := .Values.lora }}
{{- if and (not $lora.enabled) (or $lora.adapters $lora.loadOnFirstUse) }}
{{- fail "lora.adapters or lora.loadOnFirstUse is set but lora.enabled is false: set lora.enabled=true to serve adapters." }}
{{- end }}
{{- if and $lora.loadOnFirstUse (not $lora.volume.enabled) }}
{{- fail "lora.loadOnFirstUse is true but lora.volume.enabled is false: vLLM loads unlisted adapters from the adapters volume. Set lora.volume.enabled=true (and lora.volume.existingClaim to your claim)." }}
{{- end }}
{{- if and $lora.volume.existingClaim (not $lora.volume.enabled) }}
{{- fail "lora.volume.existingClaim is set but lora.volume.enabled is false: set lora.volume.enabled=true to mount it, or drop the claim." }}
{{- end }}
{{- if and (not (kindIs "invalid" $lora.maxCpuLoras)) (lt (int $lora.maxCpuLoras) (int $lora.maxLoras)) }}
{{- fail (printf "lora.maxCpuLoras (%d) is below lora.maxLoras (%d): the adapters in a batch must also fit in CPU memory. Raise lora.maxCpuLoras or leave it empty." (int $lora.maxCpuLoras) (int $lora.maxLoras)) }}
{{- end }}
{{- $served := default .Values.model.id .Values.model.servedName }}
{{- $seen := dict }}
{{- range $index, $adapter := $lora.adapters }}
{{- if eq $adapter.name $served }}
{{- fail (printf "lora.adapters[%d].name is %q, the served model's name (model.servedName, else model.id): clients could not tell them apart. Rename the adapter." $index $adapter.name) }}
{{- end }}
{{- if hasKey $seen $adapter.name }}
{{- fail (printf "lora.adapters[%d].name %q is already the name of lora.adapters[%d]: each adapter needs its own name." $index $adapter.name (get $seen $adapter.name)) }}
{{- end }}
{{- $_ := set $seen $adapter.name $index }}
{{- if regexMatch "(^|/)\\.\\.(/|$)" $adapter.path }}
{{- fail (printf "lora.adapters[%d].path %q goes up with \"..\": give the adapter's folder inside lora.volume, or an absolute path." $index $adapter.path) }}
{{- end }}
{{- if and (not (hasPrefix "/" $adapter.path)) (not $lora.volume.enabled) }}
{{- fail (printf "lora.adapters[%d].path %q is relative to the adapters volume, but lora.volume.enabled is false. Set lora.volume.enabled=true, or give an absolute path in the pods." $index $adapter.path) }}
{{- end }}
{{- end }}
{{- end }}
