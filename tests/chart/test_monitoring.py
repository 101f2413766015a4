"""Monitoring, all optional: templates/podmonitor.yaml (what Prometheus scrapes), the dashboard
ConfigMaps in templates/configmap.yaml (what Grafana shows) and templates/prometheusrule.yaml (what
pages someone). Their PromQL comes from tools/monitoring.py, the one place a live test reads too."""

import json
import re
from pathlib import Path

import pytest

from tools import chart, monitoring

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_FILES = sorted((REPO / "files" / "dashboards").glob("*.json"))
ALL_ON = monitoring.ALL_ON
JOB = 'job="default/test-vllm-rayservice"'

# The names measured on the real app's metrics port (Ray, Serve, vLLM through Ray, the app's own).
# A live test requires each name the dashboards and alerts use, so they may use no other.
_HISTOGRAMS = ["ray_vllm_time_to_first_token_seconds", "ray_vllm_inter_token_latency_seconds",
               "ray_vllm_request_time_per_output_token_seconds", "ray_vllm_e2e_request_latency_seconds",
               "ray_vllm_request_queue_time_seconds", "ray_vllm_request_prefill_time_seconds",
               "ray_vllm_request_decode_time_seconds", "ray_vllm_request_prompt_tokens",
               "ray_vllm_request_generation_tokens", "ray_serve_http_request_latency_ms",
               "ray_serve_deployment_processing_latency_ms"]
MEASURED = {f"{name}_{suffix}" for name in _HISTOGRAMS for suffix in ("bucket", "count", "sum")} | {
    "ray_vllm_prompt_tokens_total", "ray_vllm_generation_tokens_total", "ray_vllm_num_requests_running",
    "ray_vllm_num_requests_waiting", "ray_vllm_kv_cache_usage_perc", "ray_vllm_prefix_cache_queries_total",
    "ray_vllm_prefix_cache_hits_total", "ray_vllm_request_success_total",
    "ray_serve_num_http_requests_total", "ray_serve_deployment_replica_healthy",
    "ray_serve_deployment_request_counter_total", "ray_serve_num_ongoing_http_requests",
    "ray_serve_replica_processing_queries", "ray_serve_deployment_queued_queries",
    "ray_serve_application_status", "ray_serve_deployment_status",
    "ray_vllm_rayservice_requests_total", "ray_vllm_rayservice_prompt_tokens_total",
    "ray_vllm_rayservice_completion_tokens_total", "ray_vllm_rayservice_throttled_requests_total",
    "ray_vllm_rayservice_quota_remaining"}


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


def _selectors_without_the_job(expr):
    """Every metric a PromQL expression selects must carry the job matcher, or it mixes releases."""
    return [name for name in monitoring.names_in(expr)
            for match in re.finditer(rf"\b{name}\b(\{{[^}}]*\}})?", expr) if JOB not in (match.group(1) or "")]


def _dashboard_config_maps(rendered):
    return [cm for cm in rendered.of_kind("ConfigMap") if any(key.endswith(".json") for key in cm["data"])]


def _alerts(rendered):
    [group] = rendered.one("PrometheusRule")["spec"]["groups"]
    return {rule["alert"]: rule for rule in group["rules"]}


