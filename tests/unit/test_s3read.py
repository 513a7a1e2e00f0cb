"""The operator's own SigV4 GETs sign exactly as botocore does, and read what boto3 wrote."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from unittest import mock

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from kubetune.controllers.s3read import S3Reader, sign_get
from kubetune_trainer import storage

MOMENT = datetime(2026, 11, 29, 12, 30, 5, tzinfo=UTC)


@pytest.mark.parametrize("token", [None, "session-token-123"])
@pytest.mark.parametrize(
    ("host", "path"),
    [
        ("minio.storage:9000", "/adapters/team-a/run/progress.json"),
        ("s3.eu-west-1.amazonaws.com", "/my-bucket/a%20b/manifest.json"),
        ("10.250.0.1:41234", "/base/prefix/adapters/x/progress.json"),
    ],
)
def test_signature_equals_botocores(host: str, path: str, token: str | None) -> None:
    ours = sign_get(
        host=host, path=path, region="eu-west-1", access_key="AKIDEXAMPLE", secret_key="wJalr/K7MDENG+bPxRfi",
        session_token=token, now=MOMENT,
    )  # fmt: skip
    request = AWSRequest(method="GET", url=f"http://{host}{path}", headers={"x-amz-content-sha256": ours[
        "x-amz-content-sha256"]})  # fmt: skip
    signer = S3SigV4Auth(Credentials("AKIDEXAMPLE", "wJalr/K7MDENG+bPxRfi", token), "s3", "eu-west-1")
    with mock.patch("botocore.auth.get_current_datetime", return_value=MOMENT.replace(tzinfo=None)):
        signer.add_auth(request)
    assert ours["authorization"] == request.headers["Authorization"]
    assert ours["x-amz-date"] == request.headers["X-Amz-Date"]


def test_reads_what_boto3_wrote_and_says_what_is_missing(s3_server: tuple[str, storage.S3Settings]) -> None:
    uri, settings = s3_server
    storage.write_json(uri, {"stage": "train", "step": 7}, settings)
    reader = S3Reader()
    assert json.loads(reader.get(uri, settings)) == {"stage": "train", "step": 7}
    with pytest.raises(storage.NotFoundError):
        reader.get(uri.replace("progress", "nothing"), settings)


def test_an_unreachable_store_is_a_storage_error_quickly() -> None:
    settings = storage.S3Settings(endpoint="http://127.0.0.1:9", access_key="a", secret_key="b")
    with pytest.raises(storage.StorageError):
        S3Reader(connect_timeout=0.5, read_timeout=0.5).get("s3://b/k.json", settings)


@pytest.fixture
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> object:
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
