"""What the container tests share: the figures they record, the clusters a failure reports on, and
the rendering and request helpers."""

from __future__ import annotations

from pathlib import Path

from tools import pods

REPO = Path(__file__).resolve().parents[2]
FIGURES = REPO / "build" / "containers" / "figures.json"
SERVED_NAME = "tiny-llama"

figures: dict = {}  # printed at the end of the session and written to FIGURES
running_clusters: list = []  # the RayServiceContainers a failing test reports on


def render(replicas: int = 1) -> pods.RenderedCluster:
    values = pods.tiny_model_values(SERVED_NAME)
    values["serving"] = {"replicas": replicas}
    return pods.render_cluster(values)


def chat(url: str, content: str = "Say hello to the cluster, please.", max_tokens: int = 16,
         timeout: float = 120) -> tuple[int, str]:
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return pods.http("POST", f"{url}/v1/chat/completions", body, timeout=timeout)
