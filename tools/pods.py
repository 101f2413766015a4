"""The chart's rendered pods as Docker containers: a real multi-node Ray from the rendered specs.

Not a Kubernetes emulator. It takes the head and worker pod templates of the rendered RayService and
the helm test pod, adds what KubeRay v1.4.2 (the version the README installs) adds to them when it
builds the pods, and runs each pod's Ray container with `docker run`. Where the real thing would
differ, it says so here, next to the code:

- KubeRay's additions, from `ray-operator/controllers/ray/common/pod.go` at v1.4.2 (v1.7.0 in
  brackets where it differs), see `kuberay_ray_container`:
  - the command: `BuildPod` replaces it with `/bin/bash -c --` (utils.GetContainerCommand; `-lc`
    only with ENABLE_LOGIN_SHELL) and the args `ulimit -n 65536; ray start ...`
    (`ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536}` in 1.7);
  - the `ray start` flags: rayStartParams plus `setMissingRayStartParams` (worker `address` =
    `<head service FQDN>:6379`, head `dashboard-host`, `metrics-export-port` 8080, `block`,
    `dashboard-agent-listen-port` 52365) and `generateRayStartCommand` (`num-cpus` from the CPU
    limit, `memory` from the memory limit, in bytes), sorted, as `convertParamMap` writes them; the
    head gets `no-monitor` when in-tree autoscaling is on (`DefaultHeadPodTemplate`);
  - the environment: `setContainerEnvVars` (FQ_RAY_IP and RAY_IP on workers, RAY_CLUSTER_NAME,
    RAY_CLUSTER_NAMESPACE, RAY_CLOUD_INSTANCE_ID (the pod name), RAY_NODE_TYPE_NAME,
    KUBERAY_GEN_RAY_START_CMD, RAY_PORT, the three RayService timeouts, RAY_ADDRESS
    (127.0.0.1:6379 on the head, the head service on workers), RAY_USAGE_STATS_*,
    RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE);
  - /dev/shm: an emptyDir of medium Memory sized like the memory limit when the template mounts
    none (`addEmptyDir`, `makeEmptyDirVolume`);
  - the probes the template leaves unset (`initLivenessAndReadinessProbe`): exec `wget ... | grep
    success` of the raylet (and, on the head, the GCS) through the dashboard agent; for RayService
    workers the readiness adds the Serve ingress's `/-/healthz`, failureThreshold 1. [1.7 with Ray
    >= 2.53: httpGet /api/healthz on port 52365 for liveness and the head's readiness];
  - workers wait for the GCS in the `wait-gcs-ready` init container (`DefaultWorkerPodTemplate`),
    run here as a container of its own before the worker's.
- Services are network aliases: the head service FQDN (`<cluster>-head-svc.<ns>.svc.cluster.local`,
  utils.GenerateFQDNServiceName) and the serve Service's name resolve to the head container. A real
  serve Service also spreads requests over the workers whose readiness passes; the probes' record
  shows when it would.
- Not run: KubeRay's autoscaler sidecar (it needs the Kubernetes API); the test starts and kills
  worker containers itself, as the autoscaler and the kubelet would. The kubelet's probe actions
  (restart after liveness failures, Endpoints from readiness) are recorded, not acted on.
- Resources: limits become --cpus and --memory (no swap); requests become --cpu-shares
  (1024 per CPU, as the kubelet sets cpu.shares). Kubernetes would refuse to schedule pods whose
  requests exceed a node; Docker runs them, so `resource_report` says when the machine is smaller.
- Open files: KubeRay's `ulimit -n 65536` needs a hard limit at least that high. Containers get the
  engine's (dockerd's) limit; where that is lower and the machine lacks CAP_SYS_RESOURCE (machines
  of this kind: 20000), the ulimit fails with "Operation not permitted" in the container log and
  `ray start` runs on with the lower limit, as it would on such a node.
- The network is one Docker network the run creates, --internal: the containers reach each other
  and the test host (through the bridge), nothing else. No port is published.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from tools import chart

KUBERAY_VERSION = "1.4.2"
HEAD_PORT = 6379  # utils.DefaultRedisPort; the chart's gcs-server port
DASHBOARD_PORT = 8265
AGENT_PORT = 52365  # utils.DefaultDashboardAgentListenPort
METRICS_PORT = 8080
CLUSTER_DOMAIN = "cluster.local"
# utils.BaseWgetHealthCommand: timeout, port, path.
WGET_HEALTH = "wget --tries 1 -T {timeout} -q -O- http://localhost:{port}/{path} | grep success"
# The probe the chart had before issue 17 item B (the guide's): the raylet only.
RAYLET_ONLY_PROBE = ["bash", "-c", WGET_HEALTH.format(timeout=2, port=AGENT_PORT, path="api/local_raylet_healthz")]


class PodError(Exception):
    pass


# --- what KubeRay builds from the rendered templates ------------------------------------------------

def quantity(value) -> float:
    """A Kubernetes quantity as a number (CPUs, or bytes for memory)."""
    text = str(value)
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for suffix, factor in suffixes.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def _flags(params: dict) -> str:
    """convertParamMap: sorted `--key=value`, booleans "true" as a bare `--key`."""
    parts = []
    for key in sorted(params):
        value = str(params[key])
        if value.lower() == "true":
            parts.append(f"--{key}")
        elif value.lower() == "false":
            continue
        else:
            parts.append(f"--{key}={value}")
    return " ".join(parts)


def _default_probes(node_type: str, serve_port: int) -> dict:
    """initLivenessAndReadinessProbe (v1.4.2) for a RayService pod."""
    raylet = WGET_HEALTH.format(timeout=2, port=AGENT_PORT, path="api/local_raylet_healthz")
    gcs = WGET_HEALTH.format(timeout=10, port=DASHBOARD_PORT, path="api/gcs_healthz")
    checks = [raylet, gcs] if node_type == "head" else [raylet]
    timeout = 5 if node_type == "head" else 2
    liveness = {"exec": {"command": ["bash", "-c", " && ".join(checks)]}, "initialDelaySeconds": 30,
                "timeoutSeconds": timeout, "periodSeconds": 5, "successThreshold": 1, "failureThreshold": 120}
    readiness = {"exec": {"command": ["bash", "-c", " && ".join(checks)]}, "initialDelaySeconds": 10,
                 "timeoutSeconds": timeout, "periodSeconds": 5, "successThreshold": 1, "failureThreshold": 10}
    if node_type == "worker":
        serve = WGET_HEALTH.format(timeout=10, port=serve_port, path="-/healthz")
        readiness["exec"]["command"] = ["bash", "-c", " && ".join(checks + [serve])]
        readiness["failureThreshold"] = 1
    return {"livenessProbe": liveness, "readinessProbe": readiness}


def kuberay_worker_readiness(serve_port: int = 8000) -> list[str]:
    """KubeRay's default readiness command for a RayService worker (what review item B relies on)."""
    return _default_probes("worker", serve_port)["readinessProbe"]["exec"]["command"]


