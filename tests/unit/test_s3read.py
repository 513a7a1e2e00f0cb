"""The operator's own SigV4 GETs sign exactly as botocore does, and read what boto3 wrote."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
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


@dataclass
class Store:
    """A loopback HTTP server that answers each GET with ``body``; it counts connections and can misbehave."""

    body: bytes
    close_after: int = 0  # close each connection after this many answers (0: keep it)
    delay: float = 0.0  # seconds before answering
    framing: str = "length"  # the body's framing: "length" (Content-Length), "chunked", "close" (HTTP/1.0)
    connections: int = 0
    requests: int = 0
    sock: socket.socket = field(default_factory=socket.socket)

    @property
    def settings(self) -> storage.S3Settings:
        return storage.S3Settings(endpoint=f"http://127.0.0.1:{self.sock.getsockname()[1]}", access_key="a",
                                  secret_key="b")  # fmt: skip

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as requests:
            answered = 0
            while requests.readline():  # a request line
                while requests.readline() not in (b"\r\n", b""):
                    pass
                self.requests += 1
                time.sleep(self.delay)
                conn.sendall(self.answer_bytes())
                if self.framing == "close":
                    return
                answered += 1
                if self.close_after and answered >= self.close_after:
                    return

    def answer_bytes(self) -> bytes:
        # A dozen headers, as S3 servers send, in the cases they come in.
        extra = "".join(f"x-amz-meta-{i}: {i}\r\n" for i in range(8)) + 'ETag: "abc"\r\nServer: scripted\r\n'
        if self.framing == "chunked":
            halves = (self.body[: len(self.body) // 2], self.body[len(self.body) // 2 :])
            chunks = b"".join(f"{len(c):x};ext=1\r\n".encode() + c + b"\r\n" for c in halves if c)
            return f"HTTP/1.1 200 OK\r\n{extra}Transfer-Encoding: Chunked\r\n\r\n".encode() + chunks + b"0\r\n\r\n"
        if self.framing == "close":
            return f"HTTP/1.0 200 OK\r\n{extra}\r\n".encode() + self.body
        return f"HTTP/1.1 200 OK\r\n{extra}content-length: {len(self.body)}\r\n\r\n".encode() + self.body


@pytest.fixture
def store() -> Iterator[Store]:
    server = Store(b'{"step": 3}')
    server.sock.bind(("127.0.0.1", 0))
    server.sock.listen()
    threading.Thread(target=server.serve, daemon=True).start()
    yield server
    server.sock.close()


def test_many_reads_share_one_kept_connection(store: Store) -> None:
    reader = S3Reader()
    for _ in range(5):
        assert json.loads(reader.get("s3://b/progress.json", store.settings)) == {"step": 3}
    assert store.requests == 5
    assert store.connections == 1, "each read opened a connection of its own"


def test_a_kept_connection_the_store_closed_is_replaced_without_an_error(store: Store) -> None:
    store.close_after = 1
    reader = S3Reader()
    for _ in range(3):
        assert json.loads(reader.get("s3://b/progress.json", store.settings)) == {"step": 3}
        time.sleep(0.05)  # the store's close reaches the kept connection
    assert store.requests == 3
    assert store.connections == 3


def test_a_store_that_answers_too_slowly_is_not_asked_twice(store: Store) -> None:
    reader = S3Reader(read_timeout=0.3)
    reader.get("s3://b/progress.json", store.settings)  # a kept connection now
    store.delay = 1.0
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match="did not answer"):
        reader.get("s3://b/progress.json", store.settings)
    assert time.monotonic() - started < 0.9
    assert store.requests == 2


@pytest.mark.parametrize(("framing", "connections"), [("length", 1), ("chunked", 1), ("close", 3)])
def test_every_framing_of_a_body_is_read_whole(store: Store, framing: str, connections: int) -> None:
    """A body of Content-Length bytes or of chunks keeps the connection; one ended by closing it does not."""
    store.framing = framing
    store.body = json.dumps({"step": 7, "pad": "x" * 3000}).encode()
    reader = S3Reader()
    for _ in range(3):
        assert json.loads(reader.get("s3://b/progress.json", store.settings))["step"] == 7
        time.sleep(0.02)
    assert store.requests == 3
    assert store.connections == connections


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_a_body_over_the_limit_fails_and_the_next_read_is_whole(store: Store, framing: str) -> None:
    store.framing = framing
    store.body = b"y" * 100
    reader = S3Reader(max_bytes=20)
    with pytest.raises(storage.StorageError, match="larger than 20 bytes"):
        reader.get("s3://b/big.json", store.settings)
    store.body = b'{"step": 5}'
    assert json.loads(reader.get("s3://b/progress.json", store.settings)) == {"step": 5}
