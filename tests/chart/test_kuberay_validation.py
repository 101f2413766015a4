"""KubeRay's own validation of a RayService (ray-operator/controllers/ray/utils/validation.go at
v1.7.0), mirrored at `helm install` time: every rule a value of this chart can reach fails the
render and names the value, instead of a RayService that KubeRay refuses after the install.
The rules and the fields they guard are listed in templates/_validate_kuberay.tpl."""

import pytest

from tools import chart

INCREMENTAL = "NewClusterWithIncrementalUpgrade"

# (values, release name, text the error must contain)
REFUSED_BY_KUBERAY = [
    # ValidateRayServiceMetadata: the name must be a DNS-1035 label (Helm allows more).
    pytest.param({}, "1chat", 'the RayService name "1chat-vllm-rayservice"', id="name-starts-with-a-digit"),
    pytest.param({}, "my.chat", "not a DNS-1035 label", id="name-with-a-dot"),
    pytest.param({"fullnameOverride": "Chat"}, "test", "fullnameOverride", id="upper-case-full-name"),
    # ValidateRayServiceSpec: upgrade strategy, deletion delay, incremental upgrade options.
    pytest.param({"cluster": {"upgradeStrategy": "Recreate"}}, "test", "/cluster/upgradeStrategy",
                 id="unknown-upgrade-type"),
    pytest.param({"cluster": {"rayClusterDeletionDelaySeconds": -1}}, "test", "/cluster/rayClusterDeletionDelaySeconds",
                 id="negative-deletion-delay"),
    pytest.param({"cluster": {"upgradeStrategy": INCREMENTAL}}, "test",
                 "cluster.incrementalUpgrade.gatewayClassName is empty", id="incremental-without-gateway-class"),
    pytest.param({"cluster": {"upgradeStrategy": INCREMENTAL, "incrementalUpgrade": {
        "gatewayClassName": "istio", "stepSizePercent": 50, "maxSurgePercent": 20}}}, "test",
        "stepSizePercent (50) is larger than cluster.incrementalUpgrade.maxSurgePercent (20)", id="step-over-surge"),
    pytest.param({"cluster": {"incrementalUpgrade": {"stepSizePercent": 0}}}, "test",
                 "/cluster/incrementalUpgrade/stepSizePercent", id="zero-step"),
    pytest.param({"cluster": {"incrementalUpgrade": {"stepSizePercent": 101}}}, "test",
                 "/cluster/incrementalUpgrade/stepSizePercent", id="step-over-100"),
    pytest.param({"cluster": {"incrementalUpgrade": {"intervalSeconds": 0}}}, "test",
                 "/cluster/incrementalUpgrade/intervalSeconds", id="zero-interval"),
    pytest.param({"cluster": {"incrementalUpgrade": {"maxSurgePercent": 150}}}, "test",
                 "/cluster/incrementalUpgrade/maxSurgePercent", id="surge-over-100"),
    pytest.param({"cluster": {"incrementalUpgrade": {"maxSurgePercent": -1}}}, "test",
                 "/cluster/incrementalUpgrade/maxSurgePercent", id="negative-surge"),
    pytest.param({"cluster": {"upgradeStrategy": "NewCluster", "incrementalUpgrade": {"gatewayClassName": "istio"}}},
                 "test", "apply only to NewClusterWithIncrementalUpgrade", id="gateway-class-without-incremental"),
    # ValidateRayClusterSpec: replica bounds, idle timeout, rayStartParams labels, GCS fault tolerance.
    pytest.param({"workers": {"minReplicas": -1}}, "test", "/workers/minReplicas", id="negative-min-replicas"),
    pytest.param({"workers": {"maxReplicas": -1}}, "test", "/workers/maxReplicas", id="negative-max-replicas"),
    pytest.param({"workers": {"minReplicas": 3, "maxReplicas": 2}}, "test", "workers.minReplicas (3) is larger",
                 id="min-over-max-replicas"),
    pytest.param({"cluster": {"autoscaler": {"idleTimeoutSeconds": -5}}}, "test",
                 "/cluster/autoscaler/idleTimeoutSeconds", id="negative-idle-timeout"),
    pytest.param({"head": {"rayStartParams": {"labels": "tier=head"}}}, "test", "head.rayStartParams.labels",
                 id="head-ray-start-labels"),
    pytest.param({"workers": {"rayStartParams": {"labels": "tier=gpu"}}}, "test", "workers.rayStartParams.labels",
                 id="worker-ray-start-labels"),
    pytest.param({"head": {"env": [{"name": "RAY_REDIS_ADDRESS", "value": "redis:6379"}]}}, "test",
                 "head.env sets RAY_REDIS_ADDRESS", id="redis-address-without-fault-tolerance-options"),
    pytest.param({"head": {"env": [{"name": "REDIS_USERNAME", "value": "ray"}]}}, "test",
                 "head.env sets REDIS_USERNAME", id="redis-username-env"),
    pytest.param({"head": {"rayStartParams": {"redis-username": "ray"}}}, "test", "head.rayStartParams.redis-username",
                 id="redis-username-param"),
]