@dataclass
class ContainerSpec:
    """One container to `docker run`: what the pod spec and KubeRay make of it."""
    name: str
    image: str
    command: list[str]
    env: dict
    cpus: Optional[float] = None
    cpu_shares: Optional[int] = None
    memory: Optional[int] = None
    shm_size: Optional[int] = None
    mounts: list = field(default_factory=list)  # (host path, container path, read_only)
    tmpfs: list = field(default_factory=list)  # (container path, size in bytes)
    user: Optional[str] = None
    read_only_root: bool = False
    drop_all_caps: bool = False
    no_new_privileges: bool = False
    aliases: list = field(default_factory=list)
    probes: dict = field(default_factory=dict)  # "readiness"/"liveness" -> probe spec
    probe_sources: dict = field(default_factory=dict)  # "readiness"/"liveness" -> "chart" / "KubeRay default"


@dataclass
class RenderedCluster:
    """The rendered objects, and KubeRay's view of them."""
    rendered: chart.Rendered
    release: str
    namespace: str
    cluster_name: str

    @property
    def rayservice(self) -> dict:
        return self.rendered.rayservice()

    @property
    def serve_config(self) -> dict:
        return self.rendered.serve_config()

    @property
    def head_service_fqdn(self) -> str:
        return f"{self.cluster_name}-head-svc.{self.namespace}.svc.{CLUSTER_DOMAIN}"

    @property
    def serve_service(self) -> str:
        return self.rayservice["spec"]["serveService"]["metadata"]["name"]

    @property
    def serve_port(self) -> int:
        return int(yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])["http_options"]["port"])

    def config_map_data(self) -> dict:
        return self.rendered.one("ConfigMap")["data"]

    def _group(self, node_type: str) -> dict:
        spec = self.rayservice["spec"]["rayClusterConfig"]
        return spec["headGroupSpec"] if node_type == "head" else spec["workerGroupSpecs"][0]

    def start_params(self, node_type: str) -> dict:
        cluster = self.rayservice["spec"]["rayClusterConfig"]
        group = self._group(node_type)
        params = {key: str(value) for key, value in (group.get("rayStartParams") or {}).items()}
        container = group["template"]["spec"]["containers"][0]
        limits = (container.get("resources") or {}).get("limits") or {}
        if node_type == "worker":
            params.setdefault("address", f"{self.head_service_fqdn}:{HEAD_PORT}")
        else:
            params.setdefault("dashboard-host", "0.0.0.0")
            if cluster.get("enableInTreeAutoscaling"):
                params["no-monitor"] = "true"
        params.setdefault("metrics-export-port", str(METRICS_PORT))
        params["block"] = "true"
        params.setdefault("dashboard-agent-listen-port", str(AGENT_PORT))
        if "num-cpus" not in params and "cpu" in limits:
            params["num-cpus"] = str(int(quantity(limits["cpu"])))
        if "memory" not in params and "memory" in limits:
            params["memory"] = str(int(quantity(limits["memory"])))
        return params

    def ray_start_command(self, node_type: str) -> str:
        head = "--head " if node_type == "head" else ""
        return f"ray start {head}{_flags(self.start_params(node_type))}"

    def pod_container(self, node_type: str, pod_name: str, config_dir: Path,
                      host_paths: Optional[dict] = None) -> ContainerSpec:
        """The Ray container of a head or worker pod as KubeRay v1.4.2 builds it."""
        group = self._group(node_type)
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        if container.get("command") or container.get("args"):
            raise PodError("the chart renders a command for the Ray container; KubeRay would prepend it "
                           "to `ray start` (BuildPod): not modelled here")
        start = self.ray_start_command(node_type)
        env = container_env(container)
        group_name = "headgroup" if node_type == "head" else group["groupName"]
        address_host = "127.0.0.1" if node_type == "head" else self.head_service_fqdn
        injected = {
            "RAY_CLUSTER_NAME": self.cluster_name, "RAY_CLUSTER_NAMESPACE": self.namespace,
            "RAY_CLOUD_INSTANCE_ID": pod_name, "RAY_NODE_TYPE_NAME": group_name,
            "KUBERAY_GEN_RAY_START_CMD": start, "RAY_PORT": str(HEAD_PORT),
            "RAY_TIMEOUT_MS_TASK_WAIT_FOR_DEATH_INFO": "0", "RAY_GCS_SERVER_REQUEST_TIMEOUT_SECONDS": "5",
            "RAY_SERVE_KV_TIMEOUT_S": "5", "RAY_ADDRESS": f"{address_host}:{HEAD_PORT}",
            "RAY_USAGE_STATS_KUBERAY_IN_USE": "1", "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE": "1",
        }
        if node_type == "worker":
            injected = {"FQ_RAY_IP": self.head_service_fqdn,
                        "RAY_IP": self.head_service_fqdn.split(".")[0], **injected}
        else:
            injected["RAY_USAGE_STATS_EXTRA_TAGS"] = f"kuberay_version=v{KUBERAY_VERSION};kuberay_crd=RayService"
        for name, value in injected.items():
            env.setdefault(name, value)
        spec = ContainerSpec(name=pod_name, image=container["image"],
                             command=["/bin/bash", "-c", "--", f"ulimit -n 65536; {start}"], env=env)
        _apply_resources(spec, container.get("resources") or {})
        _apply_volumes(spec, pod, container, config_dir, host_paths or {})
        if not any(path == "/dev/shm" for _, path, _ in spec.mounts) and spec.shm_size is None:
            spec.shm_size = spec.memory  # addEmptyDir: medium Memory, sized like the memory limit
        defaults = _default_probes(node_type, self.serve_port)
        for kind in ("readiness", "liveness"):
            rendered = container.get(f"{kind}Probe")
            spec.probes[kind] = rendered or defaults[f"{kind}Probe"]
            spec.probe_sources[kind] = "chart" if rendered else f"KubeRay {KUBERAY_VERSION} default"
        return spec

    def wait_gcs_container(self, worker: ContainerSpec) -> ContainerSpec:
        """The worker's `wait-gcs-ready` init container (v1.4.2 gives up after 120 s of quiet retries
        and then retries loudly; here it is bounded by the caller's timeout)."""
        target = f"{self.head_service_fqdn}:{HEAD_PORT}"
        script = ("SECONDS=0; while true; do "
                  f"if ray health-check --address {target} > /dev/null 2>&1; then echo 'GCS is ready.'; break; fi; "
                  "echo \"$SECONDS seconds elapsed: Waiting for GCS to be ready.\"; sleep 5; done")
        return ContainerSpec(name=f"{worker.name}-wait-gcs-ready", image=worker.image,
                             command=["/bin/bash", "-c", "--", script], env=dict(worker.env),
                             cpus=0.2, memory=256 * 2**20, mounts=list(worker.mounts))

    def smoke_test_container(self, name: str, config_dir: Path, image: str) -> ContainerSpec:
        """The helm test pod, with `image` in place of its Docker Hub image."""
        pod = self.rendered.one("Pod")["spec"]
        container = pod["containers"][0]
        env = container_env(container)
        security = {**(pod.get("securityContext") or {}), **(container.get("securityContext") or {})}
        spec = ContainerSpec(name=name, image=image, command=container["command"] + container.get("args", []),
                             env=env, user=f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}"
                             if "runAsUser" in security else None,
                             read_only_root=bool(security.get("readOnlyRootFilesystem")),
                             drop_all_caps="ALL" in ((security.get("capabilities") or {}).get("drop") or []),
                             no_new_privileges=security.get("allowPrivilegeEscalation") is False)
        _apply_resources(spec, container.get("resources") or {})
        _apply_volumes(spec, pod, container, config_dir, {})
        return spec


