{{/*
KubeRay's own checks of a RayService (ray-operator/controllers/ray/utils/validation.go at v1.7.0:
ValidateRayServiceMetadata, ValidateRayServiceSpec, ValidateRayClusterSpec), for the fields a
value of this chart can reach. KubeRay applies them only after the install, as a status condition
or an event nobody sees; here they fail `helm install`, naming the value. Rules on fields the chart
never renders (authOptions, gcsFaultToleranceOptions, headService, group-level resources and
labels, suspend, autoscalerOptions.version/env, TLS, network policy) cannot be reached; the
schema covers the ranges (negative replicas, idle timeout, deletion delay, upgrade type).
Called from vllm-rayservice.validate.
*/}}
{{- define "vllm-rayservice.validateKubeRay" -}}
{{- $name := include "vllm-rayservice.fullname" . }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "the RayService name %q (from the release name, nameOverride or fullnameOverride) is not a DNS-1035 label, which KubeRay requires: it must start with a letter and hold only lowercase letters, digits and '-'. Use a release name such as chat-1, or set fullnameOverride." $name) }}
{{- end }}
{{- range $group := list "head" "workers" }}
{{- if hasKey (index $.Values $group).rayStartParams "labels" }}
{{- fail (printf "%s.rayStartParams.labels is set, but KubeRay >= 1.5 rejects rayStartParams labels (it wants the group's own labels field, which this chart does not render). Remove it." $group) }}
{{- end }}
{{- end }}
{{- if hasKey .Values.head.rayStartParams "redis-username" }}
{{- fail "head.rayStartParams.redis-username is set, but KubeRay rejects it (it belongs in gcsFaultToleranceOptions, which this chart does not render). Remove it." }}
{{- end }}
{{- range .Values.head.env }}
{{- if eq .name "RAY_REDIS_ADDRESS" }}
{{- fail "head.env sets RAY_REDIS_ADDRESS, which turns on GCS fault tolerance, but KubeRay requires gcsFaultToleranceOptions for that, which this chart does not render. Remove it." }}
{{- end }}
{{- if eq .name "REDIS_USERNAME" }}
{{- fail "head.env sets REDIS_USERNAME, but KubeRay rejects it (it belongs in gcsFaultToleranceOptions, which this chart does not render). Remove it." }}
{{- end }}
{{- end }}
{{- $incremental := .Values.cluster.incrementalUpgrade }}
{{- if eq .Values.cluster.upgradeStrategy "NewClusterWithIncrementalUpgrade" }}
{{- /* KubeRay also requires the in-tree autoscaler here, which this chart always turns on. */}}
{{- if not $incremental.gatewayClassName }}
{{- fail "cluster.upgradeStrategy is NewClusterWithIncrementalUpgrade, but cluster.incrementalUpgrade.gatewayClassName is empty: KubeRay rejects that RayService. Set it to a GatewayClass of your cluster (kubectl get gatewayclass), or choose another cluster.upgradeStrategy." }}
{{- end }}
{{- $service := .Values.service }}
{{- $customized := list }}
{{- if ne $service.type "ClusterIP" }}{{ $customized = append $customized (printf "service.type (%s)" $service.type) }}{{ end }}
{{- if ne (int $service.port) (int (include "vllm-rayservice.servePort" .)) }}{{ $customized = append $customized (printf "service.port (%d)" (int $service.port)) }}{{ end }}
{{- if not (kindIs "invalid" $service.nodePort) }}{{ $customized = append $customized "service.nodePort" }}{{ end }}
{{- if $service.annotations }}{{ $customized = append $customized "service.annotations" }}{{ end }}
{{- if $service.loadBalancerSourceRanges }}{{ $customized = append $customized "service.loadBalancerSourceRanges" }}{{ end }}
{{- with $customized }}
{{- fail (printf "%s %s set, but under cluster.upgradeStrategy NewClusterWithIncrementalUpgrade KubeRay ignores spec.serveService: clients go through the Gateway %s-gateway (port 80) it makes with cluster.incrementalUpgrade.gatewayClassName. Leave service.* at its defaults and expose that Gateway the way its class does." (join ", " .) (ternary "are" "is" (gt (len .) 1)) (include "vllm-rayservice.fullname" $)) }}
{{- end }}
{{- if gt (int $incremental.stepSizePercent) (int $incremental.maxSurgePercent) }}
{{- fail (printf "cluster.incrementalUpgrade.stepSizePercent (%d) is larger than cluster.incrementalUpgrade.maxSurgePercent (%d): KubeRay rejects that RayService. Lower stepSizePercent or raise maxSurgePercent." (int $incremental.stepSizePercent) (int $incremental.maxSurgePercent)) }}
{{- end }}
{{- else if $incremental.gatewayClassName }}
{{- fail (printf "cluster.incrementalUpgrade.gatewayClassName is set, but cluster.upgradeStrategy is %q: the incremental upgrade options apply only to NewClusterWithIncrementalUpgrade. Set that strategy, or drop the gateway class." .Values.cluster.upgradeStrategy) }}
{{- end }}
{{- end }}

