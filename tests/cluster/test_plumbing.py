"""The cluster suite's own plumbing, run here with fakes in place of a cluster: what it does when
an install fails, when `helm test` fails or times out, and when the dashboard is briefly away."""

import http.client
import io
import urllib.error

import pytest

from tests.cluster import conftest
from tools import chart, cluster


class FakeHelm:
    """Records the release actions; each one raises what `failures` maps its name to."""

    def __init__(self, **failures):
        self.calls, self.failures = [], failures

    def _act(self, action, name, **kwargs):
        self.calls.append((action, name))
        if action in self.failures:
            raise self.failures[action]
        return {}

    def install(self, chart, name, values, **kwargs):
        return self._act("install", name)

    def uninstall(self, name, **kwargs):
        return self._act("uninstall", name)

    def test(self, name, **kwargs):
        self._act("test", name)
        return {"logs": "POD LOGS: x-smoke-test\nall 4 checks passed"}


def _release(helm):
    return conftest.Release(name="vrs-e2e-abc123", fullname="vrs-e2e-abc123-vllm-rayservice", namespace="llm",
                            values={}, kubeconfig="/dev/null", helm=helm, api=None)


def test_a_failed_install_should_still_be_uninstalled(monkeypatch):
    import helm_python

    deleted = []
    monkeypatch.setattr(conftest, "delete_test_pods", lambda api, namespace, name: deleted.append(name))
    helm = FakeHelm(install=helm_python.HelmReleaseError("context deadline exceeded"))
    lifecycle = conftest.installed(_release(helm), ready_timeout=1)
    with pytest.raises(helm_python.HelmReleaseError):
        next(lifecycle)
    assert helm.calls == [("install", "vrs-e2e-abc123"), ("uninstall", "vrs-e2e-abc123")]
    assert deleted == ["vrs-e2e-abc123"]


def test_a_release_that_never_gets_ready_should_be_uninstalled(monkeypatch):
    monkeypatch.setattr(conftest, "delete_test_pods", lambda api, namespace, name: None)
    monkeypatch.setattr(conftest, "wait_ready", lambda release, timeout: pytest.fail("not ready"))
    helm = FakeHelm()
    with pytest.raises(pytest.fail.Exception, match="not ready"):
        next(conftest.installed(_release(helm), ready_timeout=1))
    assert helm.calls[-1] == ("uninstall", "vrs-e2e-abc123")


def test_a_ready_release_should_be_uninstalled_after_the_tests(monkeypatch):
    monkeypatch.setattr(conftest, "delete_test_pods", lambda api, namespace, name: None)
    monkeypatch.setattr(conftest, "wait_ready", lambda release, timeout: None)
    helm = FakeHelm()
    lifecycle = conftest.installed(_release(helm), ready_timeout=1)
    assert next(lifecycle).name == "vrs-e2e-abc123"
    assert helm.calls == [("install", "vrs-e2e-abc123")]
    with pytest.raises(StopIteration):
        next(lifecycle)  # the tests are done
    assert helm.calls[-1] == ("uninstall", "vrs-e2e-abc123")


def test_a_release_the_uninstall_test_removed_should_not_be_uninstalled_again(monkeypatch):
    deleted = []
    monkeypatch.setattr(conftest, "delete_test_pods", lambda api, namespace, name: deleted.append(name))
    monkeypatch.setattr(conftest, "wait_ready", lambda release, timeout: None)
    helm = FakeHelm()
    lifecycle = conftest.installed(_release(helm), ready_timeout=1)
    conftest.uninstall(next(lifecycle))  # what the uninstall test does
    with pytest.raises(StopIteration):
        next(lifecycle)
    assert helm.calls == [("install", "vrs-e2e-abc123"), ("uninstall", "vrs-e2e-abc123")]
    assert deleted == ["vrs-e2e-abc123"]  # a failed test hook's pod is still cleaned up


def test_a_failed_uninstall_test_should_leave_the_uninstall_to_the_teardown(monkeypatch):
    import helm_python

    monkeypatch.setattr(conftest, "delete_test_pods", lambda api, namespace, name: None)
    monkeypatch.setattr(conftest, "wait_ready", lambda release, timeout: None)
    helm = FakeHelm(uninstall=helm_python.HelmReleaseError("timed out waiting for the condition"))
    lifecycle = conftest.installed(_release(helm), ready_timeout=1)
    with pytest.raises(helm_python.HelmReleaseError):
        conftest.uninstall(next(lifecycle))
    with pytest.raises(helm_python.HelmReleaseError):
        next(lifecycle)  # the teardown tries again
    assert helm.calls.count(("uninstall", "vrs-e2e-abc123")) == 2


