"""Build the chart's CPU image (images/cpu/Dockerfile) on a machine with no image registry.

    python -m tools.cpu_image            # build (or reuse) the image; print its tag
    python -m tools.cpu_image --force    # rebuild even if the cached image matches its inputs

The Dockerfile is used as it is; only its build arguments change:
- BASE_IMAGE: a Debian bookworm root filesystem made here with `debootstrap` and `docker import`,
  in place of Docker Hub's python:3.11-slim-bookworm. Like that image, it has Python 3.11 with a
  writable `python`/`pip` in /usr/local/bin (a venv made in /usr/local): /usr/local/bin is on the PATH
  that Debian's /etc/profile sets for KubeRay's `bash -lc` commands, and Debian's own python refuses
  `pip install` outside a venv (PEP 668).
- TORCH_INDEX_URL: the CPU torch wheel from this machine's pip configuration (its find-links folders
  and file:// indexes), served as a package index on 127.0.0.1 for the build, in place of PyTorch's
  index. The build runs with --network host to reach it; every other package comes from PyPI as
  for any user.
- The rest of this machine's pip configuration that a build needs, its CA bundle (`pip config`
  `cert`, PIP_CERT: machines of this kind reach PyPI through a TLS proxy), goes into the base image
  as /etc/pip.conf. The image built here is for this machine's tests only.

Caching, so that a second run on one machine takes seconds and a fresh machine still builds:
- the root filesystem tarball is kept in $VLLM_RAYSERVICE_CACHE (default /var/cache/vllm-rayservice),
  keyed by the recipe below;
- each image carries a label with the hash of its inputs (the Dockerfile, the files it copies, the
  build arguments, the base image's id); an image whose label matches is reused.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "images" / "cpu" / "Dockerfile"
CONSTRAINTS = REPO / "requirements" / "constraints.txt"
CACHE = Path(os.environ.get("VLLM_RAYSERVICE_CACHE", "/var/cache/vllm-rayservice"))
# The tag ci/05-cpu-kind-values.yaml runs (image.repository:image.tag).
IMAGE = "vllm-rayservice-cpu:ray2.60.0-vllm0.29.0"
INPUTS_LABEL = "io.vllm-rayservice.inputs"
BUILD_LOG = REPO / "build" / "containers" / "image-build.log"

# The base: what python:3.11-slim-bookworm gives the Dockerfile (Python 3.11, pip, apt sources),
# from Debian's packages. Bump BASE_RECIPE when this changes, so cached tarballs are rebuilt.
BASE_RECIPE = "2"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("VLLM_RAYSERVICE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# python3-dev: the slim image ships Python's headers, which torch's inductor includes when it compiles.
BASE_PACKAGES = ["python3", "python3-venv", "python3-dev", "ca-certificates"]
BASE_IMAGE = f"vllm-rayservice-base:{DEBIAN_SUITE}-py311-r{BASE_RECIPE}"
# What the python images set; PATH as theirs: /usr/local/bin first.
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


class ImageBuildError(Exception):
    pass


def log(message: str) -> None:
    print(f"[cpu_image {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def docker(*args: str, capture: bool = True, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], text=True, capture_output=capture, **kwargs)
    if check and result.returncode != 0:
        raise ImageBuildError(f"docker {' '.join(args[:3])} ... failed ({result.returncode}): "
                              f"{(result.stderr or '')[-3000:]}")
    return result


def image_label(image: str, label: str) -> Optional[str]:
    """The image's label, or None when there is no such image."""
    result = docker("image", "inspect", "--format", "{{json .Config.Labels}}", image, check=False)
    if result.returncode != 0:
        return None
    return (json.loads(result.stdout) or {}).get(label, "")


def image_id(image: str) -> str:
    return docker("image", "inspect", "--format", "{{.Id}}", image).stdout.strip()


# --- the base image -----------------------------------------------------------------------------

def base_tarball() -> Path:
    return CACHE / f"rootfs-{DEBIAN_SUITE}-py311-r{BASE_RECIPE}.tar"