class TestOffByDefault:
    def test_should_render_no_monitoring_object_by_default(self, render):
        rendered = render()
        assert not rendered.of_kind("PodMonitor") and not rendered.of_kind("PrometheusRule")
        assert _dashboard_config_maps(rendered) == []

    @pytest.mark.parametrize("switch, kind", [("podMonitor", "PodMonitor"), ("dashboards", "ConfigMap")])
    def test_each_switch_should_add_only_its_own_objects(self, render, switch, kind):
        before = [obj["kind"] for obj in render().objects]
        after = [obj["kind"] for obj in render({"monitoring": {switch: {"enabled": True}}}).objects]
        added = list(after)
        for existing in before:
            added.remove(existing)
        assert added and set(added) == {kind}

    def test_alerts_should_add_only_a_prometheus_rule(self, render):
        with_scrape = {"monitoring": {"podMonitor": {"enabled": True}}}
        before = render(with_scrape).objects
        after = render(chart.deep_merge(with_scrape, {"monitoring": {"prometheusRule": {"enabled": True}}})).objects
        assert [obj["kind"] for obj in after if obj not in before] == ["PrometheusRule"]


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

    def test_its_name_should_make_the_job_label_the_alerts_and_dashboards_select(self, render):
        rendered = render(ALL_ON, namespace="llm")
        job = f'llm/{rendered.one("PodMonitor")["metadata"]["name"]}'
        for rule in _alerts(rendered).values():
            assert f'job="{job}"' in rule["expr"]
        for dashboard in monitoring.dashboards(rendered).values():
            [variable] = [v for v in dashboard["templating"]["list"] if v["name"] == "job"]
            assert variable["current"]["value"] == job


