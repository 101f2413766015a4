"""What the cluster suite decides from what a cluster reports: is the RayService ready, has it failed
for good, how many Serve replicas run, and what to print when it does not become ready; and which
kubeconfig file every client of the suite reads.

Plain functions over the objects a cluster returns (dicts), so the default test run checks them
against recorded KubeRay statuses (tests/cluster/test_logic.py) without a cluster.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

# Serve application states (ray.serve.schema.ApplicationStatus) that no amount of waiting fixes.
APP_FAILED = {"DEPLOY_FAILED", "UNHEALTHY"}
# RayService Ready-condition reasons (KubeRay >= 1.3) that mean it will not become ready by itself.
TERMINAL_REASONS = {"InitializingTimeout", "ValidationFailed"}
# Warning events KubeRay < 1.5 emits, instead of a condition, when it refuses a RayService.
REJECTED_EVENT_REASONS = {"InvalidRayServiceSpec", "InvalidRayServiceMetadata"}


@dataclass
class Readiness:
    ready: bool
    failed: bool
    reason: str


def _condition(rayservice: dict, kind: str) -> Optional[dict]:
    return next((c for c in rayservice.get("status", {}).get("conditions", []) or [] if c.get("type") == kind), None)


def _cluster_status(rayservice: dict, which: str) -> dict:
    """activeServiceStatus or pendingServiceStatus. After a promotion KubeRay leaves the pending one
    as an empty struct that still serializes, so only rayClusterName says a cluster is there."""
    return (rayservice.get("status") or {}).get(which) or {}


def app_status(rayservice: dict, app: str = "llm", which: str = "activeServiceStatus") -> dict:
    """The Serve application's status as the RayService reports it for one of its clusters."""
    return (_cluster_status(rayservice, which).get("applicationStatuses") or {}).get(app) or {}


def _rejection(rayservice: dict, events: Iterable[dict]) -> Optional[str]:
    """Why KubeRay refused this RayService, if it did: a terminal Ready reason (KubeRay >= 1.5 for
    ValidationFailed) or, before that, only a Warning event."""
    ready = _condition(rayservice, "Ready")
    if ready is not None and ready.get("status") != "True" and ready.get("reason") in TERMINAL_REASONS:
        return f"Ready is {ready.get('status')} ({ready.get('reason')}): {ready.get('message', '')}"
    name = rayservice.get("metadata", {}).get("name")
    for event in events:
        involved = event.get("involvedObject") or event.get("regarding") or {}
        if (event.get("type") == "Warning" and event.get("reason") in REJECTED_EVENT_REASONS
                and involved.get("kind") == "RayService" and involved.get("name") == name):
            message = event.get("message") or event.get("note", "")
            return f"KubeRay refused the RayService ({event['reason']}): {message}"
    return None


