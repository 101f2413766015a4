"""Every PromQL expression of the chart's dashboards and alerts, as a Prometheus would run them.

    python -m tools.monitoring           print (source, expression), one per line
    python -m tools.monitoring --names   print the metric names they use

The chart is rendered with all monitoring on, for RELEASE in NAMESPACE, so each expression selects
that release's series by its job label, SCRAPE_JOB ("<namespace>/<full name>", what the Prometheus
Operator gives whatever the chart's PodMonitor scrapes). A Prometheus scraping the app elsewhere
(say a local one) matches the expressions when its scrape job is named SCRAPE_JOB.

Dashboard variables become the value each dashboard opens on (its job: SCRAPE_JOB; a multi-value
variable on "All": its allValue), and Grafana's $__range one hour. tests/chart/test_monitoring.py
parses them all with promtool; a live test can evaluate them against a real Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tools import chart

RELEASE = "test"
NAMESPACE = "default"
SCRAPE_JOB = f"{NAMESPACE}/{RELEASE}-vllm-rayservice"
ALL_ON = {"monitoring": {"podMonitor": {"enabled": True}, "dashboards": {"enabled": True},
                         "prometheusRule": {"enabled": True}}}
# Grafana's built-in variables the dashboards use, and what they stand for here.
GRAFANA_BUILTINS = {"__range": "1h"}

_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.S)


def dashboards(rendered: chart.Rendered) -> dict[str, dict]:
    """{file name: dashboard} of the rendered dashboard ConfigMaps."""
    found = {}
    for config_map in rendered.of_kind("ConfigMap"):
        for name, text in (config_map.get("data") or {}).items():
            if name.endswith(".json"):
                found[name] = json.loads(text)
    return found


def _opening_values(dashboard: dict) -> dict[str, str]:
    values = dict(GRAFANA_BUILTINS)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "datasource":
            continue
        current = (variable.get("current") or {}).get("value")
        if current in ("$__all", ["$__all"]):
            current = variable["allValue"]
        if not isinstance(current, str) or not current:
            raise ValueError(f"dashboard {dashboard['title']!r}: variable {variable['name']!r} opens on no value")
        values[variable["name"]] = current
    return values


def _substitute(expr: str, values: dict[str, str], where: str) -> str:
    def value(match):
        name = match.group(1) or match.group(2)
        if name not in values:
            raise ValueError(f"{where}: unknown variable ${name} in {expr!r}")
        return values[name]
    return _VARIABLE.sub(value, expr)


def dashboard_expressions(rendered: chart.Rendered) -> list[tuple[str, str]]:
    found = []
    for file_name, dashboard in sorted(dashboards(rendered).items()):
        values = _opening_values(dashboard)
        for variable in dashboard["templating"]["list"]:
            if variable["type"] != "query":
                continue
            # Grafana's label_values(SELECTOR, LABEL) asks Prometheus for the series of SELECTOR.
            match = _LABEL_VALUES.match(variable["query"]["query"])
            if not match:
                raise ValueError(f"{file_name}: variable {variable['name']!r} is not label_values(...)")
            where = f"dashboard {file_name}, variable ${variable['name']}"
            found.append((where, _substitute(match.group(1), values, where)))
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                where = f"dashboard {file_name}, panel {panel['id']} {panel['title']!r}, query {target['refId']}"
                found.append((where, _substitute(target["expr"], values, where)))
    return found


def alert_expressions(rendered: chart.Rendered) -> list[tuple[str, str]]:
    return [(f"alert {rule['alert']}", rule["expr"])
            for group in rendered.one("PrometheusRule")["spec"]["groups"] for rule in group["rules"]]


def all_expressions() -> list[tuple[str, str]]:
    """(source, PromQL) of every dashboard query and alert, rendered with all monitoring on."""
    rendered = chart.render(ALL_ON, release=RELEASE, namespace=NAMESPACE)
    return dashboard_expressions(rendered) + alert_expressions(rendered)


_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "offset", "bool", "inf", "nan"}


def names_in(expr: str) -> set[str]:
    """The metric names one PromQL expression selects: every identifier that is not a function, a
    keyword, a label or a number. Enough for the expressions this chart writes (no `{__name__=...}`)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"(?<![\w.])\d+(\.\d*)?([eE][-+]?\d+)?", " ", text)  # numbers
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", text):
        if match.group().lower() in _KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue
        names.add(match.group())
    return names


def metric_names() -> list[str]:
    """Every metric name the dashboards and alerts use, sorted."""
    return sorted(set().union(*(names_in(expr) for _, expr in all_expressions())))


def promtool() -> str | None:
    return shutil.which("promtool")


def promtool_check(groups: list[dict]) -> str:
    """Run `promtool check rules` on rule groups; "" when they pass, else promtool's complaint."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rules.yaml"
        path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    return "" if result.returncode == 0 else (result.stdout + result.stderr).strip()


def as_recording_rules(expressions: list[tuple[str, str]]) -> list[dict]:
    """Expressions wrapped as recording rules, the one form in which promtool parses bare PromQL."""
    return [{"name": "expressions", "rules": [
        {"record": f"check:expression_{number}", "expr": expr} for number, (_, expr) in enumerate(expressions)]}]


if __name__ == "__main__":
    if "--names" in sys.argv:
        print("\n".join(metric_names()))
    else:
        for source, expr in all_expressions():
            print(f"{source}\n    {' '.join(expr.split())}")
