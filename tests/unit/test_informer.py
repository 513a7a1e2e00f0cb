"""The informer against a scripted HTTP server: list, watch, resume, list again on 410, stop.

The e2e suite runs it against the real API server (every FineTune test); what a
real server does only rarely (a compacted history, a watch cut mid-stream) is
scripted here.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kopf
import pytest
from kubernetes import client as k8s

from kubetune.builders.meta import ADEP_LABEL
from kubetune.controllers.informer import Informer
from kubetune.controllers.operator import apply_kopf_settings
from kubetune.controllers.transport import ApiTransport

Script = list[tuple[str, Any]]  # ("list", items, rv) | ("watch", [events]) | ("status", code) | ("hang", seconds)


def obj(uid: str, rv: int, **meta: Any) -> dict[str, Any]:
    return {"metadata": {"uid": uid, "name": uid, "namespace": "ns", "resourceVersion": str(rv), **meta}}


def event(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": body}


class Scripted(http.server.BaseHTTPRequestHandler):
    server: ScriptedServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
        self.server.seen.append(query)
        step = self.server.script.pop(0) if self.server.script else ("hang", 30)
        kind = step[0]
        if kind == "hang":
            self.send_response(200)
            self.end_headers()
            self.wfile.flush()
            time.sleep(step[1])
            return
        if kind == "status":
            self.send_error(step[1], "scripted")
            return
        if kind == "list":
            payload = json.dumps({"metadata": {"resourceVersion": str(step[2])}, "items": step[1]}).encode()
        else:
            payload = b"".join(json.dumps(e).encode() + b"\n" for e in step[1])
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class ScriptedServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: Script) -> None:
        super().__init__(("127.0.0.1", 0), Scripted)
        self.script = script
        self.seen: list[dict[str, str]] = []


@pytest.fixture
def scripted() -> Iterator[Callable[[Script], tuple[ScriptedServer, ApiTransport]]]:
    servers: list[ScriptedServer] = []

    def start(script: Script) -> tuple[ScriptedServer, ApiTransport]:
        server = ScriptedServer(list(script))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        configuration = k8s.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
        return server, ApiTransport(configuration, (2, 5))

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def run_until(informer: Informer, received: list[tuple[str, str]], count: int) -> None:
    informer.start()
    deadline = time.monotonic() + 10
    while len(received) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    informer.stop()


def recorder() -> tuple[list[tuple[str, str]], Callable[[str, dict[str, Any]], None]]:
    received: list[tuple[str, str]] = []
    return received, lambda kind, body: received.append((kind, body["metadata"]["uid"]))


def test_events_come_in_order_and_a_watch_that_ends_resumes_where_it_was(scripted: Any) -> None:
    server, api = scripted(
        [
            ("list", [obj("a", 5)], 10),
            ("watch", [event("ADDED", obj("b", 11)), event("BOOKMARK", {"metadata": {"resourceVersion": "15"}})]),
            ("watch", [event("MODIFIED", obj("a", 16)), event("DELETED", obj("b", 17))]),
        ]
    )
    received, handle = recorder()
    informer = Informer(api, "/apis/batch/v1/jobs", handle, namespace="ns", label_selector="kubetune.io/finetune")
    assert [o["metadata"]["uid"] for o in informer.list()] == ["a"]
    run_until(informer, received, 3)
    assert received == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]  # not the bookmark
    lists, first, second = server.seen[:3]
    assert lists == {"labelSelector": "kubetune.io/finetune"}
    assert (first["watch"], first["resourceVersion"], first["allowWatchBookmarks"]) == ("1", "10", "true")
    assert first["labelSelector"] == "kubetune.io/finetune"
    assert second["resourceVersion"] == "15"  # from the bookmark
    assert informer.known.keys() == {"a"}


@pytest.mark.parametrize(
    "gone",
    [
        ("watch", [event("ERROR", {"kind": "Status", "code": 410, "reason": "Expired"})]),  # in the stream
        ("status", 410),  # the watch request itself refused
    ],
)
def test_a_watch_that_cannot_resume_lists_again_and_hands_on_what_changed_meanwhile(
    scripted: Any, gone: tuple[str, Any]
) -> None:
    server, api = scripted(
        [
            ("list", [obj("a", 5), obj("b", 6)], 10),
            gone,
            ("list", [obj("a", 30), obj("c", 31)], 40),  # b was deleted while nobody watched
            ("watch", [event("ADDED", obj("d", 41))]),
        ]
    )
    received, handle = recorder()
    informer = Informer(api, "/apis/kubetune.io/v1alpha1/finetunes", handle)
    informer.list()
    run_until(informer, received, 4)
    assert received == [("MODIFIED", "a"), ("MODIFIED", "c"), ("DELETED", "b"), ("ADDED", "d")]
    assert server.seen[3]["resourceVersion"] == "40"  # the watch after the new list starts from it


def test_a_failing_handler_does_not_stop_the_watch(scripted: Any) -> None:
    _, api = scripted([("list", [], 1), ("watch", [event("ADDED", obj("bad", 2)), event("ADDED", obj("good", 3))])])
    received: list[tuple[str, str]] = []

    def handle(kind: str, body: dict[str, Any]) -> None:
        if body["metadata"]["uid"] == "bad":
            raise RuntimeError("boom")
        received.append((kind, body["metadata"]["uid"]))

    informer = Informer(api, "/apis/batch/v1/jobs", handle)
    informer.list()
    run_until(informer, received, 1)
    assert received == [("ADDED", "good")]


def test_a_failed_watch_is_tried_again_with_back_off(scripted: Any) -> None:
    server, api = scripted([("list", [], 1), ("status", 500), ("watch", [event("ADDED", obj("a", 2))])])
    received, handle = recorder()
    informer = Informer(api, "/apis/batch/v1/jobs", handle)
    informer.list()
    run_until(informer, received, 1)
    assert received == [("ADDED", "a")]
    assert [q.get("resourceVersion") for q in server.seen[1:3]] == ["1", "1"]


def test_stop_ends_a_watch_that_is_waiting_for_events(scripted: Any) -> None:
    _, api = scripted([("list", [], 1), ("hang", 30)])
    informer = Informer(api, "/apis/batch/v1/jobs", lambda kind, body: None)
    informer.list()
    informer.start()
    time.sleep(0.3)  # the watch is open and silent
    started = time.monotonic()
    informer.stop()
    assert informer._thread is not None
    informer._thread.join(5)
    assert not informer._thread.is_alive()
    assert time.monotonic() - started < 2


def test_kopf_watches_only_the_adapterdeployment_controllers_jobs_and_deployments() -> None:
    """Training Jobs go to the FineTune controller's informer only; kopf asks the API server for the rest."""
    settings = kopf.OperatorSettings()
    apply_kopf_settings(settings, workers=4)
    selectors = settings.watching.label_selectors
    jobs = kopf.Resource("batch", "v1", "jobs", kind="Job", namespaced=True)
    deployments = kopf.Resource("apps", "v1", "deployments", kind="Deployment", namespaced=True)
    adeps = kopf.Resource("kubetune.io", "v1alpha1", "adapterdeployments", kind="AdapterDeployment", namespaced=True)
    assert list(selectors.collect(jobs)) == [ADEP_LABEL]
    assert list(selectors.collect(deployments)) == [ADEP_LABEL]
    assert list(selectors.collect(adeps)) == []
