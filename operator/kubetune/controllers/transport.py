"""The operator's requests to the API server: plain JSON over kept HTTP/1.1 connections.

Every request of :class:`~kubetune.controllers.kube.Kube` used to go through the
Kubernetes client's ``ApiClient``: a recursive walk of the body to "sanitize"
it, urllib3's pool manager and retry objects, a scan of the environment for
proxies on every call. A CPU profile of the operator during a burst of a
thousand FineTunes (yappi, CPU clock) put 39% of the operator's time under
``Kube.request``, most of it in those layers rather than on the socket or in
JSON. The bodies are plain JSON already, so this module sends them on HTTP/1.1
connections kept for the next request (:mod:`kubetune.controllers.http1`, which
also spares the standard library's ``email``-based header parsing).

What it keeps of the client: the configuration it loads (in-cluster service
account or kubeconfig: host, CA, client certificate, token), the token's
refresh hook (a projected service-account token rotates; a kubeconfig exec
plugin's token expires), and the error type (``ApiException``) callers catch.

Retries, all bounded: a connection that cannot be made (twice more); a kept
connection the server closed meanwhile (once, on a new one); a 429 that says
when to come back (``Retry-After``: the API server refused the request before
acting on it, e.g. a CRD's watch cache still filling after it was created, or
priority-and-fairness shedding load), and a 503 with ``Retry-After`` for reads,
up to four times; a 401 once, with the token read again. A read that times out is never retried here: a hung call
would otherwise last several timeouts; the controllers' own back-off decides.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from kubetune.controllers.http1 import Answer, Http1Connection

CONNECT_ATTEMPTS = 3
REFUSED_ATTEMPTS = 5  # one request and up to four more after a Retry-After
MAX_RETRY_AFTER_S = 10.0
AUTH_REFRESH_S = 10.0
READS = frozenset({"GET", "HEAD"})


def _retry_after(method: str, status: int, headers: dict[str, str]) -> float | None:
    """Seconds to wait before sending the request again, or None when it must not be sent again."""
    value = headers.get("retry-after")
    if value is None or not (status == 429 or (status == 503 and method in READS)):
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return None


class ApiTransport:
    """HTTP(S) to one API server, on connections kept between requests (up to ``keep`` idle)."""

    def __init__(
        self, configuration: k8s.Configuration, timeout: tuple[float, float] = (5.0, 30.0), keep: int = 16
    ) -> None:
        self.configuration = configuration
        self.connect_timeout, self.read_timeout = timeout
        self.keep = keep
        url = urlsplit(configuration.host)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"the API server's address {configuration.host!r} is not an http(s) URL")
        self.scheme, self.hostname = url.scheme, url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.base_path = url.path.rstrip("/")
        self.netloc = url.netloc
        self.server_name = configuration.tls_server_name or self.hostname
        self.tls = self._tls_context() if url.scheme == "https" else None
        self._idle: list[Http1Connection] = []
        self._lock = threading.Lock()
        self._auth: str | None = None
        self._auth_read = -AUTH_REFRESH_S

    def _tls_context(self) -> ssl.SSLContext:
        c = self.configuration
        if not c.verify_ssl:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context = ssl.create_default_context(cafile=c.ssl_ca_cert, cadata=c.ca_cert_data)
        if c.cert_file:
            context.load_cert_chain(c.cert_file, c.key_file)
        return context

    # ------------------------------------------------------------------ connections

    def _connect(self) -> Http1Connection:
        """A new connection, made now (``CONNECT_ATTEMPTS`` tries for a server that refuses or is unreachable)."""
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                return Http1Connection.open(
                    self.hostname,
                    self.port,
                    connect_timeout=self.connect_timeout,
                    read_timeout=self.read_timeout,
                    tls=self.tls,
                    server_hostname=self.server_name,
                )
            except ssl.SSLError:
                raise
            except OSError as e:  # refused, unreachable, timed out, no such host
                if attempt == CONNECT_ATTEMPTS - 1:
                    raise ConnectionError(f"cannot connect to the API server at {self.netloc}: {e}") from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _take(self) -> tuple[Http1Connection, bool]:
        """(a connection, whether it was kept from an earlier request)."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(), False
            if not conn.dropped():
                return conn, True
            conn.close()

    def _give_back(self, conn: Http1Connection) -> None:
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # ------------------------------------------------------------------ requests

    def authorization(self, fresh: bool = False) -> str | None:
        """The Authorization header's value, from the client's refresh hook at most every ``AUTH_REFRESH_S``.

        The hook re-reads a projected service-account token or a kubeconfig's credentials (the
        kubeconfig loader's hook scans the environment each time: a quarter of the operator's CPU
        per request when called for every one). A token that expired meanwhile is answered with a
        401, and the request is sent once more with a ``fresh`` one.
        """
        now = time.monotonic()
        if fresh or now - self._auth_read >= AUTH_REFRESH_S:
            self._auth = self.configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
            self._auth_read = now
        return self._auth

    def headers(self, content_type: str) -> dict[str, str]:
        headers = {"Accept": "application/json", "Content-Type": content_type, "User-Agent": "kubetune-operator"}
        token = self.authorization()
        if token:
            headers["Authorization"] = token
        return headers

    def _exchange(self, method: str, target: str, body: bytes | None, headers: dict[str, str]) -> Answer:
        """One request and its answer; a kept connection found broken is replaced once."""
        for attempt in range(2):
            conn, kept = self._take()
            try:
                answer = conn.request(method, target, self.netloc, headers, body)
            except TimeoutError:
                conn.close()
                raise
            except (OSError, ValueError):  # ConnectionError and ssl.SSLError are OSErrors
                conn.close()
                if kept and attempt == 0:
                    continue  # the server closed or broke the kept connection: once more, on a new one
                raise
            if answer.keep:
                self._give_back(conn)
            else:
                conn.close()
            return answer
        raise AssertionError("unreachable")  # pragma: no cover

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """``method path`` with ``body`` as JSON; the decoded JSON answer. Raises ApiException for an error status."""
        target = self.base_path + path + (f"?{urlencode(query)}" if query else "")
        payload = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        reauthenticated = False
        for attempt in range(REFUSED_ATTEMPTS):
            sent = self.headers(content_type)
            answer = self._exchange(method, target, payload, sent)
            if answer.status == 401 and not reauthenticated:
                reauthenticated = True
                if self.authorization(fresh=True) != sent.get("Authorization"):
                    continue  # the token was rotated or expired since it was read: once more with the new one
            wait = _retry_after(method, answer.status, answer.headers) if attempt < REFUSED_ATTEMPTS - 1 else None
            if wait is None:
                break
            time.sleep(wait)
        if not 200 <= answer.status <= 299:
            error = ApiException(status=answer.status, reason=answer.reason, body=answer.body.decode(errors="replace"))
            error.headers = answer.headers
            raise error
        return json.loads(answer.body) if answer.body else None

    def stream(
        self,
        path: str,
        query: list[tuple[str, str]],
        read_timeout: float,
        opened: Callable[[socket.socket], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """GET ``path`` as a watch: each line of the answer decoded, as it comes, on a connection of its own.

        The connection is closed when the answer ends or the caller stops reading; a line not read
        within ``read_timeout`` raises TimeoutError. An error status raises ApiException. ``opened``
        is given the socket before the request goes (another thread may shut it down to end the watch).
        """
        target = self.base_path + path + f"?{urlencode(query)}"
        fresh = self._connect()  # a socket of its own; http.client reads the chunked stream line by line
        conn = http.client.HTTPConnection(self.hostname, self.port, timeout=read_timeout)
        conn.sock = fresh.sock
        try:
            if opened is not None:
                opened(fresh.sock)
            fresh.sock.settimeout(read_timeout)
            sent = self.headers("application/json")
            conn.request("GET", target, headers=sent)
            response = conn.getresponse()
            if response.status == 401:
                self.authorization(fresh=True)  # the next watch goes with a token read again
            if response.status != 200:
                error = ApiException(status=response.status, reason=response.reason, body=response.read().decode())
                error.headers = response.headers
                raise error
            while line := response.readline():
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()
            fresh.close()
