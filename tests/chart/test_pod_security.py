"""Pod Security "restricted": the smoke-test pod complies by default, and the Ray pods comply with
ci/06-restricted-values.yaml, counting the containers KubeRay adds to them.

`violations` checks the rules of the Pod Security Standards' restricted profile that a pod spec
can break (https://kubernetes.io/docs/concepts/security/pod-security-standards/), the way the
admission controller does: a container is fine when its own setting or the pod's complies.
"""

from pathlib import Path

import pytest
import yaml

from tools import chart

REPO = Path(__file__).resolve().parents[2]
RESTRICTED = yaml.safe_load((REPO / "ci" / "06-restricted-values.yaml").read_text())
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret"}


def violations(pod_spec: dict) -> list[str]:
    found = []
    pod_context = pod_spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(field):
            found.append(f"pod: {field}")
    for volume in pod_spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(kinds)}")
    if pod_context.get("runAsUser") == 0:
        found.append("pod: runAsUser 0")
    containers = (pod_spec.get("initContainers") or []) + pod_spec["containers"]
    for container in containers:
        name, context = container["name"], container.get("securityContext") or {}

        def setting(key):
            return context[key] if key in context else pod_context.get(key)

        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if setting("runAsNonRoot") is not True:
            found.append(f"{name}: runAsNonRoot is not true")
        if context.get("runAsUser") == 0:
            found.append(f"{name}: runAsUser 0")
        if (setting("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: no RuntimeDefault or Localhost seccompProfile")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities {capabilities['add']}")
        if any(port.get("hostPort") for port in container.get("ports") or []):
            found.append(f"{name}: hostPort")
    return found


def _with_kuberays_containers(cluster_config: dict) -> list[tuple[str, dict]]:
    """The pod specs KubeRay makes from the RayService: it adds the autoscaler sidecar to the head
    (securityContext from autoscalerOptions) and the wait-gcs-ready init container to each worker
    (a copy of the Ray container's securityContext); ray-operator/controllers/ray/common/pod.go."""
    head = yaml.safe_load(yaml.safe_dump(cluster_config["headGroupSpec"]["template"]["spec"]))
    head["containers"].append({"name": "autoscaler",
                               "securityContext": cluster_config["autoscalerOptions"].get("securityContext")})
    pods = [("head", head)]
    for group in cluster_config["workerGroupSpecs"]:
        worker = yaml.safe_load(yaml.safe_dump(group["template"]["spec"]))
        worker["initContainers"] = [{"name": "wait-gcs-ready",
                                     "securityContext": worker["containers"][0].get("securityContext")}]
        pods.append((group["groupName"], worker))
    return pods


class TestSmokeTestPod:
    def test_should_pass_restricted_by_default(self, render):
        assert violations(render().one("Pod")["spec"]) == []

    def test_should_take_its_security_contexts_from_values(self, render):
        pod = render({"smokeTest": {"podSecurityContext": {"fsGroup": 3}, "securityContext": {"privileged": True}}})
        spec = pod.one("Pod")["spec"]
        # Helm merges the user's map into the default one.
        assert spec["securityContext"]["fsGroup"] == 3 and spec["securityContext"]["runAsNonRoot"] is True
        assert spec["containers"][0]["securityContext"]["privileged"] is True
        assert violations(spec) == ["smoke-test: privileged"]


class TestRayPods:
    @pytest.mark.parametrize("base", [None, "ci/05-cpu-kind-values.yaml"])
    def test_should_pass_restricted_with_the_restricted_scenario(self, base):
        files = ([REPO / base] if base else []) + [REPO / "ci" / "06-restricted-values.yaml"]
        cluster_config = chart.render(values_files=files).rayservice()["spec"]["rayClusterConfig"]
        for name, spec in _with_kuberays_containers(cluster_config):
            assert violations(spec) == [], name

    def test_should_not_pass_restricted_by_default(self, render):
        """The check can fail: the default Ray pods (and the autoscaler) set no security context."""
        cluster_config = render().rayservice()["spec"]["rayClusterConfig"]
        assert all(violations(spec) for _, spec in _with_kuberays_containers(cluster_config))

    def test_autoscaler_should_get_its_security_context_from_values(self, render):
        options = render(RESTRICTED).rayservice()["spec"]["rayClusterConfig"]["autoscalerOptions"]
        assert options["securityContext"] == RESTRICTED["cluster"]["autoscaler"]["securityContext"]
        assert "securityContext" not in render().rayservice()["spec"]["rayClusterConfig"]["autoscalerOptions"]
