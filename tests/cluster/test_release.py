"""The chart's promise on a live cluster, in the order a user meets it: install, call the endpoint,
scale with `helm upgrade`, `helm test`, uninstall. Runs only with a kubeconfig (-m cluster)."""

import json
import time
import urllib.request

import pytest

from tests.cluster.conftest import (REPO, expected_workers, port_forward, release_objects, run_helm_test, uninstall,
                                   wait_ready, wait_until)
from tools import cluster

pytestmark = pytest.mark.cluster


def _served_name(release) -> str:
    model = release.values.get("model", {})
    return model.get("servedName") or model.get("id") or "TinyLlama/TinyLlama-1.1B-Chat-v1.0"


def _api_key(release):
    return release.values.get("serving", {}).get("apiKey", {}).get("value") or None


def _serve_details(dashboard_url: str) -> dict:
    with urllib.request.urlopen(dashboard_url + "/api/serve/applications/", timeout=30) as response:
        return json.loads(response.read())


def _running_workers(release) -> int:
    import pykube

    group = release.values.get("workers", {}).get("groupName", "gpu-workers")
    pods = pykube.Pod.objects(release.api).filter(namespace=release.namespace, selector={
        "app.kubernetes.io/instance": release.name, "ray.io/group": group})
    return sum(1 for pod in pods if pod.obj.get("status", {}).get("phase") == "Running")


def _scale(release, replicas: int, timeout: float) -> None:
    """`helm upgrade --reuse-values --set serving.replicas=N`, then wait for Serve and the workers."""
    release.helm.upgrade(str(REPO), release.name, {"serving": {"replicas": replicas}},
                         namespace=release.namespace, reuse_values=True, timeout=300)
    wait_ready(release, timeout)

    def serve_replicas():
        # A fresh port-forward each poll: one that died with a restarted head pod is just replaced,
        # and a 503 while Serve reconfigures is "not yet" (TRANSIENT_ERRORS).
        with port_forward(release, f"svc/{release.fullname}-head-svc", 8265) as dashboard:
            details = _serve_details(dashboard)
        running = cluster.running_replicas(details)
        return cluster.Readiness(running == replicas, False, f"{running} Serve replicas running: "
                                 f"{details.get('applications', {}).get('llm', {}).get('deployments')}")

    wait_until(release, serve_replicas, timeout, f"Serve did not reach {replicas} running replicas")

    # Ray's autoscaler follows with as many worker pods as the replicas fill (several share a
    # multi-GPU pod); scale-down waits for the idle timeout.
    expected = expected_workers(release, replicas)

    def workers():
        running = _running_workers(release)
        return cluster.Readiness(running == expected, False, f"{running} worker pods running")

    wait_until(release, workers, timeout, f"worker pods did not follow to {expected} for {replicas} replicas")


def test_prerequisites_should_be_in_place(prerequisites):
    assert "v1" in prerequisites["crd_versions"]
    print(f"Kubernetes {prerequisites['kubernetes']}, KubeRay operator {prerequisites['operator_image']}, "
          f"RayService CRD versions {prerequisites['crd_versions']}")


def test_endpoint_should_serve_openai_clients(release):
    import openai

    with port_forward(release, *release.serve_target()) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=_api_key(release) or "none", max_retries=2, timeout=300)
        model = _served_name(release)
        assert [m.id for m in client.models.list().data] == [model]
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                                max_tokens=8)
        assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
        chunks = list(client.chat.completions.create(model=model, stream=True, max_tokens=8,
                                                     messages=[{"role": "user", "content": "Count"}]))
        assert chunks[0].choices[0].delta.role == "assistant"


def test_helm_upgrade_should_scale_replicas_and_workers_and_back(release, pytestconfig):
    timeout = pytestconfig.getoption("cluster_ready_timeout")
    _scale(release, 2, timeout)
    _scale(release, 1, timeout)


def test_helm_test_should_pass(release):
    logs = run_helm_test(release, timeout=600)
    assert "all" in logs and "checks passed" in logs


def test_uninstall_should_remove_the_releases_objects(release):
    uninstall(release)
    deadline = time.monotonic() + 600
    while (left := release_objects(release.api, release.namespace, release.name)):
        if time.monotonic() > deadline:
            pytest.fail(f"objects left 10 minutes after uninstall: {left}")
        time.sleep(10)