def readiness(rayservice: dict, app: str = "llm", events: Iterable[dict] = ()) -> Readiness:
    """Ready when KubeRay says so for the current spec, no new cluster is pending and the app runs
    on the active cluster; failed when it cannot recover by waiting.

    A new RayService reports its app under pendingServiceStatus until KubeRay promotes the cluster,
    and so does a cluster upgrade: a broken app shows up there first, so both are read. KubeRay >=
    1.3 reports a `Ready` condition; older releases only `serviceStatus: Running`. Either way the
    status must be for the current spec (observedGeneration), so that a ready status left over from
    before an upgrade is not taken for the upgraded one.
    """
    status = rayservice.get("status") or {}
    generation = rayservice.get("metadata", {}).get("generation", 0)
    for which, cluster_role in (("pendingServiceStatus", "pending"), ("activeServiceStatus", "active")):
        application = app_status(rayservice, app, which)
        if application.get("status") in APP_FAILED:
            name = _cluster_status(rayservice, which).get("rayClusterName", "")
            return Readiness(False, True, f"Serve application {app} on the {cluster_role} cluster {name} is "
                                          f"{application['status']}: {application.get('message', '')}".strip())
    rejection = _rejection(rayservice, events)
    if rejection:
        return Readiness(False, True, rejection)
    ready_condition = _condition(rayservice, "Ready")
    if ready_condition is not None:
        observed = ready_condition.get("observedGeneration", status.get("observedGeneration", 0))
        if ready_condition.get("status") != "True":
            return Readiness(False, False, f"Ready is {ready_condition.get('status')} "
                                           f"({ready_condition.get('reason', '')}): "
                                           f"{ready_condition.get('message', '')}".strip())
    else:
        observed = status.get("observedGeneration", 0)
        if status.get("serviceStatus") != "Running":
            return Readiness(False, False, f"serviceStatus is {status.get('serviceStatus') or 'empty'}")
    if observed < generation:
        return Readiness(False, False, f"status is for generation {observed}, the spec is at {generation}")
    pending = _cluster_status(rayservice, "pendingServiceStatus").get("rayClusterName")
    if pending:
        pending_state = app_status(rayservice, app, "pendingServiceStatus").get("status") or "not reported yet"
        return Readiness(False, False, f"upgrade in progress: new cluster {pending} is being prepared "
                                       f"(Serve application {app} there: {pending_state})")
    app_state = app_status(rayservice, app).get("status", "")
    if app_state != "RUNNING":
        return Readiness(False, False, f"Serve application {app} is {app_state or 'not reported yet'}")
    return Readiness(True, False, "ready")


class WaitTimeout(Exception):
    pass


class WaitFailed(Exception):
    pass


class PortForwardError(ConnectionError):
    """kubectl port-forward did not come up (or died): the pod behind it may be restarting."""


# Errors that mean "not reachable right now", not "broken": a 503 from the dashboard while Serve
# reconfigures, a refused or reset connection, a port-forward that died with its pod.
TRANSIENT_ERRORS = (OSError, http.client.HTTPException)


def wait_for(check: Callable[[], Readiness], timeout: float, poll: float = 5.0,
             clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
             transient: tuple = ()) -> Readiness:
    """Poll `check` until ready (returned), failed for good (WaitFailed) or out of time (WaitTimeout).
    An exception in `transient` counts as "not ready yet"."""
    deadline = clock() + timeout
    while True:
        try:
            state = check()
        except transient as error:
            state = Readiness(False, False, f"not reachable yet: {type(error).__name__}: {error}")
        if state.ready:
            return state
        if state.failed:
            raise WaitFailed(state.reason)
        if clock() >= deadline:
            raise WaitTimeout(f"not ready after {timeout:.0f}s: {state.reason}")
        sleep(poll)


def running_replicas(serve_details: dict, app: str = "llm", deployment: str = "VLLMServer") -> int:
    """RUNNING replicas of a deployment, from the dashboard's GET /api/serve/applications/."""
    details = serve_details.get("applications", {}).get(app, {}).get("deployments", {}).get(deployment, {})
    return sum(1 for replica in details.get("replicas", []) if replica.get("state") == "RUNNING")


def serving_service_name(rayservice: dict) -> str:
    """The Service in front of Serve that KubeRay creates for this RayService, as rendered.

    KubeRay names it after spec.serveService (`<name>-serve-svc`), except under
    NewClusterWithIncrementalUpgrade: there (v1.5 and newer, common/service.go BuildServeService)
    it ignores spec.serveService and names one serve Service per cluster, and clients go through the
    Gateway `<name>-gateway`. The RayService's head Service, `<name>-head-svc`, follows the active
    cluster in every mode and carries the head's `serve` port (BuildHeadServiceForRayService)."""
    spec = rayservice["spec"]
    if (spec.get("upgradeStrategy") or {}).get("type") == "NewClusterWithIncrementalUpgrade":
        return f"{rayservice['metadata']['name']}-head-svc"
    return spec["serveService"]["metadata"]["name"]


class ServicePortError(Exception):
    pass


