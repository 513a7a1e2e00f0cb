"""Write-once publishing under a race: of two writers that both found a key free, only the first lands.

The check before writing (``stored_sha256``) leaves a window in which a second
pod of the same run can find the key free as well. The writes themselves are
conditional (S3's ``If-None-Match: *``; a hard link in a folder), so the loser
finds the winner's file and is refused, unless its bytes are the same.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer import storage


@pytest.fixture(params=["file", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, storage.S3Settings | None]:
    """An empty output URI on a folder or on moto's S3 server."""
    if request.param == "file":
        return f"file://{tmp_path / 'store'}/run-1/", None
    _, settings = request.getfixturevalue("s3_server")
    return "s3://adapters/write-once/run-1/", settings


def artifact(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    return folder


def stored(uri: str, settings: storage.S3Settings | None) -> str | None:
    loc = storage.resolve(storage.join(uri, "adapter_model.safetensors"), settings)
    return loc.store.stored_sha256(loc.key)


def blind_next_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next existence check of the weights answers "free", as it did for a writer that checked before the
    first one wrote: the second writer is inside the window."""
    answered: set[str] = set()
    for cls in (storage.FileStore, storage.S3Store):

        def checked(self: Any, key: str, _original: Any = cls.stored_sha256) -> str | None:
            if key.endswith("adapter_model.safetensors") and key not in answered:
                answered.add(key)
                return None
            result: str | None = _original(self, key)
            return result

        monkeypatch.setattr(cls, "stored_sha256", checked)


def test_upload_new_writes_once_and_keeps_the_first(output: tuple[str, Any], tmp_path: Path) -> None:
    uri, settings = output
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    loc = storage.resolve(storage.join(uri, "weights.bin"), settings)
    assert loc.store.upload_new(first, loc.key, sha256=hashlib.sha256(b"first").hexdigest())
    assert not loc.store.upload_new(second, loc.key, sha256=hashlib.sha256(b"second").hexdigest())
    assert loc.store.read_bytes(loc.key) == b"first"
    assert loc.store.list(storage.resolve(uri, settings).key) == [loc.key], "a temporary file was left behind"


@pytest.mark.parametrize(
    ("weights_b", "refused"),
    [
        (b"weights of pod b (a GPU run differs)", True),  # the loser is refused; the winner's file stays
        (b"weights of pod a", False),  # the same bytes: the loser's publish converges on the winner's
    ],
    ids=["other-weights-refused", "same-weights-converge"],
)
def test_the_loser_of_a_race(
    output: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights_b: bytes, refused: bool
) -> None:
    uri, settings = output
    a = artifact(tmp_path / "pod-a", b"weights of pod a")
    b = artifact(tmp_path / "pod-b", weights_b)
    storage.publish_dir(a, uri, settings)
    blind_next_check(monkeypatch)
    if refused:
        with pytest.raises(storage.WriteOnceError, match="another writer meanwhile"):
            storage.publish_dir(b, uri, settings)
    else:
        assert storage.publish_dir(b, uri, settings) == storage.publish_dir(a, uri, settings)
    assert stored(uri, settings) == hashlib.sha256(b"weights of pod a").hexdigest()
