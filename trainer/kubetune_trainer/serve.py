"""The ``kubetune`` serving runtime: a small OpenAI-compatible server over one base model and its PEFT adapters.

An AdapterDeployment with ``runtime.type: kubetune`` runs this server from the
trainer image. It exists so that an adapter can be served where vLLM cannot
run — CPUs, laptops, the operator's end-to-end tests — with the same API
(``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``) and the same
model selection (the request's ``model`` names an adapter, or the base), so
clients and the operator cannot tell the two runtimes apart.

It is a reference server, not a production one: one base model sits in
memory and every request selects its adapter on it. Requests that arrive
while the model is busy queue; when it is free, the queued requests for the
same model with the same sampling settings are generated together as one
left-padded batch (up to ``--max-batch-size``), each stopping at its own end,
with the same answers as one at a time. No streaming. Production serving is
vLLM with ``--enable-lora``.

It also holds what serving pods need before the server starts: ``fetch``
downloads a model or adapter folder (the pod's init container) and refuses
one whose digest is not the expected one, so that what is served is exactly
what was evaluated. The server checks the adapters' digests again before it
becomes ready.

Heavy imports (torch, transformers, peft) happen when the weights load, so the
``fetch`` init container and a refused digest stay fast.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kubetune_trainer import storage

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# How long SIGTERM waits for requests in flight: below Kubernetes' default 30 s
# grace period, so the pod exits on its own before the kubelet kills it.
SHUTDOWN_TIMEOUT_SECONDS = 25.0
# OpenAI's default for /v1/completions; chat defaults to the server's limit.
DEFAULT_COMPLETION_TOKENS = 16
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class DigestMismatchError(Exception):
    """A folder's files do not hash to the digest it was deployed with: serving it would serve something else."""


@dataclass(frozen=True)
class ServeOptions:
    base_model: Path
    base_model_name: str
    adapters: dict[str, Path]  # served name -> PEFT adapter folder, in command-line order
    adapter_digests: dict[str, str] = field(default_factory=dict)
    host: str = "0.0.0.0"
    port: int = 8000
    max_tokens_limit: int = 512
    max_batch_size: int = 16
    max_queue: int = 64  # requests waiting for the model; more are refused with 429
    request_timeout: float = 120.0  # seconds a request may wait and generate before it gets 504
    max_body_bytes: int = 1 << 20  # a larger request body is refused with 413

    @property
    def model_names(self) -> list[str]:
        return [self.base_model_name, *self.adapters]


# ----------------------------------------------------------------------------- digests and fetching


def verify_digest(what: str, folder: Path, expected: str) -> str:
    """The folder's digest; raises DigestMismatchError naming both digests when it is not ``expected``."""
    actual, _ = storage.digest_of_dir(folder)
    if actual != expected:
        raise DigestMismatchError(
            f"{what}: expected digest {expected} but the files in {folder} hash to {actual}; refusing to serve it"
        )
    return actual


def fetch(uri: str, dest: Path, digest: str | None, settings: storage.S3Settings) -> str:
    """Download the folder at ``uri`` into ``dest``; return its digest.

    The files land in a hidden folder inside ``dest`` first (the same
    filesystem, so moving them is a rename even when ``dest`` is a mounted
    volume; hidden, so digests ignore it) and move into place only once their
    digest matches. A mismatch or a failed download therefore leaves whatever
    ``dest`` held before as it was.
    """
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".kubetune-fetch-", dir=dest))
    try:
        storage.fetch_dir(uri, staging, settings)
        actual, files = storage.digest_of_dir(staging)
        if digest is not None and actual != digest:
            raise DigestMismatchError(f"{uri}: expected digest {digest} but its files hash to {actual}")
        for rel in files:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, target)
        return actual
    except BaseException:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------- requests


class ApiError(Exception):
    """A request that fails with an HTTP status and an OpenAI-shaped error body."""

    def __init__(
        self, status: int, message: str, error_type: str, code: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.code = code
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.error_type, "code": self.code}}
        return web.json_response(body, status=self.status, headers=self.headers)


def bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


