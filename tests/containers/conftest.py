"""The chart's pods as containers (make test-containers): the CPU image built here, one head and two
workers started from the rendered RayService as KubeRay v1.4.2 would build them (tools/pods.py says
what is taken from where), the rendered serveConfigV2 submitted to the head's dashboard, and the
helm test pod run against the serve Service's name.

Needs a Docker engine (.ci/run installs and starts one). Without one, the tests skip with the reason;
with CI=true they fail instead, so that a CI run never counts a skip as a pass.

The figures (times from container start, probe results) are printed at the end of the session and
written to build/containers/figures.json; docs/reliability.md quotes them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tools import cpu_image, pods, tiny_model

from tests.containers.harness import FIGURES, REPO, figures, render, running_clusters as _running


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _running and "tests/containers/" in str(item.fspath).replace(os.sep, "/"):
        for cluster in _running:
            try:
                report.sections.append(("containers: logs, Serve state and probes", cluster.report()))
            except Exception as error:  # the report must never hide the failure itself
                report.sections.append(("containers", f"could not collect the report: {error!r}"))


def pytest_terminal_summary(terminalreporter):
    if figures:
        FIGURES.parent.mkdir(parents=True, exist_ok=True)
        FIGURES.write_text(json.dumps(figures, indent=2, sort_keys=True))
        terminalreporter.write_sep("-", f"container figures (also in {FIGURES.relative_to(REPO)})")
        terminalreporter.write_line(json.dumps(figures, indent=2, sort_keys=True))


@pytest.fixture(scope="session")
def docker_engine():
    why = pods.docker_available()
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and the container tests cannot run: {why}", pytrace=False)
        pytest.skip(f"container tests need a Docker engine: {why}")
    removed = pods.cleanup_leftovers()
    if removed:
        print(f"removed containers and networks an earlier run left: {removed}")


@pytest.fixture(scope="session")
def cpu_image_tag(docker_engine):
    started = time.monotonic()
    tag = cpu_image.build()
    figures["image_build_or_reuse_s"] = round(time.monotonic() - started, 1)
    return tag


@pytest.fixture(scope="session")
def network(docker_engine):
    with pods.Network() as created:
        yield created


@pytest.fixture(scope="session")
def model_dir(network):
    """The tiny model, readable by the pods' user (uid 1000): the hostPath volume's folder."""
    built = tiny_model.build(REPO / "build" / "tiny-llama")
    target = network.workdir / "model"
    shutil.copytree(built, target)
    for path in [target, *target.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    network.workdir.chmod(0o755)
    return target


@pytest.fixture(scope="session")
def cluster(cpu_image_tag, network, model_dir):
    """One head and two workers, serving the rendered serveConfigV2 (one replica)."""
    rendered = render(replicas=1)
    running = pods.RayServiceContainers(rendered, network, cpu_image_tag, model_dir)
    _running.append(running)
    started = time.monotonic()
    head = running.start_head()
    figures["head_dashboard_s"] = round(running.wait_dashboard(), 1)
    for _ in range(2):
        running.start_worker()
    figures["workers_started_s"] = round(time.monotonic() - started, 1)
    pods.wait_until(lambda: None if len(running.alive_nodes()) == 3 else f"3 Ray nodes alive, have {running.alive_nodes()}",
                    timeout=180, explain=running.report)
    submitted = time.monotonic()
    running.submit(rendered.serve_config)
    running.wait_replicas_on(set(), timeout=600)
    figures["app_running_after_submit_s"] = round(time.monotonic() - submitted, 1)
    figures["cluster_ready_s"] = round(time.monotonic() - started, 1)
    figures["resources"] = pods.resource_report([pod.spec for pod in running.pods()])
    assert head.running()
    yield running
    figures["probes"] = {pod.name: {kind: {"source": pod.spec.probe_sources.get(kind, "comparison"),
                                           "first_pass_s": runner.first_pass(),
                                           "kubelet": runner.kubelet_view()}
                                    for kind, runner in pod.probes.items()} for pod in running.pods()}
    _running.remove(running)