def pip_config_values(name: str) -> list[str]:
    """A setting of this machine's pip configuration, from its environment (PIP_...) and its files,
    environment first as pip reads it; whitespace-separated lists split."""
    values = os.environ.get(f"PIP_{name.upper().replace('-', '_')}", "").split()
    result = subprocess.run([sys.executable, "-m", "pip", "config", "list"], text=True, capture_output=True)
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.rsplit(".", 1)[-1] == name:
            values += [item for item in value.strip().strip("'\"").split() if item not in values]
    return values


def machine_pip_files() -> dict[str, bytes]:
    """The files that carry this machine's pip configuration into the base: its CA bundle, if any."""
    cert = next(iter(pip_config_values("cert")), None)
    if not cert or not Path(cert).is_file():
        return {}
    return {"etc/ssl/certs/pip-ca-bundle.crt": Path(cert).read_bytes(),
            "etc/pip.conf": b"[global]\ncert = /etc/ssl/certs/pip-ca-bundle.crt\n"}


def build_base(force: bool = False) -> str:
    """The base image: imported from the cached root filesystem, which debootstrap makes if missing,
    plus this machine's pip configuration."""
    extra = machine_pip_files()
    digest = hashlib.sha256(BASE_RECIPE.encode())
    for name, data in sorted(extra.items()):
        digest.update(name.encode() + data)
    key = digest.hexdigest()[:16]
    if not force and image_label(BASE_IMAGE, INPUTS_LABEL) == key:
        log(f"base image {BASE_IMAGE} is here")
        return BASE_IMAGE
    tarball = base_tarball()
    if force or not tarball.exists():
        _debootstrap(tarball)
    log(f"docker import {tarball.name} as {BASE_IMAGE}, with this machine's pip configuration ({sorted(extra)})")
    changes = [f"ENV {name}={value}" for name, value in BASE_ENV.items()]
    changes += [f"LABEL {INPUTS_LABEL}={key}", 'CMD ["python3"]']
    with tempfile.TemporaryDirectory(prefix="base-import-", dir=tarball.parent) as work:
        combined = Path(work) / "rootfs.tar"
        shutil.copy(tarball, combined)
        if extra:
            files = Path(work) / "files"
            for name, data in extra.items():
                (files / name).parent.mkdir(parents=True, exist_ok=True)
                (files / name).write_bytes(data)
                (files / name).chmod(0o644)
            _run(["tar", "--owner=0", "--group=0", "-C", str(files), "-rf", str(combined), *sorted(extra)])
        with combined.open("rb") as stream:
            docker("import", *[arg for change in changes for arg in ("--change", change)], "-", BASE_IMAGE,
                   stdin=stream)
    return BASE_IMAGE


