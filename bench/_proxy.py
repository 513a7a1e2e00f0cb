"""A counting reverse proxy in front of the Kubernetes API server, for ``bench/operator_scale.py``.

The operator under test talks plain HTTP to this proxy on 127.0.0.1; the proxy
forwards every request to the real (https) API server, verifying its
certificate, and streams responses back chunk by chunk, so watches behave as
they do without it. For each request it appends one JSON line to a log file
once the upstream response headers are in::

    {"t": <time.monotonic() at arrival>, "dt": <seconds to response headers>,
     "m": "PATCH", "p": "/apis/.../finetunes/x", "c": "finetunes", "w": false, "s": 200,
     "b": "metadata.finalizers"}

(writes also carry ``b``, what they set, and ``n``, the object named in the body; see ``describe``).

``t`` is comparable with ``time.monotonic()`` in other processes on this
machine (CLOCK_MONOTONIC), which is how the benchmark windows the counts.

Run: ``python bench/_proxy.py --upstream https://127.0.0.1:6443 --ca ca.crt --log requests.jsonl``;
it prints ``listening <port>`` on stdout once it accepts connections, and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import IO
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.cluster.faults import HOP_BY_HOP

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_DESCRIBED = 256 * 1024
# Fields of a created object's metadata that say nothing about what the write is for.
IGNORED_META = frozenset({"name", "namespace", "resourceVersion", "uid"})
AUTO_HEADERS = ("Content-Type", "Accept", "Accept-Encoding", "User-Agent")
CATEGORIES = ("finetunes", "finetunes/status", "jobs", "configmaps", "secrets", "events", "pods")


def classify(path: str) -> str:
    """The benchmark's resource class of an API path (``other`` for discovery, CRDs, ...)."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 2:
        rest = parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        rest = parts[3:]
    else:
        return "other"
    if len(rest) >= 2 and rest[0] == "namespaces":
        rest = rest[2:]
    if not rest:
        return "other"
    resource, sub = rest[0], rest[2] if len(rest) >= 3 else None
    if resource == "finetunes":
        return "finetunes/status" if sub == "status" else "finetunes"
    return resource if resource in CATEGORIES else "other"


def describe(method: str, body: bytes) -> dict[str, object]:
    """What a write is about: ``n`` the object it names, ``b`` what it sets (for the benchmark's breakdown).

    For an Event, ``n`` is the object it is about and ``b`` its reason; for anything else ``n`` is
    ``metadata.name`` (absent in most patches: the path names the object) and ``b`` the fields it
    sets, two levels deep (``metadata.finalizers``, ``status.phase``, ...).
    """
    if len(body) > MAX_DESCRIBED:
        return {}
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    if not isinstance(doc, dict):
        return {"b": "json-patch"} if isinstance(doc, list) else {}
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    if doc.get("kind") == "Event":
        involved = doc.get("involvedObject") or {}
        return {"n": involved.get("name"), "b": f"reason={doc.get('reason')}"}
    keys = []
    for top in ("metadata", "spec", "status"):
        value = doc.get(top)
        if isinstance(value, dict):
            keys.extend(f"{top}.{k}" for k in sorted(value) if not (top == "metadata" and k in IGNORED_META))
        elif top in doc:
            keys.append(top)
    verb = {"POST": "create", "PUT": "replace"}.get(method)
    whole = verb is not None and doc.get("kind") is not None
    out: dict[str, object] = {"b": f"{verb} {doc['kind']}" if whole else ",".join(keys)}
    if meta.get("name"):
        out["n"] = meta["name"]
    return out


def is_watch(request: web.BaseRequest) -> bool:
    values = parse_qs(request.query_string).get("watch", [])
    return any(v.lower() in ("1", "true") for v in values)


class Proxy:
    def __init__(self, upstream: str, ca_file: str, log: IO[str]) -> None:
        self.upstream = upstream.rstrip("/")
        self.ssl = ssl.create_default_context(cafile=ca_file)
        self.log = log
        self.session: aiohttp.ClientSession | None = None

    def record(self, **fields: object) -> None:
        self.log.write(json.dumps(fields, separators=(",", ":")) + "\n")
        self.log.flush()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(ssl=self.ssl, limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        arrived = time.monotonic()
        assert self.session is not None
        path = request.path_qs
        fields: dict[str, object] = {
            "t": arrived,
            "m": request.method,
            "p": request.path,
            "c": classify(request.path),
            "w": is_watch(request),
        }
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read() if request.body_exists else None
        if body and request.method in WRITES:
            fields.update(describe(request.method, body))
        # aiohttp would add these when absent (Content-Type: application/octet-stream, which the API
        # server refuses with 415, where a missing one means JSON): forward the request as it came.
        skip = [h for h in AUTO_HEADERS if h not in request.headers]
        try:
            upstream = await self.session.request(
                request.method,
                self.upstream + path,
                headers=headers,
                data=body,
                skip_auto_headers=skip,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, OSError) as e:
            self.record(**fields, dt=time.monotonic() - arrived, s=502)
            return web.Response(status=502, text=f"proxy: upstream unreachable: {e}")
        async with upstream:
            self.record(**fields, dt=time.monotonic() - arrived, s=upstream.status)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            length = upstream.headers.get("Content-Length")
            if length is not None:
                response.content_length = int(length)
            elif request.method != "HEAD" and upstream.status not in (204, 304):
                response.enable_chunked_encoding()
            await response.prepare(request)
            # Each chunk goes out as it arrives: a watch's events must not wait in a buffer.
            with contextlib.suppress(ConnectionResetError, aiohttp.ClientPayloadError):
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
        return response


async def serve(args: argparse.Namespace) -> None:
    with open(args.log, "a", encoding="utf-8") as log:
        proxy = Proxy(args.upstream, args.ca, log)
        await proxy.start()
        server = web.Server(proxy.handle)
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port)
        await site.start()
        sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr]
        print(f"listening {sockets[0].getsockname()[1]}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()
        await proxy.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the API server, https://host:port")
    parser.add_argument("--ca", required=True, help="CA bundle that signed the API server's certificate")
    parser.add_argument("--log", required=True, help="JSON-lines file to append one line per request to")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    asyncio.run(serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
