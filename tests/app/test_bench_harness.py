"""The benchmark's harness on a tiny workload: it measures what it says it measures (not the speed)."""

import asyncio
import json

import pytest

from bench import loadgen, run, servers
from tests.app.conftest import API_KEY

pytestmark = pytest.mark.engine


def test_load_generator_should_time_every_streamed_request(server, model_name):
    result = asyncio.run(loadgen.run_level(server.url, model_name, run.PROMPTS, concurrency=2, requests=4,
                                           max_tokens=8, api_key=API_KEY))
    assert (result.requests, result.errors) == (4, 0)
    assert result.output_tokens_per_s > 0 and result.requests_per_s > 0
    assert 0 < result.ttft_p50_ms <= result.latency_p50_ms <= result.latency_p95_ms
    assert result.itl_p50_ms is not None  # 8 tokens stream as several frames
    # Every request produced exactly max_tokens (EOS ignored): 4 x 8 tokens over the run.
    assert result.output_tokens_per_s * result.duration_s == pytest.approx(32, rel=0.01)


def test_load_generator_should_count_refusals_as_errors(server, model_name):
    result = asyncio.run(loadgen.run_level(server.url, model_name, run.PROMPTS, concurrency=1, requests=2,
                                           max_tokens=4, api_key="wrong"))
    assert result.errors == 2 and "HTTP 401" in result.error_samples[0]
    assert result.output_tokens_per_s == 0


def test_percentiles_and_summary():
    assert loadgen.percentile([], 50) is None
    assert loadgen.percentile([1, 2, 3, 4], 50) == 2.5
    assert loadgen.percentile([5], 95) == 5
    results = [loadgen.RequestResult(ok=True, ttft=0.1, latency=1.0, output_tokens=10, gaps=[0.01, 0.03]),
               loadgen.RequestResult(ok=False, error="HTTP 503: shed")]
    summary = loadgen.summarize(4, results, duration=2.0, cpu_seconds=0.5)
    assert (summary.requests, summary.errors, summary.output_tokens_per_s) == (2, 1, 5.0)
    assert (summary.ttft_p50_ms, summary.itl_p50_ms, summary.loadgen_cpu_percent) == (100.0, 20.0, 25.0)


def _level(concurrency, tokens_per_s, ttft_ms):
    return {"concurrency": concurrency, "requests": 160, "errors": 0, "duration_s": 20.0, "requests_per_s": 8.0,
            "output_tokens_per_s": tokens_per_s, "ttft_p50_ms": ttft_ms, "ttft_p95_ms": ttft_ms, "itl_p50_ms": 1.0,
            "latency_p50_ms": 10.0, "latency_p95_ms": 12.0, "loadgen_cpu_percent": 5.0,
            "serving_cpu_s_per_1k_tokens": 0.5, "error_samples": []}


def test_report_should_give_medians_ranges_ties_a_table_and_a_plot(tmp_path):
    # Two rounds: round i of this app is paired with round i of each other server.
    results = {"app": [[_level(16, 900.0, 30.0)], [_level(16, 1100.0, 20.0)]],
               "vllm": [[_level(16, 1000.0, 25.0)], [_level(16, 1000.0, 25.0)]],
               "rayllm": [[_level(16, 300.0, 60.0)], [_level(16, 500.0, 40.0)]]}
    ratios = run.ratios(results)["16"]
    assert ratios["throughput_vs_vllm"] == {"median": 1.0, "min": 0.9, "max": 1.1, "n": 2, "tie": True}
    assert ratios["throughput_vs_rayllm"]["min"] == 2.2 and ratios["throughput_vs_rayllm"]["tie"] is False
    assert ratios["ttft_p50_vs_vllm"]["median"] == 1.0
    stats = run.summary(results)
    assert stats["app"]["16"]["output_tokens_per_s"] == {"median": 1000.0, "min": 900.0, "max": 1100.0, "n": 2}
    assert "1000.0 [900.0-1100.0]" in run.table(results) and "Ray Serve LLM" in run.table(results)
    assert any("(tie)" in line for line in run.ratio_lines(run.ratios(results)))
    report = {"summary": run.summary(results), "ratios": run.ratios(results)}
    assert "| this app | 16 | 1,000 (900-1,100) |" in run.markdown(report)
    assert "1.00x (0.90-1.10) tie" in run.markdown(report)
    run.plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(run.machine())  # the machine record is plain data


