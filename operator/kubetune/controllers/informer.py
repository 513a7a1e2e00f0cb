"""Watching FineTunes and their Jobs straight from the API server, without kopf's per-event pipeline.

kopf hands every watch event through its per-object machinery (a worker task and
queue per object, a batching window, cause detection, a body wrapper, a logger
and a patch object per event) before the handler sees it. For the FineTune
controller, whose handlers only remember a slim copy and schedule work, that
machinery was ~40% of the operator's CPU in a burst of a thousand FineTunes
(bench/operator_scale.py --profile). An :class:`Informer` is the plain form of
the same thing: list, then watch from the list's resourceVersion, and hand each
event to a function on a thread of its own. kopf still runs the operator (start-
up, clean-up, the AdapterDeployment controller's handlers, log-in).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from kubetune.controllers.transport import ApiTransport

log = logging.getLogger(__name__)

WATCH_TIMEOUT_S = 300  # the API server ends a watch after this; it is started again from where it was
READ_MARGIN_S = 30  # with bookmarks a minute apart at most, a watch silent this much longer is dead
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0

Handler = Callable[[str, dict[str, Any]], None]


class GoneError(Exception):
    """The API server cannot resume the watch from the resourceVersion given (410): list again."""


def namespaced(path: str, namespace: str | None) -> str:
    """``/apis/batch/v1/jobs`` in one namespace: ``/apis/batch/v1/namespaces/NS/jobs``."""
    if namespace is None:
        return path
    group, _, resource = path.rpartition("/")
    return f"{group}/namespaces/{namespace}/{resource}"


def identity(obj: dict[str, Any]) -> dict[str, Any]:
    """What an object's DELETED event needs when it has to be made up after a new list."""
    meta = obj.get("metadata") or {}
    kept = ("namespace", "name", "uid", "ownerReferences", "labels")
    return {"metadata": {k: meta[k] for k in kept if k in meta}}


class Informer:
    """List, then watch, one resource in one namespace or the whole cluster; each event to ``handle``, in order.

    A watch that ends (the server's timeout, a dropped connection, an API server restart) starts
    again from the last resourceVersion seen; bookmarks keep that fresh while nothing changes. When
    the server can no longer resume from it (410 Gone: its history was compacted meanwhile), a new
    list replaces it: every listed object is handed on as MODIFIED, and every object seen before
    but no longer listed as DELETED. Failures are retried with back-off, 0.5 s doubling to 30 s.
    """

    def __init__(
        self,
        api: ApiTransport,
        path: str,
        handle: Handler,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> None:
        self.api = api
        self.collection = namespaced(path, namespace)
        self.handle = handle
        self.label_selector = label_selector
        self.resource_version = ""
        self.known: dict[str, dict[str, Any]] = {}  # uid -> identity(obj), for DELETED events made up on a new list
        self._stopped = threading.Event()
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def _query(self) -> list[tuple[str, str]]:
        return [("labelSelector", self.label_selector)] if self.label_selector else []

    def list(self) -> list[dict[str, Any]]:
        """Every object there now; the watch will start from this list's resourceVersion."""
        listed = self.api.request("GET", self.collection, query=self._query() or None)
        self.resource_version = str(listed["metadata"]["resourceVersion"])
        items: list[dict[str, Any]] = listed.get("items") or []
        self.known = {str(o["metadata"]["uid"]): identity(o) for o in items}
        return items

    def start(self) -> None:
        """Watch on a thread of its own, from the last list (call :meth:`list` first)."""
        self._thread = threading.Thread(target=self.run, name=f"watch {self.collection}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked reading the watch

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def run(self) -> None:
        backoff = FIRST_BACKOFF_S
        while not self.stopped:
            try:
                if self.watch():
                    backoff = FIRST_BACKOFF_S
                    continue
            except GoneError:
                log.info("watch of %s: resourceVersion %s is gone; listing again", self.collection,
                         self.resource_version)  # fmt: skip
                try:
                    self.relist()
                    backoff = FIRST_BACKOFF_S
                    continue
                except Exception as e:
                    log.warning("listing %s failed (%s); again in %.1f s", self.collection, e, backoff)
            except Exception as e:
                if self.stopped:
                    return
                log.warning("watch of %s failed (%s); again in %.1f s", self.collection, e, backoff)
            self._stopped.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def watch(self) -> bool:
        """One watch, until the server ends it; whether it delivered anything (or a bookmark)."""
        query = [
            *self._query(),
            ("watch", "1"),
            ("resourceVersion", self.resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(WATCH_TIMEOUT_S)),
        ]
        progressed = False
        try:
            events = self.api.stream(self.collection, query, WATCH_TIMEOUT_S + READ_MARGIN_S, opened=self._opened)
            for event in events:
                if self.stopped:
                    return progressed
                self.deliver(event)
                progressed = True
        except ApiException as e:
            if e.status == 410:
                raise GoneError() from e
            raise
        finally:
            self._socket = None
        return progressed

    def _opened(self, sock: socket.socket) -> None:
        self._socket = sock
        if self.stopped:
            self.stop()

    def deliver(self, event: dict[str, Any]) -> None:
        """One watch event: bookmarks and errors are the informer's; the rest go to ``handle``."""
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise GoneError()
            raise ApiException(status=obj.get("code"), reason=obj.get("reason"), body=str(obj.get("message")))
        meta = obj.get("metadata") or {}
        if meta.get("resourceVersion"):
            self.resource_version = str(meta["resourceVersion"])
        if kind == "BOOKMARK" or kind not in ("ADDED", "MODIFIED", "DELETED"):
            return
        uid = str(meta.get("uid"))
        if kind == "DELETED":
            self.known.pop(uid, None)
        else:
            self.known[uid] = identity(obj)
        self.hand_on(str(kind), obj)

    def relist(self) -> None:
        """A new list in place of a watch that cannot resume: what changed or went meanwhile is handed on."""
        before = self.known
        items = self.list()
        for obj in items:
            self.hand_on("MODIFIED", obj)
        for uid, gone in before.items():
            if uid not in self.known:
                self.hand_on("DELETED", gone)

    def hand_on(self, kind: str, obj: dict[str, Any]) -> None:
        try:
            self.handle(kind, obj)
        except Exception:
            # The controllers retry their own work; an event they could not take must not stop the watch.
            meta = obj.get("metadata") or {}
            log.exception("handling %s of %s/%s failed", kind, meta.get("namespace"), meta.get("name"))
