"""The reference server's limits: a bounded queue (429), a per-request timeout (504), a body limit (413).

The engine here is a stand-in that sleeps instead of generating: what is under
test is the server around it (routes, queue, timeouts), which is the same
whatever the model. The model's own behaviour is tested in test_serve.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from kubetune_trainer.serve import Generation, Sampling, ServeOptions, Server


class SlowEngine:
    """Answers every request in a batch after ``seconds``; counts batches."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.batches: list[int] = []

    def generate_many(self, name: str, requests: Sequence[tuple[Any, Sampling]]) -> list[Generation]:
        self.batches.append(len(requests))
        time.sleep(self.seconds)
        return [Generation("ok", 3, 1, "stop") for _ in requests]


def options(**overrides: Any) -> ServeOptions:
    return ServeOptions(base_model=Path("/nowhere"), base_model_name="base", adapters={"bot": Path("/nowhere")},
                        **overrides)  # fmt: skip


async def serve(server: Server, engine: SlowEngine) -> TestClient[Any, Any]:
    server.engine = engine  # type: ignore[assignment]
    client = TestClient(TestServer(server.app))
    await client.start_server()
    return client


def request(client: TestClient[Any, Any], body: Any = None) -> Any:
    body = body or {"model": "bot", "prompt": "hi", "max_tokens": 1}
    return client.post("/v1/completions", json=body)


def test_a_full_queue_answers_429_and_the_rest_are_served() -> None:
    async def scenario() -> tuple[list[int], str | None, list[int]]:
        engine = SlowEngine(0.5)
        client = await serve(Server(options(max_queue=2, max_batch_size=1)), engine)
        try:
            # At most two wait (the one generating is no longer waiting); the rest are refused at once.
            responses = await asyncio.gather(*(request(client) for _ in range(6)))
            codes = sorted(r.status for r in responses)
            refused = next(r for r in responses if r.status == 429)
            return codes, refused.headers.get("Retry-After"), engine.batches
        finally:
            await client.close()

    codes, retry_after, batches = asyncio.run(scenario())
    assert 2 <= codes.count(200) <= 3
    assert codes.count(429) >= 3
    assert set(codes) <= {200, 429}
    assert retry_after == "1"
    assert sum(batches) == codes.count(200)


def test_a_request_that_waits_too_long_gets_504() -> None:
    async def scenario() -> tuple[int, dict[str, Any]]:
        client = await serve(Server(options(request_timeout=0.3)), SlowEngine(2.0))
        try:
            response = await request(client)
            return response.status, await response.json()
        finally:
            await client.close()

    status, body = asyncio.run(scenario())
    assert status == 504
    assert body["error"]["code"] == "timeout"
    assert "--request-timeout" in body["error"]["message"]


def test_a_body_over_the_limit_gets_413_naming_it() -> None:
    async def scenario() -> tuple[int, dict[str, Any], int]:
        engine = SlowEngine(0.0)
        client = await serve(Server(options(max_body_bytes=1000)), engine)
        try:
            response = await request(client, {"model": "bot", "prompt": "x" * 5000, "max_tokens": 1})
            small = await request(client)
            return response.status, await response.json(), small.status
        finally:
            await client.close()

    status, body, small = asyncio.run(scenario())
    assert status == 413
    assert body["error"]["code"] == "body_too_large"
    assert "1000 bytes" in body["error"]["message"]
    assert small == 200