def serve_port(service: Optional[dict], name: str = "") -> int:
    """The port of the live Service named `serve`, the one KubeRay keeps for Serve.

    Read from the cluster, never from the values: KubeRay < 1.6 replaces the ports of
    spec.serveService with the head's container port (common/service.go, BuildServeService)."""
    if service is None:
        raise ServicePortError(f"Service {name} does not exist: KubeRay creates it once the Serve app runs "
                               "(kubectl get rayservice, and its events, say why not)")
    ports = service.get("spec", {}).get("ports") or []
    for port in ports:
        if port.get("name") == "serve":
            return port["port"]
    raise ServicePortError(f"Service {service['metadata']['name']} has no port named serve: "
                           f"{[(p.get('name'), p.get('port')) for p in ports]}")


_MEMORY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity(value, memory: bool = False) -> float:
    """A Kubernetes quantity as a number: CPUs ("500m" -> 0.5) or bytes ("6Gi")."""
    text = str(value)
    if not memory and text.endswith("m"):
        return int(text[:-1]) / 1000
    for unit, factor in _MEMORY_UNITS.items():
        if memory and text.endswith(unit):
            return float(text[:-len(unit)]) * factor
    return float(text)


def peak_requests(rayservice: dict, workers: int) -> dict[str, tuple[float, float]]:
    """(CPUs, GiB) the scheduler must find for the head pod (the Ray container and the autoscaler
    sidecar KubeRay adds with autoscalerOptions.resources, common/pod.go BuildAutoscalerContainer)
    and for `workers` worker pods of the first group, from a rendered RayService."""
    cluster_config = rayservice["spec"]["rayClusterConfig"]

    def requests(resources: dict) -> tuple[float, float]:
        # Kubernetes takes a resource's limit as its request when only the limit is set.
        def asked(name):
            return (resources.get("requests") or {}).get(name, (resources.get("limits") or {}).get(name, 0))
        return quantity(asked("cpu")), quantity(asked("memory"), memory=True) / 2**30

    [head] = cluster_config["headGroupSpec"]["template"]["spec"]["containers"]
    [worker] = cluster_config["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    parts = {"head": requests(head["resources"]),
             "autoscaler": requests(cluster_config["autoscalerOptions"]["resources"]),
             "worker": requests(worker["resources"])}
    parts["total"] = tuple(parts["head"][i] + parts["autoscaler"][i] + workers * parts["worker"][i] for i in (0, 1))
    return parts


