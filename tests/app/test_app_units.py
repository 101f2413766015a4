"""Narrow unit tests of the app's own parts: the args contract, the arguments it gives vLLM's
server, the gate in front of vLLM's app, usage counting. The behaviour users see is tested against
the real engine in the other modules."""

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

FILES = Path(__file__).resolve().parents[2] / "files"
sys.path.insert(0, str(FILES))
import vllm_app  # noqa: E402

ARGS = {"model": {"id": "org/model"}}


class TestArgsContract:
    def test_should_fill_defaults_and_treat_empty_strings_as_unset(self):
        args = vllm_app.AppArgs.model_validate({"model": {"id": "org/model", "servedName": "", "revision": "",
                                                          "chatTemplate": ""}, "serving": {"apiKeyEnv": ""}})
        assert args.model.name == "org/model"
        assert args.model.revision is None and args.model.chat_template is None
        assert args.serving.api_key_env is None
        assert args.engine.tensor_parallel_size == 1

    @pytest.mark.parametrize("args, problem", [
        ({}, "model"),
        ({"model": {"id": "x", "servedname": "y"}}, "servedname"),
        ({"model": {"id": "x"}, "engine": {"dtype": "fp4"}}, "engine.dtype"),
        ({"model": {"id": "x"}, "engine": {"tensorParallelSize": 0}}, "engine.tensorParallelSize"),
        ({"model": {"id": "x"}, "engine": {"gpuMemoryUtilization": 2}}, "engine.gpuMemoryUtilization"),
    ])
    def test_build_app_should_name_a_bad_arg(self, args, problem):
        with pytest.raises(ValueError, match="Invalid vllm_app args") as failure:
            vllm_app.build_app(args)
        assert problem in str(failure.value)

    def test_build_app_should_reject_an_unknown_vllm_engine_argument(self):
        with pytest.raises(ValueError, match="max_num_seq"):
            vllm_app.build_app({"model": {"id": "x"}, "engine": {"extraArgs": {"max_num_seq": 8}}})

    def test_server_settings_should_map_the_contract_to_vllm_names(self):
        args = vllm_app.AppArgs.model_validate({
            "model": {"id": "org/model", "servedName": "chat", "revision": "v1", "trustRemoteCode": True},
            "engine": {"dtype": "float16", "maxModelLen": 4096, "gpuMemoryUtilization": 0.8, "tensorParallelSize": 2,
                       "enforceEager": True, "streamInterval": 4, "extraArgs": {"max_num_seqs": 8}},
            "openai": {"toolCallParser": "hermes", "enableAutoToolChoice": True, "reasoningParser": "qwen3",
                       "chatTemplateContentFormat": "openai", "extraArgs": {"enable_prompt_tokens_details": True}}})
        settings = vllm_app.vllm_server_settings(args)
        assert settings == {
            "model": "org/model", "served_model_name": ["chat"], "revision": "v1", "trust_remote_code": True,
            "dtype": "float16", "max_model_len": 4096, "gpu_memory_utilization": 0.8, "tensor_parallel_size": 2,
            "pipeline_parallel_size": 1, "enforce_eager": True, "stream_interval": 4,
            "distributed_executor_backend": "mp", "worker_extension_cls": "vllm_app_worker.WorkerSetup",
            "max_num_seqs": 8, "reasoning_parser": "qwen3", "chat_template": None, "tool_call_parser": "hermes",
            "enable_auto_tool_choice": True, "chat_template_content_format": "openai",
            "enable_prompt_tokens_details": True, "disable_log_stats": False, "enable_log_requests": False,
            "disable_fastapi_docs": True, "enable_request_id_headers": False, "api_key": None}
        namespace = vllm_app.vllm_server_args(args)  # every name is one vLLM's server knows
        assert (namespace.tool_call_parser, namespace.max_num_seqs, namespace.served_model_name) == (
            "hermes", 8, ["chat"])

    def test_auto_tool_choice_should_need_a_parser(self):
        with pytest.raises(ValueError, match="enableAutoToolChoice needs toolCallParser"):
            vllm_app.build_app({"model": {"id": "x"}, "openai": {"enableAutoToolChoice": True}})

    def test_build_app_should_reject_an_unknown_vllm_frontend_argument(self):
        with pytest.raises(ValueError, match="openai.extraArgs has keys .*enable_prompt_token_details"):
            vllm_app.build_app({"model": {"id": "x"}, "openai": {"extraArgs": {"enable_prompt_token_details": 1}}})

    def test_build_app_should_refuse_frontend_arguments_the_app_owns(self):
        with pytest.raises(ValueError, match="openai.extraArgs.api_key .*serving.apiKey"):
            vllm_app.build_app({"model": {"id": "x"}, "openai": {"extraArgs": {"api_key": "k"}}})

    def test_a_config_object_argument_should_go_through_vllms_own_parser(self):
        args = vllm_app.AppArgs.model_validate({"model": {"id": "x"}, "engine": {"extraArgs": {
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}}})
        namespace = vllm_app.vllm_server_args(args)
        assert namespace.structured_outputs_config.disable_any_whitespace is True
        bad = vllm_app.AppArgs.model_validate({"model": {"id": "x"}, "engine": {"extraArgs": {
            "structured_outputs_config": {"backend": "outlines", "disable_any_whitespace": True}}}})
        with pytest.raises(Exception, match="disable_any_whitespace"):
            vllm_app.vllm_server_args(bad)

    def test_a_chat_template_value_should_reach_vllm_as_the_template_itself(self):
        from vllm.entrypoints.chat_utils import load_chat_template

        template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
        args = vllm_app.AppArgs.model_validate({"model": {"id": "x", "chatTemplate": template}})
        assert load_chat_template(vllm_app.vllm_server_args(args).chat_template) == template

    def test_a_vllm_of_another_shape_should_fail_naming_both_versions(self, monkeypatch):
        import vllm

        monkeypatch.setitem(sys.modules, "vllm.entrypoints.launchers.app", None)  # as if it moved
        monkeypatch.setattr(vllm, "__version__", "9.9.9")
        vllm_app._vllm_internals.cache_clear()
        with pytest.raises(RuntimeError, match=r"vLLM 0\.29\.0.*vLLM 9\.9\.9 differs"):
            vllm_app.vllm_server_args(vllm_app.AppArgs.model_validate(ARGS))

    @pytest.mark.parametrize("kept", [True, False])
    def test_importing_vllm_should_leave_serves_log_buffer_writing(self, tmp_path, kept):
        """Serve's replica logs through a MemoryHandler; vLLM's first import runs dictConfig, which
        closes it. The app's import gives the handler its file back; a bare import (the control)
        leaves it buffering every record in memory. A fresh interpreter: this one imported vLLM."""
        log = tmp_path / "replica.log"
        script = textwrap.dedent(f"""
            import logging, logging.handlers, sys
            sys.path.insert(0, {str(FILES)!r})
            import vllm_app  # imports Serve, which sets up its logger
            buffer = logging.handlers.MemoryHandler(1, target=logging.FileHandler({str(log)!r}))
            serve_logger = logging.getLogger("ray.serve")
            serve_logger.handlers = [buffer]
            serve_logger.propagate = False
            if {kept}:
                vllm_app._vllm_internals()
            else:
                import vllm.logger
            for n in range(3):
                serve_logger.warning("request %d", n)
            print(len(buffer.buffer))
        """)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        held = int(done.stdout.split()[-1])
        written = log.read_text() if log.exists() else ""
        if kept:
            assert held == 0 and written.splitlines() == ["request 0", "request 1", "request 2"]
        else:
            assert held == 3 and written == ""

    def test_api_key_env_that_is_empty_should_refuse_to_start(self, monkeypatch):
        monkeypatch.delenv("SOME_KEY_ENV", raising=False)
        with pytest.raises(RuntimeError, match="SOME_KEY_ENV"):
            vllm_app._api_keys(vllm_app.ServingArgs(api_key_env="SOME_KEY_ENV"))

    def test_current_code_should_start_at_once(self, monkeypatch):
        monkeypatch.setenv(vllm_app.CODE_HASH_ENV, vllm_app.code_digest(Path(vllm_app.__file__).parent))
        assert vllm_app._wait_for_current_code() is True
        monkeypatch.delenv(vllm_app.CODE_HASH_ENV)
        assert vllm_app._wait_for_current_code() is True  # outside a Serve config: nothing to check

    def test_code_digest_should_cover_every_app_module_and_nothing_else(self, tmp_path):
        (tmp_path / "vllm_app.py").write_text("app")
        before = vllm_app.code_digest(tmp_path)
        (tmp_path / "smoke_test.py").write_text("not the app")
        assert vllm_app.code_digest(tmp_path) == before
        (tmp_path / "vllm_app_worker.py").write_text("worker")
        assert vllm_app.code_digest(tmp_path) != before

    def test_stale_code_should_wait_for_the_configmap_update(self, monkeypatch, tmp_path):
        import hashlib
        import threading

        app_file = tmp_path / "vllm_app.py"
        app_file.write_text("old")
        monkeypatch.setenv(vllm_app.CODE_HASH_ENV, hashlib.sha256(b"new").hexdigest())
        threading.Timer(0.3, app_file.write_text, args=("new",)).start()  # the kubelet's update
        assert vllm_app._wait_for_current_code(app_file, timeout_s=10, poll_s=0.05) is False

    def test_code_that_never_arrives_should_fail_clearly(self, monkeypatch, tmp_path):
        app_file = tmp_path / "vllm_app.py"
        app_file.write_text("old")
        monkeypatch.setenv(vllm_app.CODE_HASH_ENV, "0" * 64)
        with pytest.raises(RuntimeError, match="ConfigMap has not reached this pod"):
            vllm_app._wait_for_current_code(app_file, timeout_s=0.2, poll_s=0.05)





