"""The release under test on a live cluster: installed once per module with a unique name, torn down
(and checked gone) afterwards, also when a test fails. Skips with instructions when no cluster is
given; see the docs/cluster-suite.md."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tools import chart, cluster, serve_local

REPO = Path(__file__).resolve().parents[2]
HOW_TO_RUN = ("no cluster given: pass --kubeconfig=PATH or set KUBECONFIG, e.g. "
              "`make test-cluster PYTEST_ARGS=--kubeconfig=$HOME/.kube/config` (docs/cluster-suite.md)")


@dataclass
class Release:
    name: str
    fullname: str
    namespace: str
    values: dict
    kubeconfig: str
    helm: object  # helm_python.Config
    api: object  # pykube.HTTPClient
    serve_service_name: str = ""  # the Service in front of Serve (tools.cluster.serving_service_name)
    uninstalled: bool = False  # set by uninstall(): the release is gone, Helm must not be asked again

    def rayservice(self) -> dict | None:
        return get_object(self.api, "ray.io/v1", "RayService", self.namespace, self.fullname)

    def serve_target(self) -> tuple[str, int]:
        """The Service clients call and the port it really has, read from the cluster (not
        service.port: KubeRay < 1.6 keeps the Service on the head's serve port), for port-forward."""
        service = get_object(self.api, "v1", "Service", self.namespace, self.serve_service_name)
        return f"svc/{self.serve_service_name}", cluster.serve_port(service, self.serve_service_name)


def get_object(api, api_version, kind, namespace, name):
    import pykube

    resource = pykube.object_factory(api, api_version, kind)
    try:
        return resource.objects(api).filter(namespace=namespace).get(name=name).obj
    except pykube.ObjectDoesNotExist:
        return None


def release_objects(api, namespace, release_name) -> list[str]:
    """Kind/name of what is left of the release (pods and KubeRay's objects included)."""
    import pykube

    selector = {"app.kubernetes.io/instance": release_name}
    resources = (pykube.ConfigMap, pykube.Secret, pykube.Service, pykube.Pod, pykube.ServiceAccount,
                 pykube.PersistentVolumeClaim, pykube.object_factory(api, "ray.io/v1", "RayService"),
                 pykube.object_factory(api, "ray.io/v1", "RayCluster"))
    objects = [obj.obj for resource in resources
               for obj in resource.objects(api).filter(namespace=namespace, selector=selector)]
    return cluster.leftovers(objects, release_name)


def delete_test_pods(api, namespace, release_name) -> None:
    """A failed `helm test` keeps its pod for debugging; uninstall never deletes hooks."""
    import pykube

    for pod in pykube.Pod.objects(api).filter(namespace=namespace,
                                              selector={"app.kubernetes.io/instance": release_name}):
        if cluster.is_hook(pod.obj):
            pod.delete()


@pytest.fixture(scope="module")
def kubeconfig(pytestconfig, tmp_path_factory) -> str:
    """One kubeconfig file for helm, kubectl and pykube: --kubeconfig (the option pytest-helm-charts
    registers), else KUBECONFIG, which may list several files."""
    paths = pytestconfig.getoption("kubeconfig", default=None) or os.environ.get("KUBECONFIG")
    if not paths:
        pytest.skip(HOW_TO_RUN)
    try:
        return str(cluster.resolve_kubeconfig(paths, tmp_path_factory.mktemp("kubeconfig")))
    except cluster.KubeconfigError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def kube_config(kubeconfig) -> str:
    """Overrides pytest-helm-charts' fixture of this name, so its pykube client reads the same file."""
    return kubeconfig


@pytest.fixture(scope="module")
def kube_api(kube_cluster):
    # pytest-helm-charts' cluster fixture: a pykube client for the kubeconfig above.
    return kube_cluster.kube_client


@pytest.fixture(scope="module")
def prerequisites(kubeconfig, kube_api, pytestconfig) -> dict:
    """Everything the suite needs, checked first, each failure saying what to do."""
    namespace = pytestconfig.getoption("cluster_namespace")
    context = kube_api.config.current_context
    user_name = kube_api.config.contexts[context].get("user", "")
    problem = cluster.credential_problem(user_name, kube_api.config.user)
    if problem:
        pytest.fail(problem, pytrace=False)
    try:
        version = kube_api.version
    except Exception as error:  # any transport error: the server is not reachable with this config
        pytest.fail(f"API server unreachable: {kube_api.config.cluster.get('server')} (kubeconfig {kubeconfig}, "
                    f"context {context}): {error}", pytrace=False)
    # Both reads are cluster-scoped: users limited to a namespace get a 403 here.
    permission = "get customresourcedefinitions.apiextensions.k8s.io (rayservices.ray.io)"
    try:
        crd = get_object(kube_api, "apiextensions.k8s.io/v1", "CustomResourceDefinition", None, "rayservices.ray.io")
    except Exception as error:
        pytest.fail(cluster.explain_api_error(error, permission), pytrace=False)
    if crd is None:
        pytest.fail("the rayservices.ray.io CRD is not installed: install the KubeRay operator first, e.g. "
                    "helm install kuberay-operator kuberay/kuberay-operator -n kuberay-system --create-namespace")
    try:
        found = get_object(kube_api, "v1", "Namespace", None, namespace)
    except Exception as error:
        pytest.fail(cluster.explain_api_error(error, f"get namespaces ({namespace})"), pytrace=False)
    if found is None:
        pytest.fail(f"namespace {namespace} does not exist: kubectl create namespace {namespace}, "
                    "or pass --cluster-namespace")
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not on PATH: the suite port-forwards with it. Install kubectl.")
    operator_image, operator_version = find_operator(kube_api)
    return {"kubernetes": version, "crd_versions": [v["name"] for v in crd["spec"]["versions"]],
            "operator_image": operator_image, "operator_version": operator_version, "namespace": namespace}


def find_operator(api) -> tuple[str, str | None]:
    """The KubeRay operator's image and version, from its pods in any namespace. Optional: a user
    who may not list pods cluster-wide gets "unknown" and the chart's cluster.kuberayVersion."""
    import pykube

    try:
        pods = [pod.obj for pod in pykube.Pod.objects(api).filter(namespace=pykube.all,
                                                                    selector=cluster.OPERATOR_SELECTOR)]
    except Exception as error:  # 403 for a namespace-limited user; nothing else depends on it
        return f"unknown ({cluster.explain_api_error(error, 'list pods in all namespaces')})", None
    return cluster.operator_version(pods)


def _failure_report(api, namespace, release_name, rayservice) -> str:
    import pykube

    events = [event.obj for event in pykube.Event.objects(api).filter(namespace=namespace)
              if event.obj.get("involvedObject", {}).get("name", "").startswith(release_name)]
    logs = {}
    for pod in pykube.Pod.objects(api).filter(namespace=namespace,
                                              selector={"app.kubernetes.io/instance": release_name}):
        for container in pod.obj["spec"]["containers"]:
            try:
                logs[f"{pod.name}/{container['name']}"] = pod.logs(container=container["name"], tail_lines=40)
            except Exception as error:  # a pod still pulling its image has no log yet
                logs[f"{pod.name}/{container['name']}"] = f"(no log: {error})"
    return cluster.failure_report(rayservice, events, logs)


def rayservice_events(release: Release) -> list[dict]:
    import pykube

    return [event.obj for event in pykube.Event.objects(release.api).filter(
        namespace=release.namespace, field_selector={"involvedObject.name": release.fullname})]


def expected_workers(release: Release, replicas: int) -> int:
    """Worker pods Ray's autoscaler settles on for `replicas` model replicas: the chart's own count
    for that many (vllm-rayservice.initialWorkers, the replicas packed by GPUs and CPUs per pod, at
    least workers.minReplicas), not one pod per replica."""
    values = chart.deep_merge(release.values, {"serving": {"replicas": replicas}})
    rayservice = chart.render(values, release=release.name, namespace=release.namespace).rayservice()
    return rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"]


def pending_pods_report(release: Release) -> str:
    """The release's Pending pods and their scheduling events, read from the cluster."""
    import pykube

    pods = [pod.obj for pod in pykube.Pod.objects(release.api).filter(
        namespace=release.namespace, selector={"app.kubernetes.io/instance": release.name})]
    events = [event.obj for event in pykube.Event.objects(release.api).filter(namespace=release.namespace)]
    return cluster.scheduling_report(pods, events)


def wait_until(release: Release, check, timeout: float, what: str) -> None:
    """Poll `check` (a cluster.Readiness) until ready; on a timeout fail with what did not happen and,
    when pods of the release stay Pending, why the scheduler does not place them."""
    try:
        cluster.wait_for(check, timeout=timeout, poll=10, transient=cluster.TRANSIENT_ERRORS)
    except cluster.WaitTimeout as error:
        pending = pending_pods_report(release)
        pytest.fail(f"{what}: {error}" + (f"\n\n{pending}" if pending else ""), pytrace=False)


def wait_ready(release: Release, timeout: float) -> None:
    def check():
        return cluster.readiness(release.rayservice() or {}, events=rayservice_events(release))

    try:
        cluster.wait_for(check, timeout=timeout, poll=10, transient=cluster.TRANSIENT_ERRORS)
    except (cluster.WaitTimeout, cluster.WaitFailed) as error:
        pytest.fail(f"{error}\n\n{_failure_report(release.api, release.namespace, release.name, release.rayservice())}")


@pytest.fixture(scope="module")
def release(prerequisites, kubeconfig, kube_api, pytestconfig):
    import helm_python

    namespace = prerequisites["namespace"]
    values = chart.load_values_files([REPO / pytestconfig.getoption("cluster_values")])
    for expression in pytestconfig.getoption("cluster_set"):
        values = chart.deep_merge(values, helm_python.parse_set_string(expression))
    values = chart.deep_merge(values, {"serving": {"replicas": 1, "autoscaling": {"enabled": False}},
                                       "workers": {"maxReplicas": max(2, values.get("workers", {}).get("maxReplicas", 2))}})
    values = with_operator_version(values, prerequisites["operator_version"])
    name = f"vrs-e2e-{uuid.uuid4().hex[:6]}"
    helm = helm_python.Config(kubeconfig_path=kubeconfig, namespace=namespace)
    rendered = chart.render(values, release=name, namespace=namespace)
    subject = Release(name=name, fullname=rendered.rayservice()["metadata"]["name"], namespace=namespace,
                      values=values, kubeconfig=kubeconfig, helm=helm, api=kube_api,
                      serve_service_name=cluster.serving_service_name(rendered.rayservice()))
    yield from installed(subject, pytestconfig.getoption("cluster_ready_timeout"))


def uninstall(release: Release) -> None:
    """`helm uninstall`, remembered: the teardown then leaves the release alone."""
    release.helm.uninstall(release.name, timeout=300)
    release.uninstalled = True


def with_operator_version(values: dict, operator_version: str | None) -> dict:
    """Tell the chart which KubeRay runs (cluster.kuberayVersion), unless the user's values do."""
    if operator_version is None or "kuberayVersion" in values.get("cluster", {}):
        return values
    return chart.deep_merge(values, {"cluster": {"kuberayVersion": operator_version}})


def installed(release: Release, ready_timeout: float):
    """Install, wait until ready, hand the release to the tests, then uninstall it whatever happened:
    also when the install itself fails, since a release Helm records as failed still holds objects.
    The uninstall test checks the result when it runs; after it, the teardown does not uninstall a
    second time (helm-c has crashed on a release that was already gone)."""
    try:
        release.helm.install(str(REPO), release.name, release.values, namespace=release.namespace, timeout=300)
        wait_ready(release, ready_timeout)
        yield release
    finally:
        if not release.uninstalled:
            release.helm.uninstall(release.name, ignore_not_found=True, timeout=300)
        delete_test_pods(release.api, release.namespace, release.name)


def smoke_test_pod_report(release: Release) -> str:
    """The `helm test` pod's phase, container state and log, read directly from the cluster."""
    import pykube

    name = f"{release.fullname}-smoke-test"
    try:
        pod = pykube.Pod.objects(release.api).filter(namespace=release.namespace).get(name=name)
        states = [f"{status['name']}: {status.get('state')}"
                  for status in pod.obj["status"].get("containerStatuses", [])]
        log = pod.logs(container="smoke-test", tail_lines=200)
    except Exception as error:  # gone, never started, no log yet: say so
        return f"Test pod {name}: no log ({error})"
    return f"Test pod {name}: phase {pod.obj['status'].get('phase')}; {'; '.join(states)}\nLog:\n{log}"


def run_helm_test(release: Release, timeout: int) -> str:
    """`helm test --logs`, returning the log. On a failure or a timeout, fail with the test pod's
    log: the Helm SDK reads it but raises without it."""
    import helm_python

    try:
        return release.helm.test(release.name, timeout=timeout, logs=True).get("logs", "")
    except helm_python.HelmError as error:  # HelmReleaseError on a failed check, HelmCancelledError on timeout
        pytest.fail(cluster.helm_test_failure(error, timeout, smoke_test_pod_report(release)), pytrace=False)


@contextlib.contextmanager
def port_forward(release: Release, target: str, remote_port: int, timeout: float = 60):
    """kubectl port-forward to 127.0.0.1 on the test side; yields the local base URL."""
    local = serve_local.free_port()
    process = subprocess.Popen(
        ["kubectl", "--kubeconfig", release.kubeconfig, "-n", release.namespace, "port-forward",
         "--address", "127.0.0.1", target, f"{local}:{remote_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", local)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                output = process.stdout.read() if process.poll() is not None else ""
                raise cluster.PortForwardError(f"kubectl port-forward {target} did not come up: {output}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{local}"
    finally:
        process.terminate()
        process.wait(timeout=30)
