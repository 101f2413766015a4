"""Bad values fail at `helm install` time, and the message names the key to fix."""

import pytest

from tools import chart

# (values, text the error must contain: the key, and where useful what to do)
BAD_VALUES = [
    pytest.param({"modle": {"id": "x"}}, "modle", id="typo-top-level-key"),
    pytest.param({"model": {"idd": "x"}}, "idd", id="typo-nested-key"),
    pytest.param({"workers": {"gpu": 1}}, "gpu", id="typo-workers-gpu"),
    pytest.param({"model": {"id": ""}}, "/model/id", id="empty-model-id"),
    pytest.param({"workers": {"gpus": -1}}, "/workers/gpus", id="negative-gpus"),
    pytest.param({"workers": {"gpus": "one"}}, "/workers/gpus", id="gpus-not-a-number"),
    pytest.param({"engine": {"maxModelLen": "2048"}}, "/engine/maxModelLen", id="context-as-string"),
    pytest.param({"engine": {"gpuMemoryUtilization": 1.5}}, "/engine/gpuMemoryUtilization", id="gpu-memory-over-1"),
    pytest.param({"engine": {"dtype": "fp8"}}, "/engine/dtype", id="unknown-dtype"),
    pytest.param({"engine": {"tensorParallelSize": 0}}, "/engine/tensorParallelSize", id="zero-tensor-parallel"),
    pytest.param({"service": {"type": "Ingress"}}, "/service/type", id="unknown-service-type"),
    pytest.param({"service": {"port": 70000}}, "/service/port", id="port-out-of-range"),
    pytest.param({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", id="unknown-pull-policy"),
    pytest.param({"cluster": {"upgradeStrategy": "BlueGreen"}}, "/cluster/upgradeStrategy", id="unknown-upgrade-strategy"),
    pytest.param({"serving": {"replicas": -1}}, "/serving/replicas", id="negative-replicas"),
    pytest.param({"serving": {"maxQueuedRequests": -5}}, "/serving/maxQueuedRequests", id="queue-below-minus-one"),
    pytest.param({"serving": {"healthCheck": {"periodSeconds": 0}}}, "/serving/healthCheck/periodSeconds",
                 id="health-check-period-zero"),
    pytest.param({"serving": {"healthCheck": {"periodSecond": 5}}}, "/serving/healthCheck",
                 id="health-check-typo"),
    pytest.param({"workers": {"tolerations": [{"key": "x", "operatr": "Exists"}]}}, "operatr", id="typo-in-toleration"),
    pytest.param({"workers": {"resources": {"limit": {"cpu": "1"}}}}, "limit", id="typo-resources-limits"),
    pytest.param({"workers": {"resources": {"limits": {"memory": "eight gigs"}}}}, "/workers/resources/limits/memory",
                 id="bad-quantity"),
    pytest.param({"workers": {"groupName": "GPU_Workers"}}, "/workers/groupName", id="group-name-not-dns"),
    pytest.param({"fullnameOverride": "x" * 60}, "/fullnameOverride", id="fullname-over-kuberay-limit"),
    pytest.param({"monitoring": {"podMonitor": {"intervall": "30s"}}}, "intervall", id="typo-pod-monitor-key"),
    pytest.param({"monitoring": {"podMonitor": {"interval": "30"}}}, "/monitoring/podMonitor/interval",
                 id="interval-without-unit"),
    pytest.param({"monitoring": {"podMonitor": {"relabelings": [{"sourcelabels": ["__name__"]}]}}}, "sourcelabels",
                 id="typo-in-relabeling"),
    pytest.param({"monitoring": {"podMonitor": {"metricRelabelings": [{"action": "rename"}]}}},
                 "/monitoring/podMonitor/metricRelabelings/0/action", id="unknown-relabel-action"),
    pytest.param({"monitoring": {"dashboards": {"label": "grafana dashboard"}}}, "/monitoring/dashboards/label",
                 id="dashboard-label-not-a-label-name"),
    pytest.param({"monitoring": {"prometheusRule": {"errorRatio": {"threshold": 5}}}},
                 "/monitoring/prometheusRule/errorRatio/threshold", id="error-ratio-as-percent"),
    pytest.param({"monitoring": {"prometheusRule": {"kvCache": {"threshold": 90}}}},
                 "/monitoring/prometheusRule/kvCache/threshold", id="kv-cache-threshold-as-percent"),
    pytest.param({"monitoring": {"prometheusRule": {"kvCache": {"threshold": 0}}}},
                 "/monitoring/prometheusRule/kvCache/threshold", id="zero-kv-cache-threshold"),
    pytest.param({"monitoring": {"prometheusRule": {"timeToFirstToken": {"thresholdSeconds": 0}}}},
                 "/monitoring/prometheusRule/timeToFirstToken/thresholdSeconds", id="zero-first-token-threshold"),
    pytest.param({"monitoring": {"prometheusRule": {"errorRatio": {"for": "10 minutes"}}}},
                 "/monitoring/prometheusRule/errorRatio/for", id="alert-for-not-a-duration"),
    pytest.param({"monitoring": {"prometheusRule": {"noHealthyReplica": {"for": ""}}}},
                 "/monitoring/prometheusRule/noHealthyReplica/for", id="empty-alert-for"),
    pytest.param({"monitoring": {"prometheusRule": {"noHealthyReplica": {"severity": ""}}}},
                 "/monitoring/prometheusRule/noHealthyReplica/severity", id="empty-severity"),
    # Rules across keys (templates/_validate.tpl): the message says what to change.
    pytest.param({"engine": {"tensorParallelSize": 2}}, "Raise workers.gpus to at least 2", id="tp-larger-than-gpus"),
    pytest.param({"engine": {"tensorParallelSize": 2, "pipelineParallelSize": 2}, "workers": {"gpus": 2}},
                 "engine.tensorParallelSize x engine.pipelineParallelSize = 4", id="tp-times-pp-larger-than-gpus"),
    pytest.param({"engine": {"tensorParallelSize": 2}, "workers": {"gpus": 0}}, "workers.gpus is 0", id="tp-on-cpu"),
    pytest.param({"serving": {"replicas": 5}}, "Raise workers.maxReplicas to at least 5", id="replicas-beyond-workers"),
    pytest.param({"serving": {"autoscaling": {"enabled": True, "maxReplicas": 9}}},
                 "serving.autoscaling.maxReplicas = 9", id="autoscaling-beyond-workers"),
    pytest.param({"serving": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 2}}},
                 "serving.autoscaling.minReplicas (3) is larger", id="autoscaling-min-over-max"),
    pytest.param({"workers": {"minReplicas": 5, "maxReplicas": 4}}, "workers.minReplicas (5)", id="workers-min-over-max"),
    pytest.param({"workers": {"gpus": 4}, "serving": {"replicas": 9}}, "need 5 worker pods (2 per pod)",
                 id="replicas-beyond-workers-by-cpus-not-gpus"),
    pytest.param({"serving": {"replicaCpus": 3}}, "Ray counts only 2 CPUs on a worker pod",
                 id="replica-cpus-beyond-a-gpu-worker"),
    pytest.param({"openai": {"toolCallParsr": "hermes"}}, "toolCallParsr", id="typo-openai-key"),
    pytest.param({"openai": {"chatTemplateContentFormat": "markdown"}}, "/openai/chatTemplateContentFormat",
                 id="unknown-content-format"),
    pytest.param({"openai": {"enableAutoToolChoice": True}}, "Set openai.toolCallParser", id="auto-tools-without-parser"),
    pytest.param({"openai": {"extraArgs": {"api_key": "k"}}}, "set serving.apiKey", id="api-key-in-frontend-args"),
    pytest.param({"openai": {"extraArgs": {"enable_request_id_headers": True}}},
                 "openai.extraArgs.enable_request_id_headers", id="owned-frontend-arg"),
    pytest.param({"serving": {"apiKey": {"existingSecret": "s", "value": "k"}}}, "serving.apiKey.existingSecret",
                 id="two-api-key-sources"),
    pytest.param({"model": {"cache": {"existingClaim": "c"}}}, "model.cache.enabled", id="claim-without-cache"),
    pytest.param({"service": {"loadBalancerSourceRanges": ["10.0.0.0/8"]}}, "service.loadBalancerSourceRanges",
                 id="source-ranges-without-load-balancer"),
    pytest.param({"service": {"nodePort": 30000}}, "service.nodePort", id="node-port-on-cluster-ip"),
    pytest.param({"workers": {"gpus": 0}, "serving": {"replicaCpus": 0.5}}, "serving.replicaCpus is 0.5",
                 id="fractional-replica-cpus-on-cpu-workers"),
    pytest.param({"workers": {"gpus": 0}, "serving": {"replicaCpus": 0}}, "Set serving.replicaCpus to 1",
                 id="zero-replica-cpus-on-cpu-workers"),
    pytest.param({"workers": {"gpus": 0, "rayStartParams": {"num-cpus": "4"}}}, "workers.rayStartParams.num-cpus",
                 id="num-cpus-override-on-cpu-workers"),
    pytest.param({"workers": {"rayStartParams": {"num-gpus": "2"}}}, "workers.rayStartParams.num-gpus",
                 id="num-gpus-override"),
    pytest.param({"monitoring": {"prometheusRule": {"enabled": True}}}, "Set monitoring.podMonitor.enabled=true",
                 id="alerts-without-pod-monitor"),
    pytest.param({"serving": {"maxOngoingRequests": 32, "maxQueuedRequests": 16}},
                 "Set serving.maxQueuedRequests to -1 or at least 32", id="queue-shorter-than-a-burst-under-haproxy"),
    pytest.param({"serving": {"maxQueuedRequests": 0, "ingress": "proxy"}}, "/serving/maxQueuedRequests",
                 id="zero-queue-that-serve-refuses"),
]


@pytest.mark.parametrize("values, names", BAD_VALUES)
def test_bad_values_should_fail_with_the_key_named(values, names):
    with pytest.raises(chart.ChartError) as failure:
        chart.render(values)
    assert names in str(failure.value)


def test_set_syntax_should_be_validated_too():
    with pytest.raises(chart.ChartError, match="/serving/replicas"):
        chart.render(set_values=["serving.replicas=many"])


def test_values_from_set_should_scale_like_values_files():
    rendered = chart.render(set_values=["serving.replicas=3"])
    assert rendered.serve_config()["applications"][0]["deployments"][0]["num_replicas"] == 3


@pytest.mark.parametrize("serving", [
    {"maxOngoingRequests": 32, "maxQueuedRequests": 32},
    {"maxOngoingRequests": 32, "maxQueuedRequests": -1},
    {"maxOngoingRequests": 32, "maxQueuedRequests": 1, "ingress": "proxy"},  # the proxy queues at its router
])
def test_a_queue_that_holds_a_burst_or_the_python_proxy_should_render(serving):
    [app] = chart.render({"serving": serving}).serve_config()["applications"]
    assert app["deployments"][0]["max_queued_requests"] == serving["maxQueuedRequests"]