def test_dashboard_hiccups_should_count_as_not_yet():
    """One 503 while Serve reconfigures, a refused connection, a port-forward that died with its
    pod: the scale step keeps polling instead of failing."""
    answers = iter([
        urllib.error.HTTPError("http://127.0.0.1:1/api/serve/applications/", 503, "Service Unavailable", {},
                               io.BytesIO(b"")),
        urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")),
        cluster.PortForwardError("kubectl port-forward svc/x-head-svc did not come up: pod is not running"),
        http.client.RemoteDisconnected("Remote end closed connection without response"),
        cluster.Readiness(True, False, "2 Serve replicas running"),
    ])

    def check():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    slept = []
    state = cluster.wait_for(check, timeout=600, poll=10, sleep=slept.append, transient=cluster.TRANSIENT_ERRORS)
    assert state.ready and slept == [10, 10, 10, 10]


def test_a_dashboard_that_stays_away_should_time_out_with_the_last_error():
    now = [0.0]

    def check():
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    def sleep(seconds):
        now[0] += seconds

    with pytest.raises(cluster.WaitTimeout, match="not reachable yet: URLError.*Connection refused"):
        cluster.wait_for(check, timeout=30, poll=10, clock=lambda: now[0], sleep=sleep,
                         transient=cluster.TRANSIENT_ERRORS)


def test_a_bug_in_the_check_should_not_be_retried():
    def check():
        raise KeyError("applications")

    with pytest.raises(KeyError):
        cluster.wait_for(check, timeout=30, poll=10, sleep=lambda _: None, transient=cluster.TRANSIENT_ERRORS)


def _live_service(name, port):
    """A serve Service as KubeRay < 1.6 leaves it: only the head's serve port, whatever service.port said."""
    return {"kind": "Service", "metadata": {"name": name},
            "spec": {"ports": [{"name": "serve", "port": port, "protocol": "TCP", "targetPort": port}]}}


def test_the_endpoint_should_be_reached_on_the_port_the_live_service_has(monkeypatch):
    """Not on service.port from the values: the suite asks the cluster which port Serve is behind."""
    rayservice = chart.render({"service": {"port": 80}, "cluster": {"kuberayVersion": "1.7.0"}},
                              release="vrs-e2e-abc123").rayservice()
    asked = []

    def get_object(api, api_version, kind, namespace, name):
        asked.append((kind, namespace, name))
        return _live_service(name, 8000)

    monkeypatch.setattr(conftest, "get_object", get_object)
    release = conftest.Release(name="vrs-e2e-abc123", fullname=rayservice["metadata"]["name"], namespace="llm",
                               values={"service": {"port": 80}}, kubeconfig="/dev/null", helm=None, api=None,
                               serve_service_name=cluster.serving_service_name(rayservice))
    assert release.serve_target() == ("svc/vrs-e2e-abc123-vllm-rayservice-serve-svc", 8000)
    assert asked == [("Service", "llm", "vrs-e2e-abc123-vllm-rayservice-serve-svc")]


def test_a_missing_or_portless_serve_service_should_say_what_is_wrong():
    with pytest.raises(cluster.ServicePortError, match="chat-serve-svc does not exist"):
        cluster.serve_port(None, "chat-serve-svc")
    service = _live_service("chat-serve-svc", 8000)
    service["spec"]["ports"][0]["name"] = "http"
    with pytest.raises(cluster.ServicePortError, match=r"no port named serve: \[\('http', 8000\)\]"):
        cluster.serve_port(service)


def test_a_wait_that_times_out_should_report_why_pods_stay_pending(monkeypatch):
    report = "Pod chat-worker-abc is Pending, not scheduled (Unschedulable): 0/1 nodes are available"
    monkeypatch.setattr(conftest, "pending_pods_report", lambda release: report)
    never = lambda: cluster.Readiness(False, False, "1 worker pods running")  # noqa: E731
    with pytest.raises(pytest.fail.Exception) as failure:
        conftest.wait_until(_release(FakeHelm()), never, timeout=0, what="worker pods did not follow to 2")
    assert str(failure.value) == f"worker pods did not follow to 2: not ready after 0s: 1 worker pods running\n\n{report}"


