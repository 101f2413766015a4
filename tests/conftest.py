"""Shared fixtures. Chart tests render with the real Helm engine (tools/chart.py); app tests run the
app on a real local Ray with the real vLLM CPU engine (tests/app/conftest.py)."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `tools` is the repository's own package, not installed

from tools import chart  # noqa: E402

# A failing test against the local stack prints the last HTTP responses and the replicas' logs.
from tests.failure_context import _fresh_responses, pytest_runtest_makereport  # noqa: E402,F401


@pytest.fixture
def render():
    """render(values, **kwargs) -> tools.chart.Rendered; raises ChartError with Helm's message."""
    return chart.render


def pytest_addoption(parser):
    # The cluster suite's knobs (tests/cluster); --kubeconfig comes from pytest-helm-charts.
    group = parser.getgroup("vllm-rayservice cluster suite")
    group.addoption("--cluster-values", default="ci/05-cpu-kind-values.yaml",
                    help="values file the cluster suite installs (default: the CPU/kind scenario)")
    group.addoption("--cluster-set", action="append", default=[],
                    help="extra KEY=VALUE for the install, as helm --set (repeatable)")
    group.addoption("--cluster-namespace", default="default", help="namespace to install into (must exist)")
    group.addoption("--cluster-ready-timeout", type=float, default=1800.0,
                    help="seconds to wait for the RayService to become ready (image pulls, model download)")
