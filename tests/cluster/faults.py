"""Fault injection for end-to-end tests: proxies that refuse, delay or black-hole chosen requests.

:class:`FaultProxy` is a reverse proxy (plain HTTP towards its clients, HTTP or
verified HTTPS towards its upstream) that forwards everything unless a
:class:`Rule` matches the request's verb and path. It stands in front of:

- the API server, for the operator (``cluster_kubeconfig`` writes a
  kubeconfig that points at it): refuse 5% of status PATCHes, delay Job
  creates, black-hole Lease renewals;
- the S3 server, for trainers and the operator (a FineTune's
  ``storage.endpoint``): ``down(60)`` makes the store unreachable for a minute.

Responses stream chunk by chunk, so watches work through it. Rules can be
added and removed while requests flow; every fault injected is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import ssl
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp
import yaml
from aiohttp import web

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
Action = Literal["refuse", "delay", "blackhole", "reset"]


@dataclass
class Rule:
    """Which requests to spoil, and how.

    ``action``: ``refuse`` answers ``status`` at once; ``delay`` waits ``seconds`` then forwards;
    ``blackhole`` holds the request ``seconds`` (or until the client gives up) without an answer;
    ``reset`` closes the connection. ``probability`` spoils that share of matching requests
    (drawn from ``seed``); ``times`` stops after that many.
    """

    action: Action
    verb: str | None = None  # GET, PATCH, ...; None: any
    path: str = ".*"  # a regular expression searched in the path (with the query)
    status: int = 503
    seconds: float = 0.0
    probability: float = 1.0
    times: int | None = None
    seed: int = 0
    hits: int = 0
    _random: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._pattern = re.compile(self.path)

    def matches(self, verb: str, path: str) -> bool:
        if self.verb is not None and verb != self.verb:
            return False
        if not self._pattern.search(path):
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        return self._random.random() < self.probability


class FaultProxy:
    """A reverse proxy on ``host`` (an ephemeral port) in front of ``upstream``, spoiling what its rules say."""

    def __init__(self, upstream: str, *, ca: Path | None = None, host: str = "127.0.0.1") -> None:
        self.upstream = upstream.rstrip("/")
        self.ca = ca
        self.host = host
        self.rules: list[Rule] = []
        self.injected: Counter[str] = Counter()
        self.forwarded = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- rules

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        with self._lock:
            if rule in self.rules:
                self.rules.remove(rule)

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    @contextlib.contextmanager
    def fault(self, rule: Rule) -> Iterator[Rule]:
        """``with proxy.fault(Rule(...)):`` — the rule holds for the block."""
        self.add(rule)
        try:
            yield rule
        finally:
            self.remove(rule)

    def down(self, seconds: float, *, action: Action = "reset") -> threading.Timer:
        """Make the upstream unreachable through the proxy for ``seconds`` (from now, in the background)."""
        rule = self.add(Rule(action=action, seconds=seconds))
        timer = threading.Timer(seconds, self.remove, args=(rule,))
        timer.daemon = True
        timer.start()
        return timer

    def _match(self, verb: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(verb, path):
                    rule.hits += 1
                    self.injected[rule.action] += 1
                    return rule
        return None

    # -- lifecycle

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    async def _start(self) -> None:
        ssl_context: ssl.SSLContext | bool = False
        if self.upstream.startswith("https://"):
            ssl_context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        connector = aiohttp.TCPConnector(ssl=ssl_context, limit=0)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rule = self._match(request.method, request.path_qs)
        if rule is not None:
            if rule.action == "refuse":
                body = f'{{"kind":"Status","apiVersion":"v1","status":"Failure","code":{rule.status}}}'
                return web.Response(status=rule.status, text=body, content_type="application/json")
            if rule.action == "reset":
                if request.transport is not None:
                    request.transport.close()
                raise ConnectionResetError("fault: connection reset")
            if rule.action == "blackhole":
                await asyncio.sleep(rule.seconds or 3600)
                if request.transport is not None:
                    request.transport.close()
                raise ConnectionResetError("fault: black hole")
            await asyncio.sleep(rule.seconds)
        return await self._forward(request)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body if body else None,
            allow_redirects=False,
            auto_decompress=False,
            # As sent: aiohttp would add "application/octet-stream" to a body without one, which the API
            # server refuses (415) where it reads a body with no Content-Type as JSON.
            skip_auto_headers=("Content-Type",),
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers[key] = value
            if upstream.headers.get("Content-Length") is not None and "chunked" not in upstream.headers.get(
                "Transfer-Encoding", ""
            ):
                response.content_length = int(upstream.headers["Content-Length"])
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            self.forwarded += 1
            return response


def cluster_kubeconfig(path: Path, server: str, token: str) -> Path:
    """A kubeconfig for a client that reaches the API server through ``server`` (a FaultProxy's url)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "faulty", "cluster": {"server": server}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "faulty", "context": {"cluster": "faulty", "user": "admin"}}],
        "current-context": "faulty",
    }
    path.write_text(yaml.safe_dump(config))
    return path