def render_cluster(values: Optional[dict] = None, values_file: str = "ci/05-cpu-kind-values.yaml",
                   release: str = "ctest", namespace: str = "default") -> RenderedCluster:
    rendered = chart.render(values or {}, values_files=[chart.CHART_DIR / values_file], release=release,
                            namespace=namespace)
    name = rendered.rayservice()["metadata"]["name"]
    # utils.GenerateRayClusterName: <rayservice>-raycluster-<5 random characters>; fixed here.
    return RenderedCluster(rendered, release, namespace, f"{name}-raycluster-ctest")


def container_env(container: dict) -> dict:
    """The container's environment as the kubelet resolves it: plain values, and `resourceFieldRef`
    (a CPU or memory limit or request, rounded up in units of its divisor; without a limit, the
    node's capacity). Secrets (`secretKeyRef`) are left out: the tests give those themselves."""
    resources = container.get("resources") or {}
    env = {}
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = (item.get("valueFrom") or {}).get("resourceFieldRef")
        if ref is None:
            continue
        kind, _, resource = ref["resource"].partition(".")  # e.g. limits.cpu
        amount = (resources.get(kind) or {}).get(resource)
        if amount is None:
            amount = os.cpu_count() if resource == "cpu" else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        env[item["name"]] = str(math.ceil(quantity(amount) / quantity(ref.get("divisor", 1)) - 1e-9))
    return env


