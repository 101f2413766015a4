"""Run the chart's serving app on a local Ray, the way KubeRay runs it on a cluster.

    python -m tools.serve_local [-f VALUES]... [--set KEY=VALUE]... [--model ID_OR_PATH] [--port 8000]

1. Renders the chart with the values given (default: ci/05-cpu-kind-values.yaml, the CPU profile) and
   takes the RayService's serveConfigV2: the same template a cluster gets.
2. With no --model, builds the tiny demo model locally (tools/tiny_model.py), so it works offline.
3. Starts a local Ray (head only, loopback only, dashboard on 127.0.0.1) with files/ on PYTHONPATH,
   as the chart's ConfigMap mount does on the pods.
4. Submits the config to the dashboard's Serve REST API (`PUT /api/serve/applications/`), as KubeRay
   does, and polls the application status until RUNNING.
5. Serves the OpenAI endpoint on 127.0.0.1:PORT until Ctrl-C, then stops everything it started.

What differs from a cluster: one Ray node instead of a head plus autoscaled workers (so the
chart's worker/autoscaler settings do not apply), the API key comes from the values or the
environment instead of a Secret, and the Serve proxy listens on 127.0.0.1 instead of 0.0.0.0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from tools import chart, tiny_model

REPO = chart.CHART_DIR
DEFAULT_VALUES = REPO / "ci" / "05-cpu-kind-values.yaml"
DEMO_MODEL_DIR = REPO / "build" / "tiny-llama"
DEMO_MODEL_NAME = "tiny-llama"  # what clients send as `model` for the demo model, not a temp path
API_KEY_ENV = "VLLM_RAYSERVICE_API_KEY"  # the name templates/_helpers.tpl gives the key's env var


class LocalServeError(Exception):
    pass


# Ports handed out by free_port: 21000-29999 is outside the kernel's ephemeral range (32768-60999 by
# default), Ray's worker ports (10002-19999) and the direct-ingress ports of local runs (30000-31999).
# A port the kernel picked (bind to port 0) was free only at that moment: Ray's own processes bind port 0
# as they start, and can take it before HAProxy binds it; a request then reaches a Ray service
# instead of the model (the likely cause of a flake: /v1/models answered 200 without `data`).
# Nothing here binds ports in this range by chance.
FREE_PORTS = range(21000, 30000)
_handed_out: set = set()


def _can_bind(port: int, reuse: bool = False) -> bool:
    """Whether 127.0.0.1:port can be bound now. With `reuse`, as a server binds it (SO_REUSEADDR,
    which uvicorn and gRPC set): a closed connection's TIME_WAIT on the port does not count."""
    with socket.socket() as sock:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (everything local listens on loopback only), not handed out before."""
    for port in random.sample(FREE_PORTS, 200):
        if port not in _handed_out and _can_bind(port):
            _handed_out.add(port)
            return port
    raise LocalServeError(f"no free port in {FREE_PORTS.start}-{FREE_PORTS.stop - 1} on 127.0.0.1")


# Where local runs put Serve's direct-ingress ports: HTTP blocks in the first 1,000, the matching
# gRPC block 1,000 above (direct_ingress_ports says why not Serve's default 40000-41000).
DIRECT_INGRESS_PORTS = range(30000, 32000)
_GRPC_OFFSET = 1000


def direct_ingress_ports(block: int = 50) -> dict:
    """Serve's direct-ingress port ranges for one local Ray: a block of `block` ports of 30000-30999
    for HTTP and the same block of 31000-31999 for gRPC, that no server holds now. Every local Ray
    otherwise starts its replicas' HTTP servers at 30000. Ray 2.60's replicas bind without
    SO_REUSEPORT, so a clash fails a replica's start rather than mixing two apps' traffic, but it
    fails it: separate blocks keep local runs side by side (the CLI test beside the app tests'
    server) from racing for the same ports.

    gRPC's default range, 40000-41000, lies inside the kernel's ephemeral range (32768-60999):
    after a few thousand test requests its ports are taken by client connections and their
    TIME_WAITs, and no whole block was free (a CI run failed so). 30000-31999 lies below it."""
    first = DIRECT_INGRESS_PORTS.start
    for start in random.sample(range(first, first + _GRPC_OFFSET, block), _GRPC_OFFSET // block):
        grpc = start + _GRPC_OFFSET
        if start not in _handed_out and all(_can_bind(port, reuse=True)
                                            for low in (start, grpc) for port in range(low, low + block)):
            _handed_out.add(start)
            return {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(start),
                    "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(start + block - 1),
                    "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc),
                    "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + block - 1)}
    held = [port for port in DIRECT_INGRESS_PORTS if not _can_bind(port, reuse=True)]
    raise LocalServeError(f"no free block of {block} ports in {first}-{first + _GRPC_OFFSET - 1} and "
                          f"{first + _GRPC_OFFSET}-{DIRECT_INGRESS_PORTS.stop - 1} for Serve's direct "
                          f"ingress; held now: {held[:20]}{' ...' if len(held) > 20 else ''} (`ss -ltnp` names "
                          "their processes; a local Ray left running holds a block: `ray stop`)")


def vllm_environment() -> dict:
    """Environment every local vLLM process gets: caches inside the tree, no usage reporting, and
    a bounded KV cache (vLLM's CPU backend otherwise reserves most of the RAM)."""
    cache = REPO / ".cache"
    return {
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor"),
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_NO_USAGE_STATS": "1",
    }


def local_serve_config(values_files=(), set_values=(), model: Optional[str] = None,
                       port: int = 8000, values: Optional[dict] = None,
                       key_policies_dir: Optional[Path] = None) -> tuple[dict, dict]:
    """The chart's serveConfigV2 for a local run, and the merged values it came from. The key
    policies go to `key_policies_dir` (default: a new folder under build/key-policies/)."""
    overrides = dict(values or {})
    if model:
        overrides = chart.deep_merge(overrides, {"model": {"id": model}})
    rendered = chart.render(overrides, values_files=values_files, set_values=set_values, release="local")
    config = rendered.serve_config()
    # The only changes to the rendered config: listen on loopback, on the port asked for, and read
    # the key policies where this run wrote them.
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    # Each rendering gets a file of its own, as each release has its own ConfigMap. A folder per
    # port was shared by every config rendered for one server: the LoRA tests' app, added to the
    # app tests' server, rewrote that server's policies (its throttled key then got 200s).
    if key_policies_dir is None:
        KEY_POLICIES_DIR.mkdir(parents=True, exist_ok=True)
        key_policies_dir = Path(tempfile.mkdtemp(prefix=f"port-{port}-", dir=KEY_POLICIES_DIR))
    write_key_policies(rendered, config, key_policies_dir)
    merged = chart.deep_merge(chart.load_values_files(values_files), overrides)
    return config, merged


KEY_POLICIES_FILE = "key_policies.yaml"  # in the app ConfigMap (templates/_helpers.tpl)
KEY_POLICIES_DIR = REPO / "build" / "key-policies"


def write_key_policies(rendered: "chart.Rendered", config: dict, folder: Path) -> Path:
    """The key policies the chart renders into the app ConfigMap, written to `folder` (the pods
    read them from the ConfigMap mount), and the config's apps pointed at them. Rewriting the file
    while the app runs is what the kubelet does after a `helm upgrade`."""
    [text] = [cm["data"][KEY_POLICIES_FILE] for cm in rendered.of_kind("ConfigMap")
              if KEY_POLICIES_FILE in cm.get("data", {})]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / KEY_POLICIES_FILE
    path.write_text(text + "\n")
    for app in config["applications"]:
        app["args"]["serving"]["keyPoliciesFile"] = str(path)
    return path


def chart_ingress_env(values: Optional[dict] = None) -> dict:
    """The Ray Serve settings the chart gives every Ray pod (RAY_SERVE_* variables, e.g. the
    HAProxy ingress), so a local run serves through the same ingress as the cluster."""
    rendered = chart.render(values or {}, release="local")
    [head] = rendered.rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    return {env["name"]: env["value"] for env in head.get("env", [])
            if env["name"].startswith("RAY_SERVE_") and "value" in env}


class LocalServe:
    """A local Ray with the dashboard, running one serveConfigV2. Use as a context manager.

    Ray Serve's ingress follows the chart: its values (the chart's defaults when none are given)
    decide the RAY_SERVE_* environment of the local Ray, as they do on the pods.
    """

    def __init__(self, config: dict, *, api_key: Optional[str] = None, dashboard_port: int = 8265,
                 num_cpus: int = 2, extra_env: Optional[dict] = None, metrics_port: Optional[int] = None,
                 values: Optional[dict] = None):
        self.config = config
        self.ingress_env = chart_ingress_env(values)
        self.haproxy = self.ingress_env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
        if self.haproxy:
            # Every fixed port of Serve's HAProxy mode gets a free one, so local runs side by side
            # don't clash. HAProxy's stats and metrics ports: Ray 2.60 binds them on all interfaces;
            # nothing here sends traffic to them. The fallback proxy (Serve's Python proxy, which
            # HAProxy uses while an app has no replica up, e.g. while it starts) binds 8500 with
            # SO_REUSEPORT: two local Rays would share it, and the kernel would hand one's requests
            # to the other's apps (seen: `make serve`'s /v1/models answered 401 by the app tests'
            # server, whose app has keys).
            self.ingress_env.update(RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
                                    RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
                                    RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=str(free_port()),
                                    RAY_SERVE_FALLBACK_PROXY_GRPC_PORT=str(free_port()),
                                    **direct_ingress_ports())
        self.api_key = api_key
        self.dashboard_port = dashboard_port
        self.num_cpus = num_cpus
        self.extra_env = extra_env or {}
        self.port = config["http_options"]["port"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        # Ray's Prometheus export of this node: Ray's, Serve's and vLLM's (`ray_vllm_*`) metrics,
        # as on a pod's `metrics` port (8080) in the cluster.
        self.metrics_port = metrics_port or free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self._temp_dir: Optional[str] = None
        self._saved_env: dict = {}

    @property
    def logs_dir(self) -> Optional[Path]:
        """The running local Ray session's log folder (serve/ holds the replicas' logs), or None."""
        return Path(self._temp_dir) / "session_latest" / "logs" if self._temp_dir else None

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> "LocalServe":
        try:
            self.start_ray()
            self.submit()
            self.wait_running()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _environment(self) -> dict:
        # Short temp path: Ray puts Unix sockets there, and their paths are length-limited.
        self._temp_dir = tempfile.mkdtemp(prefix="vrs-", dir="/tmp")
        env = {
            # Ray 2.60 turns token auth on by default; this cluster is loopback-only and short-lived.
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            # Workers import vllm_app from here, as pods do from the ConfigMap mount.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "files"), os.environ.get("PYTHONPATH")])),
            "TMPDIR": self._temp_dir,
            "RAY_TMPDIR": self._temp_dir,
            **vllm_environment(),
            **self.ingress_env,
        }
        if self.api_key:
            env[API_KEY_ENV] = self.api_key
        env.update(self.extra_env)
        return env

    def start_ray(self) -> None:
        import ray

        for name, value in self._environment().items():
            self._saved_env[name] = os.environ.get(name)
            os.environ[name] = value
        ray.init(
            address="local",  # never join a stale cluster from an earlier run
            num_cpus=self.num_cpus,
            num_gpus=0,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=self.dashboard_port,
            object_store_memory=256 * 1024 * 1024,
            _node_ip_address="127.0.0.1",
            _metrics_export_port=self.metrics_port,
            _temp_dir=self._temp_dir,
            log_to_driver=False,
        )
        self._wait_for_dashboard()

    def _wait_for_dashboard(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._request("GET", "/api/serve/applications/")
                return
            except (urllib.error.URLError, OSError, LocalServeError):
                time.sleep(1)
        raise LocalServeError(f"Ray's dashboard did not answer on {self.dashboard_url} in {timeout:.0f}s")

    def submit(self) -> None:
        """What KubeRay does with serveConfigV2: PUT it to the dashboard's Serve REST API."""
        self._request("PUT", "/api/serve/applications/", self.config)

    def status(self) -> dict:
        return self._request("GET", "/api/serve/applications/")

    @contextlib.contextmanager
    def added(self, app: dict, timeout: float = 600):
        """Deploy one more application beside the running ones (as a `helm upgrade` adding it to
        serveConfigV2 would), wait until it runs, and remove it afterwards. Serve removes it in the
        background once it says DELETING; the running apps are never touched."""
        original = self.config
        self.config = {**original, "applications": [*original["applications"], app]}
        try:
            self.submit()
            self.wait_running(timeout)
            yield app
        finally:
            self.config = original
            self.submit()
            deadline = time.monotonic() + 60
            while self.status().get("applications", {}).get(app["name"], {}).get("status") not in (None, "DELETING") \
                    and time.monotonic() < deadline:
                time.sleep(0.5)

    def wait_running(self, timeout: float = 600) -> dict:
        names = [app["name"] for app in self.config["applications"]]
        deadline = time.monotonic() + timeout
        last = {}
        while time.monotonic() < deadline:
            apps = self.status().get("applications", {})
            last = {name: apps.get(name, {}).get("status") for name in names}
            failed = [name for name, status in last.items() if status in ("DEPLOY_FAILED", "UNHEALTHY")]
            if failed:
                app = apps[failed[0]]
                details = [app.get("message", "")] + [
                    f"{name}: {deployment.get('message', '')}"
                    for name, deployment in app.get("deployments", {}).items() if deployment.get("message")]
                raise LocalServeError(_start_failure(failed[0], last[failed[0]], "\n".join(details)))
            if all(status == "RUNNING" for status in last.values()):
                return apps
            time.sleep(1)
        raise LocalServeError(f"applications not RUNNING after {timeout:.0f}s: {last}")

    def stop(self) -> None:
        import ray

        if ray.is_initialized():
            # Taken first: once a replica exits, vLLM's engine processes are re-parented away from us.
            started = _descendants()
            # No graceful Serve shutdown: deleting the applications through the dashboard (what
            # KubeRay would do) blocks for 30 s, the Serve controller's own shutdown timeout, and
            # then the replicas drain. A local stop ends the whole cluster, so requests in flight
            # are cut; on a cluster, stopping replicas drain (serving.gracefulShutdownTimeoutSeconds).
            ray.shutdown()
            _reap(started + _descendants())
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = {}
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def _request(self, method: str, path: str, body: Optional[dict] = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.dashboard_url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as error:
            raise LocalServeError(f"{method} {path}: HTTP {error.code}: {error.read().decode()[:1000]}") from None
        return json.loads(text) if text.strip() else {}


# The app begins every error that stops it from starting with this (files/vllm_app.py, START_FAILED).
START_FAILED = "vllm_app cannot start:"
FAILURE_LOG = REPO / "build" / "serve_local_failure.log"


def _start_failure(app: str, status: str, details: str) -> str:
    """What a failed deploy says: the app's own one-line reason when it gave one (the full status,
    tracebacks included, goes to FAILURE_LOG), else Serve's whole message."""
    reasons = [line[line.index(START_FAILED):].strip() for line in details.splitlines() if START_FAILED in line]
    if not reasons:
        return f"application {app} is {status}: {details}"
    FAILURE_LOG.parent.mkdir(parents=True, exist_ok=True)
    FAILURE_LOG.write_text(f"application {app} is {status}:\n{details}\n")
    return f"{reasons[-1]}\n(application {app} is {status}; Serve's full report: {FAILURE_LOG})"


def _descendants() -> list:
    import psutil

    return psutil.Process().children(recursive=True)


def _reap(processes: list, grace: float = 5.0) -> None:
    """Ask the processes the local Ray started (raylet, workers, HAProxy, vLLM's engine processes)
    to exit, then kill what is left after `grace` seconds: nothing may outlive the run, nor keep
    burning CPU after it."""
    import psutil

    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def api_key_from(values: dict) -> Optional[str]:
    """The key the app will demand: the values' own, or (for an existingSecret) the environment's."""
    key_values = values.get("serving", {}).get("apiKey", {})
    if key_values.get("existingSecret"):
        if not os.environ.get(API_KEY_ENV):
            raise LocalServeError(f"serving.apiKey.existingSecret is set, and a local run cannot read "
                                  f"Secrets: export {API_KEY_ENV} with the key.")
        return os.environ[API_KEY_ENV]
    return key_values.get("value") or None


def _ingress_note(server: "LocalServe") -> str:
    if not server.haproxy:
        return "Ingress: Ray Serve's Python proxy (serving.ingress=proxy), on 127.0.0.1."
    env = server.ingress_env
    return ("Ingress: Ray Serve's HAProxy (the chart's default, serving.ingress=haproxy). HAProxy and the "
            f"replica's own HTTP port ({env['RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT']}-"
            f"{env['RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT']}) listen on 127.0.0.1; Ray 2.60 binds HAProxy's stats "
            f"({env['RAY_SERVE_HAPROXY_STATS_PORT']}) and metrics ({env['RAY_SERVE_HAPROXY_METRICS_PORT']}) "
            "ports on all interfaces.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-f", "--values", action="append", default=None,
                        help=f"values file (repeatable; default {DEFAULT_VALUES.relative_to(REPO)})")
    parser.add_argument("--set", action="append", default=[], dest="set_values", help="KEY=VALUE, as helm")
    parser.add_argument("--model", help="model id or path (default: build and serve the tiny demo model)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--metrics-port", type=int, default=8080, help="Ray's Prometheus metrics port")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)

    values_files = args.values or [DEFAULT_VALUES]
    model = args.model
    extra_env = {}
    if not model:
        print(f"Building the tiny demo model in {DEMO_MODEL_DIR} ...", flush=True)
        model = str(tiny_model.build(DEMO_MODEL_DIR))
        extra_env["HF_HUB_OFFLINE"] = "1"
        # Served under a plain name; a --set model.servedName=... still wins.
        demo = {"model": {"servedName": DEMO_MODEL_NAME}}
    else:
        demo = {}
    try:
        config, values = local_serve_config(values_files, args.set_values, model, args.port, values=demo)
        api_key = api_key_from(values)
    except (chart.ChartError, LocalServeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    served = config["applications"][0]["args"]["model"]["servedName"]
    print(f"Starting Ray and deploying {served} (first start takes a minute) ...", flush=True)
    try:
        with LocalServe(config, api_key=api_key, dashboard_port=args.dashboard_port, num_cpus=args.num_cpus,
                        extra_env=extra_env, metrics_port=args.metrics_port, values=values) as server:
            auth = ' -H "Authorization: Bearer $VLLM_RAYSERVICE_API_KEY"' if api_key else ""
            print(f"\nServing {served} on {server.url} (Ctrl-C stops it). Try:\n"
                  f"  curl {server.url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
                  f"    -d '{{\"model\": \"{served}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n"
                  f"Metrics (Ray, Serve and vLLM's engine, for Prometheus): {server.metrics_url}\n"
                  f"{_ingress_note(server)}\n",
                  flush=True)
            stop.wait()
            print("Stopping ...", flush=True)
    except LocalServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