@pytest.mark.parametrize("service, named", [
    ({"type": "LoadBalancer"}, "service.type (LoadBalancer) is set"),
    ({"port": 80}, "service.port (80) is set"),
    ({"type": "NodePort", "nodePort": 30080}, "service.type (NodePort), service.nodePort are set"),
    ({"annotations": {"a": "b"}}, "service.annotations is set"),
])
def test_a_serve_service_that_incremental_upgrade_ignores_should_fail(service, named):
    """From 1.5, BuildServeService (common/service.go) skips spec.serveService under
    NewClusterWithIncrementalUpgrade: traffic goes through the Gateway KubeRay makes."""
    with pytest.raises(chart.ChartError) as failure:
        chart.render({"service": service, "cluster": {"kuberayVersion": "1.7.0", "upgradeStrategy": INCREMENTAL,
                                                      "incrementalUpgrade": {"gatewayClassName": "istio"}}})
    assert named in str(failure.value) and "the Gateway test-vllm-rayservice-gateway (port 80)" in str(failure.value)


@pytest.mark.parametrize("values, release, names", REFUSED_BY_KUBERAY)
def test_values_kuberay_would_refuse_should_fail_at_render_time(values, release, names):
    with pytest.raises(chart.ChartError) as failure:
        chart.render(values, release=release)
    assert names in str(failure.value)


def test_the_rules_should_let_a_valid_rayservice_through():
    rendered = chart.render({"cluster": {"kuberayVersion": "1.7.0", "upgradeStrategy": INCREMENTAL, "incrementalUpgrade": {
        "gatewayClassName": "istio", "stepSizePercent": 20, "maxSurgePercent": 20}},
        "head": {"env": [{"name": "RAY_LOG_TO_STDERR", "value": "1"}]}}, release="chat-1")
    assert rendered.rayservice()["metadata"]["name"] == "chat-1-vllm-rayservice"


# What an older operator would drop or refuse, known at render time from cluster.kuberayVersion
# (templates/_validate_kuberay.tpl, validateKubeRayVersion): (values, version, text of the error).
NEEDS_A_NEWER_KUBERAY = [
    pytest.param({"service": {"port": 80}}, "1.5.2", "service.port is 80", id="service-port-before-1.6"),
    pytest.param({"service": {"type": "NodePort", "nodePort": 30080}}, "1.4.2", "service.nodePort is 30080",
                 id="node-port-before-1.6"),
    pytest.param({"cluster": {"upgradeStrategy": "None"}}, "1.2.2", "cluster.upgradeStrategy is None",
                 id="upgrade-strategy-before-1.3"),
    pytest.param({"cluster": {"upgradeStrategy": INCREMENTAL, "incrementalUpgrade": {"gatewayClassName": "istio"}}},
                 "1.4.2", "cluster.upgradeStrategy is NewClusterWithIncrementalUpgrade, but KubeRay 1.4.2",
                 id="incremental-before-1.5"),
    pytest.param({"cluster": {"rayClusterDeletionDelaySeconds": 30}}, "1.4.2",
                 "cluster.rayClusterDeletionDelaySeconds is set, but KubeRay 1.4.2", id="deletion-delay-before-1.5"),
    pytest.param({}, "1.0.0", "cluster.kuberayVersion is 1.0.0, but this chart needs KubeRay 1.1.0 or newer",
                 id="operator-before-1.1"),
]


@pytest.mark.parametrize("values, version, message", NEEDS_A_NEWER_KUBERAY)
def test_values_an_older_kuberay_would_drop_should_fail_naming_the_version(values, version, message):
    values = chart.deep_merge(values, {"cluster": {"kuberayVersion": version}})
    with pytest.raises(chart.ChartError) as failure:
        chart.render(values)
    assert message in str(failure.value)
    if version != "1.0.0":
        assert "set cluster.kuberayVersion to its version" in str(failure.value)


@pytest.mark.parametrize("values, version", [
    ({"service": {"type": "NodePort", "port": 80, "nodePort": 30080}}, "1.6.0"),
    ({"cluster": {"upgradeStrategy": "None"}}, "1.3.0"),
    ({"cluster": {"upgradeStrategy": INCREMENTAL, "incrementalUpgrade": {"gatewayClassName": "istio"}}}, "1.5.0"),
    ({"cluster": {"rayClusterDeletionDelaySeconds": 30}}, "v1.5.0"),
], ids=["ports-from-1.6", "upgrade-strategy-from-1.3", "incremental-from-1.5", "deletion-delay-from-1.5-v-prefix"])
def test_the_same_values_should_render_for_a_kuberay_that_has_them(values, version):
    chart.render(chart.deep_merge(values, {"cluster": {"kuberayVersion": version}}))


@pytest.mark.parametrize("version", ["latest", "1.4", "1.4.2-rc.0", ""])
def test_a_kuberay_version_that_is_not_a_release_should_fail_in_the_schema(version):
    with pytest.raises(chart.ChartError, match="/cluster/kuberayVersion"):
        chart.render({"cluster": {"kuberayVersion": version}})


def test_the_readme_should_install_the_kuberay_version_the_chart_assumes():
    """The default of cluster.kuberayVersion is the operator the README's install command puts in."""
    import re

    default = chart.load_values_files([chart.CHART_DIR / "values.yaml"])["cluster"]["kuberayVersion"]
    readme = "\n".join(path.read_text() for path in [chart.CHART_DIR / "README.md", *(chart.CHART_DIR / "docs").glob("*.md")])
    installed = set(re.findall(r"helm install kuberay-operator kuberay/kuberay-operator --version (\S+)", readme))
    assert installed == {default}