class TestDashboards:
    def test_the_files_should_be_valid_json_with_unique_panel_ids(self):
        assert {path.name for path in DASHBOARD_FILES} == {"overview.json", "usage-by-key.json"}
        for path in DASHBOARD_FILES:
            dashboard = json.loads(path.read_text())
            ids = [panel["id"] for panel in dashboard["panels"]]
            assert len(ids) == len(set(ids)), path.name

    def test_should_render_one_config_map_per_dashboard(self, render):
        config_maps = _dashboard_config_maps(render(ALL_ON))
        assert sorted(key for cm in config_maps for key in cm["data"]) == [path.name for path in DASHBOARD_FILES]
        assert all(len(cm["data"]) == 1 for cm in config_maps)
        assert len({cm["metadata"]["name"] for cm in config_maps}) == len(DASHBOARD_FILES)

    def test_each_config_map_should_stay_far_below_the_1_mib_object_limit(self, render):
        for config_map in _dashboard_config_maps(render(ALL_ON)):
            assert len(json.dumps(config_map).encode()) < 1024 * 1024 // 4, config_map["metadata"]["name"]

    def test_should_render_the_files_unchanged_but_for_uid_title_and_job(self, render):
        rendered = monitoring.dashboards(render(ALL_ON))
        for path in DASHBOARD_FILES:
            source, result = json.loads(path.read_text()), rendered[path.name]
            assert result["panels"] == source["panels"]
            for board in (source, result):
                board.pop("uid"), board.pop("title")
                [job] = [v for v in board["templating"]["list"] if v["name"] == "job"]
                job.pop("current")
            assert result == source

    def test_every_panel_should_query_the_datasource_variable(self, render):
        for name, dashboard in monitoring.dashboards(render(ALL_ON)).items():
            [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
            assert variable["name"] == "datasource" and variable["query"] == "prometheus"
            for panel in dashboard["panels"]:
                assert panel["datasource"]["uid"] == "${datasource}", (name, panel["title"])
                assert panel["targets"], (name, panel["title"])
                assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), (name, panel["title"])

    def test_should_carry_the_sidecar_label_and_folder_from_values(self, render):
        default = _dashboard_config_maps(render(ALL_ON))
        assert all(cm["metadata"]["labels"]["grafana_dashboard"] == "1" for cm in default)
        assert all("annotations" not in cm["metadata"] for cm in default)
        custom = _dashboard_config_maps(render(chart.deep_merge(ALL_ON, {"monitoring": {"dashboards": {
            "label": "example.com/dashboard", "labelValue": "llm", "folder": "LLM serving",
            "folderAnnotation": "example.com/folder"}}})))
        for config_map in custom:
            assert config_map["metadata"]["labels"]["example.com/dashboard"] == "llm"
            assert "grafana_dashboard" not in config_map["metadata"]["labels"]
            assert config_map["metadata"]["annotations"] == {"example.com/folder": "LLM serving"}

    def test_each_release_should_get_its_own_uids_and_titles(self):
        """Grafana refuses a second dashboard with the same uid, or the same title in a folder."""
        first = monitoring.dashboards(chart.render(ALL_ON, release="chat"))
        second = monitoring.dashboards(chart.render(ALL_ON, release="chat", namespace="staging"))
        boards = list(first.values()) + list(second.values())
        assert len({board["uid"] for board in boards}) == len(boards) == 2 * len(DASHBOARD_FILES)
        assert len({board["title"] for board in boards}) == len(boards)
        assert all(len(board["uid"]) <= 40 for board in boards)  # Grafana's limit
        assert "default/chat-vllm-rayservice" in first["overview.json"]["title"]
        again = monitoring.dashboards(chart.render(ALL_ON, release="chat"))
        assert [b["uid"] for b in again.values()] == [b["uid"] for b in first.values()]  # stable over upgrades

    def test_every_query_should_select_the_chosen_release(self, render):
        for source, expr in monitoring.dashboard_expressions(render(ALL_ON)):
            if "variable $job" not in source:  # the list of releases to choose from
                assert _selectors_without_the_job(expr) == [], source

    def test_serve_request_queries_should_leave_serves_own_health_checks_out(self, render):
        """Serve counts KubeRay's probes of /-/healthz too, with no application: at low traffic they
        would be most of the requests and pull the latency quantiles down."""
        expressions = monitoring.all_expressions()
        for source, expr in expressions:
            for metric in ("ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms_bucket"):
                for selector in re.findall(rf"\b{metric}(\{{[^}}]*\}})?", expr):
                    assert 'application!=""' in selector, source
        assert any("ray_serve_num_http_requests_total" in expr for source, expr in expressions if "alert" in source)

    def test_the_overview_should_show_traffic_latency_throughput_and_capacity(self, render):
        queries = {panel["title"]: " ".join(t["expr"] for t in panel["targets"])
                   for panel in monitoring.dashboards(render(ALL_ON))["overview.json"]["panels"]}
        expected = {
            "Requests by status": ["sum by (status_code)", "ray_serve_num_http_requests_total"],
            "Requests by API key": ["sum by (key)", "ray_vllm_rayservice_requests_total"],
            "Time to first token": ["histogram_quantile(0.5,", "histogram_quantile(0.95,",
                                    "ray_vllm_time_to_first_token_seconds_bucket"],
            "Inter-token latency": ["histogram_quantile(0.5,", "histogram_quantile(0.95,",
                                    "ray_vllm_inter_token_latency_seconds_bucket"],
            "Tokens per second": ["ray_vllm_prompt_tokens_total", "ray_vllm_generation_tokens_total"],
            "Requests in the engines": ["ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting"],
            "KV-cache use by replica": ["ray_vllm_kv_cache_usage_perc"],
            "Healthy replicas": ["ray_serve_deployment_replica_healthy", 'deployment="VLLMServer"'],
        }
        for title, parts in expected.items():
            for part in parts:
                assert part in queries[title], (title, part)

    def test_the_usage_view_should_show_requests_tokens_and_errors_per_key_name(self, render):
        panels = monitoring.dashboards(render(ALL_ON))["usage-by-key.json"]["panels"]
        queries = " ".join(t["expr"] for panel in panels for t in panel["targets"])
        for metric in ("ray_vllm_rayservice_requests_total", "ray_vllm_rayservice_prompt_tokens_total",
                       "ray_vllm_rayservice_completion_tokens_total"):
            assert f"sum by (key) (rate({metric}" in queries
            assert f"sum by (key) (increase({metric}" in queries
        [errors] = [panel for panel in panels if panel["title"] == "Error ratio by API key"]
        assert {t["legendFormat"] for t in errors["targets"]} == {"{{key}} 5xx", "{{key}} 4xx"}
        assert errors["fieldConfig"]["defaults"]["unit"] == "percentunit"

    def test_the_usage_view_should_show_tokens_per_model_or_lora_adapter(self, render):
        panels = monitoring.dashboards(render(ALL_ON))["usage-by-key.json"]["panels"]
        [by_model] = [panel for panel in panels if panel["title"] == "Tokens by model or LoRA adapter"]
        queries = [target["expr"] for target in by_model["targets"]]
        for metric in ("ray_vllm_rayservice_prompt_tokens_total", "ray_vllm_rayservice_completion_tokens_total"):
            assert any(query.startswith(f"sum by (model) (rate({metric}") and 'key=~"$key"' in query
                       for query in queries), queries


