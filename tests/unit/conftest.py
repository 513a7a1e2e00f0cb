"""Fixtures shared by unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kubetune_trainer import storage


@pytest.fixture
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, storage.S3Settings]]:
    """moto's S3 server on loopback, a bucket, and settings with explicit credentials."""
    from tests.cluster.s3 import S3Server

    server = S3Server.start(tmp_path_factory.mktemp("s3"))
    try:
        server.wait_ready()
        server.create_bucket("adapters")
        settings = storage.S3Settings(endpoint=server.endpoint_url, access_key="a", secret_key="b", attempts=2)
        yield "s3://adapters/team-a/run/progress.json", settings
    finally:
        from tests.cluster.procs import stop_all

        stop_all([server.service])
