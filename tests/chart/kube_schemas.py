"""Offline schema validation of rendered objects: built-in kinds with kubernetes-validate (strict),
the RayService against KubeRay's CRDs and the PodMonitor and PrometheusRule against the Prometheus
Operator's, with jsonschema, the CRDs made strict so unknown fields fail.

The KubeRay CRDs are read from ../shared/kuberay/ beside the repository, or from the files or folder
named by VLLM_RAYSERVICE_CRDS (for example your cluster's: kubectl get crd rayservices.ray.io -o
yaml). The Prometheus Operator's (v0.93.0) from ../shared/prometheus-operator/, or from the files or
folder named by VLLM_RAYSERVICE_PROMETHEUS_CRDS.
"""

import copy
import os
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CRD_DIR = REPO.parent / "shared" / "kuberay"
DEFAULT_PROMETHEUS_CRD_DIR = REPO.parent / "shared" / "prometheus-operator"
# The chart's oldest supported Kubernetes (Chart.yaml kubeVersion) and the newest schemas shipped.
KUBE_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]


def crd_files(variable: str = "VLLM_RAYSERVICE_CRDS", default: Path = DEFAULT_CRD_DIR) -> list[Path]:
    named = os.environ.get(variable)
    if named:
        paths = [Path(part) for part in named.split(os.pathsep) if part]
    else:
        paths = [default]
    files = []
    for path in paths:
        files += sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    return [path for path in files if path.exists()]


def crd_missing_reason() -> str:
    return (f"no RayService CRD found in {DEFAULT_CRD_DIR}; set VLLM_RAYSERVICE_CRDS to a CRD file "
            "(kubectl get crd rayservices.ray.io -o yaml > rayservice-crd.yaml)")


def _strict(schema):
    """Reject unknown fields at every level, except where the CRD keeps unknown fields on purpose."""
    if isinstance(schema, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return schema
        result = {key: _strict(value) for key, value in schema.items()}
        if "properties" in result and "additionalProperties" not in result:
            result["additionalProperties"] = False
        return result
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@lru_cache(maxsize=None)
def crd_validator(crd_path: str, version_name: str = "v1") -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(Path(crd_path).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == version_name)
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft7Validator(schema)


def crd_errors(obj: dict, crd_path: Path, version_name: str = "v1") -> list[str]:
    """What the strict schema of the CRD's version finds wrong with obj."""
    validator = crd_validator(str(crd_path), version_name)
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
            for error in validator.iter_errors(obj)]


def rayservice_errors(rayservice: dict, crd_path: Path) -> list[str]:
    return crd_errors(rayservice, crd_path)


def prometheus_crd(kind: str) -> Path | None:
    """The Prometheus Operator CRD file defining `kind` (PodMonitor, PrometheusRule), if there is one."""
    for path in crd_files("VLLM_RAYSERVICE_PROMETHEUS_CRDS", DEFAULT_PROMETHEUS_CRD_DIR):
        if yaml.safe_load(path.read_text())["spec"]["names"]["kind"] == kind:
            return path
    return None


def prometheus_crd_missing_reason(kind: str) -> str:
    plural = f"{kind.lower()}s.monitoring.coreos.com"
    return (f"no {kind} CRD found in {DEFAULT_PROMETHEUS_CRD_DIR}; set VLLM_RAYSERVICE_PROMETHEUS_CRDS to the "
            f"Prometheus Operator's CRD files (kubectl get crd {plural} -o yaml > {kind.lower()}-crd.yaml)")


def validate_metadata(obj: dict, kube_version: str) -> None:
    """A CRD leaves metadata to the API server: check it as a core ObjectMeta (label values and so on)."""
    wrapper = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
    kubernetes_validate.validate(wrapper, kube_version, strict=True)


def validate_builtin(obj: dict, kube_version: str) -> None:
    kubernetes_validate.validate(obj, kube_version, strict=True)


def validate_pod_template(template: dict, kube_version: str) -> None:
    """A RayService's head/worker template is a core PodTemplateSpec: check it as one."""
    wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
    kubernetes_validate.validate(wrapper, kube_version, strict=True)