def test_a_level_should_run_for_its_minimum_time_and_count_the_servers_cpu(server, model_name):
    calls = []

    def fake_cpu():  # the probe is read once before and once after the level
        calls.append(1)
        return 10.0 * len(calls)

    result = asyncio.run(loadgen.run_level(server.url, model_name, run.PROMPTS, concurrency=2, requests=2,
                                           max_tokens=4, api_key=API_KEY, min_duration=3.0, serving_cpu=fake_cpu))
    assert result.duration_s >= 3.0 and result.requests > 2 and result.errors == 0
    assert len(calls) == 2
    assert result.serving_cpu_s_per_1k_tokens == pytest.approx(10.0 * 1000 / (4 * result.requests), rel=0.01)


def test_the_serving_path_cpu_should_leave_out_the_engine_and_the_benchmark(server):
    import psutil

    engine = [p for p in psutil.Process().children(recursive=True) if "EngineCor" in p.name()]
    assert engine, "the app's engine core process should be among this run's processes"
    before = servers.serving_path_cpu()
    assert before > 0 and servers.serving_path_cpu() >= before


def test_all_servers_should_get_the_same_engine_arguments(server):
    kwargs = servers.server_settings(server.config)
    command = servers.vllm_server_command(kwargs, 8123)
    for name, value in kwargs.items():
        if value not in (None, False, ""):
            assert "--" + name.replace("_", "-") in command
    assert command[command.index("--model") + 1] == kwargs["model"]
    assert "--enforce-eager" in command and command[command.index("--host") + 1] == "127.0.0.1"


def test_vllms_command_line_should_take_each_adapter_as_a_json_item():
    import json

    adapters = [{"name": "a", "path": "/adapters/a"}, {"name": "b", "path": "/adapters/b"}]
    command = servers.vllm_server_command({"enable_lora": True, "lora_modules": adapters}, 8123)
    at = command.index("--lora-modules")
    assert [json.loads(item) for item in command[at + 1:at + 3]] == adapters and "--enable-lora" in command


def test_app_b_should_serve_the_edited_file_with_the_hash_the_replica_waits_for(tmp_path):

    from tools import serve_local

    rendered, _ = serve_local.local_serve_config([serve_local.DEFAULT_VALUES], model="org/model")

    edited = tmp_path / "edited.py"
    edited.write_text((servers.REPO / "files" / "vllm_app.py").read_text() + "\n# variant B\n")
    config, env = servers.app_variant(rendered, {"HF_HUB_OFFLINE": "1"}, edited, tmp_path)
    files = tmp_path / "files"
    assert env == {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(files)}
    assert (files / "vllm_app.py").read_text().endswith("# variant B\n")
    assert sorted(p.name for p in files.iterdir()) == sorted(p.name for p in (servers.REPO / "files").iterdir())
    env_vars = config["applications"][0]["runtime_env"]["env_vars"]
    assert env_vars["VLLM_APP_SHA256"] == servers.vllm_app.code_digest(files)
    # The A side keeps the repository's code and hash.
    assert rendered["applications"][0]["runtime_env"]["env_vars"]["VLLM_APP_SHA256"] != env_vars["VLLM_APP_SHA256"]


def test_app_b_and_its_change_should_be_asked_for_together(capsys):
    for argv in (["--servers", "app,app-b"], ["--servers", "app", "--app-b", "x.py"],
                 ["--servers", "app", "--b-set", "engine.maxNumSeqs=8"],
                 ["--servers", "app", "--b-request-model", "tiny-lora-0"]):
        with pytest.raises(SystemExit):
            run.main(argv)
        assert "app-b goes with --app-b FILE, --b-set KEY=VALUE or --b-request-model NAME" in capsys.readouterr().err