def test_a_wait_that_times_out_with_nothing_pending_should_say_only_what_it_waited_for(monkeypatch):
    monkeypatch.setattr(conftest, "pending_pods_report", lambda release: "")
    never = lambda: cluster.Readiness(False, False, "1 Serve replicas running")  # noqa: E731
    with pytest.raises(pytest.fail.Exception, match=r"^Serve did not reach 2 running replicas: not ready after 0s: "
                                                    r"1 Serve replicas running$"):
        conftest.wait_until(_release(FakeHelm()), never, timeout=0, what="Serve did not reach 2 running replicas")


@pytest.mark.parametrize("values, replicas, workers", [
    (chart.load_values_files([conftest.REPO / "ci" / "05-cpu-kind-values.yaml"]), 2, 2),
    ({"workers": {"gpus": 2, "resources": {"limits": {"cpu": "4"}}}}, 2, 1),
    ({"workers": {"gpus": 4}, "engine": {"tensorParallelSize": 2}}, 2, 1),
    ({"workers": {"gpus": 4, "minReplicas": 2}}, 1, 2),
], ids=["cpu-kind-one-per-pod", "two-gpus-hold-two", "tensor-parallel-pairs", "at-least-min-replicas"])
def test_the_scale_step_should_wait_for_the_workers_the_chart_counts(values, replicas, workers):
    """Not one pod per replica: a worker with more GPUs than a replica needs holds several."""
    release = conftest.Release(name="vrs-e2e-abc123", fullname="vrs-e2e-abc123-vllm-rayservice", namespace="llm",
                               values=values, kubeconfig="/dev/null", helm=None, api=None)
    assert conftest.expected_workers(release, replicas) == workers


def test_the_release_should_tell_the_chart_the_operator_version_found_unless_the_values_do():
    values = {"serving": {"replicas": 1}}
    assert conftest.with_operator_version(values, "1.7.0") == {"serving": {"replicas": 1},
                                                                "cluster": {"kuberayVersion": "1.7.0"}}
    assert conftest.with_operator_version(values, None) == values
    mine = {"cluster": {"kuberayVersion": "1.6.0"}}
    assert conftest.with_operator_version(mine, "1.7.0") == mine


def test_an_operator_the_user_may_not_list_should_be_reported_as_unknown(monkeypatch):
    import pykube

    class Forbidden(Exception):
        code = 403

    class Query:
        def filter(self, **kwargs):
            assert kwargs == {"namespace": pykube.all, "selector": cluster.OPERATOR_SELECTOR}
            raise Forbidden("pods is forbidden")

    monkeypatch.setattr(pykube.Pod, "objects", classmethod(lambda cls, api: Query()))
    image, version = conftest.find_operator(api=None)
    assert image.startswith("unknown (403 Forbidden: the kubeconfig's user may not list pods in all namespaces")
    assert version is None


POD_REPORT = "Test pod x-smoke-test: phase Failed\nLog:\nFAIL streaming chat: no data: [DONE]"


@pytest.mark.parametrize("error_class, message, headline", [
    ("HelmReleaseError", "pod x-smoke-test failed", "helm test failed (HelmReleaseError: pod x-smoke-test failed)"),
    ("HelmCancelledError", "context deadline exceeded", "helm test did not finish within 600s"),
])
def test_a_failing_helm_test_should_report_the_pods_log(monkeypatch, error_class, message, headline):
    import helm_python

    monkeypatch.setattr(conftest, "smoke_test_pod_report", lambda release: POD_REPORT)
    release = _release(FakeHelm(test=getattr(helm_python, error_class)(message)))
    with pytest.raises(pytest.fail.Exception) as failure:
        conftest.run_helm_test(release, timeout=600)
    assert str(failure.value).startswith(headline)
    assert "FAIL streaming chat: no data: [DONE]" in str(failure.value)


def test_a_passing_helm_test_should_return_its_log():
    assert conftest.run_helm_test(_release(FakeHelm()), timeout=600).endswith("all 4 checks passed")
