"""Online evaluation: score a serving endpoint before its canary is promoted.

The trainer's offline evaluation scored the adapter in the training pod. What
gets promoted is something else: a server, the base model files it fetched,
the adapter bytes it loaded, its chat template. The operator therefore runs
``kubetune-trainer eval-endpoint`` as a Job against the canary's
OpenAI-compatible endpoint (vLLM or the reference server alike): every
held-out prompt goes through ``/v1/chat/completions`` with temperature 0 and
is scored with the trainer's own metrics, so an online score is comparable
with the offline one.

Like ``kubetune-trainer run``, it prints a one-line JSON summary and writes it
to the termination log; the exit code says what the operator should do:
0 promote, 11 (``GATES_FAILED``) roll back, 75 (``STORAGE_UNAVAILABLE``, i.e.
try again) when the endpoint could not be reached, 10 for a dataset or metric
that can never be evaluated.

It uses only the standard library's HTTP client, so the Job needs nothing the
trainer image does not have.
"""

from __future__ import annotations

import http.client
import json
import logging
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kubetune_trainer import data, evaluate, storage
from kubetune_trainer.contract import ExitCode
from kubetune_trainer.pipeline import announce

log = logging.getLogger(__name__)

# Statuses a server gives while it starts, restarts or sits behind a proxy that lost it: worth retrying.
RETRY_STATUSES = (502, 503, 504)
MESSAGE_LIMIT = 1024


class EndpointUnavailableError(Exception):
    """The endpoint could not be reached, or kept answering "unavailable", through every retry."""


class EndpointError(Exception):
    """The endpoint answered a request with an error: the deployment does not serve the model properly."""


@dataclass(frozen=True)
class EvalSummary:
    """The one-line result the operator reads from the Job's termination message."""

    phase: str
    reason: str
    metric: str
    score: float | None
    threshold: float
    examples: int
    message: str

    def to_json(self) -> str:
        fields = asdict(self)
        if len(fields["message"]) > MESSAGE_LIMIT:
            fields["message"] = fields["message"][: MESSAGE_LIMIT - 3] + "..."
        return json.dumps(fields, separators=(",", ":"))


@dataclass(frozen=True)
class Client:
    """Chat completions against one endpoint and model, retrying what a restart or a cold start explains."""

    endpoint: str
    model: str
    max_tokens: int
    timeout: float = 120.0
    attempts: int = 5

    def chat(self, messages: Sequence[dict[str, str]]) -> str:
        body = json.dumps(
            {"model": self.model, "messages": list(messages), "temperature": 0, "max_tokens": self.max_tokens}
        ).encode()
        url = self.endpoint.rstrip("/") + "/v1/chat/completions"
        delay = 0.5
        for attempt in range(1, self.attempts + 1):
            request = urllib.request.Request(url, body, {"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    answer = json.loads(response.read())
                return str(answer["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as e:
                if e.code not in RETRY_STATUSES:
                    raise EndpointError(f"{url} answered {e.code}: {_error_message(e)}") from e
                error: Exception = e
            except (http.client.HTTPException, OSError) as e:  # refused, reset, timed out (URLError is an OSError)
                error = e
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise EndpointError(f"{url} answered something that is not a chat completion: {e}") from e
            if attempt == self.attempts:
                raise EndpointUnavailableError(f"{url}: gave up after {attempt} attempts: {error}") from error
            log.warning("%s: %s; retrying in %.1f s", url, error, delay)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")


def _error_message(error: urllib.error.HTTPError) -> str:
    """The OpenAI-style error message of a response, else its raw body."""
    raw = error.read().decode("utf-8", "replace")
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw[:200] or str(error.reason)


def score(
    client: Client, examples: Sequence[data.Example], metric: Callable[[str, str], float]
) -> tuple[float, list[tuple[str, str, str]]]:
    """Mean metric over ``examples`` and the (source, reference, prediction) of those that missed."""
    total = 0.0
    misses: list[tuple[str, str, str]] = []
    for example in examples:
        prediction = client.chat(example.prompt)
        value = metric(prediction, example.response)
        total += value
        if value < 1.0:
            misses.append((example.source, example.response, prediction))
    return total / len(examples), misses


def evaluate_endpoint(
    client: Client,
    dataset: str,
    metric: str,
    minimum: float,
    *,
    max_examples: int,
    settings: storage.S3Settings,
) -> tuple[EvalSummary, ExitCode]:
    """Fetch the dataset, score the endpoint on it and decide; every failure becomes a summary and an exit code."""

    def failed(reason: str, code: ExitCode, message: str, examples: int = 0) -> tuple[EvalSummary, ExitCode]:
        return EvalSummary("Failed", reason, metric, None, minimum, examples, message), code

    if metric not in evaluate.TEXT_METRICS:
        known = ", ".join(sorted(evaluate.TEXT_METRICS))
        return failed(
            "ConfigInvalid",
            ExitCode.BAD_INPUT,
            f"metric {metric} cannot be measured on an endpoint's text; use one of {known}",
        )
    try:
        with tempfile.TemporaryDirectory(prefix="kubetune-eval-") as work:
            local = storage.fetch_file(dataset, Path(work) / Path(dataset).name, settings)
            examples = data.load_jsonl(local).examples[:max_examples]
    except storage.NotFoundError as e:
        return failed("DataNotFound", ExitCode.BAD_INPUT, f"dataset: {e}")
    except (storage.InvalidURIError, data.DataError) as e:
        return failed("DataInvalid", ExitCode.BAD_INPUT, f"dataset: {e}")
    except storage.StorageError as e:
        return failed("StorageUnavailable", ExitCode.STORAGE_UNAVAILABLE, f"dataset: {e}")

    where = f"model {client.model} at {client.endpoint}"
    try:
        value, misses = score(client, examples, evaluate.TEXT_METRICS[metric])
    except EndpointUnavailableError as e:
        return failed("EndpointUnavailable", ExitCode.STORAGE_UNAVAILABLE, str(e), len(examples))
    except EndpointError as e:
        return failed("OnlineEvalFailed", ExitCode.GATES_FAILED, f"{where}: {e}", len(examples))
    passed = value >= minimum
    message = f"{metric} {value:.4f} {'>=' if passed else '<'} {minimum} over {len(examples)} examples ({where})"
    if misses and not passed:
        source, reference, prediction = misses[0]
        message += f"; e.g. {source}: expected {reference!r}, got {prediction[:200]!r}"
    summary = EvalSummary(
        "Succeeded" if passed else "Failed",
        "Succeeded" if passed else "OnlineEvalFailed",
        metric,
        round(value, 4),
        minimum,
        len(examples),
        message,
    )
    return summary, ExitCode.OK if passed else ExitCode.GATES_FAILED


def report(summary: EvalSummary, termination_log: Path | None) -> None:
    announce(summary.to_json(), termination_log)