def test_tiny_adapters_should_be_served_from_values_and_asked_for_in_turn(tmp_path, monkeypatch):
    from tools import serve_local, tiny_model

    model = tiny_model.build(serve_local.DEMO_MODEL_DIR)
    values = run.tiny_adapter_values(model, tmp_path / "lora", 2)
    config, _ = serve_local.local_serve_config([serve_local.DEFAULT_VALUES], model=str(model), values=values)
    settings = servers.server_settings(config)
    assert settings["enable_lora"] and [m["name"] for m in settings["lora_modules"]] == ["tiny-lora-0", "tiny-lora-1"]
    assert all((tmp_path / "lora" / name / "adapter_config.json").exists() for name in ("tiny-lora-0", "tiny-lora-1"))

    sent = []

    async def one_request(session, url, body):
        sent.append(body["model"])
        return loadgen.RequestResult(ok=True, ttft=0.01, latency=0.02, output_tokens=1)

    monkeypatch.setattr(loadgen, "one_request", one_request)
    asyncio.run(loadgen.run_level("http://x", ["a", "b"], ["p"], concurrency=1, requests=4, max_tokens=1))
    assert sent == ["a", "b", "a", "b"]


def test_the_replica_profile_should_sum_samples_by_part_of_the_serving_path():
    from bench import profile

    collapsed = "\n".join([
        "thread (1): Thread-1;_run (replica.py:1);Gate.__call__ (vllm_app.py:580);Router.__call__ (starlette/routing.py:683) 5",
        "thread (1): Thread-1;_run (ray/serve/_private/replica.py:3746);Gate._finish (vllm_app.py:620) 2",
        "thread (1): Thread-1;output_handler (vllm/v1/engine/async_llm.py:812);Metric._record (ray/util/metrics.py:133) 3",
        "thread (2): AsyncIO Thread: default;Thread.run (threading.py:982) 7",
        "thread (2): AsyncIO Thread: default;Thread.run (threading.py:982);send (uvicorn/protocols/http/httptools_impl.py:544) 4",
        "thread (3): MainThread;Worker.main_loop (ray/_private/worker.py:1069) 1",
        "thread (1): Thread-1;UserCallableWrapper.__init__.<locals>._run_user_code_event_loop (ray/serve/_private/replica.py:3746) 6",
        "thread (1): Thread-1;<module> (somewhere.py:1) 1",
    ])
    assert profile.breakdown(collapsed) == {
        "event loops in C (uvloop)": 13, "vLLM's frontend, FastAPI, Starlette": 5, "Serve's direct ingress and uvicorn": 4,
        "metrics": 3, "this app's own code": 2, "Ray's worker main thread": 1, "other": 1}


def test_the_routing_report_should_keep_its_columns_for_long_mode_names():
    from bench import routing

    def level(tok_s, p50, p90, hits, cpu):
        return {"tenants": {"output_tokens_per_s": tok_s, "ttft_p50_ms": p50, "ttft_p90_ms": p90,
                            "prefix_cache_hit_rate": hits, "router_cpu_s_per_1k_requests": cpu}}

    results = {"leastconn": [level(100.0, 200.0, 400.0, 0.5, None), level(110.0, 220.0, 440.0, 0.6, None)],
               "rayllm-prefix": [level(120.0, 100.0, 200.0, 0.7, 5.0), level(121.0, 110.0, 220.0, 0.8, 6.0)]}
    lines = routing.report(results, ["leastconn", "rayllm-prefix"], ["tenants"]).splitlines()
    table = lines[:3]
    print("\n".join(lines))
    # The workload column starts at the same place on every row, after a space.
    assert len({line.index("tenants") for line in table[1:]} | {table[0].index("workload")}) == 1
    assert "rayllm-prefix / leastconn, tenants, output_tokens_per_s: 1.15x [1.10-1.20] over 2 rounds" in lines
