"""`helm test`: a hook Pod that runs files/smoke_test.py against the serving Service; and NOTES.txt."""

from tools import chart, cluster

INCREMENTAL = {"cluster": {"kuberayVersion": "1.7.0", "upgradeStrategy": "NewClusterWithIncrementalUpgrade",
                           "incrementalUpgrade": {"gatewayClassName": "istio"}}}


def _pod(rendered):
    return rendered.one("Pod")


class TestSmokeTestHook:
    def test_should_be_a_helm_test_hook(self, render):
        annotations = _pod(render())["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "test"
        assert _pod(render())["spec"]["restartPolicy"] == "Never"

    def test_should_be_deleted_when_it_passes_and_replaced_on_the_next_run(self, render):
        """Helm 4 deletes a test hook only under hook-succeeded, and uninstall never deletes hooks:
        without it every passing `helm test` leaves its pod behind."""
        policies = _pod(render())["metadata"]["annotations"]["helm.sh/hook-delete-policy"].split(",")
        assert set(policies) == {"before-hook-creation", "hook-succeeded"}

    def test_should_call_this_releases_service_with_the_served_model(self, render):
        rendered = render({"model": {"servedName": "chat"}, "service": {"port": 80}, "cluster": {"kuberayVersion": "1.6.0"}},
                          release="rel", namespace="llm")
        env = {e["name"]: e.get("value") for e in _pod(rendered)["spec"]["containers"][0]["env"]}
        service = rendered.rayservice()["spec"]["serveService"]["metadata"]["name"]
        assert env["SMOKE_TEST_URL"] == f"http://{service}.llm.svc:80"
        assert env["SMOKE_TEST_MODEL"] == "chat"

    def test_under_incremental_upgrade_should_call_the_head_service_which_exists_in_that_mode(self, render):
        """KubeRay (v1.7 common/service.go BuildServeService) ignores spec.serveService then, so
        <name>-serve-svc never exists; its head Service does and carries the serve port."""
        rendered = render(INCREMENTAL, release="rel", namespace="llm")
        env = {e["name"]: e.get("value") for e in _pod(rendered)["spec"]["containers"][0]["env"]}
        assert env["SMOKE_TEST_URL"] == "http://rel-vllm-rayservice-head-svc.llm.svc:8000"
        assert cluster.serving_service_name(rendered.rayservice()) == "rel-vllm-rayservice-head-svc"
        assert rendered.serve_config()["http_options"]["port"] == 8000

    def test_should_run_the_shipped_script_from_the_configmap(self, render):
        rendered = render()
        pod = _pod(rendered)
        assert pod["spec"]["containers"][0]["command"] == ["python3", "/smoke-test/smoke_test.py"]
        [volume] = pod["spec"]["volumes"]
        assert volume["configMap"]["name"] == rendered.one("ConfigMap")["metadata"]["name"]
        assert volume["configMap"]["items"] == [{"key": "smoke_test.py", "path": "smoke_test.py"}]

    def test_should_use_a_small_image_from_values(self, render):
        assert _pod(render({"smokeTest": {"image": "python:3.13-alpine"}}))["spec"]["containers"][0]["image"] == \
            "python:3.13-alpine"

    def test_should_get_the_api_key_to_check_auth_when_one_is_set(self, render):
        env = _pod(render({"serving": {"apiKey": {"existingSecret": "keys", "key": "k"}}}))["spec"]["containers"][0]["env"]
        [key] = [e for e in env if e["name"] == "SMOKE_TEST_API_KEY"]
        assert key["valueFrom"]["secretKeyRef"] == {"name": "keys", "key": "k"}

    def test_should_not_check_auth_without_a_key(self, render):
        env = _pod(render())["spec"]["containers"][0]["env"]
        assert all(e["name"] != "SMOKE_TEST_API_KEY" for e in env)


class TestNotes:
    """NOTES.txt; `helm template` does not render it, so these use the Helm engine's Python binding."""

    @staticmethod
    def _notes(values=None, **kwargs):
        return chart.render(values, engine="python", **kwargs).notes

    def test_should_show_how_to_reach_the_endpoint_for_each_service_type(self):
        assert "port-forward svc/test-vllm-rayservice-serve-svc 8000:8000" in self._notes()
        assert "loadBalancer.ingress" in self._notes({"service": {"type": "LoadBalancer"}})
        assert "nodePort" in self._notes({"service": {"type": "NodePort"}})

    def test_under_incremental_upgrade_should_show_the_gateway_kuberay_makes(self):
        notes = self._notes(INCREMENTAL)
        assert "get gateway test-vllm-rayservice-gateway" in notes and "(port 80)" in notes
        assert "serve-svc" not in notes and "test-vllm-rayservice-head-svc" in notes

    def test_should_show_a_curl_and_helm_test(self):
        notes = self._notes({"serving": {"apiKey": {"value": "k"}}})
        assert "curl $URL/v1/chat/completions" in notes and "Authorization: Bearer" in notes
        assert "helm test test" in notes

    def test_should_say_what_an_upgrade_does_only_on_upgrade(self):
        assert "What this upgrade does" not in self._notes()
        notes = self._notes(upgrade=True)
        assert "What this upgrade does" in notes
        assert "second Ray cluster" in notes and "in place" in notes
        assert "KubeRay updates the serve Service only when it switches to a new" in notes
        assert "workers.minReplicas / workers.maxReplicas: KubeRay ignores these" in notes

    def test_should_warn_that_kuberay_1_1_rebuilds_the_cluster_for_worker_bounds(self):
        """KubeRay 1.1's change hash leaves out only replicas and workersToDelete."""
        notes = self._notes({"cluster": {"kuberayVersion": "1.1.1"}}, upgrade=True)
        assert "workers.minReplicas / workers.maxReplicas: KubeRay 1.1.1 builds a whole new Ray" in notes
