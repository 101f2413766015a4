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
{{- if gt (int $incremental.stepSizePercent) (int $incremental.maxSurgePercent) }}
{{- fail (printf "cluster.incrementalUpgrade.stepSizePercent (%d) is larger than cluster.incrementalUpgrade.maxSurgePercent (%d): KubeRay rejects that RayService. Lower stepSizePercent or raise maxSurgePercent." (int $incremental.stepSizePercent) (int $incremental.maxSurgePercent)) }}
{{- end }}
{{- else if $incremental.gatewayClassName }}
{{- fail (printf "cluster.incrementalUpgrade.gatewayClassName is set, but cluster.upgradeStrategy is %q: the incremental upgrade options apply only to NewClusterWithIncrementalUpgrade. Set that strategy, or drop the gateway class." .Values.cluster.upgradeStrategy) }}
{{- end }}
{{- end }}
