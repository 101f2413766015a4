"""values.yaml is the single source of truth: every key documented, typed in the schema with the
same default, and used by some template. Every ci/ scenario validates against the schema."""

import json
import re
from pathlib import Path

import pytest
import yaml

from tools import chart, values_doc

REPO = Path(__file__).resolve().parents[2]
VALUES = yaml.safe_load((REPO / "values.yaml").read_text())
SCHEMA = json.loads((REPO / "values.schema.json").read_text())
TEMPLATES = "\n".join(path.read_text() for path in (REPO / "templates").rglob("*") if path.is_file())


def _resolve(node):
    ref = node.get("$ref")
    return _resolve(SCHEMA["definitions"][ref.rsplit("/", 1)[1]]) if ref else node


LEAVES = list(values_doc.leaves(VALUES, SCHEMA))


def test_schema_should_reject_unknown_keys_at_every_level_users_write():
    def objects(node, path="root"):
        node = _resolve(node)
        if "properties" in node:
            yield path, node
            for key, sub in node["properties"].items():
                yield from objects(sub, f"{path}.{key}")

    for path, node in objects(SCHEMA):
        assert node.get("additionalProperties") is False, path


@pytest.mark.parametrize("path, value, node", LEAVES, ids=[".".join(p) for p, _, _ in LEAVES])
def test_every_value_should_be_documented_with_its_default(path, value, node):
    assert node.get("description"), f"{'.'.join(path)} has no description in values.schema.json"
    assert node.get("default") == value, f"{'.'.join(path)}: schema default differs from values.yaml"


@pytest.mark.parametrize("path", [p for p, _, _ in LEAVES], ids=[".".join(p) for p, _, _ in LEAVES])
def test_every_value_should_be_used_by_a_template(path):
    dotted = ".Values." + ".".join(path)
    assert re.search(re.escape(dotted) + r"\b", TEMPLATES), f"{dotted} is never used in templates/"


def test_every_key_in_values_yaml_should_have_a_comment_above_it():
    """Sections and leaves alike, where they stand; data inside a leaf (a resources map) is exempt."""
    schema_paths = {path[:i] for path, _, _ in LEAVES for i in range(1, len(path) + 1)}
    lines = (REPO / "values.yaml").read_text().splitlines()
    stack = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z]\w*):", line)
        if not match:
            continue
        stack = stack[:len(match.group(1)) // 2] + [match.group(2)]
        if tuple(stack) not in schema_paths:
            continue
        above = lines[number - 1].strip() if number else ""
        assert above.startswith("#"), f"values.yaml line {number + 1}: {'.'.join(stack)} has no comment above it"


@pytest.mark.parametrize("scenario", sorted((REPO / "ci").glob("*-values.yaml")), ids=lambda p: p.name)
def test_every_ci_scenario_should_validate_against_the_schema(scenario):
    import helm_python

    values = chart.load_values_files([scenario])
    loaded = helm_python.Chart.load(str(REPO))
    loaded.validate_schema(loaded.merge_values(values) if hasattr(loaded, "merge_values") else values)


def test_readme_values_reference_should_match_values_yaml():
    readme = (REPO / "README.md").read_text()
    assert values_doc.readme_with_table(readme) == readme, "README values reference is stale: run `make docs`"
