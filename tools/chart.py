"""Render this chart with the real Helm engine and return parsed objects.

Uses the `helm` binary when one is on PATH (so users' own Helm is what the tests exercise), and the
Helm engine's Python binding (helm-python-sdk, Helm v4's Go SDK) otherwise. Either way, errors
carry Helm's own message: schema violations name the key, `fail` messages come through verbatim.
Set VLLM_RAYSERVICE_HELM=python or =binary to force one.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import yaml

CHART_DIR = Path(__file__).resolve().parent.parent


class ChartError(Exception):
    """Helm refused to render: the message is Helm's."""


@dataclass
class Rendered:
    objects: list[dict]
    notes: str = ""
    sources: dict[str, list[dict]] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[dict]:
        return [obj for obj in self.objects if obj.get("kind") == kind]

    def one(self, kind: str) -> dict:
        found = self.of_kind(kind)
        if len(found) != 1:
            raise AssertionError(f"expected one {kind}, rendered {len(found)}")
        return found[0]

    def rayservice(self) -> dict:
        return self.one("RayService")

    def serve_config(self) -> dict:
        return yaml.safe_load(self.rayservice()["spec"]["serveConfigV2"])


def deep_merge(base: dict, override: dict) -> dict:
    """Merge `override` into a copy of `base` the way Helm merges -f files: maps merge, the rest replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_values_files(paths: Iterable[os.PathLike | str]) -> dict:
    values: dict = {}
    for path in paths:
        values = deep_merge(values, yaml.safe_load(Path(path).read_text()) or {})
    return values


def render(values: Optional[dict] = None, *, values_files: Iterable = (), set_values: Iterable[str] = (),
           release: str = "test", namespace: str = "default", chart_dir: Path = CHART_DIR,
           engine: Optional[str] = None, upgrade: bool = False) -> Rendered:
    """Render like `helm template RELEASE CHART -n NAMESPACE -f FILE... --set ...` plus `values`.

    `helm template` never renders NOTES.txt; the Python engine does (pass engine="python" to read
    them), and with upgrade=True it renders as `helm upgrade` would (.Release.IsUpgrade).
    """
    engine = engine or os.environ.get("VLLM_RAYSERVICE_HELM") or ("binary" if shutil.which("helm") else "python")
    merged = deep_merge(load_values_files(values_files), values or {})
    if engine == "binary":
        texts = _render_with_binary(merged, list(set_values), release, namespace, Path(chart_dir), upgrade)
    else:
        texts = _render_with_python(merged, list(set_values), release, namespace, Path(chart_dir), upgrade)
    rendered = Rendered(objects=[])
    for source, text in sorted(texts.items()):
        if source.endswith("NOTES.txt"):
            rendered.notes = text
            continue
        docs = [doc for doc in yaml.safe_load_all(text) if doc]
        rendered.sources[source] = docs
        rendered.objects.extend(docs)
    return rendered


def _render_with_python(values, set_values, release, namespace, chart_dir, upgrade) -> dict[str, str]:
    import helm_python

    for expression in set_values:
        values = deep_merge(values, helm_python.parse_set_string(expression))
    try:
        chart = helm_python.Chart.load(str(chart_dir))
        return chart.render(values, name=release, namespace=namespace,
                            is_install=not upgrade, is_upgrade=upgrade)
    except (helm_python.HelmValuesError, helm_python.HelmRenderError, helm_python.HelmChartInvalidError) as error:
        raise ChartError(str(error)) from None


def _render_with_binary(values, set_values, release, namespace, chart_dir, upgrade) -> dict[str, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as values_file:
        yaml.safe_dump(values, values_file)
        values_file.flush()
        command = ["helm", "template", release, str(chart_dir), "-n", namespace, "-f", values_file.name]
        if upgrade:
            command.append("--is-upgrade")
        for expression in set_values:
            command += ["--set", expression]
        result = subprocess.run(command + ["--include-crds"], capture_output=True, text=True)
    if result.returncode != 0:
        raise ChartError(result.stderr.strip())
    # `helm template` marks each document with its source template.
    texts: dict[str, str] = {}
    for doc in result.stdout.split("\n---\n"):
        for line in doc.splitlines():
            if line.startswith("# Source: "):
                source = line[len("# Source: "):].strip()
                texts[source] = texts.get(source, "") + "\n---\n" + doc
                break
    return texts


def lint(values: Optional[dict] = None, *, strict: bool = True) -> list[str]:
    """Helm lint findings (warnings and errors; with strict, warnings count), as messages."""
    import helm_python

    report = helm_python.lint(str(CHART_DIR), values or {}, strict=strict)
    return [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2] + list(
        report.get("errors") or [])
