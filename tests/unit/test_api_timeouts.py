"""Every API request of the operator ends, and a leader whose renewals hang stops leading in time."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from kubetune.controllers.leader import LeaderElection
from kubetune.controllers.operator import TimeoutApiClient
from kubetune.controllers.transport import ApiTransport

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


def transport(url: str, timeout: tuple[float, float]) -> ApiTransport:
    configuration = k8s.Configuration()
    configuration.host = url
    return ApiTransport(configuration, timeout)


def test_the_controllers_transport_times_out_once_on_a_hung_api_server(black_hole: str) -> None:
    api = transport(black_hole, (0.5, 0.5))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        api.request("GET", "/api/v1/namespaces/default")
    assert time.monotonic() - started < 2
    assert len(ACCEPTED) == 1  # a timed-out read is not sent again


Answer = tuple[int, dict[str, str]]


class Answering(http.server.BaseHTTPRequestHandler):
    """Answers with the server's ``statuses`` in turn (then 200 and an empty list); counts what it was sent."""

    protocol_version = "HTTP/1.1"  # keeps connections, as the API server does
    server: AnsweringServer

    def answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.seen.append((self.command, self.path, self.rfile.read(length), dict(self.headers)))
        code, headers = self.server.statuses.pop(0) if self.server.statuses else (200, {})
        headers = dict(headers)
        # "close": answer as if keeping the connection, then close it (an API server restarting, an idle timeout)
        self.close_connection = headers.pop("close", None) is not None
        body = json.dumps({"kind": "List", "items": []} if code == 200 else {"message": f"no ({code})"}).encode()
        chunked = headers.pop("chunked", None) is not None  # as the API server sends a large list
        self.send_response(code)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(key, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (body[:7], body[7:]):
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.answer()

    def do_POST(self) -> None:
        self.answer()

    def do_PATCH(self) -> None:
        self.answer()

    def log_message(self, *_: object) -> None:
        pass


class AnsweringServer(http.server.ThreadingHTTPServer):
    def __init__(self, statuses: list[Answer]) -> None:
        super().__init__(("127.0.0.1", 0), Answering)
        self.statuses = statuses
        self.seen: list[tuple[str, str, bytes, dict[str, str]]] = []
        self.connections = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections += 1
        super().process_request(request, client_address)


@pytest.fixture
def answering() -> Iterator[Callable[[list[Answer]], AnsweringServer]]:
    servers: list[AnsweringServer] = []

    def start(statuses: list[Answer]) -> AnsweringServer:
        server = AnsweringServer(list(statuses))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("method", "statuses", "succeeds", "requests"),
    [
        ("GET", [], True, 1),
        # the API server refused before acting and said when to come back (a CRD's watch cache filling)
        ("GET", [(429, {"Retry-After": "0"})] * 2, True, 3),
        ("POST", [(429, {"Retry-After": "0"})], True, 2),  # a 429 was not acted on: a write may go again
        ("GET", [(503, {"Retry-After": "0"})], True, 2),
        ("POST", [(503, {"Retry-After": "0"})], False, 1),  # a 503 may come after a write was done
        ("GET", [(429, {"Retry-After": "0"})] * 9, False, 5),  # not for ever
        ("GET", [(429, {})], False, 1),  # no Retry-After: the controllers' own back-off decides
        ("GET", [(500, {"Retry-After": "0"})], False, 1),
        ("GET", [(404, {})], False, 1),
    ],
)
def test_a_refused_request_is_sent_again_only_when_the_server_says_when(
    answering: Callable[[list[Answer]], AnsweringServer],
    method: str,
    statuses: list[Answer],
    succeeds: bool,
    requests: int,
) -> None:
    server = answering(statuses)
    api = transport(f"http://127.0.0.1:{server.server_address[1]}", (2, 2))
    body = {"metadata": {"name": "x"}} if method == "POST" else None
    if succeeds:
        assert api.request(method, "/api/v1/namespaces", body=body) == {"kind": "List", "items": []}
    else:
        with pytest.raises(ApiException) as raised:
            api.request(method, "/api/v1/namespaces", body=body)
        assert raised.value.status == statuses[-1][0]
        assert "no (" in raised.value.body
    assert len(server.seen) == requests
    assert server.connections == 1  # every try on the one kept connection


