"""The fault suite's own stack: the chart's CPU serveConfigV2 on a local Ray (tools/serve_local,
whatever ingress it starts), the real vLLM CPU engine, the tiny model with a short context so a
replacement replica starts fast. Separate from tests/app's server: these tests kill its processes.

The app's files are served from a copy (on PYTHONPATH, as the ConfigMap mount is on a pod), so the
rollout scenario can change the code the way `helm upgrade` does without touching the repository.

Each scenario records its figures; at the end of the session they are merged into
build/faults/figures.json, which `python -m tests.faults.figures` turns into the Reliability table (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests import failure_context
from tools import serve_local, tiny_model

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "files"))
import vllm_app  # noqa: E402  (the code hash a rollout renders)

FIGURES = REPO / "build" / "faults" / "figures.json"
API_KEY = "fault-key-0123456789"
SERVED_NAME = "tiny-llama"
MAX_MODEL_LEN = 512
MAX_ONGOING = 32  # room for the 24 requests in flight when a process is killed
MAX_QUEUED = 32  # at least MAX_ONGOING: under HAProxy a shorter queue sheds bursts (templates/_validate.tpl)


class Stack:
    """The running service and the handles a fault test needs on it."""

    def __init__(self, serve: serve_local.LocalServe, app_dir: Path):
        self.serve, self.app_dir = serve, app_dir
        self.url = serve.url
        self.app = serve.config["applications"][0]
        self.rollouts = 0

    # -- what is running -----------------------------------------------------------------------

    def replicas(self) -> list[dict]:
        try:
            app = self.serve.status()["applications"]["llm"]
        except Exception:  # the dashboard can hiccup while Serve replaces things
            return []
        return app["deployments"].get("VLLMServer", {}).get("replicas", [])

    def running_pids(self) -> set[int]:
        return {r["pid"] for r in self.replicas() if r["state"] == "RUNNING"}

    def engine_core(self, replica_pid: int) -> psutil.Process:
        [core] = [p for p in psutil.Process(replica_pid).children(recursive=True) if p.name() == "VLLM::EngineCore"]
        return core

    def rss(self, pid: int) -> tuple[int, int]:
        """Resident memory in bytes of the replica process (Serve's replica, the gate, vLLM's
        frontend: where requests and their backlog live) and of its vLLM engine processes (whose
        KV cache, VLLM_CPU_KVCACHE_SPACE, grows as its pages are first touched, up to its size)."""
        process = psutil.Process(pid)
        return process.memory_info().rss, sum(p.memory_info().rss for p in process.children(recursive=True))

    def stats(self) -> dict:
        from ray import serve

        return serve.get_app_handle("llm").get_stats.remote().result(timeout_s=30)

    def health(self, timeout: float = 5.0):
        try:
            return httpx.get(self.url + "/health", timeout=timeout).status_code
        except httpx.HTTPError as error:
            return type(error).__name__

    def wait_healthy(self, replicas: int = 1, timeout: float = 240.0, exclude: set = frozenset()) -> set[int]:
        """Until `replicas` replicas run (none of them in `exclude`) and /health says 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.running_pids()
            if len(pids) == replicas and not pids & exclude and len(self.replicas()) == replicas \
                    and self.health() == 200:
                return pids
            time.sleep(0.5)
        raise AssertionError(f"not {replicas} healthy replica(s) after {timeout:.0f} s: {self.replicas()}")

    # -- what `helm upgrade` would change --------------------------------------------------------

    def scale(self, replicas: int) -> None:
        self.app["deployments"][0]["num_replicas"] = replicas
        self.serve.submit()

    def roll_out_new_code(self) -> str:
        """Change the app code and submit the serveConfigV2 with its new hash, as an upgrade does
        (the ConfigMap and serveConfigV2 change together). Returns the new hash."""
        self.rollouts += 1
        path = self.app_dir / "vllm_app.py"
        path.write_text(path.read_text() + f"\n# rollout {self.rollouts}\n")
        digest = vllm_app.code_digest(self.app_dir)
        self.app["runtime_env"]["env_vars"]["VLLM_APP_SHA256"] = digest
        self.serve.submit()
        return digest


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    model = tiny_model.build(REPO / "build" / "tiny-llama")
    app_dir = tmp_path_factory.mktemp("app") / "files"
    shutil.copytree(REPO / "files", app_dir)
    values = {"model": {"servedName": SERVED_NAME}, "engine": {"maxModelLen": MAX_MODEL_LEN},
              "serving": {"apiKey": {"value": API_KEY}, "maxOngoingRequests": MAX_ONGOING,
                          "maxQueuedRequests": MAX_QUEUED,
                          # Scenario 7's threshold: one engine, short requests, no grammars.
                          "engineStallSeconds": 10}}
    config, merged = serve_local.local_serve_config(
        [serve_local.DEFAULT_VALUES], model=str(model), port=serve_local.free_port(), values=values)
    with serve_local.LocalServe(config, api_key=serve_local.api_key_from(merged),
                                dashboard_port=serve_local.free_port(),
                                extra_env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(app_dir)}) as running:
        failure_context.watch(running)
        yield Stack(running, app_dir)
        failure_context.unwatch(running)


@pytest.fixture
def healthy(stack):
    """Each scenario starts from one healthy replica, whatever the one before it left."""
    if stack.app["deployments"][0]["num_replicas"] != 1:
        stack.scale(1)
    stack.wait_healthy(1)
    return stack


def _machine() -> dict:
    model = platform.processor() or ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import ray
    import vllm

    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30),
            "gpu": "none", "vllm": vllm.__version__, "ray": ray.__version__}


@pytest.fixture(scope="session")
def figures():
    """Scenario name -> its figures; merged into build/faults/figures.json at the end."""
    recorded: dict = {}
    yield recorded
    if not recorded:
        return
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(FIGURES.read_text()) if FIGURES.exists() else {"scenarios": {}}
    existing["machine"] = _machine()
    for name, values in recorded.items():
        existing["scenarios"][name] = {**values, "date": time.strftime("%Y-%m-%d")}
    FIGURES.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n")