def _debootstrap(tarball: Path) -> None:
    if not shutil.which("debootstrap"):
        raise ImageBuildError("debootstrap is not installed (apt-get install debootstrap; .ci/run does)")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=tarball.parent) as work:
        root = Path(work) / "root"
        log(f"debootstrap {DEBIAN_SUITE} from {DEBIAN_MIRROR} (a few minutes)")
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
              DEBIAN_SUITE, str(root), DEBIAN_MIRROR])
        # python:3.11-slim's python and pip live in /usr/local/bin and install there: a venv in
        # /usr/local gives the same on Debian's own python.
        _run(["chroot", str(root), "/usr/bin/python3", "-m", "venv", "/usr/local"])
        (root / "etc" / "apt" / "sources.list").write_text(
            f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n"
            f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE}-updates main\n"
            f"deb {DEBIAN_MIRROR.replace('/debian', '/debian-security')} {DEBIAN_SUITE}-security main\n")
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (root / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        partial = tarball.with_suffix(".partial")
        _run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."])
        partial.rename(tarball)
    log(f"root filesystem cached as {tarball}")


def _run(command: list[str]) -> None:
    result = subprocess.run(command, text=True, capture_output=True)
    if result.returncode != 0:
        raise ImageBuildError(f"{' '.join(command[:3])} ... failed ({result.returncode}):\n"
                              f"{(result.stdout + result.stderr)[-3000:]}")


# --- the torch wheel, from this machine's pip configuration ----------------------------------------

def pip_wheel_sources() -> list[Path]:
    """Local folders pip here takes packages from: find-links folders and file:// indexes."""
    folders = []
    for value in [*pip_config_values("find-links"), *pip_config_values("extra-index-url"),
                  *pip_config_values("index-url")]:
        path = Path(value.removeprefix("file://"))
        if value.startswith(("file://", "/")) and path.is_dir() and path not in folders:
            folders.append(path)
    return folders


def torch_wheels(version: str) -> list[Path]:
    """The CPU torch wheels of `version` in those folders (flat or as a simple index's torch/)."""
    found = []
    for folder in pip_wheel_sources():
        for candidate in (folder, folder / "torch"):
            found += sorted(candidate.glob(f"torch-{version}+cpu-*.whl"))
    if not found:
        raise ImageBuildError(
            f"no torch-{version}+cpu wheel in this machine's pip sources {pip_wheel_sources()}; outside "
            "this machine build as the README says (PyTorch's CPU index is the Dockerfile's default)")
    return found


@contextlib.contextmanager
def wheel_index(wheels: list[Path]) -> Iterator[str]:
    """A PEP 503 package index holding `wheels`, served on 127.0.0.1 for the duration of the build."""
    with tempfile.TemporaryDirectory(prefix="torch-index-") as root:
        project = Path(root) / "torch"
        project.mkdir()
        for wheel in wheels:
            (project / wheel.name).symlink_to(wheel)
        handler = functools.partial(_QuietHandler, directory=root)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


# --- the CPU image -------------------------------------------------------------------------------

def dockerfile_arg(name: str) -> str:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith(f"ARG {name}="):
            return line.split("=", 1)[1]
    raise ImageBuildError(f"{DOCKERFILE} has no ARG {name}")


def inputs_hash(build_args: dict, wheels: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in (DOCKERFILE, CONSTRAINTS):
        digest.update(path.read_bytes())
    digest.update(json.dumps(build_args, sort_keys=True).encode())
    digest.update(image_id(build_args["BASE_IMAGE"]).encode())
    for wheel in wheels:
        digest.update(f"{wheel.name}:{wheel.stat().st_size}".encode())
    return digest.hexdigest()[:20]


def build(force: bool = False) -> str:
    """Build the CPU image unless one built from the same inputs is here; return its tag."""
    started = time.monotonic()
    base = build_base()
    wheels = torch_wheels(dockerfile_arg("TORCH_VERSION"))
    # The index URL changes every run (a free port): it is not part of the inputs.
    key = inputs_hash({"BASE_IMAGE": base}, wheels)
    if not force and image_label(IMAGE, INPUTS_LABEL) == key:
        log(f"{IMAGE} is up to date (inputs {key})")
        return IMAGE
    log(f"building {IMAGE} (inputs {key}); torch from {wheels[0]}")
    with tempfile.TemporaryDirectory(prefix="cpu-image-context-") as context, wheel_index(wheels) as index:
        # The context holds only what the Dockerfile copies (the repository root would send .venv).
        (Path(context) / "requirements").mkdir()
        shutil.copy(CONSTRAINTS, Path(context) / "requirements" / "constraints.txt")
        command = ["build", "--force-rm", "--network", "host", "-f", str(DOCKERFILE), "-t", IMAGE,
                   "--label", f"{INPUTS_LABEL}={key}",
                   "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"TORCH_INDEX_URL={index}", context]
        BUILD_LOG.parent.mkdir(parents=True, exist_ok=True)
        log(f"build output: {BUILD_LOG}")
        with BUILD_LOG.open("w") as output:
            # The legacy builder: Debian's docker.io ships no BuildKit plugin for this client.
            code = subprocess.run(["docker", *command], stdout=output, stderr=subprocess.STDOUT,
                                  env={**os.environ, "DOCKER_BUILDKIT": "0"}).returncode
    if code != 0:
        raise ImageBuildError(f"docker build failed ({code}); the end of {BUILD_LOG}:\n"
                              f"{BUILD_LOG.read_text()[-4000:]}")
    log(f"built {IMAGE} in {time.monotonic() - started:.0f} s")
    return IMAGE


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when the cached image matches")
    args = parser.parse_args(argv)
    try:
        print(build(force=args.force))
    except ImageBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