class TestAlerts:
    def test_should_alert_on_replicas_errors_first_token_and_kv_cache(self, render):
        alerts = _alerts(render(ALL_ON))
        assert set(alerts) == {"VLLMRayServiceNoHealthyReplica", "VLLMRayServiceHighErrorRatio",
                               "VLLMRayServiceSlowFirstToken", "VLLMRayServiceKVCacheSaturated",
                               "VLLMRayServiceKeyThrottled"}
        for name, rule in alerts.items():
            assert rule["for"] and rule["labels"]["severity"], name
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
            assert _selectors_without_the_job(rule["expr"]) == [], name
        assert alerts["VLLMRayServiceNoHealthyReplica"]["labels"]["severity"] == "critical"
        assert "absent(" in alerts["VLLMRayServiceNoHealthyReplica"]["expr"]
        assert 'status_code=~"5.."' in alerts["VLLMRayServiceHighErrorRatio"]["expr"]
        assert "histogram_quantile(0.95," in alerts["VLLMRayServiceSlowFirstToken"]["expr"]

    def test_should_take_thresholds_durations_and_severities_from_values(self, render):
        alerts = _alerts(render(chart.deep_merge(ALL_ON, {"monitoring": {"prometheusRule": {
            "labels": {"release": "monitoring"},
            "noHealthyReplica": {"for": "30m", "severity": "page"},
            "errorRatio": {"threshold": 0.2, "for": "5m"},
            "timeToFirstToken": {"thresholdSeconds": 1.5, "severity": "info"},
            "kvCache": {"threshold": 0.8, "for": "1h"}}}})))
        assert alerts["VLLMRayServiceNoHealthyReplica"]["for"] == "30m"
        assert alerts["VLLMRayServiceNoHealthyReplica"]["labels"]["severity"] == "page"
        assert alerts["VLLMRayServiceHighErrorRatio"]["expr"].endswith("> 0.2")
        assert alerts["VLLMRayServiceHighErrorRatio"]["for"] == "5m"
        assert alerts["VLLMRayServiceSlowFirstToken"]["expr"].endswith("> 1.5")
        assert alerts["VLLMRayServiceSlowFirstToken"]["labels"]["severity"] == "info"
        assert alerts["VLLMRayServiceKVCacheSaturated"]["expr"].endswith("> 0.8")
        assert alerts["VLLMRayServiceKVCacheSaturated"]["for"] == "1h"
        assert "threshold 0.8" in alerts["VLLMRayServiceKVCacheSaturated"]["annotations"]["description"]

    def test_the_rule_should_carry_the_labels_prometheus_selects_by(self, render):
        rule = render(chart.deep_merge(ALL_ON, {"monitoring": {"prometheusRule": {
            "labels": {"release": "monitoring"}}}})).one("PrometheusRule")
        assert rule["metadata"]["labels"]["release"] == "monitoring"

    def test_alerts_without_the_pod_monitor_should_fail_naming_both_keys(self, render):
        with pytest.raises(chart.ChartError) as failure:
            render({"monitoring": {"prometheusRule": {"enabled": True}}})
        assert "monitoring.prometheusRule.enabled" in str(failure.value)
        assert "Set monitoring.podMonitor.enabled=true" in str(failure.value)


needs_promtool = pytest.mark.skipif(
    monitoring.promtool() is None,
    reason="promtool is not on PATH: install Debian's prometheus package (.ci/run does) to parse the PromQL")