def failure_report(rayservice: Optional[dict], events: Iterable[dict], pod_logs: dict[str, str],
                   log_lines: int = 40) -> str:
    """What a person needs when the RayService did not become ready: its status, the events, the
    last lines of each pod's log."""
    import yaml

    parts = ["RayService status:"]
    parts.append(yaml.safe_dump((rayservice or {}).get("status", {"note": "the RayService does not exist"}),
                                sort_keys=False).rstrip())
    events = sorted(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    parts.append(f"\nEvents ({len(events)}):")
    for event in events[-30:]:
        involved = event.get("involvedObject", {})
        parts.append(f"  {event.get('lastTimestamp') or event.get('eventTime') or '-'} {event.get('type', '')} "
                     f"{involved.get('kind', '')}/{involved.get('name', '')} {event.get('reason', '')}: "
                     f"{event.get('message', '')}".rstrip())
    for pod, log in sorted(pod_logs.items()):
        tail = log.rstrip().splitlines()[-log_lines:]
        parts.append(f"\nLast {len(tail)} log lines of pod {pod}:")
        parts.extend("  " + line for line in tail)
    return "\n".join(parts)


def scheduling_report(pods: Iterable[dict], events: Iterable[dict], events_per_pod: int = 5) -> str:
    """Why pods stay Pending: for each one, the scheduler's PodScheduled condition and the pod's
    last events (FailedScheduling says which resource no node has). Empty when none is Pending."""
    events = sorted(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    parts = []
    for pod in pods:
        if (pod.get("status") or {}).get("phase") != "Pending":
            continue
        name = pod["metadata"]["name"]
        scheduled = next((c for c in pod["status"].get("conditions") or [] if c.get("type") == "PodScheduled"), {})
        state = (f"not scheduled ({scheduled.get('reason', '')}): {scheduled.get('message', '')}"
                 if scheduled.get("status") == "False" else "scheduled, containers not started yet")
        parts.append(f"Pod {name} is Pending, {state}".rstrip(": "))
        own = [e for e in events if (e.get("involvedObject") or {}).get("kind") == "Pod"
               and (e.get("involvedObject") or {}).get("name") == name]
        for event in own[-events_per_pod:]:
            parts.append(f"  {event.get('lastTimestamp') or event.get('eventTime') or '-'} {event.get('type', '')} "
                         f"{event.get('reason', '')}: {event.get('message', '')}".rstrip())
        if not own:
            parts.append("  (no events)")
    return "\n".join(parts)


# The label both of KubeRay's installs put on the operator's pod: the kuberay-operator Helm chart
# (component: the chart name) and the kustomize manifests (ray-operator/config/manager).
OPERATOR_SELECTOR = {"app.kubernetes.io/component": "kuberay-operator"}


def operator_version(pods: Iterable[dict]) -> tuple[str, Optional[str]]:
    """The KubeRay operator's image and its version ("1.4.2", from the tag "v1.4.2"), from the
    operator's pods; the version is None when the tag is no release (latest, a digest, a fork's)."""
    images = sorted({container.get("image", "") for pod in pods
                     for container in pod.get("spec", {}).get("containers", [])
                     if container.get("name") == "kuberay-operator" or "kuberay" in container.get("image", "")})
    if not images:
        return "not found", None
    image = images[-1] if len(images) == 1 else ", ".join(images)
    tag = images[-1].rsplit("/", 1)[-1].partition("@")[0].partition(":")[2]
    match = re.fullmatch(r"v?(\d+\.\d+\.\d+)", tag)
    return image, (match.group(1) if match and len(images) == 1 else None)


def is_hook(obj: dict) -> bool:
    return "helm.sh/hook" in (obj.get("metadata", {}).get("annotations") or {})


def leftovers(objects: Iterable[dict], release: str) -> list[str]:
    """Kind/name of the objects still belonging to `release` after an uninstall, except those Helm
    keeps on purpose (`helm.sh/resource-policy: keep`, such as the model cache claim) and hooks,
    such as a failed `helm test` pod: uninstall deletes only the release manifest, never hooks."""
    left = []
    for obj in objects:
        metadata = obj.get("metadata", {})
        if metadata.get("labels", {}).get("app.kubernetes.io/instance") != release:
            continue
        if (metadata.get("annotations") or {}).get("helm.sh/resource-policy") == "keep" or is_hook(obj):
            continue
        left.append(f"{obj.get('kind')}/{metadata.get('name')}")
    return sorted(left)


class KubeconfigError(Exception):
    pass


# Fields of a kubeconfig that name files; a relative path is relative to the file it is written in.
_FILE_FIELDS = {"clusters": ("certificate-authority",), "users": ("client-certificate", "client-key", "tokenFile")}


def resolve_kubeconfig(paths: str, workdir: Path) -> Path:
    """The one kubeconfig file helm, kubectl and pykube all read.

    `paths` is --kubeconfig or KUBECONFIG: one file, or several joined by os.pathsep as kubectl
    allows. pykube reads a single file, so several are merged into one in `workdir` the way kubectl
    merges them: files that do not exist are skipped, and the first file to define a cluster, user,
    context or current-context wins.
    """
    import yaml

    files = [Path(part).expanduser() for part in paths.split(os.pathsep) if part]
    existing = [path.resolve() for path in files if path.is_file()]
    if not existing:
        raise KubeconfigError(f"no kubeconfig file found at {paths}: pass --kubeconfig=PATH to an existing file")
    if len(existing) == 1:
        return existing[0]
    merged: dict = {"apiVersion": "v1", "kind": "Config", "clusters": [], "users": [], "contexts": []}
    for path in existing:
        doc = yaml.safe_load(path.read_text()) or {}
        for section in ("clusters", "users", "contexts"):
            known = {entry["name"] for entry in merged[section]}
            for entry in doc.get(section) or []:
                if entry.get("name") not in known:
                    merged[section].append(_absolute_file_fields(section, entry, path.parent))
        if doc.get("current-context") and not merged.get("current-context"):
            merged["current-context"] = doc["current-context"]
    target = Path(workdir) / "kubeconfig"
    target.write_text(yaml.safe_dump(merged, sort_keys=False))
    target.chmod(0o600)  # it may hold credentials
    return target


def _absolute_file_fields(section: str, entry: dict, base: Path) -> dict:
    inner_key = section[:-1]  # clusters -> cluster, users -> user
    inner = dict(entry.get(inner_key) or {})
    for field in _FILE_FIELDS.get(section, ()):
        if inner.get(field) and not Path(inner[field]).expanduser().is_absolute():
            inner[field] = str(base / inner[field])
    return {**entry, inner_key: inner}


# The exec credential plugin versions pykube-ng 23.6 (the suite's API client) can run.
PYKUBE_EXEC_VERSIONS = ("client.authentication.k8s.io/v1beta1", "client.authentication.k8s.io/v1alpha1")


def credential_problem(user_name: str, user: dict) -> Optional[str]:
    """What keeps the suite's API client from authenticating as this kubeconfig user, if anything.

    Managed clusters (EKS, GKE, AKS) hand out credentials through an exec plugin; pykube runs it only
    at the v1alpha1/v1beta1 protocol and fails on the first request otherwise.
    """
    plugin = user.get("exec")
    if not plugin:
        return None
    version, command = plugin.get("apiVersion", ""), plugin.get("command", "")
    if version not in PYKUBE_EXEC_VERSIONS:
        return (f"the kubeconfig user {user_name} gets credentials from the exec plugin {command} at {version}, but "
                f"pykube-ng 23.6, the suite's API client, runs exec plugins only at "
                f"{' or '.join(PYKUBE_EXEC_VERSIONS)}. "
                f"Set that user's exec apiVersion to {PYKUBE_EXEC_VERSIONS[0]} if the plugin supports it (the "
                "common cloud plugins do), or pass a kubeconfig with a token or client certificate.")
    if shutil.which(command) is None:
        return (f"the kubeconfig user {user_name} gets credentials from the exec plugin {command}, which is not "
                "on PATH: install it (your cloud provider's CLI or auth plugin) or fix the path in the kubeconfig.")
    return None


def explain_api_error(error: Exception, permission: str) -> str:
    """A refused cluster-scoped read, said so that a user knows which permission to ask for."""
    code = getattr(error, "code", None) or getattr(getattr(error, "response", None), "status_code", None)
    if code == 403:
        return (f"403 Forbidden: the kubeconfig's user may not {permission}. The suite checks this before installing; "
                f"ask a cluster admin for that permission (a ClusterRole) or run with an admin kubeconfig. ({error})")
    if code == 401:
        return (f"401 Unauthorized while trying to {permission}: the API server did not accept the kubeconfig's "
                f"credentials; refresh them (an expired token or certificate, or a failing exec plugin). ({error})")
    return f"could not {permission}: {error}"


def helm_test_failure(error: Exception, timeout: float, pod_report: str) -> str:
    """What to say when `helm test` raised: a timeout plainly as one, and in both cases the test pod's
    state and log, which the Helm SDK does not return when the test fails."""
    import helm_python

    detail = f"{type(error).__name__}: {error}"
    # helm-c maps a context deadline to HelmCancelledError, other failures to HelmReleaseError.
    if isinstance(error, helm_python.HelmCancelledError) or "deadline exceeded" in str(error):
        headline = f"helm test did not finish within {timeout:.0f}s ({detail})"
    else:
        headline = f"helm test failed ({detail})"
    return f"{headline}\n\n{pod_report}"