def _apply_resources(spec: ContainerSpec, resources: dict) -> None:
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    if "cpu" in limits:
        spec.cpus = quantity(limits["cpu"])
    if "memory" in limits:
        spec.memory = int(quantity(limits["memory"]))
    if "cpu" in requests:
        spec.cpu_shares = max(2, int(quantity(requests["cpu"]) * 1024))


def _apply_volumes(spec: ContainerSpec, pod: dict, container: dict, config_dir: Path, host_paths: dict) -> None:
    volumes = {volume["name"]: volume for volume in pod.get("volumes") or []}
    for mount in container.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        path, read_only = mount["mountPath"], bool(mount.get("readOnly"))
        if "configMap" in volume:
            folder = config_dir / mount["name"]
            items = volume["configMap"].get("items")
            data = read_config_map(config_dir)
            chosen = {item["path"]: data[item["key"]] for item in items} if items else data
            _write_folder(folder, chosen)
            spec.mounts.append((str(folder), path, True))  # the kubelet mounts configMaps read-only
        elif "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit")
            if volume["emptyDir"].get("medium") == "Memory" and path == "/dev/shm":
                spec.shm_size = int(quantity(size)) if size else spec.memory
            else:
                spec.tmpfs.append((path, int(quantity(size)) if size else None))
        elif "hostPath" in volume:
            spec.mounts.append((host_paths.get(volume["hostPath"]["path"], volume["hostPath"]["path"]), path, read_only))
        else:
            raise PodError(f"volume {mount['name']}: only configMap, emptyDir and hostPath volumes run here")