class TestPromQL:
    @needs_promtool
    def test_every_dashboard_query_should_parse(self, render):
        expressions = monitoring.dashboard_expressions(render(ALL_ON))
        assert monitoring.promtool_check(monitoring.as_recording_rules(expressions)) == ""

    @needs_promtool
    def test_the_alert_rules_should_pass_promtool_with_their_annotation_templates(self, render):
        groups = render(ALL_ON).one("PrometheusRule")["spec"]["groups"]
        assert monitoring.promtool_check(groups) == ""

    @needs_promtool
    def test_promtool_should_catch_a_broken_query_and_a_broken_annotation(self):
        broken = monitoring.as_recording_rules([("panel", "sum(rate(ray_vllm_prompt_tokens_total[5m])")])
        assert "parse error" in monitoring.promtool_check(broken)
        alert = [{"name": "g", "rules": [{"alert": "A", "expr": "vector(1)",
                                          "annotations": {"summary": "{{ $value | noSuchFunction }}"}}]}]
        assert "noSuchFunction" in monitoring.promtool_check(alert)

    def test_all_expressions_should_cover_every_query_variable_and_alert(self, render):
        rendered = render(ALL_ON)
        boards = monitoring.dashboards(rendered).values()
        queries = sum(len(panel["targets"]) for board in boards for panel in board["panels"])
        variables = sum(v["type"] == "query" for board in boards for v in board["templating"]["list"])
        expressions = monitoring.all_expressions()
        assert len(expressions) == queries + variables + len(_alerts(rendered))
        assert all("$" not in expr for _, expr in expressions)  # Grafana variables filled in
        assert len({source for source, _ in expressions}) == len(expressions)

    def test_should_use_only_metric_names_measured_on_the_real_app(self):
        names = set(monitoring.metric_names())
        assert names - MEASURED == set()
        assert {"ray_vllm_time_to_first_token_seconds_bucket", "ray_serve_deployment_replica_healthy",
                "ray_vllm_rayservice_completion_tokens_total"} <= names

    @pytest.mark.parametrize("expr, names", [
        ('histogram_quantile(0.95, sum by (le) (rate(a_bucket{job="x", le=~"1.*"}[5m]))) > 1.5e-3',
         {"a_bucket"}),
        ('(sum(rate(a_total{status=~"5.."}[5m])) or 0 * sum(rate(b_total[1h]))) / sum(c)', {"a_total", "b_total", "c"}),
        ('max by (namespace, job, ReplicaId) (kv) > 0.95 or absent(up{job="a/b"})', {"kv", "up"}),
        ("sum(a) without (instance) / on (job) group_left (x) b", {"a", "b"}),
    ])
    def test_metric_names_should_find_metrics_not_functions_labels_or_numbers(self, expr, names):
        assert monitoring.names_in(expr) == names

    def test_should_refuse_a_dashboard_variable_it_cannot_fill(self, render):
        rendered = render(ALL_ON)
        [config_map] = [cm for cm in _dashboard_config_maps(rendered) if "overview.json" in cm["data"]]
        dashboard = json.loads(config_map["data"]["overview.json"])
        dashboard["panels"][0]["targets"][0]["expr"] = "sum(up{pod=~\"$pod\"})"
        config_map["data"]["overview.json"] = json.dumps(dashboard)
        with pytest.raises(ValueError, match=r"unknown variable \$pod"):
            monitoring.dashboard_expressions(rendered)


def test_the_scenario_should_turn_everything_on():
    rendered = chart.render(values_files=[REPO / "ci" / "07-monitoring-values.yaml"])
    assert rendered.one("PodMonitor") and rendered.one("PrometheusRule")
    assert len(_dashboard_config_maps(rendered)) == len(DASHBOARD_FILES)


def test_the_readme_should_list_the_metric_names_in_use():
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Metric names", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    assert section.split() == monitoring.metric_names(), "README's metric names are stale: python -m tools.monitoring --names"