{{/*
"true" when cluster.kuberayVersion is at least the version given; call with (list $ "1.6.0").
*/}}
{{- define "vllm-rayservice.kuberayAtLeast" -}}
{{- $root := index . 0 }}
{{- if semverCompare (printf ">=%s" (index . 1)) $root.Values.cluster.kuberayVersion }}true{{ end }}
{{- end }}

{{/*
What the KubeRay version in cluster.kuberayVersion does with the values, where an older operator
silently drops or refuses what the chart renders. Read in the KubeRay code at each tag:
- ray-operator/controllers/ray/common/service.go, BuildServeService: up to v1.5.2, when the head
  container has a port named `serve` (this chart always adds one), the ports of spec.serveService
  are replaced by that container port, {name: serve, port: 8000}: service.port and service.nodePort
  are lost ("Ignoring user provided ports for serve service"). From v1.6.0 a user port named
  `serve` replaces the detected one, whole.
- ray-operator/apis/ray/v1/rayservice_types.go: upgradeStrategy from v1.3.0,
  rayClusterDeletionDelaySeconds and NewClusterWithIncrementalUpgrade from v1.5.0 (before that the
  API server prunes the unknown field, and v1.3/v1.4 refuse the upgrade type with an event).
Called from vllm-rayservice.validate, after KubeRay's own checks.
*/}}
{{- define "vllm-rayservice.validateKubeRayVersion" -}}
{{- $version := .Values.cluster.kuberayVersion }}
{{- $upgradeKubeRay := "or upgrade the KubeRay operator and set cluster.kuberayVersion to its version" }}
{{- if not (include "vllm-rayservice.kuberayAtLeast" (list . "1.1.0")) }}
{{- fail (printf "cluster.kuberayVersion is %s, but this chart needs KubeRay 1.1.0 or newer (the ray.io/v1 RayService). Upgrade the KubeRay operator and set cluster.kuberayVersion to its version." $version) }}
{{- end }}
{{- if not (include "vllm-rayservice.kuberayAtLeast" (list . "1.6.0")) }}
{{- $servePort := int (include "vllm-rayservice.servePort" .) }}
{{- if ne (int .Values.service.port) $servePort }}
{{- fail (printf "service.port is %d, but KubeRay %s (cluster.kuberayVersion) keeps the serve Service on port %d: before 1.6 it replaces the ports of spec.serveService with the head's serve port. Set service.port to %d, %s (1.6 or newer)." (int .Values.service.port) $version $servePort $servePort $upgradeKubeRay) }}
{{- end }}
{{- if not (kindIs "invalid" .Values.service.nodePort) }}
{{- fail (printf "service.nodePort is %d, but KubeRay %s (cluster.kuberayVersion) drops it: before 1.6 it replaces the ports of spec.serveService with the head's serve port, and Kubernetes picks a random node port. Remove service.nodePort, %s (1.6 or newer)." (int .Values.service.nodePort) $version $upgradeKubeRay) }}
{{- end }}
{{- end }}
{{- if and .Values.cluster.upgradeStrategy (not (include "vllm-rayservice.kuberayAtLeast" (list . "1.3.0"))) }}
{{- fail (printf "cluster.upgradeStrategy is %s, but KubeRay %s (cluster.kuberayVersion) has no upgradeStrategy field: the API server would drop it. Leave cluster.upgradeStrategy empty, %s (1.3 or newer)." .Values.cluster.upgradeStrategy $version $upgradeKubeRay) }}
{{- end }}
{{- if and (eq .Values.cluster.upgradeStrategy "NewClusterWithIncrementalUpgrade") (not (include "vllm-rayservice.kuberayAtLeast" (list . "1.5.0"))) }}
{{- fail (printf "cluster.upgradeStrategy is NewClusterWithIncrementalUpgrade, but KubeRay %s (cluster.kuberayVersion) refuses it (it knows only NewCluster and None). Choose NewCluster, %s (1.7 or newer; 1.5 and 1.6 with their RayServiceIncrementalUpgrade feature gate)." $version $upgradeKubeRay) }}
{{- end }}
{{- if and (not (kindIs "invalid" .Values.cluster.rayClusterDeletionDelaySeconds)) (not (include "vllm-rayservice.kuberayAtLeast" (list . "1.5.0"))) }}
{{- fail (printf "cluster.rayClusterDeletionDelaySeconds is set, but KubeRay %s (cluster.kuberayVersion) has no such field: the API server would drop it. Remove it, %s (1.5 or newer)." $version $upgradeKubeRay) }}
{{- end }}
{{- end }}
