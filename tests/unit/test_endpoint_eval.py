"""The online eval's dataset is read from the store the Job names, never from a default endpoint."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from kubetune_trainer import storage
from kubetune_trainer.endpoint_eval import Client, evaluate_endpoint

HELDOUT = Path(__file__).resolve().parents[2] / "docs" / "examples" / "data" / "support" / "heldout.jsonl"


class AlwaysDelete(Client):
    """An endpoint that routes every ticket to ACCOUNT/DELETE (no server needed to score against)."""

    def chat(self, messages: Sequence[dict[str, str]]) -> str:
        return "ACCOUNT/DELETE"


@pytest.fixture
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[storage.S3Settings]:
    from tests.cluster.procs import stop_all
    from tests.cluster.s3 import S3Server

    server = S3Server.start(tmp_path_factory.mktemp("s3"))
    try:
        server.wait_ready()
        server.create_bucket("datasets")
        settings = storage.S3Settings(endpoint=server.endpoint_url, access_key="a", secret_key="b", attempts=2)
        folder = tmp_path_factory.mktemp("data")
        (folder / "heldout.jsonl").write_bytes(HELDOUT.read_bytes())
        storage.upload_dir(folder, "s3://datasets/support/", settings)
        yield settings
    finally:
        stop_all([server.service])


def test_the_dataset_comes_from_the_given_store(store: storage.S3Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "KUBETUNE_STORAGE_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    client = AlwaysDelete("http://127.0.0.1:9", "bot", 8)
    summary, code = evaluate_endpoint(
        client, "s3://datasets/support/heldout.jsonl", "exact_match", 0.5, max_examples=8, settings=store
    )
    assert summary.examples == 8, summary
    assert summary.reason == "OnlineEvalFailed", summary  # scored (1 of 8 is ACCOUNT/DELETE), not unreadable
    assert summary.score == pytest.approx(1 / 8)
    assert int(code) == 11
