"""The servers the benchmark compares, each started on 127.0.0.1 and stopped after its run.

All get the same engine arguments, derived once from the chart-rendered args by the app's own
mapping (vllm_app.vllm_server_settings), so only the serving path differs:
  app         this chart's app, deployed from the chart's serveConfigV2 as `make serve` does, with
              the chart's default ingress (Ray Serve's HAProxy)
  app-proxy   the same app behind Ray Serve's Python proxy (serving.ingress=proxy)
  app-tput    the app with HAProxy and RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (the A/B for that switch)
  app-b       the app with one change, for an A/B: an edited vllm_app.py (--app-b FILE), chart
              values (--b-set KEY=VALUE), or both
  original    the guide's design (bench/baseline_app.py) on the same local Ray and Serve options
  vllm        vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`), no Ray
  rayllm      Ray Serve LLM's default OpenAI app (`ray.serve.llm:build_openai_app`) on the same Ray
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

from tools import serve_local

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "files"))
import vllm_app  # noqa: E402  (the app's own args -> vLLM mapping)


def server_settings(serve_config: dict) -> dict:
    """What the app gives `vllm serve`'s argument parser, by vLLM's Python names."""
    args = vllm_app.AppArgs.model_validate(serve_config["applications"][0]["args"])
    return vllm_app.vllm_server_settings(args)


def serving_path_cpu() -> float:
    """CPU seconds used so far by every process this benchmark started but vLLM's engine cores and
    the benchmark itself: Ray's processes, Serve's proxy or HAProxy, the replica, vLLM's frontend."""
    import psutil

    total = 0.0
    for process in psutil.Process().children(recursive=True):
        try:
            if "EngineCor" in process.name() or any("EngineCore" in part for part in process.cmdline()[:1]):
                continue
            times = process.cpu_times()
            total += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


@contextlib.contextmanager
def this_app(serve_config: dict, values: dict, dashboard_port: int, extra_env: dict,
             app_file: Optional[Path] = None):
    """The app, with the Ray Serve ingress the values ask for (the chart's default: HAProxy).
    `app_file`: an edited copy of files/vllm_app.py to serve instead (the A/B of an app change)."""
    with contextlib.ExitStack() as stack:
        if app_file is not None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="app-b-")))
            serve_config, extra_env = app_variant(serve_config, extra_env, app_file, folder)
        server = stack.enter_context(serve_local.LocalServe(
            serve_config, dashboard_port=dashboard_port, extra_env=extra_env, values=values))
        yield server.url


def app_variant(serve_config: dict, extra_env: dict, app_file: Path, folder: Path) -> tuple[dict, dict]:
    """The config and environment that serve `app_file` in place of files/vllm_app.py, from a copy
    of files/ in `folder`, with the code hash the replica waits for (as `helm upgrade` renders it)."""
    files = folder / "files"
    shutil.copytree(REPO / "files", files)
    shutil.copyfile(app_file, files / "vllm_app.py")
    serve_config = copy.deepcopy(serve_config)
    serve_config["applications"][0]["runtime_env"]["env_vars"]["VLLM_APP_SHA256"] = \
        vllm_app.code_digest(files)
    return serve_config, {**extra_env, "PYTHONPATH": str(files)}


@contextlib.contextmanager
def original_design(serve_config: dict, dashboard_port: int, extra_env: dict):
    """The baseline on the same Ray and the same Serve deployment options as this app."""
    [app] = serve_config["applications"]
    [deployment] = app["deployments"]
    kwargs = vllm_app.vllm_engine_settings(vllm_app.AppArgs.model_validate(app["args"]))
    model = kwargs.pop("model")
    kwargs.pop("served_model_name")
    baseline = {
        "http_options": serve_config["http_options"],
        "applications": [{
            "name": "original", "import_path": "baseline_app:build_app", "route_prefix": "/",
            "args": {"model": model, "engine": kwargs},
            "deployments": [{**copy.deepcopy(deployment), "name": "OriginalDesign"}],
        }],
    }
    env = {**extra_env, "PYTHONPATH": os.pathsep.join([str(REPO / "bench"), str(REPO / "files")])}
    # The guide's design ran behind Serve's default (Python) proxy.
    with serve_local.LocalServe(baseline, dashboard_port=dashboard_port, extra_env=env,
                                values=PYTHON_PROXY) as server:
        yield server.url


PYTHON_PROXY = {"serving": {"ingress": "proxy"}}


def ray_serve_llm_config(serve_config: dict, deployment_options: Optional[dict] = None,
                         bundle_cpus: Optional[float] = None) -> dict:
    """Ray Serve LLM's LLMConfig with this app's engine arguments and Serve options: the model
    from the app's args, an explicit CPU accelerator config (else it asks Ray for a GPU bundle),
    and `deployment_options` merged into its deployment_config. `bundle_cpus` sizes each replica's
    placement-group bundle (Ray Serve LLM adds the replica's own num_cpus to it)."""
    [app] = serve_config["applications"]
    [deployment] = app["deployments"]
    engine = vllm_app.vllm_engine_settings(vllm_app.AppArgs.model_validate(app["args"]))
    model = engine.pop("model")
    [served] = engine.pop("served_model_name")
    llm_config = {
        "model_loading_config": {"model_id": served, "model_source": model},
        "engine_kwargs": {name: value for name, value in engine.items() if value not in (None, "")},
        "accelerator_config": {"kind": "cpu"},
        "deployment_config": {**{key: deployment[key] for key in
                                 ("num_replicas", "max_ongoing_requests", "max_queued_requests") if key in deployment},
                              **(deployment_options or {})},
    }
    if bundle_cpus is not None:
        llm_config["placement_group_config"] = {"bundles": [{"CPU": bundle_cpus}], "strategy": "PACK"}
    return llm_config


@contextlib.contextmanager
def ray_serve_llm(serve_config: dict, dashboard_port: int, extra_env: dict):
    """Ray Serve LLM's default OpenAI app, as its docs deploy it, with this app's engine arguments
    and Serve options, its ingress deployment at 0 CPUs so both deployments fit on a 2-CPU Ray."""
    config = {
        "http_options": serve_config["http_options"],
        "applications": [{
            "name": "rayllm", "import_path": "ray.serve.llm:build_openai_app", "route_prefix": "/",
            "args": {"llm_configs": [ray_serve_llm_config(serve_config)],
                     "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}}},
        }],
    }
    # Its default app runs behind Serve's default (Python) proxy.
    with serve_local.LocalServe(config, dashboard_port=dashboard_port, extra_env=extra_env,
                                values=PYTHON_PROXY) as server:
        yield server.url


def vllm_server_command(kwargs: dict, port: int) -> list[str]:
    """vLLM's OpenAI server with the same arguments, as command-line flags (unset ones left out)."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port)]
    for name, value in kwargs.items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False or value == "":
            continue
        if value is True:
            command.append(flag)
        elif isinstance(value, list):  # objects (lora_modules) as JSON, one item each
            command += [flag, *(json.dumps(item) if isinstance(item, dict) else str(item) for item in value)]
        elif isinstance(value, dict):
            command += [flag, json.dumps(value)]
        else:
            command += [flag, str(value)]
    return command


@contextlib.contextmanager
def vllm_server(serve_config: dict, port: int, extra_env: dict, startup_timeout: float = 600):
    command = vllm_server_command(server_settings(serve_config), port)
    env = {**os.environ, **serve_local.vllm_environment(), **extra_env}
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-server-", suffix=".log", delete=False)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"vLLM's server exited ({process.returncode}):\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM's server did not become healthy in {startup_timeout:.0f}s")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        os.unlink(log.name)
