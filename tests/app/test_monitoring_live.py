"""The chart's dashboards and alerts against real data: a real Prometheus (Debian's package, which
.ci/run installs) scrapes the local app's Ray metrics port, as the chart's PodMonitor makes the
Prometheus Operator scrape each pod, and every dashboard and alert expression is evaluated through
its HTTP API after traffic from this test."""

import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from tests.app.conftest import API_KEY, NAMED_KEYS, THROTTLED_KEY
from tools import monitoring, serve_local

pytestmark = pytest.mark.engine

PROMETHEUS = shutil.which("prometheus")


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    if PROMETHEUS is None:
        pytest.skip("Debian's prometheus package is not installed (.ci/run installs it: apt-get install prometheus)")
    folder = tmp_path_factory.mktemp("prometheus")
    port = serve_local.free_port()
    metrics = httpx.URL(server.metrics_url)
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              # The job name the chart's PodMonitor gets from the Prometheus Operator.
              "scrape_configs": [{"job_name": monitoring.SCRAPE_JOB, "metrics_path": metrics.path,
                                  "static_configs": [{"targets": [f"{metrics.host}:{metrics.port}"]}]}]}
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _scraped(url):
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "Prometheus did not scrape the app's metrics port"
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _scraped(url: str) -> bool:
    try:
        targets = httpx.get(url + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return bool(targets) and all(target["health"] == "up" for target in targets)


def query(prometheus: str, expression: str) -> list:
    answer = httpx.get(prometheus + "/api/v1/query", params={"query": expression}, timeout=30).json()
    assert answer["status"] == "success", (expression, answer)
    return answer["data"]["result"]


@pytest.fixture(scope="module")
def traffic(server, prometheus, model_name):
    """Steady traffic for as long as these tests look, as on a live service: every key, streaming and
    not, a repeated prompt (prefix-cache hits), a refusal now and then. (vLLM sets its gauges on each
    engine step, and Ray exports only what was recently updated: an idle engine shows no KV-cache
    series at all, which a dashboard shows as "no data".)"""
    import threading

    headers = [{"Authorization": f"Bearer {key}"} for key in (API_KEY, *NAMED_KEYS.values())]
    prompt = [{"role": "user", "content": "The same long question about rivers, mountains and cities. " * 8}]
    stop, failures = threading.Event(), []

    def send():
        with httpx.Client(base_url=server.url, timeout=120) as http:
            for index in range(100_000):
                if stop.is_set():
                    return
                response = http.post("/v1/chat/completions", headers=headers[index % len(headers)], json={
                    "model": model_name, "messages": prompt, "max_tokens": 8, "ignore_eos": True,
                    "stream": index % 2 == 1})
                if response.status_code != 200:
                    failures.append(response.text[:200])
                if index % 20 == 0:
                    http.post("/v1/chat/completions", json={"model": model_name, "messages": prompt})  # a 401
                    http.post("/v1/chat/completions", json={"model": model_name, "messages": prompt, "max_tokens": 1},
                              headers={"Authorization": f"Bearer {THROTTLED_KEY[1]}"})  # a 429 but the first

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        # Ray's agent exports every few seconds (HAProxy's request counts every 10 s) and Prometheus
        # scrapes every second: wait until the traffic shows in every panel, two minutes at most.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(_has_data(query(prometheus, expression))
                                                      for source, expression in DASHBOARD_QUERIES):
            time.sleep(3)
        yield monitoring.metric_names()
    finally:
        stop.set()
        sender.join(timeout=150)
    assert not failures, failures[:3]


DASHBOARD_QUERIES = [(source, expression) for source, expression in monitoring.all_expressions()
                     if source.startswith("dashboard")]


def _has_data(result: list) -> bool:
    values = [sample["value"][1] for sample in result if "value" in sample]
    return bool(values) and not all(value == "NaN" for value in values)


def test_every_metric_a_panel_or_alert_uses_should_be_scraped(prometheus, traffic):
    missing = [name for name in traffic if not query(prometheus, f'count({name}{{job="{monitoring.SCRAPE_JOB}"}})')]
    assert not missing, f"never exported by the app under traffic: {missing}"


@pytest.mark.parametrize("source, expression", [pytest.param(*query, id=query[0]) for query in DASHBOARD_QUERIES])
def test_every_dashboard_query_should_return_data_after_traffic(prometheus, traffic, source, expression):
    result = query(prometheus, expression)
    assert _has_data(result), f"{source}: no data (or only NaN) for {expression}: {result}"


@pytest.mark.parametrize("source, expression", [
    pytest.param(source, expression, id=source) for source, expression in monitoring.all_expressions()
    if not source.startswith("dashboard")])
def test_alerts_should_evaluate_and_stay_quiet_on_a_healthy_service(prometheus, traffic, source, expression):
    # A healthy replica, no 5xx, a fast tiny model, an idle KV cache: no alert condition holds. The
    # one key this traffic throttles on purpose is the throttled-key alert's own test, below.
    fired = [result for result in query(prometheus, expression) if result["metric"].get("key") != THROTTLED_KEY[0]]
    assert fired == [], f"{source} would fire on a healthy service: {expression}"


def test_the_throttled_key_alert_should_hold_for_the_throttled_key_only(prometheus, traffic):
    [(_, expression)] = [(s, e) for s, e in monitoring.all_expressions() if s == "alert VLLMRayServiceKeyThrottled"]
    # rate() needs two scraped values of the counter that differ: the traffic's second 429 (it sends
    # the throttled key every 20th request). The panels' data, which `traffic` waits for, needs only
    # the first. Seen in CI: one query right after it found nothing.
    deadline, keys = time.monotonic() + 120, set()
    while time.monotonic() < deadline and not keys:
        keys = {result["metric"]["key"] for result in query(prometheus, expression)}
        time.sleep(0 if keys else 3)
    assert keys == {THROTTLED_KEY[0]}


def test_the_ttft_alert_should_fire_when_its_threshold_is_below_what_was_measured(prometheus, traffic):
    rendered = monitoring.chart.render(
        {**monitoring.ALL_ON, "monitoring": {**monitoring.ALL_ON["monitoring"], "prometheusRule": {
            "enabled": True, "timeToFirstToken": {"thresholdSeconds": 1e-6}}}},
        release=monitoring.RELEASE, namespace=monitoring.NAMESPACE)
    rules = [rule for group in rendered.one("PrometheusRule")["spec"]["groups"] for rule in group["rules"]]
    [ttft] = [rule for rule in rules if "time_to_first_token" in rule["expr"]]
    assert query(prometheus, ttft["expr"]), ttft["expr"]
