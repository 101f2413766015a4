"""The local run path (`make serve`): the chart-rendered serveConfigV2, submitted through Ray's
dashboard REST API as KubeRay does, is RUNNING and passes the same smoke test `helm test` runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.app.conftest import API_KEY
from tools import serve_local

pytestmark = pytest.mark.engine
REPO = Path(__file__).resolve().parents[2]


def test_config_submitted_through_the_dashboard_should_be_running(server):
    status = server.status()
    assert status["applications"]["llm"]["status"] == "RUNNING"
    assert status["applications"]["llm"]["deployments"]["VLLMServer"]["status"] == "HEALTHY"


def test_the_submitted_config_should_be_the_charts_own(server):
    # Only the proxy's address differs from what a cluster gets.
    assert server.config["http_options"]["host"] == "127.0.0.1"
    app = next(app for app in server.config["applications"] if app["name"] == "llm")
    assert app["import_path"] == "vllm_app:build_app"
    assert app["runtime_env"]["env_vars"]["VLLM_APP_SHA256"]  # and the replica checked it on start


def _run_smoke_test(**env):
    """files/smoke_test.py as `helm test` runs it, configured by SMOKE_TEST_* variables."""
    return subprocess.run([sys.executable, str(REPO / "files" / "smoke_test.py")], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("with_key", [True, False], ids=["with-key", "without-key"])
def test_the_helm_test_smoke_script_should_pass_against_the_endpoint(server, model_name, with_key):
    key = {"SMOKE_TEST_API_KEY": API_KEY} if with_key else {}
    result = _run_smoke_test(SMOKE_TEST_URL=server.url, SMOKE_TEST_MODEL=model_name, **key)
    if with_key:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ok   json-schema" in result.stdout and "all 5 checks passed" in result.stdout
    else:
        # Without the key the endpoint refuses, and the script says which check failed and why.
        assert result.returncode == 1
        assert "FAIL models" in result.stdout and "401" in result.stdout


def test_the_smoke_script_should_fail_clearly_on_a_wrong_model_name(server):
    result = _run_smoke_test(SMOKE_TEST_URL=server.url, SMOKE_TEST_MODEL="not-served", SMOKE_TEST_API_KEY=API_KEY)
    assert result.returncode == 1
    assert "'not-served' is not among the served models" in result.stdout


def test_the_smoke_script_should_fail_clearly_when_nothing_listens():
    result = _run_smoke_test(SMOKE_TEST_URL="http://127.0.0.1:9", SMOKE_TEST_MODEL="m", SMOKE_TEST_TIMEOUT="5")
    assert result.returncode == 1
    assert "FAIL models" in result.stdout and "did not answer" in result.stdout


def test_local_config_should_need_the_key_in_the_environment_for_an_existing_secret(monkeypatch):
    monkeypatch.delenv(serve_local.API_KEY_ENV, raising=False)
    with pytest.raises(serve_local.LocalServeError, match=serve_local.API_KEY_ENV):
        serve_local.api_key_from({"serving": {"apiKey": {"existingSecret": "keys"}}})


def _session_processes(session_id: int) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.getsid(int(pid)) == session_id:
                    found.append(int(pid))
            except OSError:  # gone meanwhile
                pass
    return found


def test_make_serve_should_serve_then_stop_everything_on_ctrl_c(tiny_model_dir):
    import signal
    import threading
    import time

    import httpx

    port = serve_local.free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tools.serve_local", "--port", str(port), "--dashboard-port", str(serve_local.free_port()),
         "--metrics-port", str(serve_local.free_port())],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output, serving = [], threading.Event()

    def read():
        for line in process.stdout:
            output.append(line)
            if f"on http://127.0.0.1:{port}" in line:
                serving.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert serving.wait(timeout=400), "".join(output[-40:])
        assert any("curl http://127.0.0.1:" in line for line in output)  # it prints a curl to try
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=60)
        assert models.status_code == 200, (models.status_code, models.text, "".join(output[-40:]))
        assert models.json().get("data"), (models.headers, models.text)
        assert models.json()["data"][0]["id"] == "tiny-llama"  # the demo model's plain name, not its path
        assert any("Metrics (Ray, Serve and vLLM's engine" in line for line in output)
        stopping = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert process.wait(timeout=180) == 0, "".join(output[-40:])
        # A user waits for Ctrl-C: it must not take Serve's graceful shutdown (measured 3.7 s; it
        # took over a minute when the stop went through the dashboard's DELETE).
        assert time.monotonic() - stopping < 15, "".join(output[-40:])
        deadline = time.monotonic() + 30
        while _session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(1)
        assert _session_processes(process.pid) == [], "processes outlived make serve"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_vllms_engine_metrics_should_reach_rays_metrics_port(server, http, model_name):
    """vLLM's engine statistics go through Ray's metrics export, as on a pod's metrics port."""
    import time

    import httpx

    answer = http.post("/v1/completions", json={"model": model_name, "prompt": "The river", "max_tokens": 5,
                                                "ignore_eos": True})
    assert answer.status_code == 200
    wanted = ["ray_vllm_time_to_first_token_seconds_bucket", "ray_vllm_generation_tokens_total",
              "ray_vllm_num_requests_running", "ray_vllm_kv_cache_usage_perc"]
    def generated(text: str) -> list[float]:
        # Every app of the session serves this model name and warms up with 2 tokens: the replica
        # that served the 5 tokens has the largest count, once Ray's agent has exported it.
        return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("ray_vllm_generation_tokens_total") and f'model_name="{model_name}"' in line]

    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:  # Ray's agent exports every few seconds
        text = httpx.get(server.metrics_url, timeout=30).text
        if all(name in text for name in wanted) and max(generated(text), default=0) >= 5:
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, f"not exported on {server.metrics_url}: {missing}"
    assert max(generated(text), default=0) >= 5, generated(text)


def test_the_local_run_should_serve_through_the_charts_default_ingress(server):
    """The chart's default is Ray Serve's HAProxy ingress; the local stack runs the same."""
    import psutil

    assert server.haproxy and server.ingress_env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    names = {process.name() for process in psutil.Process().children(recursive=True)}
    assert "haproxy" in names, names
    # Every port the model is served on stays on loopback (HAProxy's own stats and metrics
    # ports are Ray's to bind, and this test sends them nothing).
    listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
                 and c.laddr.port in (server.port, *serve_local.DIRECT_INGRESS_PORTS)]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening), listening


def test_make_serve_should_name_a_bad_engine_value_in_one_line(tmp_path):
    """A value vLLM rejects fails the deploy before any replica starts: `make serve` prints the value
    and vLLM's reason on one line, exits non-zero, and leaves the full report in a file it names."""
    values = tmp_path / "bad.yaml"
    values.write_text("engine:\n  extraArgs:\n    structured_outputs_config: {disable_any_whitespace: true}\n")
    result = subprocess.run(
        [sys.executable, "-m", "tools.serve_local", "-f", str(serve_local.DEFAULT_VALUES), "-f", str(values),
         "--port", str(serve_local.free_port()), "--dashboard-port", str(serve_local.free_port()),
         "--metrics-port", str(serve_local.free_port())],
        cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "engine.extraArgs.structured_outputs_config" in errors[0], result.stderr
    assert "only supported for xgrammar and guidance backends" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert str(serve_local.FAILURE_LOG) in result.stderr and "Traceback" in serve_local.FAILURE_LOG.read_text()
