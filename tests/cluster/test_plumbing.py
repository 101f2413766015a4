"""The cluster suite's own plumbing, run here with fakes in place of a cluster: what it does when
an install fails, when `helm test` fails or times out, and when the dashboard is briefly away."""

import pytest

from tests.cluster import conftest


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
