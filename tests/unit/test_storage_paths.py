"""Storage URIs and listed keys that must never lead out of the bucket, claim or folder they are fetched into."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_trainer import storage


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/models/../../etc/passwd",
        "s3://bucket/..",
        "file:///data/../etc/shadow",
        "pvc://claim/../other-claim/secret",
        "pvc://../x/y",
        "pvc:///x/y",
    ],
)
def test_uris_with_parent_segments_are_refused(uri: str) -> None:
    with pytest.raises(storage.InvalidURIError) as refused:
        storage.resolve(uri)
    assert uri in str(refused.value)


@pytest.mark.parametrize("rel", ["../escaped", "a/../../escaped", "/etc/cron.d/x", "a/..", ""])
def test_listed_keys_never_land_outside_the_destination(tmp_path: Path, rel: str) -> None:
    with pytest.raises(storage.InvalidURIError, match="outside"):
        storage.local_path(tmp_path / "dest", rel, "s3://b/model/")
    assert storage.local_path(tmp_path / "dest", "sub/ok.bin", "s3://b/model/") == tmp_path / "dest/sub/ok.bin"


def test_fetch_dir_refuses_a_listing_that_escapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store whose listing holds ``model/../../x`` (S3 keys are plain strings: a bucket may hold one)."""
    root = tmp_path / "store"
    (root / "model").mkdir(parents=True)
    (root / "model" / "config.json").write_text("{}")
    (root / "secret.txt").write_text("s3cret")
    listing = ["model/config.json", "model/../secret.txt"]
    monkeypatch.setattr(storage.FileStore, "list", lambda self, prefix: listing)
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path))
    dest = tmp_path / "work" / "cache" / "base-model"
    with pytest.raises(storage.InvalidURIError, match=r"pvc://store/model: refusing to fetch '\.\./secret\.txt'"):
        storage.fetch_dir("pvc://store/model", dest)
    assert not (tmp_path / "work" / "cache" / "secret.txt").exists()


def test_a_symlink_out_of_a_claim_is_refused_when_fetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    claim = tmp_path / "pvc" / "models"
    (claim / "model").mkdir(parents=True)
    (claim / "model" / "config.json").write_text("{}")
    (tmp_path / "outside.txt").write_text("not yours")
    (claim / "model" / "weights.bin").symlink_to(tmp_path / "outside.txt")
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "pvc"))
    with pytest.raises(storage.InvalidURIError, match="escapes"):
        storage.fetch_dir("pvc://models/model", tmp_path / "dest")


def test_a_dataset_uri_must_name_a_file(tmp_path: Path) -> None:
    with pytest.raises(storage.InvalidURIError, match="hf:// names a model on a hub"):
        storage.fetch_file("hf://datasets/acme/tickets", tmp_path / "train.jsonl")
    with pytest.raises(storage.InvalidURIError, match="names a folder"):
        storage.fetch_file("s3://bucket/datasets/", tmp_path / "train.jsonl")