def test_requests_carry_the_token_the_body_and_the_query_on_kept_connections(
    answering: Callable[[list[Answer]], AnsweringServer],
) -> None:
    server = answering([])
    configuration = k8s.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_address[1]}/prefix"
    refreshed: list[str] = []

    def refresh(c: k8s.Configuration) -> None:  # the kubeconfig loader's and the in-cluster loader's hook
        refreshed.append("yes")
        c.api_key["authorization"] = "one"

    configuration.api_key_prefix["authorization"] = "Bearer"
    configuration.refresh_api_key_hook = refresh
    api = ApiTransport(configuration, (2, 2))
    api.request("PATCH", "/apis/x/v1/things/a/status", body={"status": {"phase": "Running"}},
                content_type="application/merge-patch+json")  # fmt: skip
    api.request("GET", "/apis/x/v1/things", query=[("labelSelector", "a=b,c")])
    (m1, p1, b1, h1), (m2, p2, b2, h2) = server.seen
    assert (m1, p1, json.loads(b1), h1["Authorization"]) == (
        "PATCH", "/prefix/apis/x/v1/things/a/status", {"status": {"phase": "Running"}}, "Bearer one")  # fmt: skip
    assert h1["Content-Type"] == "application/merge-patch+json"
    assert (m2, p2, b2, h2["Authorization"]) == ("GET", "/prefix/apis/x/v1/things?labelSelector=a%3Db%2Cc", b"",
                                                 "Bearer one")  # fmt: skip
    assert server.connections == 1
    assert refreshed == ["yes"]  # read once for both requests, not per request


@pytest.mark.parametrize(("rotated", "requests", "succeeds"), [(True, 2, True), (False, 1, False)])
def test_a_401_is_answered_with_the_token_read_again_once(
    answering: Callable[[list[Answer]], AnsweringServer], rotated: bool, requests: int, succeeds: bool
) -> None:
    server = answering([(401, {}), (401, {})])
    configuration = k8s.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
    tokens = iter(["old", "new" if rotated else "old"])
    configuration.refresh_api_key_hook = lambda c: c.api_key.update(authorization=next(tokens))
    api = ApiTransport(configuration, (2, 2))
    if succeeds:
        server.statuses.pop()  # the second try is accepted
        api.request("GET", "/api")
    else:
        with pytest.raises(ApiException, match=r"\(401\)"):
            api.request("GET", "/api")
    assert [h["Authorization"] for *_, h in server.seen] == ["old", "new"][:requests]


def test_a_kept_connection_the_server_closed_is_replaced(
    answering: Callable[[list[Answer]], AnsweringServer],
) -> None:
    server = answering([(200, {"close": "yes"})])
    api = transport(f"http://127.0.0.1:{server.server_address[1]}", (2, 2))
    api.request("GET", "/api")
    assert len(api._idle) == 1  # kept: the answer did not say it would close
    time.sleep(0.2)  # the server has closed its end
    assert api.request("GET", "/api") == {"kind": "List", "items": []}
    assert len(server.seen) == 2
    assert server.connections == 2


def test_the_leader_elections_client_also_waits_out_a_refusal_that_says_when(
    answering: Callable[[list[Answer]], AnsweringServer],
) -> None:
    server = answering([(429, {"Retry-After": "0"})] * 2)
    api = client(f"http://127.0.0.1:{server.server_address[1]}", (2, 2))
    k8s.CoreV1Api(api).list_namespace()
    assert len(server.seen) == 3


def test_a_chunked_answer_is_read_whole_and_its_connection_kept(
    answering: Callable[[list[Answer]], AnsweringServer],
) -> None:
    server = answering([(200, {"chunked": "1"}), (429, {"Retry-After": "0", "chunked": "1"})])
    api = transport(f"http://127.0.0.1:{server.server_address[1]}", (2, 2))
    for _ in range(2):
        assert api.request("GET", "/api/v1/namespaces") == {"kind": "List", "items": []}
    assert len(server.seen) == 3  # the 429 was waited out, its chunked body read to the end first
    assert server.connections == 1