class _Request(BaseModel):
    """The fields both endpoints share. Other fields are ignored: OpenAI clients send many optional ones."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=4)
    n: int = 1
    stream: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value: bool) -> bool:
        if value:
            raise ValueError("streaming is not supported by the kubetune reference server")
        return value

    def requested_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_Request):
    prompt: str = Field(min_length=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _single_prompt(cls, value: object) -> object:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("send exactly one prompt per request")
            return value[0]
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: str = Field(min_length=1)
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: object) -> object:
        """OpenAI's content may be a list of parts; text parts are joined, anything else is refused."""
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError('content parts must be {"type": "text", "text": "..."}; only text is supported')
            texts.append(part["text"])
        return "".join(texts)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def requested_tokens(self) -> int | None:
        # OpenAI's newer name wins over the deprecated max_tokens.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _describe(error: ValidationError) -> str:
    parts = []
    for e in error.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None  # None: as many as the endpoint's default allows
    default_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


class Engine:
    """The base model with its adapters loaded, and generation on it.

    Which adapter is active is state of the one model in memory, so selecting
    it and generating with it happen together under one lock; so does
    tokenization, because a fast tokenizer must not be used from two threads
    at once.
    """

    def __init__(self, options: ServeOptions) -> None:
        from transformers import GenerationConfig

        from kubetune_trainer import data, modeling
        from kubetune_trainer.config import MethodConfig

        self.base_name = options.base_model_name
        self.adapters = list(options.adapters)
        self.runtime = modeling.for_evaluation(modeling.pick_runtime("auto"))  # the evaluation's precision
        self.tokenizer = modeling.load_tokenizer(options.base_model)
        # The trainer renders prompts with this fallback when the base has no template; so must serving.
        data.ensure_chat_template(self.tokenizer)
        model: Any = modeling.load_base_model(options.base_model, MethodConfig(), self.runtime)
        # Keep the folder's end-of-turn tokens (often several), drop its sampling defaults: an OpenAI
        # request states its own sampling (temperature and top_p default to 1), and only that applies.
        shipped = model.generation_config
        model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
            eos_token_id=self.tokenizer.eos_token_id if shipped.eos_token_id is None else shipped.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id if shipped.pad_token_id is None else shipped.pad_token_id,
        )
        if options.adapters:
            from peft import PeftModel

            (first, first_dir), *rest = options.adapters.items()
            model = PeftModel.from_pretrained(model, first_dir, adapter_name=first)
            for name, folder in rest:
                model.load_adapter(folder, adapter_name=name)
        self.model = model.eval()
        self.context_length: int | None = getattr(self.model.config, "max_position_embeddings", None)
        self._lock = threading.Lock()

    @contextmanager
    def _selected(self, name: str) -> Iterator[None]:
        if name != self.base_name:
            self.model.set_adapter(name)
            yield
        elif self.adapters:
            with self.model.disable_adapter():
                yield
        else:
            yield

    def _budget(self, prompt_tokens: int, sampling: Sampling) -> int:
        """New tokens to allow: the request's, or the default trimmed to what the context has left."""
        room = None if self.context_length is None else self.context_length - prompt_tokens
        if room is not None and room < 1:
            raise bad_request(
                f"the prompt is {prompt_tokens} tokens; this model's context is {self.context_length} tokens",
                "context_length_exceeded",
            )
        if sampling.max_tokens is None:
            return sampling.default_tokens if room is None else min(sampling.default_tokens, room)
        if room is not None and sampling.max_tokens > room:
            raise bad_request(
                f"this model's maximum context length is {self.context_length} tokens; the prompt is "
                f"{prompt_tokens} tokens and max_tokens asks for {sampling.max_tokens} more",
                "context_length_exceeded",
            )
        return sampling.max_tokens

    def _encode(self, prompt: str | Sequence[dict[str, str]]) -> list[int]:
        from kubetune_trainer import data

        if isinstance(prompt, str):
            ids: list[int] = self.tokenizer(prompt)["input_ids"]
            return ids
        return data.render_prompt(self.tokenizer, prompt)

    def generate(self, name: str, prompt: str | Sequence[dict[str, str]], sampling: Sampling) -> Generation:
        """Complete a text prompt, or a conversation rendered with the chat template, with model ``name``."""
        (result,) = self.generate_many(name, [(prompt, sampling)])
        if isinstance(result, ApiError):
            raise result
        return result

    def generate_many(
        self, name: str, requests: Sequence[tuple[str | Sequence[dict[str, str]], Sampling]]
    ) -> list[Generation | ApiError]:
        """Answer several requests for model ``name`` in one batch; they must share temperature, top_p and stop.

        A request that cannot be served (its prompt does not fit the context)
        gets its ApiError in its place; the others are answered.
        """
        from kubetune_trainer import generation

        with self._lock:
            results: list[Generation | ApiError | None] = [None] * len(requests)
            rows: list[tuple[int, list[int], int]] = []
            for i, (prompt, sampling) in enumerate(requests):
                ids = self._encode(prompt)
                try:
                    rows.append((i, ids, self._budget(len(ids), sampling)))
                except ApiError as e:
                    results[i] = e
            if rows:
                sampling = requests[rows[0][0]][1]
                options: dict[str, Any] = {"do_sample": sampling.temperature > 0}
                if sampling.temperature > 0:
                    options |= {"temperature": sampling.temperature, "top_p": sampling.top_p}
                if sampling.stop:
                    options |= {"stop_strings": list(sampling.stop), "tokenizer": self.tokenizer}
                with self._selected(name):
                    outputs = generation.generate(
                        self.model,
                        self.tokenizer,
                        [ids for _, ids, _ in rows],
                        self.runtime,
                        max_new_tokens=[budget for _, _, budget in rows],
                        sampling=options,
                    )
                for (i, ids, budget), out in zip(rows, outputs, strict=True):
                    text: str = self.tokenizer.decode(out.tokens, skip_special_tokens=True)
                    results[i] = self._finish(text, ids, out, budget, requests[i][1])
        return [r for r in results if r is not None]

    @staticmethod
    def _finish(text: str, ids: list[int], out: Any, budget: int, sampling: Sampling) -> Generation:
        finish: Literal["stop", "length"] = "length" if out.generated >= budget else "stop"
        cuts = [i for i in (text.find(s) for s in sampling.stop) if i >= 0]
        if cuts:  # OpenAI leaves the stop sequence out of the text
            text, finish = text[: min(cuts)], "stop"
        return Generation(text, len(ids), out.generated, finish)


