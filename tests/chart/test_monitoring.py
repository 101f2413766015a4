"""templates/podmonitor.yaml: Prometheus scrapes this release's Ray pods, and no other pods."""

from tools import chart

ALL_ON = {"monitoring": {"podMonitor": {"enabled": True}}}


def _ray_pod_templates(rendered):
    cluster = rendered.rayservice()["spec"]["rayClusterConfig"]
    return [("head", "headgroup", cluster["headGroupSpec"]["template"])] + [
        ("worker", group["groupName"], group["template"]) for group in cluster["workerGroupSpecs"]]


def _pod_labels_as_kuberay_makes_them(node_type, group, template, cluster="test-vllm-rayservice-abcde"):
    """A Ray pod's labels: KubeRay's own, then the template's, which win except for these three
    (labelPod in KubeRay's ray-operator/controllers/ray/common/pod.go)."""
    labels = {"ray.io/is-ray-node": "yes", "ray.io/identifier": f"{cluster}-{node_type}",
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    labels.update(template["metadata"]["labels"])
    labels.update({"ray.io/node-type": node_type, "ray.io/group": group, "ray.io/cluster": cluster})
    return labels


def _selects(selector, labels):
    """A Kubernetes label selector, as the Prometheus Operator applies it to pods."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


class TestOffByDefault:
    def test_should_render_no_pod_monitor_by_default(self, render):
        assert render().of_kind("PodMonitor") == []

    def test_should_add_only_a_pod_monitor(self, render):
        before = [obj["kind"] for obj in render().objects]
        after = [obj["kind"] for obj in render(ALL_ON).objects]
        assert sorted(after) == sorted(before + ["PodMonitor"])


class TestPodMonitor:
    def test_should_scrape_the_metrics_port_kuberay_adds_to_every_ray_container(self, render):
        [endpoint] = render(ALL_ON).one("PodMonitor")["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == "metrics"
        assert endpoint["interval"] == "30s"

    def test_should_select_this_releases_head_and_worker_pods(self, render):
        rendered = render(chart.deep_merge(ALL_ON, {"head": {"podLabels": {"team": "ml"}}}))
        selector = rendered.one("PodMonitor")["spec"]["selector"]
        templates = _ray_pod_templates(rendered)
        assert {node_type for node_type, _, _ in templates} == {"head", "worker"}
        for node_type, group, template in templates:
            assert _selects(selector, template["metadata"]["labels"]), node_type
            assert _selects(selector, _pod_labels_as_kuberay_makes_them(node_type, group, template)), node_type

    def test_should_not_select_another_releases_pods(self):
        ours = chart.render(ALL_ON, release="chat").one("PodMonitor")["spec"]["selector"]
        theirs = chart.render(ALL_ON, release="other")
        for node_type, group, template in _ray_pod_templates(theirs):
            labels = _pod_labels_as_kuberay_makes_them(node_type, group, template, cluster="other-vllm-rayservice-xyz12")
            assert not _selects(ours, labels), node_type

    def test_should_not_select_the_smoke_test_pod(self, render):
        rendered = render(ALL_ON)
        [pod] = rendered.of_kind("Pod")
        assert not _selects(rendered.one("PodMonitor")["spec"]["selector"], pod["metadata"]["labels"])

    def test_should_take_interval_labels_and_relabelings_from_values(self, render):
        relabeling = {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"], "targetLabel": "ray_io_cluster"}
        dropping = {"sourceLabels": ["__name__"], "regex": "ray_tasks", "action": "drop"}
        rendered = render(chart.deep_merge(ALL_ON, {"monitoring": {"podMonitor": {
            "interval": "1m", "labels": {"release": "monitoring"},
            "relabelings": [relabeling], "metricRelabelings": [dropping]}}}))
        pod_monitor = rendered.one("PodMonitor")
        assert pod_monitor["metadata"]["labels"]["release"] == "monitoring"
        assert pod_monitor["metadata"]["labels"]["app.kubernetes.io/instance"] == "test"
        [endpoint] = pod_monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["interval"] == "1m"
        assert endpoint["relabelings"] == [relabeling]
        assert endpoint["metricRelabelings"] == [dropping]

    def test_an_empty_interval_should_leave_it_to_prometheus(self, render):
        rendered = render(chart.deep_merge(ALL_ON, {"monitoring": {"podMonitor": {"interval": ""}}}))
        [endpoint] = rendered.one("PodMonitor")["spec"]["podMetricsEndpoints"]
        assert "interval" not in endpoint and "relabelings" not in endpoint
