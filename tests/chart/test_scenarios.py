"""Every scenario (the defaults and each ci/*-values.yaml) renders, and every object it renders is
valid: built-in kinds against Kubernetes' schemas, the RayService against each KubeRay CRD, the
PodMonitor and PrometheusRule against the Prometheus Operator's CRDs, the pod templates as core
PodTemplateSpecs, and serveConfigV2's args against the app's own contract."""

import sys
from pathlib import Path

import pytest

from tests.chart import kube_schemas
from tools import chart

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = [None] + sorted(str(path.relative_to(REPO)) for path in (REPO / "ci").glob("*-values.yaml"))
CRDS = kube_schemas.crd_files()
# Kinds a CRD defines: kubernetes-validate knows only the built-in ones.
CUSTOM_KINDS = {"RayService", "PodMonitor", "PrometheusRule"}


def _render(scenario):
    return chart.render(values_files=[REPO / scenario] if scenario else [], release="scenario")


def test_should_have_the_scenarios_the_chart_promises():
    names = " ".join(SCENARIOS[1:])
    for purpose in ("guide-t4", "tensor-parallel", "autoscaling", "loadbalancer-apikey", "cpu-kind", "restricted",
                    "monitoring", "lora"):
        assert purpose in names


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kube_version", kube_schemas.KUBE_VERSIONS)
def test_should_render_valid_builtin_objects(scenario, kube_version):
    rendered = _render(scenario)
    builtins = [obj for obj in rendered.objects if obj["kind"] not in CUSTOM_KINDS]
    assert {"ConfigMap", "Pod"} <= {obj["kind"] for obj in builtins}
    for obj in builtins:
        kube_schemas.validate_builtin(obj, kube_version)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kube_version", kube_schemas.KUBE_VERSIONS)
def test_should_render_valid_pod_templates_and_serve_service(scenario, kube_version):
    spec = _render(scenario).rayservice()["spec"]
    cluster = spec["rayClusterConfig"]
    kube_schemas.validate_pod_template(cluster["headGroupSpec"]["template"], kube_version)
    for group in cluster["workerGroupSpecs"]:
        kube_schemas.validate_pod_template(group["template"], kube_version)
    service = {"apiVersion": "v1", "kind": "Service", **spec["serveService"]}
    kube_schemas.validate_builtin(service, kube_version)


@pytest.mark.skipif(not CRDS, reason=kube_schemas.crd_missing_reason())
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("crd", CRDS, ids=[path.name for path in CRDS])
def test_should_render_a_rayservice_every_kuberay_version_accepts(scenario, crd):
    errors = kube_schemas.rayservice_errors(_render(scenario).rayservice(), crd)
    assert errors == []


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kind", ["PodMonitor", "PrometheusRule"])
def test_should_render_monitoring_objects_the_prometheus_operator_accepts(scenario, kind):
    crd = kube_schemas.prometheus_crd(kind)
    if crd is None:
        pytest.skip(kube_schemas.prometheus_crd_missing_reason(kind))
    for obj in _render(scenario).of_kind(kind):
        assert kube_schemas.crd_errors(obj, crd) == []
        for kube_version in kube_schemas.KUBE_VERSIONS:
            kube_schemas.validate_metadata(obj, kube_version)


@pytest.mark.skipif(not CRDS, reason=kube_schemas.crd_missing_reason())
def test_strict_crd_check_should_catch_a_misspelt_field():
    rayservice = _render(None).rayservice()
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParamz"] = {}
    assert any("rayStartParamz" in error for error in kube_schemas.rayservice_errors(rayservice, CRDS[0]))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_serve_config_args_should_satisfy_the_app_contract(scenario):
    sys.path.insert(0, str(REPO / "files"))
    try:
        import vllm_app
    finally:
        sys.path.remove(str(REPO / "files"))
    config = _render(scenario).serve_config()
    [app] = config["applications"]
    assert app["import_path"] == "vllm_app:build_app"
    assert app["route_prefix"] == "/"
    args = vllm_app.AppArgs.model_validate(app["args"])
    assert args.model.id
    [deployment] = app["deployments"]
    assert deployment["name"] == "VLLMServer"  # must match the deployment class's name in the app


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_should_pass_helm_lint_strict(scenario):
    values = chart.load_values_files([REPO / scenario]) if scenario else {}
    assert chart.lint(values, strict=True) == []


def test_the_readme_should_size_the_kind_node_from_the_cpu_scenarios_requests():
    """The cluster suite on kind scales to two workers: the node must hold what the pods request
    then. The README's figure is this computation, never a hand-written estimate."""
    from tools import cluster

    rendered = _render("ci/05-cpu-kind-values.yaml").rayservice()
    workers = rendered["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"]
    parts = cluster.peak_requests(rendered, workers)

    def figure(cpus, gib):
        return f"{cpus:g} CPU{'s' if cpus > 1 else ''} and {gib:g} GiB"

    sentence = (f"With its {workers} workers the release requests {figure(*parts['total'])} of memory "
                f"(the head {figure(*parts['head'])}, its autoscaler sidecar {figure(*parts['autoscaler'])}, "
                f"each worker {figure(*parts['worker'])}): the kind node needs that much allocatable.")
    guide = " ".join((REPO / "docs" / "cluster-suite.md").read_text().split())
    assert sentence in guide, f"docs/cluster-suite.md's kind sizing is stale; it should read: {sentence}"
