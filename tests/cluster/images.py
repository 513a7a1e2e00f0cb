"""The project's container images, built with podman by ``images.sh``.

``images.sh`` is the one place that names the images and knows how to build
them (``make images`` runs it); this module is how tests get at them::

    from tests.cluster import images

    built = images.build()  # operator and trainer; seconds when nothing changed
    built["trainer"].ref  # "localhost/kubetune-trainer:dev"
    built["trainer"].archive  # a docker-archive tar: `ctr -n k8s.io images import <archive>`
    images.refs()["operator"]  # the name alone, without building

Each archive's file name carries a hash of everything that goes into its
image (Dockerfile, pyproject.toml, sources, base, the build commands), so an
unchanged tree builds and saves nothing.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).with_name("images.sh")
NAMES = ("operator", "trainer")


@dataclass(frozen=True)
class BuiltImage:
    name: str  # operator or trainer
    ref: str  # the image reference inside the archive, e.g. localhost/kubetune-operator:dev
    archive: Path  # docker-archive tar for `podman load` or `ctr images import`


def parse_lines(output: str) -> dict[str, BuiltImage]:
    """``images.sh`` prints ``<name> <ref> <archive>`` per image."""
    built: dict[str, BuiltImage] = {}
    for line in output.splitlines():
        name, ref, archive = line.split()
        built[name] = BuiltImage(name=name, ref=ref, archive=Path(archive))
    return built


def build(*names: str) -> dict[str, BuiltImage]:
    """Build (or find already built) the named images; all of them by default.

    A cold build takes minutes (the trainer's torch is gigabytes); progress goes
    to stderr. Raises CalledProcessError when a build fails.
    """
    unknown = set(names) - set(NAMES)
    if unknown:
        raise ValueError(f"unknown images {sorted(unknown)}; known: {NAMES}")
    result = subprocess.run(["bash", str(SCRIPT), *names], stdout=subprocess.PIPE, text=True, check=True)
    return parse_lines(result.stdout)


def refs() -> dict[str, str]:
    """The image references, without building anything."""
    result = subprocess.run(["bash", str(SCRIPT), "refs"], stdout=subprocess.PIPE, text=True, check=True)
    found: dict[str, str] = {}
    for line in result.stdout.splitlines():
        name, ref = line.split()
        found[name] = ref
    return found
