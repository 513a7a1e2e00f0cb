"""A minimal asyncio client for the Kubernetes API, for the fake kubelet.

The official ``kubernetes`` package is synchronous; the kubelet runs many pods
at once on one event loop, so it speaks plain JSON over aiohttp instead. Only
what a kubelet needs: bearer-token auth from a kubeconfig, requests, watches.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import yaml

Obj = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status


class KubeApi:
    """Bearer-token client for one API server. Use as an async context manager."""

    def __init__(self, server: str, token: str, ssl_context: ssl.SSLContext | bool) -> None:
        self.server = server.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_kubeconfig(cls, path: Path) -> KubeApi:
        """Read the current context's server, CA and token (the only auth the test cluster uses)."""
        config = yaml.safe_load(path.read_text())
        context_name = config["current-context"]
        context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
        token = user.get("token") or Path(user["tokenFile"]).read_text().strip()
        ssl_context: ssl.SSLContext | bool
        if cluster.get("insecure-skip-tls-verify"):
            ssl_context = False
        elif "certificate-authority-data" in cluster:
            ca = base64.b64decode(cluster["certificate-authority-data"]).decode()
            ssl_context = ssl.create_default_context(cadata=ca)
        elif "certificate-authority" in cluster:
            ssl_context = ssl.create_default_context(cafile=cluster["certificate-authority"])
        else:
            ssl_context = ssl.create_default_context()
        return cls(cluster["server"], token, ssl_context)

    async def __aenter__(self) -> KubeApi:
        self._session = aiohttp.ClientSession(
            headers=self._headers,
            connector=aiohttp.TCPConnector(ssl=self._ssl, limit=50),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("KubeApi used outside 'async with'")
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Obj | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> Obj:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else {}
        async with self.session.request(
            method,
            self.server + path,
            params=params,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            text = await response.text()
            if response.status >= 300:
                raise ApiError(response.status, method, path, text)
            result: Obj = json.loads(text) if text else {}
            return result

    async def get_or_none(self, path: str) -> Obj | None:
        try:
            return await self.request("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def watch(self, path: str, resource_version: str) -> AsyncIterator[Obj]:
        """Yield watch events from ``resource_version`` until the server ends the stream.

        Reads raw chunks rather than lines: aiohttp's line reader has a length
        limit that a large object (big annotations) can exceed.
        """
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": "300",
        }
        async with self.session.get(
            self.server + path,
            params=params,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=360),
        ) as response:
            if response.status >= 300:
                raise ApiError(response.status, "WATCH", path, await response.text())
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        event: Obj = json.loads(line)
                        yield event