def load_engine(options: ServeOptions) -> Engine:
    """Verify every adapter's digest, then load the weights."""
    for name, expected in options.adapter_digests.items():
        verify_digest(f"adapter {name}", options.adapters[name], expected)
        log.info("adapter %s: digest %s verified", name, expected)
    started = time.monotonic()
    engine = Engine(options)
    log.info(
        "loaded %s with adapters [%s] on %s (%s) in %.1f s",
        options.base_model,
        ", ".join(options.adapters),
        engine.runtime.device,
        engine.runtime.precision,
        time.monotonic() - started,
    )
    return engine


# ----------------------------------------------------------------------------- the HTTP server


class Metrics:
    """The server's series, in a registry of their own: only they are exported, and servers can coexist in tests."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kubetune_serve_requests",
            "Inference requests by served model, endpoint and HTTP status code.",
            ["model", "endpoint", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kubetune_serve_request_duration_seconds",
            "Inference request latency by served model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "kubetune_serve_prompt_tokens",
            "Prompt tokens processed by served model.",
            ["model"],
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "kubetune_serve_completion_tokens",
            "Completion tokens generated by served model.",
            ["model"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "kubetune_serve_batch_size",
            "Requests generated together in one batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "kubetune_serve_requests_in_flight",
            "Inference requests being served or waiting for the model.",
            registry=self.registry,
        )


Endpoint = Literal["completions", "chat"]


@dataclass(eq=False)
class _Queued:
    model: str
    prompt: str | list[dict[str, str]]
    sampling: Sampling
    future: asyncio.Future[Generation]

    def key(self) -> tuple[str, float, float, tuple[str, ...]]:
        return (self.model, self.sampling.temperature, self.sampling.top_p, self.sampling.stop)


class Batcher:
    """Requests wait here while the model is busy; compatible ones are then generated as one batch.

    Compatible: the same served model and the same sampling settings (token
    budgets may differ). The oldest request always goes in the next batch, so
    no request waits behind ones that arrived later.
    """

    def __init__(
        self, executor: ThreadPoolExecutor, metrics: Metrics, max_batch_size: int, max_queue: int = 64
    ) -> None:
        self.executor = executor
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.queue: list[_Queued] = []
        self.draining = False
        self._task: asyncio.Task[None] | None = None

    async def submit(
        self, engine: Engine, model: str, prompt: str | list[dict[str, str]], sampling: Sampling
    ) -> Generation:
        loop = asyncio.get_running_loop()
        waiting = sum(1 for q in self.queue if not q.future.done())
        if waiting >= self.max_queue:
            raise ApiError(
                429,
                f"the server is busy: {waiting} requests are waiting (--max-queue {self.max_queue}); retry shortly",
                "rate_limit_exceeded",
                "queue_full",
                headers={"Retry-After": "1"},
            )
        item = _Queued(model, prompt, sampling, loop.create_future())
        self.queue.append(item)
        if not self.draining:
            self.draining = True
            self._task = loop.create_task(self._drain(engine))
        return await item.future

    def _next_batch(self) -> list[_Queued]:
        key = self.queue[0].key()
        batch = [q for q in self.queue if q.key() == key][: self.max_batch_size]
        self.queue = [q for q in self.queue if q not in batch]
        return [q for q in batch if not q.future.done()]  # a client that went away is not served

    async def _drain(self, engine: Engine) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.queue:
                batch = self._next_batch()
                if not batch:
                    continue
                self.metrics.batch_size.observe(len(batch))
                requests = [(q.prompt, q.sampling) for q in batch]
                try:
                    results = await loop.run_in_executor(self.executor, engine.generate_many, batch[0].model, requests)
                except Exception as e:  # the whole batch failed: every request in it gets the error
                    for q in batch:
                        if not q.future.done():
                            q.future.set_exception(e)
                    continue
                for q, result in zip(batch, results, strict=True):
                    if q.future.done():
                        continue
                    if isinstance(result, ApiError):
                        q.future.set_exception(result)
                    else:
                        q.future.set_result(result)
        finally:
            self.draining = False


class Server:
    """Routes, readiness and metrics around an Engine that is loaded after the server starts listening."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.engine: Engine | None = None
        self.stopping = False
        self.created = int(time.time())
        self.metrics = Metrics()
        # One worker: generation is serialized (batches run one after another); the event loop stays free.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.batcher = Batcher(self.executor, self.metrics, options.max_batch_size, options.max_queue)
        self.app = web.Application(client_max_size=options.max_body_bytes)
        self.app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/metrics", self.prometheus),
                web.get("/v1/models", self.models),
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions),
            ]
        )

    def _ready_engine(self) -> Engine:
        if self.engine is None or self.stopping:
            state = "shutting down" if self.stopping else "loading the model"
            raise ApiError(503, f"the server is {state}", "service_unavailable", "not_ready")
        return self.engine

    async def healthz(self, request: web.Request) -> web.Response:
        if self.engine is None or self.stopping:
            status = "stopping" if self.stopping else "loading"
            return web.json_response({"status": status}, status=503)
        return web.json_response({"status": "ok", "models": self.options.model_names})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        try:
            self._ready_engine()
        except ApiError as e:
            return e.response()
        base = self.options.base_model_name
        cards = [{"id": base, "object": "model", "created": self.created, "owned_by": "kubetune", "parent": None}]
        cards += [
            {"id": name, "object": "model", "created": self.created, "owned_by": "kubetune", "parent": base}
            for name in self.options.adapters
        ]
        return web.json_response({"object": "list", "data": cards})

    async def completions(self, request: web.Request) -> web.Response:
        return await self._infer(request, "completions")

    async def chat_completions(self, request: web.Request) -> web.Response:
        return await self._infer(request, "chat")

    async def _infer(self, request: web.Request, endpoint: Endpoint) -> web.Response:
        started = time.perf_counter()
        # Only served names become label values: a client inventing names must not grow the series.
        label = "none"
        code = 499  # nginx's "client closed request": the handler was cancelled before it answered
        self.metrics.in_flight.inc()
        try:
            engine = self._ready_engine()
            parsed = await self._parse(request, endpoint)
            if parsed.model not in self.options.model_names:
                label = "unknown"
                raise ApiError(
                    404,
                    f"the model {parsed.model!r} does not exist; served: {', '.join(self.options.model_names)}",
                    "invalid_request_error",
                    "model_not_found",
                )
            label = parsed.model
            response = await self._generate(engine, parsed, endpoint)
            code = 200
            return response
        except ApiError as e:
            code = e.status
            return e.response()
        except Exception:
            log.exception("%s request failed", endpoint)
            code = 500
            return ApiError(
                500, "internal server error; see the server's log", "server_error", "internal_error"
            ).response()
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(model=label, endpoint=endpoint, code=str(code)).inc()
            self.metrics.latency.labels(model=label).observe(time.perf_counter() - started)

    async def _parse(self, request: web.Request, endpoint: Endpoint) -> _Request:
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge as e:
            limit = self.options.max_body_bytes
            raise ApiError(
                413, f"the request body is larger than {limit} bytes (--max-body-bytes)", "invalid_request_error",
                "body_too_large",
            ) from e  # fmt: skip
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"the body is not valid JSON: {e}", "invalid_json") from e
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object", "invalid_json")
        schema = CompletionRequest if endpoint == "completions" else ChatRequest
        try:
            return schema.model_validate(body)
        except ValidationError as e:
            raise bad_request(_describe(e)) from e

    async def _generate(self, engine: Engine, parsed: _Request, endpoint: Endpoint) -> web.Response:
        limit = self.options.max_tokens_limit
        requested = parsed.requested_tokens()
        if requested is not None and requested > limit:
            raise bad_request(f"max_tokens {requested} is above this server's limit of {limit} (--max-tokens-limit)")
        sampling = Sampling(
            max_tokens=requested,
            default_tokens=min(DEFAULT_COMPLETION_TOKENS, limit) if endpoint == "completions" else limit,
            temperature=parsed.temperature,
            top_p=parsed.top_p,
            stop=tuple(parsed.stop),
        )
        prompt: str | list[dict[str, str]]
        if isinstance(parsed, CompletionRequest):
            prompt = parsed.prompt
        else:
            assert isinstance(parsed, ChatRequest)
            prompt = [{"role": m.role, "content": m.content} for m in parsed.messages]
        try:
            result = await asyncio.wait_for(
                self.batcher.submit(engine, parsed.model, prompt, sampling), self.options.request_timeout
            )
        except TimeoutError as e:
            raise ApiError(
                504, f"no answer within {self.options.request_timeout:g} s (--request-timeout); the server is busy",
                "server_error", "timeout",
            ) from e  # fmt: skip
        self.metrics.prompt_tokens.labels(model=parsed.model).inc(result.prompt_tokens)
        self.metrics.completion_tokens.labels(model=parsed.model).inc(result.completion_tokens)
        usage = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        }
        if endpoint == "completions":
            choice: dict[str, Any] = {"index": 0, "text": result.text, "logprobs": None}
            kind, prefix = "text_completion", "cmpl"
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None}
            kind, prefix = "chat.completion", "chatcmpl"
        choice["finish_reason"] = result.finish_reason
        body = {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": parsed.model,
            "choices": [choice],
            "usage": usage,
        }
        return web.json_response(body)


