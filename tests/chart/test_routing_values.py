"""serving.routing: the values reach the app contract (args.serving.routing), HAProxy gets the body
and the session header on every Ray pod whatever the mode (so switching modes never changes the
pods), and impossible settings fail at render time naming the key. What the router does is tested
in units (tests/app/test_routing_units.py) and live (tests/app/test_routing.py)."""

import sys
from pathlib import Path

import pytest

from tools import chart

REPO = Path(__file__).resolve().parents[2]


def _routing(**values):
    return {"serving": {"routing": values}}


def _args(rendered):
    return rendered.serve_config()["applications"][0]["args"]


def _env(rendered):
    cluster = rendered.rayservice()["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"]["template"]["spec"]] + [group["template"]["spec"]
                                                             for group in cluster["workerGroupSpecs"]]
    return [{e["name"]: e.get("value") for e in spec["containers"][0]["env"]} for spec in specs]


class TestDefaults:
    def test_should_default_to_leastconn(self, render):
        routing = _args(render({}))["serving"]["routing"]
        assert routing["mode"] == "leastconn"

    def test_should_be_a_valid_app_contract(self, render):
        sys.path.insert(0, str(REPO / "files"))
        try:
            import vllm_app_routing
        finally:
            sys.path.remove(str(REPO / "files"))
        for mode in ("leastconn", "session", "prefix"):
            args = _args(render(_routing(mode=mode, maxImbalance=2, prefixMinMatchChars=1024)))["serving"]["routing"]
            parsed = vllm_app_routing.RoutingArgs.model_validate(args)
            assert (parsed.mode, parsed.max_imbalance, parsed.prefix_min_match_chars) == (mode, 2, 1024)


class TestPods:
    def test_should_give_haproxy_the_body_and_the_session_header_on_every_pod(self, render):
        for env in _env(render(_routing(sessionHeader="X-Conversation"))):
            assert env["RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY"] == "1"
            assert env["RAY_SERVE_SESSION_ID_HEADER_KEY"] == "x-conversation"
            assert env["RAY_SERVE_INGRESS_ROUTER_REPLICAS_PER_NODE"] == "2"

    def test_switching_the_mode_should_leave_the_ray_cluster_alone(self, render):
        # A pod-template change makes KubeRay build a second cluster; a mode change must not.
        clusters = [render(_routing(mode=mode)).rayservice()["spec"]["rayClusterConfig"]
                    for mode in ("leastconn", "session", "prefix")]
        assert clusters[0] == clusters[1] == clusters[2]

    def test_should_not_set_router_variables_behind_the_python_proxy(self, render):
        for env in _env(render({"serving": {"ingress": "proxy"}})):
            assert "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY" not in env


class TestValidation:
    def test_should_refuse_a_routed_mode_behind_the_python_proxy(self, render):
        with pytest.raises(chart.ChartError, match="serving.routing.mode is prefix, which needs serving.ingress: haproxy"):
            render({"serving": {"ingress": "proxy", "routing": {"mode": "prefix"}}})

    def test_should_refuse_a_minimum_match_below_one_block(self, render):
        with pytest.raises(chart.ChartError, match="prefixMinMatchChars"):
            render(_routing(mode="prefix", prefixBlockChars=256, prefixMinMatchChars=128))

    @pytest.mark.parametrize("values, key", [
        ({"mode": "random"}, "mode"),
        ({"maxImbalance": -1}, "maxImbalance"),
        ({"routerReplicasPerNode": 0}, "routerReplicasPerNode"),
        ({"sessionHeader": "bad header"}, "sessionHeader"),
        ({"minMatch": 3}, "minMatch"),
    ])
    def test_should_refuse_bad_values_naming_the_key(self, render, values, key):
        with pytest.raises(chart.ChartError, match=key):
            render(_routing(**values))
