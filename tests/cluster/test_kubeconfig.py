"""How a user points the cluster suite at a cluster: the command line of docs/cluster-suite.md must get past option
parsing and reach the prerequisites check, and helm, kubectl and pykube must read one file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools import cluster, serve_local

REPO = Path(__file__).resolve().parents[2]


def _kubeconfig(path: Path, server: str = "", context: str = "kind-llm", **user) -> Path:
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": context,
           "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
           "clusters": [{"name": context, "cluster": {"server": server}}] if server else [],
           "users": [{"name": context, "user": user or {"token": "t"}}]}
    path.write_text(yaml.safe_dump(doc))
    return path


def _run_prerequisites(*args, env_kubeconfig=None):
    """The cluster suite's first test in a fresh pytest, as a user would start it."""
    env = {key: value for key, value in os.environ.items() if key != "KUBECONFIG"}
    if env_kubeconfig:
        env["KUBECONFIG"] = env_kubeconfig
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cluster", "-p", "no:cacheprovider",
         "tests/cluster/test_release.py::test_prerequisites_should_be_in_place", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _dead_server() -> str:
    return f"http://127.0.0.1:{serve_local.free_port()}"  # nothing listens there


class TestCommandLine:
    def test_kubeconfig_option_should_reach_the_prerequisites_and_fail_there(self, tmp_path):
        config = _kubeconfig(tmp_path / "config", _dead_server())
        result = _run_prerequisites(f"--kubeconfig={config}")
        output = result.stdout + result.stderr
        assert "unrecognized arguments" not in output
        assert result.returncode == 1, output
        assert "1 error" in output and "skipped" not in output  # the prerequisites fixture fails
        assert "API server unreachable" in output and str(config) in output

    def test_a_kubeconfig_list_should_be_merged_and_reach_the_prerequisites(self, tmp_path):
        """KUBECONFIG=a:b as kubectl allows: the context in the second file names the cluster."""
        only_users = tmp_path / "users"
        only_users.write_text(yaml.safe_dump({"users": [{"name": "kind-llm", "user": {"token": "t"}}]}))
        with_cluster = _kubeconfig(tmp_path / "cluster", _dead_server())
        result = _run_prerequisites(env_kubeconfig=os.pathsep.join([str(tmp_path / "missing"), str(only_users),
                                                                    str(with_cluster)]))
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "API server unreachable" in output and "context kind-llm" in output

    def test_an_exec_plugin_pykube_cannot_run_should_be_named_before_any_request(self, tmp_path):
        exec_v1 = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "gke-gcloud-auth-plugin",
                            "interactiveMode": "IfAvailable"}}
        config = _kubeconfig(tmp_path / "config", _dead_server(), **exec_v1)
        result = _run_prerequisites(f"--kubeconfig={config}")
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "exec plugin gke-gcloud-auth-plugin at client.authentication.k8s.io/v1," in output
        assert "API server unreachable" not in output

    def test_no_kubeconfig_should_skip_and_say_how_to_run(self):
        result = _run_prerequisites("-rs")
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "1 skipped" in output and "--kubeconfig=PATH" in output


class TestResolveKubeconfig:
    def test_one_file_should_be_used_as_it_is(self, tmp_path):
        config = _kubeconfig(tmp_path / "config", "https://10.0.0.1:6443")
        assert cluster.resolve_kubeconfig(str(config), tmp_path / "work") == config

    def test_several_files_should_merge_with_the_first_definition_winning(self, tmp_path):
        first = _kubeconfig(tmp_path / "a", "https://first:6443", context="shared")
        second = _kubeconfig(tmp_path / "b", "https://second:6443", context="shared")
        (tmp_path / "work").mkdir()
        merged = yaml.safe_load(cluster.resolve_kubeconfig(f"{first}{os.pathsep}{second}", tmp_path / "work")
                                .read_text())
        assert merged["clusters"] == [{"name": "shared", "cluster": {"server": "https://first:6443"}}]
        assert merged["current-context"] == "shared"

    def test_relative_certificate_paths_should_stay_relative_to_their_own_file(self, tmp_path):
        (tmp_path / "certs").mkdir()
        (tmp_path / "work").mkdir()
        first = _kubeconfig(tmp_path / "certs" / "a", "https://a:6443", context="a",
                            **{"client-certificate": "client.crt", "client-key": "/abs/client.key"})
        second = _kubeconfig(tmp_path / "b", "https://b:6443", context="b")
        merged = yaml.safe_load(cluster.resolve_kubeconfig(f"{first}{os.pathsep}{second}", tmp_path / "work")
                                .read_text())
        user = merged["users"][0]["user"]
        assert user["client-certificate"] == str(tmp_path / "certs" / "client.crt")
        assert user["client-key"] == "/abs/client.key"

    def test_no_existing_file_should_say_so(self, tmp_path):
        with pytest.raises(cluster.KubeconfigError, match="no kubeconfig file found"):
            cluster.resolve_kubeconfig(str(tmp_path / "missing"), tmp_path)


class TestCredentialsAndPermissions:
    def test_exec_plugins_at_the_versions_pykube_runs_should_pass(self):
        user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": sys.executable}}
        assert cluster.credential_problem("eks", user) is None
        assert cluster.credential_problem("kind", {"client-certificate-data": "x", "client-key-data": "y"}) is None

    def test_an_exec_plugin_missing_from_path_should_be_named(self):
        user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": "kubelogin-not-here"}}
        assert "kubelogin-not-here, which is not on PATH" in cluster.credential_problem("aks", user)

    @pytest.mark.parametrize("make_error", [
        lambda: __import__("pykube").exceptions.HTTPError(403, "namespaces is forbidden"),
        lambda: _requests_error(403),
    ], ids=["pykube", "requests"])
    def test_a_403_should_name_the_permission_to_ask_for(self, make_error):
        message = cluster.explain_api_error(make_error(), "get namespaces (llm)")
        assert message.startswith("403 Forbidden: the kubeconfig's user may not get namespaces (llm)")

    def test_a_401_should_say_the_credentials_were_refused(self):
        assert "did not accept the kubeconfig's credentials" in cluster.explain_api_error(_requests_error(401), "x")


def _requests_error(status: int):
    import requests

    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} Client Error", response=response)