def _in_daemon_thread(fn: Callable[[], _T]) -> asyncio.Future[_T]:
    """Run ``fn`` in a daemon thread: a SIGTERM while a large model loads must not wait for the load to end."""
    done: concurrent.futures.Future[_T] = concurrent.futures.Future()

    def work() -> None:
        try:
            done.set_result(fn())
        except BaseException as e:
            done.set_exception(e)

    threading.Thread(target=work, name="load-model", daemon=True).start()
    return asyncio.wrap_future(done)


async def run_server(options: ServeOptions) -> int:
    """Listen, load, serve until SIGTERM or SIGINT; the exit code (10 when a digest does not match)."""
    from kubetune_trainer.contract import ExitCode

    server = Server(options)
    runner = web.AppRunner(server.app, shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        # Listening before the weights load lets probes see "loading" (503) rather than a refused connection.
        await web.TCPSite(runner, options.host, options.port).start()
        log.info("listening on %s:%d; loading %s", options.host, options.port, options.base_model)
        loading = _in_daemon_thread(lambda: load_engine(options))
        waiting: set[asyncio.Future[Any]] = {loading, stopped}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():
            loading.cancel()
            log.info("stopping before the model finished loading")
            return int(ExitCode.OK)
        try:
            server.engine = loading.result()
        except DigestMismatchError as e:
            log.error("%s", e)
            return int(ExitCode.BAD_INPUT)
        log.info("ready: serving %s", ", ".join(options.model_names))
        await stopped
        log.info("stopping: finishing the requests in flight (at most %.0f s)", SHUTDOWN_TIMEOUT_SECONDS)
        return int(ExitCode.OK)
    finally:
        stopped.cancel()
        server.stopping = True
        await runner.cleanup()
        server.executor.shutdown(cancel_futures=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def serve(options: ServeOptions) -> int:
    return asyncio.run(run_server(options))
