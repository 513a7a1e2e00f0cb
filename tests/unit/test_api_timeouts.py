"""Every API request of the operator ends, and a leader whose renewals hang stops leading in time."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from kubernetes import client as k8s

from kubetune.controllers.leader import LeaderElection
from kubetune.controllers.operator import TimeoutApiClient

ACCEPTED: list[socket.socket] = []


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An HTTP server that accepts connections and never answers (an API server that hangs)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = ACCEPTED
    held.clear()
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def client(url: str, timeout: tuple[float, float]) -> k8s.ApiClient:
    configuration = k8s.Configuration()
    configuration.host = url
    return TimeoutApiClient(configuration, timeout)


def test_a_request_to_a_hung_api_server_times_out_once(black_hole: str) -> None:
    api = client(black_hole, (0.5, 0.5))
    with pytest.raises(Exception, match=r"(?i)read timed out"):
        k8s.CoreV1Api(api).read_namespace("default")  # the first call also builds the client's validators
    started = time.monotonic()
    with pytest.raises(Exception, match=r"(?i)read timed out"):
        k8s.CoreV1Api(api).read_namespace("default")
    assert time.monotonic() - started < 3
    assert len(ACCEPTED) == 2  # one request each: a timed-out read is not sent again


def test_a_leader_whose_renewal_hangs_gives_up_within_the_renew_deadline(black_hole: str) -> None:
    election = LeaderElection(
        api=client(black_hole, (30, 30)),  # the lease calls' own timeout (retry_period) must win
        namespace="kubetune-system",
        name="kubetune-operator",
        identity="a",
        lease_duration=3.0,
        renew_deadline=2.0,
        retry_period=0.5,
    )
    lost = threading.Event()
    started = time.monotonic()
    election.keep(on_lost=lost.set)
    assert lost.wait(6), "the leader kept leading with a hung API server"
    assert time.monotonic() - started < 3.5
    assert not election.leading
    election.release()


def _answering(statuses: list[tuple[int, dict[str, str]]]) -> tuple[http.server.HTTPServer, list[str]]:
    """An HTTP server that answers its requests with ``statuses`` in turn (then 200 with an empty list)."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append(self.command)
            code, headers = statuses.pop(0) if statuses else (200, {})
            body = json.dumps({"kind": "NamespaceList", "items": []} if code == 200 else {"code": code}).encode()
            self.send_response(code)
            for key, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.mark.parametrize(
    ("method", "statuses", "succeeds", "requests"),
    [
        # the API server refused before acting and said when to come back (a CRD's watch cache filling)
        ("GET", [(429, {"Retry-After": "0"})] * 2, True, 3),
        ("GET", [(503, {"Retry-After": "0"})], True, 2),
        ("GET", [(429, {"Retry-After": "0"})] * 9, False, 5),  # not for ever
        ("GET", [(429, {})], False, 1),  # no Retry-After: the controllers' own back-off decides
        ("GET", [(500, {"Retry-After": "0"})], False, 1),
        ("POST", [(429, {"Retry-After": "0"})], False, 1),  # a write is never sent twice by the client
    ],
)
def test_a_refused_request_is_tried_again_only_when_the_server_says_when(
    method: str, statuses: list[tuple[int, dict[str, str]]], succeeds: bool, requests: int
) -> None:
    server, seen = _answering(list(statuses))
    try:
        api = client(f"http://127.0.0.1:{server.server_address[1]}", (2, 2))
        core = k8s.CoreV1Api(api)
        call = core.list_namespace if method == "GET" else lambda: core.create_namespace({"metadata": {"name": "x"}})
        if succeeds:
            call()
        else:
            with pytest.raises(Exception, match=r"\(5\d\d\)|\(429\)|too many"):
                call()
        assert len(seen) == requests
    finally:
        server.shutdown()
        server.server_close()