def read_config_map(config_dir: Path) -> dict:
    return json.loads((config_dir / "configmap.json").read_text())


def _write_folder(folder: Path, files: dict) -> None:
    """A ConfigMap volume: one file per key, readable by any user (defaultMode 0644)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    for name, text in files.items():
        target = folder / name
        target.write_text(text)
        target.chmod(0o644)


# --- Docker ------------------------------------------------------------------------------------------

def docker(*args: str, check: bool = True, timeout: Optional[float] = None) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], text=True, capture_output=True, timeout=timeout)
    if check and result.returncode != 0:
        raise PodError(f"docker {' '.join(args[:2])} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def docker_available() -> Optional[str]:
    """None when a Docker engine answers; otherwise why not."""
    if not shutil.which("docker"):
        return "no docker client on PATH (.ci/run installs Debian's docker.io)"
    try:
        result = docker("version", "--format", "{{.Server.Version}}", check=False, timeout=20)
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer in 20 s"
    if result.returncode != 0:
        return f"no Docker engine answers (start dockerd; .ci/run does): {result.stderr.strip()[:300]}"
    return None


@dataclass
class ProbeResult:
    at: float  # seconds since the pod's container started
    passed: bool
    output: str


class ProbeRunner(threading.Thread):
    """Runs one exec probe with `docker exec` at its period, as the kubelet would, and records it."""

    def __init__(self, container: str, kind: str, probe: dict, started: float,
                 command: Optional[list] = None):
        super().__init__(daemon=True, name=f"probe-{container}-{kind}")
        self.container, self.kind, self.probe, self.started = container, kind, probe, started
        self.command = command or probe["exec"]["command"]
        self.results: list[ProbeResult] = []
        self._stop = threading.Event()

    def run(self) -> None:
        period = self.probe.get("periodSeconds", 10)
        timeout = self.probe.get("timeoutSeconds", 1)
        next_at = self.started + self.probe.get("initialDelaySeconds", 0)
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            at = time.monotonic() - self.started
            try:
                result = docker("exec", self.container, *self.command, check=False, timeout=timeout + 5)
                passed, output = result.returncode == 0, (result.stdout + result.stderr).strip()[-300:]
            except subprocess.TimeoutExpired:
                passed, output = False, f"timed out after {timeout} s"
            self.results.append(ProbeResult(at, passed, output))
            next_at += period

    def stop(self) -> None:
        self._stop.set()

    def first_pass(self) -> Optional[float]:
        return next((result.at for result in self.results if result.passed), None)

    def kubelet_view(self) -> str:
        """What the kubelet would conclude: readiness flips, or a restart after failureThreshold misses."""
        threshold = self.probe.get("failureThreshold", 3)
        misses, events, ready = 0, [], False
        for result in self.results:
            misses = 0 if result.passed else misses + 1
            if self.kind == "readiness" and result.passed != ready and (result.passed or misses >= threshold):
                ready = result.passed
                events.append(f"{'Ready' if ready else 'NotReady'} at {result.at:.0f} s")
            if self.kind == "liveness" and misses == threshold:
                events.append(f"restart at {result.at:.0f} s")
        return ", ".join(events) or "no change"


class Pod:
    """A running container made from a ContainerSpec, with its probes."""

    def __init__(self, spec: ContainerSpec, network: str):
        self.spec, self.network = spec, network
        self.started = time.monotonic()
        self.probes: dict[str, ProbeRunner] = {}
        self.ip: Optional[str] = None

    @property
    def name(self) -> str:
        return self.spec.name

    def run_args(self, detach: bool = True) -> list[str]:
        spec = self.spec
        # The kubelet sets a pod's hostname to its name cut to 63 characters (a DNS label).
        args = ["run", "--name", spec.name, "--hostname", spec.name[:63].rstrip("-."), "--network", self.network,
                "--label", "io.vllm-rayservice.test=containers"]
        args += ["-d"] if detach else []
        for alias in spec.aliases:
            args += ["--network-alias", alias]
        if spec.cpus:
            args += ["--cpus", f"{min(spec.cpus, os.cpu_count() or 1):g}"]
        if spec.cpu_shares:
            args += ["--cpu-shares", str(spec.cpu_shares)]
        if spec.memory:
            args += ["--memory", str(spec.memory), "--memory-swap", str(spec.memory)]
        if spec.shm_size:
            args += ["--shm-size", str(spec.shm_size)]
        for host, path, read_only in spec.mounts:
            args += ["-v", f"{host}:{path}{':ro' if read_only else ''}"]
        for path, size in spec.tmpfs:
            args += ["--tmpfs", f"{path}:mode=1777{f',size={size}' if size else ''}"]
        if spec.user:
            args += ["--user", spec.user]
        if spec.read_only_root:
            args += ["--read-only"]
        if spec.drop_all_caps:
            args += ["--cap-drop", "ALL"]
        if spec.no_new_privileges:
            args += ["--security-opt", "no-new-privileges"]
        for name, value in spec.env.items():
            args += ["-e", f"{name}={value}"]
        args += ["--entrypoint", spec.command[0], spec.image, *spec.command[1:]]
        return args

    def start(self, probes: bool = True) -> "Pod":
        docker(*self.run_args())
        self.started = time.monotonic()
        self.ip = docker("inspect", "--format", f"{{{{(index .NetworkSettings.Networks \"{self.network}\").IPAddress}}}}",
                         self.name).stdout.strip()
        if probes:
            for kind, probe in self.spec.probes.items():
                if "exec" not in probe:
                    raise PodError(f"{self.name} {kind}: only exec probes run here")
                runner = ProbeRunner(self.name, kind, probe, self.started)
                runner.start()
                self.probes[kind] = runner
        return self

    def watch(self, label: str, command: list) -> ProbeRunner:
        """Another command run like the readiness probe, for comparison (e.g. the guide's old probe)."""
        probe = {**self.spec.probes["readiness"], "exec": {"command": command}}
        runner = ProbeRunner(self.name, label, probe, self.started)
        runner.start()
        self.probes[label] = runner
        return runner

    def exec(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return docker("exec", self.name, *command, check=False, timeout=timeout)

    def running(self) -> bool:
        result = docker("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return result.stdout.strip() == "true"

    def logs(self, lines: int = 60) -> str:
        result = docker("logs", "--tail", str(lines), self.name, check=False)
        return (result.stdout + result.stderr).strip()

    def ray_logs(self, pattern: str = "serve/*.log", lines: int = 30) -> str:
        """The tail of Ray's own log files in the container (the replica's and the controller's)."""
        script = f"for f in /tmp/ray/session_latest/logs/{pattern}; do echo \"== $f\"; tail -n {lines} \"$f\"; done"
        result = self.exec("bash", "-c", script, timeout=30)
        return (result.stdout + result.stderr)[-6000:]

    def kill(self) -> None:
        self.stop_probes()
        docker("kill", self.name, check=False)

    def stop_probes(self) -> None:
        for runner in self.probes.values():
            runner.stop()

    def remove(self) -> None:
        self.stop_probes()
        docker("rm", "-f", "-v", self.name, check=False)

    def probe_report(self) -> str:
        lines = []
        for kind, runner in self.probes.items():
            source = self.spec.probe_sources.get(kind, "comparison")
            first = runner.first_pass()
            lines.append(f"  {self.name} {kind} ({source}): first passed "
                         f"{'never' if first is None else f'at {first:.0f} s'} of {len(runner.results)} runs; "
                         f"kubelet: {runner.kubelet_view()}")
        return "\n".join(lines)


class Network(contextlib.AbstractContextManager):
    """A Docker network of this run, and every container started on it; all removed on exit."""

    def __init__(self, prefix: str = "vrs-ctest"):
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.pods: list[Pod] = []
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))

    def __enter__(self) -> "Network":
        docker("network", "create", "--internal", "--label", "io.vllm-rayservice.test=containers", self.name)
        return self

    def __exit__(self, *exc) -> None:
        for pod in self.pods:
            pod.remove()
        docker("network", "rm", self.name, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def start(self, spec: ContainerSpec, probes: bool = True) -> Pod:
        pod = Pod(spec, self.name)
        self.pods.append(pod)
        return pod.start(probes=probes)

    def run_to_end(self, spec: ContainerSpec, timeout: float) -> tuple[int, str]:
        """Run a container until it exits (an init container, a test pod): exit code and logs."""
        pod = self.start(spec, probes=False)
        deadline = time.monotonic() + timeout
        while pod.running():
            if time.monotonic() > deadline:
                logs = pod.logs()
                pod.kill()
                return -1, f"still running after {timeout:.0f} s:\n{logs}"
            time.sleep(1)
        code = int(docker("inspect", "--format", "{{.State.ExitCode}}", pod.name).stdout.strip())
        return code, pod.logs(200)


def cleanup_leftovers() -> list[str]:
    """Remove containers and networks an earlier, interrupted run left; return their names."""
    removed = []
    label = "label=io.vllm-rayservice.test=containers"
    for name in docker("ps", "-aq", "--filter", label, check=False).stdout.split():
        docker("rm", "-f", "-v", name, check=False)
        removed.append(name)
    for name in docker("network", "ls", "-q", "--filter", label, check=False).stdout.split():
        docker("network", "rm", name, check=False)
        removed.append(name)
    return removed


# --- HTTP to the containers (their network addresses, through the run's bridge) ----------------------

def http(method: str, url: str, body=None, timeout: float = 30.0, headers: Optional[dict] = None) -> tuple[int, str]:
    """(status, body text); status 0 with the error's text when nothing answered."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as error:
        return 0, f"{type(error).__name__}: {getattr(error, 'reason', error)}"


def wait_until(check: Callable[[], Optional[str]], timeout: float, poll: float = 2.0,
               explain: Callable[[], str] = lambda: "") -> float:
    """Poll `check` (None when done, else what it waits for) until done; return seconds taken."""
    started = time.monotonic()
    waiting = "?"
    while time.monotonic() - started < timeout:
        waiting = check()
        if waiting is None:
            return time.monotonic() - started
        time.sleep(poll)
    raise PodError(f"timed out after {timeout:.0f} s waiting for: {waiting}\n{explain()}")


# --- a RayService's cluster, run as containers ----------------------------------------------------------

MODEL_HOST_PATH = "/var/lib/vllm-rayservice/models/tiny-llama"  # the hostPath the test values name
MODEL_PATH = "/models/tiny-llama"  # where the pods see it


def tiny_model_values(served_name: str = "tiny-llama") -> dict:
    """Values that serve a local model folder from a hostPath volume on the workers (no model hub)."""
    return {"model": {"id": MODEL_PATH, "servedName": served_name},
            "workers": {"extraVolumes": [{"name": "model", "hostPath": {"path": MODEL_HOST_PATH}}],
                        "extraVolumeMounts": [{"name": "model", "mountPath": MODEL_PATH, "readOnly": True}]}}


class RayServiceContainers:
    """One head and any number of workers of a rendered RayService, on a Network of this run."""

    def __init__(self, rendered: RenderedCluster, network: Network, image: str, model_dir: Path):
        self.rendered, self.network, self.image = rendered, network, image
        self.config_dir = network.workdir / "configmap"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "configmap.json").write_text(json.dumps(rendered.config_map_data()))
        self.host_paths = {MODEL_HOST_PATH: str(model_dir)}
        self.head: Optional[Pod] = None
        self.workers: list[Pod] = []
        self._worker_count = 0

    # The pods ---------------------------------------------------------------------------------------

    def start_head(self) -> Pod:
        spec = self.rendered.pod_container("head", f"{self.rendered.cluster_name}-head-ctest",
                                           self.config_dir, self.host_paths)
        spec.image = self.image
        serve = self.rendered.serve_service
        spec.aliases = [self.rendered.head_service_fqdn, serve, f"{serve}.{self.rendered.namespace}.svc",
                        f"{serve}.{self.rendered.namespace}.svc.{CLUSTER_DOMAIN}"]
        self.head = self.network.start(spec)
        return self.head

    def start_worker(self, gcs_timeout: float = 180) -> Pod:
        """A new worker pod (a new name, as KubeRay names each pod it creates), after its init container."""
        self._worker_count += 1
        group = self.rendered.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
        name = f"{self.rendered.cluster_name}-{group}-worker-{self._worker_count}"
        spec = self.rendered.pod_container("worker", name, self.config_dir, self.host_paths)
        spec.image = self.image
        init = self.rendered.wait_gcs_container(spec)
        code, logs = self.network.run_to_end(init, timeout=gcs_timeout)
        if code != 0:
            raise PodError(f"{init.name} exited {code}:\n{logs}")
        worker = self.network.start(spec)
        self.workers.append(worker)
        return worker

    def pods(self) -> list[Pod]:
        return [pod for pod in [self.head, *self.workers] if pod is not None]

    # Ray and Serve, through the head's dashboard ----------------------------------------------------------

    def dashboard(self, path: str) -> str:
        return f"http://{self.head.ip}:{DASHBOARD_PORT}{path}"

    def serve_url(self, pod: Optional[Pod] = None) -> str:
        return f"http://{(pod or self.head).ip}:{self.rendered.serve_port}"

    def wait_dashboard(self, timeout: float = 180) -> float:
        def check():
            status, text = http("GET", self.dashboard("/api/gcs_healthz"), timeout=5)
            return None if status == 200 else f"the head's dashboard ({status} {text[:100]})"
        return wait_until(check, timeout, explain=self.report)

    def submit(self, serve_config: dict) -> None:
        """What KubeRay's RayService controller does with serveConfigV2 (UpdateDeployments)."""
        status, text = http("PUT", self.dashboard("/api/serve/applications/"), serve_config, timeout=60)
        if status != 200:
            raise PodError(f"PUT /api/serve/applications/ answered {status}: {text[:2000]}")

    def serve_details(self) -> dict:
        status, text = http("GET", self.dashboard("/api/serve/applications/"), timeout=20)
        if status != 200:
            raise PodError(f"GET /api/serve/applications/ answered {status}: {text[:500]}")
        return json.loads(text)

    def replicas(self, app: str = "llm") -> list[dict]:
        application = self.serve_details().get("applications", {}).get(app) or {}
        return [replica for deployment in (application.get("deployments") or {}).values()
                for replica in deployment.get("replicas") or []]

    def running_replica_ips(self, app: str = "llm") -> list[str]:
        return sorted(replica.get("node_ip") for replica in self.replicas(app) if replica.get("state") == "RUNNING")

    def wait_replicas_on(self, ips: set, timeout: float, app: str = "llm") -> float:
        """Wait until the app is RUNNING with a running replica on each of these node addresses."""
        def check():
            details = self.serve_details()
            application = details.get("applications", {}).get(app) or {}
            running = set(self.running_replica_ips(app))
            if application.get("status") == "RUNNING" and ips <= running:
                return None
            return (f"app {app} {application.get('status')} ({application.get('message', '')[:300]}), "
                    f"running replicas on {sorted(running)}, wanted on {sorted(ips)}")
        return wait_until(check, timeout, poll=2, explain=self.report)

    def alive_nodes(self) -> list[str]:
        """Addresses of the Ray nodes the GCS reports alive (the dashboard's state API)."""
        status, text = http("GET", self.dashboard("/api/v0/nodes?limit=100"), timeout=20)
        if status != 200:
            return []
        nodes = json.loads(text).get("data", {}).get("result", {}).get("result", [])
        return sorted(node.get("node_ip", "?") for node in nodes if node.get("state") == "ALIVE")

    # What a failing test prints ------------------------------------------------------------------------

    def report(self) -> str:
        parts = []
        with contextlib.suppress(Exception):
            details = self.serve_details()
            parts.append("Serve: " + json.dumps({
                "applications": {name: {"status": app.get("status"), "message": app.get("message", "")[:500],
                                        "replicas": [(r.get("node_ip"), r.get("state")) for d in
                                                     (app.get("deployments") or {}).values()
                                                     for r in d.get("replicas") or []]}
                                 for name, app in (details.get("applications") or {}).items()},
                "proxies": {p.get("node_ip"): p.get("status") for p in (details.get("proxies") or {}).values()}}))
        for pod in self.pods():
            parts.append(f"--- {pod.name} ({pod.ip}) running={pod.running()}: docker logs (tail)\n{pod.logs(40)}")
            if pod.running():
                parts.append(f"--- {pod.name}: Ray Serve logs (tail)\n{pod.ray_logs(lines=15)}")
            parts.append(pod.probe_report())
        return "\n".join(parts)


def resource_report(specs: list[ContainerSpec], cpus: Optional[int] = None, memory: Optional[int] = None) -> dict:
    """What the pods ask for against this machine: Kubernetes would schedule by requests."""
    cpus = cpus or os.cpu_count() or 1
    memory = memory or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit_cpus = sum(spec.cpus or 0 for spec in specs)
    request_cpus = sum((spec.cpu_shares or 0) / 1024 for spec in specs)
    limit_memory = sum(spec.memory or 0 for spec in specs)
    return {"machine_cpus": cpus, "machine_memory_gib": round(memory / 2**30, 1),
            "cpu_requests": round(request_cpus, 2), "cpu_limits": round(limit_cpus, 2),
            "memory_limits_gib": round(limit_memory / 2**30, 2),
            "fits_by_requests": request_cpus <= cpus and limit_memory <= memory}
