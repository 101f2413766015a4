"""The serving Service: RayService spec.serveService, which KubeRay creates and keeps pointed at
this release's active cluster (it overwrites any selector with that cluster's own labels)."""

import pytest

from tools import chart


def _service(rendered):
    return rendered.rayservice()["spec"]["serveService"]


class TestServeService:
    def test_should_default_to_cluster_ip_on_port_8000(self, render):
        service = _service(render())
        assert service["spec"]["type"] == "ClusterIP"
        assert service["spec"]["ports"] == [{"name": "serve", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]

    @pytest.mark.parametrize("service_type", ["ClusterIP", "NodePort", "LoadBalancer"])
    def test_should_follow_the_service_type(self, render, service_type):
        assert _service(render({"service": {"type": service_type}}))["spec"]["type"] == service_type

    def test_should_expose_the_port_from_values_on_the_serve_port_with_kuberay_1_6_or_newer(self, render):
        [port] = _service(render({"service": {"port": 80}, "cluster": {"kuberayVersion": "1.6.0"}}))["spec"]["ports"]
        # KubeRay >= 1.6 keeps a user port whose name is "serve", whole; the target is Serve's port.
        assert (port["name"], port["port"], port["targetPort"]) == ("serve", 80, 8000)

    @pytest.mark.parametrize("kuberay", ["1.1.0", "1.4.2", "1.5.2"])
    @pytest.mark.parametrize("service, key", [({"port": 80}, "service.port is 80"),
                                              ({"type": "NodePort", "nodePort": 30080}, "service.nodePort is 30080")])
    def test_should_refuse_a_port_kuberay_before_1_6_would_drop(self, render, kuberay, service, key):
        """Up to v1.5, KubeRay's BuildServeService (common/service.go) replaces the ports of
        spec.serveService with the head's `serve` container port, {serve: 8000}: clients and the
        smoke test would call a port the Service does not have."""
        with pytest.raises(chart.ChartError) as failure:
            render({"service": service, "cluster": {"kuberayVersion": kuberay}})
        assert key in str(failure.value) and f"KubeRay {kuberay} (cluster.kuberayVersion)" in str(failure.value)
        assert "Set service.port to 8000" in str(failure.value) or "Remove service.nodePort" in str(failure.value)

    def test_should_pass_a_load_balancer_setup_through(self, render):
        service = _service(render({"cluster": {"kuberayVersion": "1.7.0"}, "service": {
            "type": "LoadBalancer", "annotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"},
            "loadBalancerSourceRanges": ["10.0.0.0/8"], "nodePort": 30080}}))
        assert service["metadata"]["annotations"] == {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"}
        assert service["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"]
        assert service["spec"]["ports"][0]["nodePort"] == 30080

    def test_should_select_nothing_itself_so_kuberay_selects_only_this_release(self, render):
        # A hand-written selector such as ray.io/node-type=head would catch every Ray head in the
        # namespace, old clusters too. KubeRay sets ray.io/cluster=<active cluster> instead.
        assert "selector" not in _service(render())["spec"]

    def test_should_render_no_separate_service_object(self, render):
        assert render().of_kind("Service") == []

    def test_head_should_name_its_serve_port_so_kuberay_finds_it(self, render):
        [head] = render().rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
        assert {"name": "serve", "containerPort": 8000, "protocol": "TCP"} in head["ports"]
        assert all(port.get("protocol") == "TCP" for port in head["ports"])