class TestLoraContract:
    LORA = {"model": {"id": "org/model", "servedName": "chat"},
            "lora": {"enabled": True, "maxLoras": 2, "maxLoraRank": 8, "maxCpuLoras": 4,
                     "adapters": [{"name": "sql", "path": "/adapters/sql"}, {"name": "bot:v2", "path": "/adapters/b"}]}}

    def test_adapters_should_reach_vllm_as_its_own_parser_reads_lora_modules(self):
        from vllm.entrypoints.openai.models.protocol import LoRAModulePath

        namespace = vllm_app.vllm_server_args(vllm_app.AppArgs.model_validate(self.LORA))
        assert (namespace.enable_lora, namespace.max_loras, namespace.max_lora_rank, namespace.max_cpu_loras) == (
            True, 2, 8, 4)
        # As `--lora-modules name=path`: no base model name, so /v1/models shows the served model as parent.
        assert namespace.lora_modules == [LoRAModulePath("sql", "/adapters/sql"), LoRAModulePath("bot:v2", "/adapters/b")]

    def test_the_resolver_environment_should_keep_a_plugin_allowlist_working(self):
        args = vllm_app.AppArgs.model_validate({"model": {"id": "m"}, "lora": {
            "enabled": True, "loadOnFirstUse": True, "folder": "/adapters"}})
        base = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_LORA_RESOLVER_CACHE_DIR": "/adapters"}
        assert vllm_app.vllm_environment_settings(args, environ={}) == base
        assert vllm_app.vllm_environment_settings(args, environ={"VLLM_PLUGINS": "mine"}) == {
            **base, "VLLM_PLUGINS": "mine,lora_filesystem_resolver"}
        assert vllm_app.vllm_environment_settings(args, environ={"VLLM_PLUGINS": "lora_filesystem_resolver"}) == base

    def test_a_resolver_folder_that_is_not_there_should_fail_naming_the_volume(self, tmp_path):
        args = vllm_app.AppArgs.model_validate({"model": {"id": "m"}, "lora": {
            "enabled": True, "loadOnFirstUse": True, "folder": str(tmp_path / "absent")}})
        with pytest.raises(RuntimeError, match="lora.folder .* check that the adapters volume"):
            vllm_app.vllm_server_args(args)

    def test_the_controller_should_not_need_the_adapters_volume(self, tmp_path):
        """build_app runs on the Serve controller (the head pod), which does not mount the volume."""
        app = vllm_app.build_app({"model": {"id": "m"}, "lora": {
            "enabled": True, "loadOnFirstUse": True, "folder": str(tmp_path / "absent")}})
        assert app is not None

    @pytest.mark.parametrize("name, looked_up", [
        ("sql", True), ("team.bot:v2", True), ("../sql", False), ("/etc/sql", False), ("sql/.", False),
        ("./sql", False), ("", False), ("a" * 129, False)])
    def test_the_resolver_should_look_only_for_names_values_accept(self, name, looked_up):
        """vLLM's filesystem resolver joins the name to its folder as it is."""
        import asyncio

        asked = []

        class Resolver:
            async def resolve_lora(self, base_model_name, lora_name):
                asked.append(lora_name)
                return "a LoRARequest"

        class Registry:
            resolver = Resolver()

            def get_resolver(self, name):
                assert name == "Filesystem Resolver"
                return self.resolver

        registry = Registry()
        vllm_app._hold_resolver_to_adapter_names(registry)
        vllm_app._hold_resolver_to_adapter_names(registry)  # once only, however often called
        found = asyncio.run(registry.resolver.resolve_lora("org/model", name))
        assert (found is not None, asked) == (looked_up, [name] if looked_up else [])

    def test_a_vllm_without_the_filesystem_resolver_should_fail_naming_it(self):
        class Registry:
            def get_resolver(self, name):
                raise KeyError(name)

        with pytest.raises(RuntimeError, match="loadOnFirstUse needs vLLM's 'Filesystem Resolver'"):
            vllm_app._hold_resolver_to_adapter_names(Registry())

    def test_load_and_unload_routes_should_stay_closed_when_vllm_mounts_them(self, monkeypatch):
        """loadOnFirstUse turns vLLM's runtime LoRA updating on, which mounts its admin routes."""
        monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
        app = _vllm_app_for(("generate",))
        mounted = {route.path for route in app.routes}
        assert {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"} <= mounted  # vLLM did mount them
        routes = vllm_app.Routes(app)
        assert routes.status("POST", "/v1/load_lora_adapter") == 404
        assert routes.status("POST", "/v1/unload_lora_adapter") == 404

    def test_the_record_should_name_the_adapter_or_the_model_the_engine_served(self):
        import asyncio

        class Engine:
            model_config = SimpleNamespace(served_model_name="chat")

            async def generate(self, prompt, sampling_params, request_id, **kwargs):
                yield SimpleNamespace(prompt_token_ids=[1, 2], finished=True, outputs=[SimpleNamespace(token_ids=[3])])

        engine = vllm_app._metered(Engine)()

        async def serve(lora_request):
            record = vllm_app.RequestRecord("r", "POST", "/v1/completions")
            token = vllm_app._current_request.set(record)
            try:
                async for _ in engine.generate("p", SimpleNamespace(), "r", lora_request=lora_request):
                    pass
            finally:
                vllm_app._current_request.reset(token)
            return record

        assert asyncio.run(serve(SimpleNamespace(lora_name="sql"))).model == "sql"
        assert asyncio.run(serve(None)).model == "chat"
        unserved = vllm_app.RequestRecord("r", "GET", "/v1/models")
        assert unserved.model == vllm_app.NO_MODEL and " model=<none> " in unserved.line()

    def test_usage_counters_should_carry_the_model(self):
        counted = []

        class Counter:
            def __init__(self, name):
                self.name = name

            def inc(self, value, tags):
                counted.append((self.name, value, tags))

        metrics = vllm_app.UsageMetrics.__new__(vllm_app.UsageMetrics)
        metrics.requests, metrics.prompt_tokens, metrics.completion_tokens = map(Counter, "rpc")
        record = vllm_app.RequestRecord("r", "POST", "/v1/chat/completions")
        record.key, record.model, record.route, record.status = "team-a", "sql", "/v1/chat/completions", 200
        record.prompt_tokens, record.completion_tokens = 5, 7
        metrics.record(record)
        assert counted == [
            ("r", 1, {"key": "team-a", "model": "sql", "route": "/v1/chat/completions", "status": "200"}),
            ("p", 5, {"key": "team-a", "model": "sql"}), ("c", 7, {"key": "team-a", "model": "sql"})]
        assert "status=200 model=sql prompt_tokens=5 completion_tokens=7 " in record.line()


def _vllm_app_for(tasks):
    """vLLM's own FastAPI app for a model with these tasks, built without an engine."""
    from vllm.entrypoints.launchers.app import build_app

    return build_app(vllm_app.vllm_server_args(vllm_app.AppArgs.model_validate(ARGS)), tasks, None)


class TestRoutes:
    @pytest.fixture(scope="class")
    def routes(self):
        return vllm_app.Routes(_vllm_app_for(("generate",)))

    @pytest.mark.parametrize("method, path", [
        ("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
        ("POST", "/tokenize"), ("POST", "/detokenize"), ("POST", "/v1/responses"), ("GET", "/v1/responses/resp_1"),
        ("POST", "/v1/responses/resp_1/cancel"), ("POST", "/v1/messages"), ("GET", "/version")])
    def test_the_openai_surface_should_pass(self, routes, method, path):
        assert routes.status(method, path) == 200

    @pytest.mark.parametrize("method, path", [
        ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/scale_elastic_ep"),
        ("POST", "/invocations"), ("GET", "/ping"), ("GET", "/load"), ("POST", "/reset_prefix_cache"),
        ("POST", "/sleep"), ("POST", "/collective_rpc"), ("POST", "/inference/v1/generate"),
        ("POST", "/v1/chat/completions/render"), ("GET", "/v1/responses/a/b/c"),
        ("POST", "/v1/embeddings")])  # a generative model mounts no pooling routes
    def test_development_admin_and_unmounted_routes_should_not_exist(self, routes, method, path):
        assert routes.status(method, path) == 404

    def test_a_wrong_method_should_be_405(self, routes):
        assert routes.status("GET", "/v1/chat/completions") == 405

    def test_an_app_with_pooling_routes_should_get_them_and_no_chat(self):
        # As vLLM's app is for an embedding model (its pooling routers need the model's config).
        from fastapi import FastAPI

        app = FastAPI()
        app.post("/v1/embeddings")(lambda: {})
        app.get("/health")(lambda: {})
        routes = vllm_app.Routes(app)
        assert routes.status("POST", "/v1/embeddings") == 200 and routes.status("GET", "/health") == 200
        assert routes.status("POST", "/v1/chat/completions") == 404

    def test_metrics_should_name_routes_by_template_so_random_paths_add_no_series(self, routes):
        assert routes.template("GET", "/v1/responses/resp_123") == "/v1/responses/{response_id}"
        assert routes.template("POST", "/v1/chat/completions") == "/v1/chat/completions"
        assert routes.template("GET", "/wp-admin/x.php") == vllm_app.UNMATCHED


class TestUsageCounting:
    @staticmethod
    def _output(prompt_tokens, *choice_tokens, finished=False):
        return SimpleNamespace(prompt_token_ids=list(range(prompt_tokens)), finished=finished,
                               outputs=[SimpleNamespace(token_ids=list(range(n))) for n in choice_tokens])

    def test_deltas_should_add_up(self):
        record = vllm_app.RequestRecord("r", "POST", "/v1/chat/completions")
        for first, output in [(True, self._output(5, 1, 1)), (False, self._output(5, 2, 0)),
                              (False, self._output(5, 1, 1, finished=True))]:
            record.count(output, delta=True, first=first)
        assert (record.prompt_tokens, record.completion_tokens) == (5, 6)

    def test_cumulative_outputs_should_count_once_at_the_end(self):
        record = vllm_app.RequestRecord("r", "POST", "/v1/completions")
        record.count(self._output(3, 4), delta=False, first=True)
        record.count(self._output(3, 8, finished=True), delta=False, first=False)
        assert (record.prompt_tokens, record.completion_tokens) == (3, 8)


class TestGate:
    """The gate around a recording ASGI app (vLLM's app is exercised for real elsewhere)."""

    KEY = "k-123"

    @staticmethod
    def _run(gate, method, path, headers=None, body=b""):
        import asyncio

        import httpx

        async def call():
            transport = httpx.ASGITransport(app=gate)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                return await client.request(method, path, headers=headers or {}, content=body)

        return asyncio.run(call())

    @staticmethod
    def _inner(seen):
        async def app(scope, receive, send):
            seen.append(dict(scope["headers"]))
            body, more = b"", True
            while more:  # read the whole body, as FastAPI does
                message = await receive()
                body, more = body + message.get("body", b""), message.get("more_body", False)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
        return app

    def _gate(self, seen, log_prompts=False):
        return vllm_app.Gate(self._inner(seen), vllm_app.APIKeys({"default": self.KEY}), log_prompts)

    def test_a_request_without_the_key_should_get_401_and_not_reach_vllm(self):
        seen = []
        response = self._run(self._gate(seen), "POST", "/tokenize", {"Authorization": "Bearer nope"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert seen == []

    def test_the_key_should_be_taken_as_bearer_or_x_api_key(self):
        seen = []
        gate = self._gate(seen)
        assert self._run(gate, "POST", "/tokenize", {"Authorization": f"Bearer {self.KEY}"}).status_code == 200
        assert self._run(gate, "POST", "/v1/messages", {"x-api-key": self.KEY}).status_code == 200
        assert len(seen) == 2

    def test_health_should_need_no_key(self):
        assert self._run(self._gate([]), "GET", "/health").status_code == 200

    def test_unknown_routes_should_get_an_openai_shaped_404_before_auth(self):
        response = self._run(self._gate([]), "GET", "/metrics")
        assert response.status_code == 404
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    def test_a_request_id_should_be_made_and_echoed_when_no_ingress_set_one(self):
        seen = []
        response = self._run(self._gate(seen), "POST", "/tokenize", {"Authorization": f"Bearer {self.KEY}"})
        assert response.headers["x-request-id"] == seen[0][b"x-request-id"].decode()

    def test_an_ingress_request_id_should_be_passed_on_and_left_for_the_ingress_to_echo(self):
        seen = []
        response = self._run(self._gate(seen), "POST", "/tokenize",
                             {"Authorization": f"Bearer {self.KEY}", "X-Request-Id": "trace-1"})
        assert seen[0][b"x-request-id"] == b"trace-1"
        assert "x-request-id" not in response.headers  # Serve's ingress adds it: one header, not two

    @pytest.mark.parametrize("log_prompts", [False, True])
    def test_one_log_line_per_request_with_the_prompt_only_when_asked(self, caplog, log_prompts):
        gate = self._gate([], log_prompts=log_prompts)
        with caplog.at_level("INFO", logger="ray.serve"):
            self._run(gate, "POST", "/v1/completions", {"Authorization": f"Bearer {self.KEY}",
                                                        "X-Request-Id": "r-9"}, b'{"prompt": "SECRET"}')
        [line] = [record.getMessage() for record in caplog.records if "request_id=r-9" in record.getMessage()]
        assert "method=POST route=/v1/completions key=default status=200" in line
        assert ("SECRET" in line) is log_prompts
        assert self.KEY not in line

    def test_keys_should_be_compared_whole(self):
        keys = vllm_app.APIKeys({"team-a": "alpha-key", "team-b": "beta-key"})
        assert keys.name_of("beta-key") == "team-b"
        assert keys.name_of("alpha") is None and keys.name_of("") is None
        assert not vllm_app.APIKeys({}).enabled


class TestEngineWatchdog:
    """The stall rule on a stand-in engine count; the real hang is fault scenario 7 (tests/faults)."""

    class Frontend:
        def __init__(self):
            self.unfinished = 0

        def get_num_unfinished_requests(self):
            return self.unfinished

    def _run(self, frontend, steps, seconds=0.6):
        import asyncio

        watchdog = vllm_app.EngineWatchdog(frontend, stall_s=0.3)

        async def scenario():
            task = asyncio.create_task(watchdog.run(poll_s=0.02))
            await steps(watchdog)
            await asyncio.sleep(seconds)
            task.cancel()

        killed = []
        original = vllm_app.kill_engine_processes
        vllm_app.kill_engine_processes = lambda: killed.append(1) or []
        try:
            asyncio.run(scenario())
        finally:
            vllm_app.kill_engine_processes = original
        return watchdog, killed

    def test_an_engine_that_holds_requests_and_stops_stepping_should_be_called_hung(self):
        frontend = self.Frontend()

        async def steps(watchdog):
            frontend.unfinished = 3
            watchdog.step(3)

        watchdog, killed = self._run(frontend, steps)
        assert watchdog.stalled and "held 3 request(s)" in watchdog.stalled and killed
        with pytest.raises(RuntimeError, match="it is hung"):
            watchdog.check()

    def test_a_request_the_engine_finished_but_the_frontend_still_counts_should_not(self):
        frontend = self.Frontend()

        async def steps(watchdog):
            frontend.unfinished = 1
            watchdog.step(0)  # the engine's last step left it idle

        watchdog, killed = self._run(frontend, steps)
        assert watchdog.stalled is None and not killed
        watchdog.check()

    def test_a_new_request_to_an_idle_engine_that_never_steps_should_be_called_hung(self):
        import asyncio

        frontend = self.Frontend()

        async def steps(watchdog):
            watchdog.step(0)
            await asyncio.sleep(0.05)
            frontend.unfinished = 1  # sent to an engine stopped while idle

        watchdog, killed = self._run(frontend, steps)
        assert watchdog.stalled and killed

    def test_an_engine_that_keeps_stepping_should_never_be_called_hung(self):
        import asyncio

        frontend = self.Frontend()

        async def steps(watchdog):
            frontend.unfinished = 5
            for _ in range(40):  # a long prefill: many steps, no token
                watchdog.step(5)
                await asyncio.sleep(0.02)

        watchdog, killed = self._run(frontend, steps, seconds=0.1)
        assert watchdog.stalled is None and not killed


def test_the_local_runner_knows_the_apps_start_failure_prefix():
    # tools/serve_local picks the app's one-line reason out of Serve's log by this prefix; it keeps
    # its own copy because it never imports the app: Ray's workers load it from files/, as pods load it
    # from the ConfigMap.
    from tools import serve_local

    assert serve_local.START_FAILED == vllm_app.START_FAILED
