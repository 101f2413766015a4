"""Shared fixtures. Chart tests render with the real Helm engine (tools/chart.py); app tests run the
app on a real local Ray with the real vLLM CPU engine (tests/app/conftest.py)."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `tools` is the repository's own package, not installed

from tools import chart  # noqa: E402


@pytest.fixture
def render():
    """render(values, **kwargs) -> tools.chart.Rendered; raises ChartError with Helm's message."""
    return chart.render
