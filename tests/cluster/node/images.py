"""Small OCI images for the test node, written as OCI archives that ``ctr images import`` reads.

No registry can be reached from these machines, so every image the node runs
is made here: the pod sandbox (``pause``, a static C program), CoreDNS (the
static Go binary built by ``build-node-binaries.sh``) and a tool image with
Debian's static busybox for the node's own tests. Each is one uncompressed
layer of static binaries on an empty root; writing the archive directly takes
milliseconds and needs neither podman nor a daemon. The project's operator and
trainer images are built from the Dockerfile with podman (``make images``) and
imported the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAUSE_SOURCE = Path(__file__).with_name("pause.c")
BUSYBOX = Path("/usr/bin/busybox")  # Debian's busybox-static
NONROOT = 65532

_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_CONFIG = "application/vnd.oci.image.config.v1+json"
_LAYER = "application/vnd.oci.image.layer.v1.tar"
_INDEX = "application/vnd.oci.image.index.v1+json"

# What every image carries besides its binaries: mount points, a world-writable
# /tmp, and a passwd/group naming the non-root user the restricted pods run as.
_PASSWD = f"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n"
_GROUP = f"root:x:0:\nnonroot:x:{NONROOT}:\n"
_BASE_DIRS = ("dev", "proc", "sys", "etc", "tmp", "var", "home/nonroot")


@dataclass
class Image:
    """An image to write: files (path in the image → host file), symlinks, and its run config."""

    name: str
    files: dict[str, Path] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    user: str = f"{NONROOT}:{NONROOT}"
    env: Mapping[str, str] = field(default_factory=lambda: {"PATH": "/bin"})


def _add_bytes(tar: tarfile.TarFile, path: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(path)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def _layer(image: Image) -> bytes:
    """The image's only layer, byte-for-byte the same for the same inputs (mtime 0, owner root)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in _BASE_DIRS:
            parts = directory.split("/")
            for depth in range(1, len(parts) + 1):
                info = tarfile.TarInfo("/".join(parts[:depth]))
                info.type = tarfile.DIRTYPE
                info.mode = 0o1777 if directory == "tmp" else 0o755
                if parts[:depth] == ["home", "nonroot"]:
                    info.uid = info.gid = NONROOT
                if info.name not in tar.getnames():
                    tar.addfile(info)
        _add_bytes(tar, "etc/passwd", _PASSWD.encode())
        _add_bytes(tar, "etc/group", _GROUP.encode())
        for path, source in sorted(image.files.items()):
            parent = str(Path(path).parent)
            if parent not in (".", *_BASE_DIRS) and parent not in tar.getnames():
                info = tarfile.TarInfo(parent)
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            _add_bytes(tar, path, source.read_bytes(), mode=0o755)
        for path, target in sorted(image.symlinks.items()):
            info = tarfile.TarInfo(path)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def _blob(tar: tarfile.TarFile, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _add_bytes(tar, f"blobs/sha256/{digest.removeprefix('sha256:')}", data)
    return digest


def write_archive(image: Image, path: Path) -> Path:
    """Write ``image`` as an OCI archive (oci-layout, index.json, blobs/) named for ``ctr images import``."""
    layer = _layer(image)
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    config: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": image.user,
            "Env": [f"{k}={v}" for k, v in image.env.items()],
            "Entrypoint": list(image.entrypoint) or None,
            "Cmd": list(image.cmd) or None,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "tests/cluster/node/images.py", "comment": image.name}],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    with tarfile.open(tmp, mode="w") as tar:
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        config_bytes = json.dumps(config, sort_keys=True).encode()
        config_digest = _blob(tar, config_bytes)
        _blob(tar, layer)
        manifest = {
            "schemaVersion": 2,
            "mediaType": _MANIFEST,
            "config": {"mediaType": _CONFIG, "digest": config_digest, "size": len(config_bytes)},
            "layers": [{"mediaType": _LAYER, "digest": layer_digest, "size": len(layer)}],
        }
        manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
        manifest_digest = _blob(tar, manifest_bytes)
        index = {
            "schemaVersion": 2,
            "mediaType": _INDEX,
            "manifests": [
                {
                    "mediaType": _MANIFEST,
                    "digest": manifest_digest,
                    "size": len(manifest_bytes),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": image.name,
                        "org.opencontainers.image.ref.name": image.name.rsplit(":", 1)[-1],
                    },
                }
            ],
        }
        _add_bytes(tar, "index.json", json.dumps(index, sort_keys=True).encode())
    tmp.replace(path)
    return path


def build_pause(out_dir: Path) -> Path:
    """Compile ``pause.c`` statically (cached by the source's hash); return the binary."""
    source = PAUSE_SOURCE.read_bytes()
    binary = out_dir / f"pause-{hashlib.sha256(source).hexdigest()[:12]}"
    if not binary.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(".partial")
        subprocess.run(
            ["gcc", "-static", "-Os", "-s", "-o", str(partial), str(PAUSE_SOURCE)],
            check=True,
            capture_output=True,
            text=True,
        )
        partial.replace(binary)
    return binary


def pause_image(name: str, out_dir: Path) -> Image:
    # Runs as root inside the sandbox's user namespace-less container: kubelet sets the
    # pod's security context on the sandbox (a restricted pod's sandbox runs as its user).
    return Image(name, files={"pause": build_pause(out_dir)}, entrypoint=["/pause"], user="65535:65535")


def coredns_image(name: str, coredns: Path) -> Image:
    return Image(name, files={"coredns": coredns}, entrypoint=["/coredns"])


def busybox_image(name: str) -> Image:
    """Debian's static busybox with a link per applet: sh, id, cat, nc, nslookup, wget, httpd, ip ..."""
    if not BUSYBOX.exists():
        raise FileNotFoundError(f"{BUSYBOX} is missing: install Debian's busybox-static (make node-packages)")
    listed = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
    applets = {f"bin/{applet}": "busybox" for applet in listed if applet not in {"busybox", "[", "[["}}
    return Image(name, files={"bin/busybox": BUSYBOX}, symlinks=applets, entrypoint=["/bin/sh"])


def cached_archive(image: Image, cache: Path) -> Path:
    """The image's archive in ``cache``, written once per content (name and inputs)."""
    key = hashlib.sha256(image.name.encode())
    for path, source in sorted(image.files.items()):
        key.update(path.encode())
        key.update(hashlib.sha256(source.read_bytes()).digest())
    key.update(json.dumps([sorted(image.symlinks.items()), list(image.entrypoint), image.user]).encode())
    archive = cache / f"{image.name.replace('/', '_').replace(':', '_')}-{key.hexdigest()[:12]}.oci.tar"
    if not archive.exists():
        write_archive(image, archive)
    return archive
