"""The serving side of the trainer image: ``serve``, ``fetch`` and ``eval-endpoint``.

The server runs as the serving pod runs it — ``kubetune-trainer serve`` in its
own process, on a free port of 127.0.0.1 — over the real tiny Llama and two
real LoRA adapters. Their weights are random (``init_lora_weights=False``), so
each one visibly changes the answers; every answer is checked against a
greedy ``generate`` of the same PeftModel in this process.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from kubetune_trainer import cli, data, modeling, storage
from kubetune_trainer.contract import ExitCode
from tests.conftest import SUPPORT_DATA

BASE = "tiny"
ADAPTERS = ("router-a", "router-b")
MAX_TOKENS = 12
# The request the SIGTERM test keeps in flight: long enough to be caught mid-generation.
LONG_TOKENS = 300
PROMPTS = [json.loads(line)["prompt"] for line in (SUPPORT_DATA / "heldout.jsonl").read_text().splitlines()[:4]]


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA adapters with random (not zero) B matrices on different modules, saved as training saves them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    targets = {"router-a": ["q_proj", "v_proj"], "router-b": ["o_proj", "down_proj"]}
    folders = {}
    for seed, name in enumerate(ADAPTERS, start=1):
        torch.manual_seed(seed)
        config = LoraConfig(
            r=8, lora_alpha=16, target_modules=targets[name], init_lora_weights=False, task_type="CAUSAL_LM"
        )
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config)
        model.save_pretrained(str(root / name))
        folders[name] = root / name
    return folders


@dataclass(frozen=True)
class Expected:
    """What a direct greedy generate of the PeftModel answers: text and prompt/completion token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int


@pytest.fixture(scope="module")
def expected(tiny_model: Path, adapters: dict[str, Path]) -> dict[tuple[str, str, int], Expected]:
    """(model, prompt, max_tokens) -> the chat answer of PeftModel.generate, for every prompt the tests send."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = modeling.load_tokenizer(tiny_model)
    model: Any = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), adapters["router-a"], adapter_name="router-a"
    )
    model.load_adapter(adapters["router-b"], adapter_name="router-b")
    model.eval()

    def greedy(prompt: str, max_tokens: int) -> Expected:
        ids = data.render_prompt(tokenizer, chat(prompt))
        inputs = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, len(ids) :]
        return Expected(tokenizer.decode(new, skip_special_tokens=True), len(ids), len(new))

    answers = {}
    for name in (BASE, *ADAPTERS):
        for prompt in PROMPTS:
            if name == BASE:
                with model.disable_adapter():
                    answers[name, prompt, MAX_TOKENS] = greedy(prompt, MAX_TOKENS)
            else:
                model.set_adapter(name)
                answers[name, prompt, MAX_TOKENS] = greedy(prompt, MAX_TOKENS)
    model.set_adapter("router-a")
    answers["router-a", PROMPTS[0], LONG_TOKENS] = greedy(PROMPTS[0], LONG_TOKENS)
    return answers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(tmp: Path, *args: str) -> Server:
    port = free_port()
    log = tmp / f"serve-{port}.log"
    command = [sys.executable, "-m", "kubetune_trainer.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen([*command, *args], stdout=out, stderr=subprocess.STDOUT)
    return Server(process, f"http://127.0.0.1:{port}", log)


def request(url: str, body: Any = None, *, raw: bytes | None = None) -> tuple[int, Any]:
    """(status, parsed JSON or text) of a GET, or of a POST when a body is given."""
    payload = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, payload, {"Content-Type": "application/json"} if payload else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def wait_ready(server: Server, timeout: float = 90) -> list[int]:
    """Poll /healthz until 200; the statuses seen on the way (connection refusals left out)."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"the server exited with {server.process.returncode}:\n{server.output()}")
        try:
            status, _ = request(server.url + "/healthz")
        except OSError:
            time.sleep(0.05)
            continue
        seen.append(status)
        if status == 200:
            return seen
        time.sleep(0.05)
    pytest.fail(f"the server did not become ready in {timeout} s:\n{server.output()}")


@pytest.fixture(scope="module")
def server(
    tiny_model: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, list[int]]]:
    """The server with both adapters, one of them pinned to its (right) digest, and the statuses it went through."""
    digest, _ = storage.digest_of_dir(adapters["router-a"])
    started = start_server(
        tmp_path_factory.mktemp("serve"),
        "--base-model",
        str(tiny_model),
        "--base-model-name",
        BASE,
        "--adapter",
        f"router-a={adapters['router-a']}",
        "--adapter",
        f"router-b={adapters['router-b']}",
        "--adapter-digest",
        f"router-a={digest}",
    )
    try:
        yield started, wait_ready(started)
    finally:
        if started.process.poll() is None:
            started.process.kill()
            started.process.wait()


@pytest.fixture
def url(server: tuple[Server, list[int]]) -> str:
    return server[0].url


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    _, text = request(url + "/metrics")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# ----------------------------------------------------------------------------- the server


def test_healthz_answers_503_until_the_weights_are_loaded(server: tuple[Server, list[int]]) -> None:
    started, seen = server
    # The server listens before torch is even imported, so a poll every 50 ms sees it loading.
    assert seen[0] == 503, seen
    assert seen[-1] == 200, seen
    assert request(started.url + "/healthz") == (200, {"status": "ok", "models": [BASE, *ADAPTERS]})
    assert "adapter router-a: digest sha256:" in started.output()


def test_models_lists_the_base_and_its_adapters(url: str) -> None:
    status, body = request(url + "/v1/models")
    assert status == 200
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["parent"]) for m in body["data"]] == [
        (BASE, "model", None),
        ("router-a", "model", BASE),
        ("router-b", "model", BASE),
    ]


def test_chat_answers_are_those_of_the_peft_model_and_each_adapter_changes_them(
    url: str, expected: dict[tuple[str, str, int], Expected]
) -> None:
    answers = {}
    for name in (BASE, *ADAPTERS):
        body = {"model": name, "messages": chat(PROMPTS[0]), "temperature": 0, "max_tokens": MAX_TOKENS}
        status, response = request(url + "/v1/chat/completions", body)
        assert status == 200, response
        want = expected[name, PROMPTS[0], MAX_TOKENS]
        assert response["object"] == "chat.completion"
        assert response["model"] == name
        choice = response["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": want.text}
        assert choice["finish_reason"] == ("length" if want.completion_tokens == MAX_TOKENS else "stop")
        assert response["usage"] == {
            "prompt_tokens": want.prompt_tokens,
            "completion_tokens": want.completion_tokens,
            "total_tokens": want.prompt_tokens + want.completion_tokens,
        }
        answers[name] = want.text
    assert len(set(answers.values())) == 3, f"an adapter changed nothing: {answers}"


def test_completions_continue_the_raw_prompt_and_cut_at_stop_sequences(url: str, tiny_model: Path) -> None:
    body: dict[str, Any] = {"model": BASE, "prompt": ["Route this support"], "temperature": 0, "max_tokens": 16}
    status, response = request(url + "/v1/completions", body)
    assert status == 200, response
    assert response["object"] == "text_completion"
    text = response["choices"][0]["text"]
    usage = response["usage"]
    assert usage["prompt_tokens"] == len(modeling.load_tokenizer(tiny_model)(body["prompt"][0])["input_ids"])
    assert 1 <= usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    # Stop at the second word of the continuation: the text ends just before it.
    words = text.split()
    assert len(words) >= 3, text
    cut = text.index(words[1])
    status, stopped = request(url + "/v1/completions", {**body, "prompt": "Route this support", "stop": words[1]})
    assert status == 200, stopped
    assert stopped["choices"][0] == {"index": 0, "text": text[:cut], "logprobs": None, "finish_reason": "stop"}
    assert stopped["usage"]["completion_tokens"] < usage["completion_tokens"]


def test_sampling_with_temperature_and_top_p(url: str) -> None:
    body = {"model": "router-b", "prompt": "Route this", "temperature": 1.5, "top_p": 0.9, "max_tokens": 8}
    status, response = request(url + "/v1/completions", body)
    assert status == 200, response
    assert 1 <= response["usage"]["completion_tokens"] <= 8


def test_concurrent_requests_each_get_their_own_adapter(
    url: str, expected: dict[tuple[str, str, int], Expected]
) -> None:
    jobs = [(name, prompt) for prompt in PROMPTS for name in (BASE, *ADAPTERS)]
    answers: dict[tuple[str, str], str] = {}

    def ask(name: str, prompt: str) -> None:
        body = {"model": name, "messages": chat(prompt), "temperature": 0, "max_tokens": MAX_TOKENS}
        status, response = request(url + "/v1/chat/completions", body)
        answers[name, prompt] = response["choices"][0]["message"]["content"] if status == 200 else str(response)

    threads = [threading.Thread(target=ask, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == {(name, prompt): expected[name, prompt, MAX_TOKENS].text for name, prompt in jobs}


def test_queued_requests_for_one_model_are_batched_and_answer_as_alone(
    url: str, expected: dict[tuple[str, str, int], Expected]
) -> None:
    def batches() -> tuple[float, float]:
        values = metrics(url)
        return values[("kubetune_serve_batch_size_count", ())], values[("kubetune_serve_batch_size_sum", ())]

    count_before, sum_before = batches()
    answers: dict[int, Any] = {}

    def ask(i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {"model": "router-b", "messages": chat(prompt), "temperature": 0, "max_tokens": MAX_TOKENS}
        answers[i] = request(url + "/v1/chat/completions", body)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, (status, response) in answers.items():
        want = expected["router-b", PROMPTS[i % len(PROMPTS)], MAX_TOKENS]
        assert status == 200
        assert response["choices"][0]["message"]["content"] == want.text
        assert response["usage"]["completion_tokens"] == want.completion_tokens
    count_after, sum_after = batches()
    assert sum_after - sum_before == 8  # every request was generated once
    assert count_after - count_before < 8, "no two queued requests shared a batch"


def test_unknown_model_is_404_with_an_openai_error(url: str) -> None:
    status, body = request(url + "/v1/chat/completions", {"model": "gpt-4", "messages": chat("hi")})
    assert status == 404
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "model_not_found"
    assert "gpt-4" in body["error"]["message"]
    assert "router-a" in body["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/v1/chat/completions", b"{not json", "not valid JSON"),
        ("/v1/chat/completions", b"[1, 2]", "JSON object"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "model: Field required"),
        ("/v1/chat/completions", {"model": BASE, "messages": []}, "messages: List should have at least 1 item"),
        ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user"}]}, "messages.0.content"),
        ("/v1/chat/completions", {"model": BASE, "messages": chat("hi"), "n": 2}, "n: only n=1"),
        ("/v1/chat/completions", {"model": BASE, "messages": chat("hi"), "stream": True}, "stream: streaming"),
        ("/v1/chat/completions", {"model": BASE, "messages": chat("hi"), "temperature": "0"}, "temperature"),
        ("/v1/chat/completions", {"model": BASE, "messages": chat("hi"), "max_tokens": 513}, "limit of 512"),
        ("/v1/completions", {"model": BASE, "prompt": ["a", "b"]}, "exactly one prompt"),
        ("/v1/completions", {"model": BASE, "prompt": "hi", "stop": 5}, "stop"),
        ("/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": BASE, "prompt": "hi", "top_p": 0}, "top_p"),
        ("/v1/completions", {"model": BASE, "prompt": "word " * 600}, "this model's context is 512 tokens"),
        (
            "/v1/chat/completions",
            {"model": BASE, "messages": chat("hi"), "max_completion_tokens": 600, "max_tokens": 5},
            "max_tokens 600 is above",
        ),
    ],
)
def test_bad_requests_are_400_naming_the_field(url: str, path: str, body: Any, fragment: str) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, response = request(url + path, raw=raw)
    assert status == 400, response
    assert response["error"]["type"] == "invalid_request_error"
    assert fragment in response["error"]["message"], response


def test_metrics_count_requests_latency_and_tokens_by_model(url: str) -> None:
    def sample(name: str, **labels: str) -> float:
        return before_or_after.get((name, tuple(sorted(labels.items()))), 0.0)

    before_or_after = metrics(url)
    requests_ok = sample("kubetune_serve_requests_total", model="router-b", endpoint="chat", code="200")
    requests_404 = sample("kubetune_serve_requests_total", model="unknown", endpoint="chat", code="404")
    latency = sample("kubetune_serve_request_duration_seconds_count", model="router-b")
    prompt_tokens = sample("kubetune_serve_prompt_tokens_total", model="router-b")
    completion_tokens = sample("kubetune_serve_completion_tokens_total", model="router-b")

    status, response = request(
        url + "/v1/chat/completions", {"model": "router-b", "messages": chat(PROMPTS[1]), "max_tokens": 5}
    )
    assert status == 200
    assert request(url + "/v1/chat/completions", {"model": "nope", "messages": chat("hi")})[0] == 404

    before_or_after = metrics(url)
    assert sample("kubetune_serve_requests_total", model="router-b", endpoint="chat", code="200") == requests_ok + 1
    assert sample("kubetune_serve_requests_total", model="unknown", endpoint="chat", code="404") == requests_404 + 1
    assert sample("kubetune_serve_request_duration_seconds_count", model="router-b") == latency + 1
    usage = response["usage"]
    assert sample("kubetune_serve_prompt_tokens_total", model="router-b") == prompt_tokens + usage["prompt_tokens"]
    assert (
        sample("kubetune_serve_completion_tokens_total", model="router-b")
        == completion_tokens + usage["completion_tokens"]
    )
    assert sample("kubetune_serve_requests_in_flight") == 0


def test_a_wrong_adapter_digest_exits_10_without_becoming_ready(
    tiny_model: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    actual, _ = storage.digest_of_dir(adapters["router-b"])
    wrong = "sha256:" + "0" * 64
    started = start_server(
        tmp_path,
        "--base-model",
        str(tiny_model),
        "--adapter",
        f"router-b={adapters['router-b']}",
        "--adapter-digest",
        f"router-b={wrong}",
    )
    statuses = []
    try:
        while started.process.poll() is None:
            with contextlib.suppress(OSError):  # not listening yet
                statuses.append(request(started.url + "/healthz")[0])
            time.sleep(0.02)
        code = started.process.wait(timeout=30)
    finally:
        if started.process.poll() is None:
            started.process.kill()
    assert code == ExitCode.BAD_INPUT, started.output()
    assert 200 not in statuses
    assert f"adapter router-b: expected digest {wrong} but the files in {adapters['router-b']} hash to {actual}" in (
        started.output()
    )


# ----------------------------------------------------------------------------- fetch


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``kubetune-trainer ARGS`` in this process (the model is already imported here); (code, stdout, stderr)."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_fetch_verifies_the_digest_and_keeps_what_was_there(
    adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = adapters["router-a"]
    digest, files = storage.digest_of_dir(source)
    uri = f"file://{source}"

    code, out, err = run_cli(capsys, "fetch", uri, str(tmp_path / "ok"), "--digest", digest)
    assert code == ExitCode.OK, err
    assert json.loads(out) == {"uri": uri, "dir": str(tmp_path / "ok"), "digest": digest}
    assert storage.digest_of_dir(tmp_path / "ok") == (digest, files)
    assert not list((tmp_path / "ok").glob(".*")), "the staging folder was left behind"

    # A mismatch into a folder with the user's files: refused, naming both digests; the folder is as it was.
    wrong = "sha256:" + "f" * 64
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "fetch", uri, str(mine), "--digest", wrong)
    assert code == ExitCode.BAD_INPUT
    assert wrong in err
    assert digest in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"

    # Into a folder that did not exist: it still does not.
    code, _, _ = run_cli(capsys, "fetch", uri, str(tmp_path / "new" / "adapter"), "--digest", wrong)
    assert code == ExitCode.BAD_INPUT
    assert not (tmp_path / "new" / "adapter").exists()

    code, _, err = run_cli(capsys, "fetch", f"file://{tmp_path}/nothing-here", str(tmp_path / "x"))
    assert code == ExitCode.BAD_INPUT
    assert "no files there" in err


def test_fetch_exits_75_when_the_store_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(uri: str, dest: Path, settings: storage.S3Settings) -> Path:
        raise storage.StorageError(f"{uri}: gave up after 6 attempts: connection refused")

    monkeypatch.setattr(storage, "fetch_dir", unreachable)
    code, _, err = run_cli(capsys, "fetch", "s3://models/tiny/", str(tmp_path / "model"))
    assert code == ExitCode.STORAGE_UNAVAILABLE
    assert "gave up after 6 attempts" in err
    assert not (tmp_path / "model").exists()


# ----------------------------------------------------------------------------- eval-endpoint


def eval_endpoint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, url: str, dataset: Path, minimum: float, *extra: str
) -> tuple[int, dict[str, Any]]:
    log = tmp_path / "termination-log"
    args = ["eval-endpoint", "--endpoint", url, "--model", "router-a", "--dataset", f"file://{dataset}"]
    args += ["--metric", "exact_match", "--min", str(minimum), "--max-tokens", str(MAX_TOKENS)]
    code, out, _ = run_cli(capsys, *args, "--termination-log", str(log), *extra)
    summary = json.loads(out.strip().splitlines()[-1])
    assert json.loads(log.read_text()) == summary
    return code, summary


def test_eval_endpoint_passes_and_fails_on_the_threshold(
    url: str, expected: dict[tuple[str, str, int], Expected], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Three references are the adapter's own greedy answers, one is not: the endpoint must score exactly 0.75.
    dataset = tmp_path / "heldout.jsonl"
    references = [expected["router-a", prompt, MAX_TOKENS].text for prompt in PROMPTS[:3]] + ["NOT/THIS"]
    dataset.write_text(
        "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(PROMPTS, references, strict=True))
    )

    code, summary = eval_endpoint(capsys, tmp_path, url, dataset, 0.75)
    assert code == ExitCode.OK, summary
    assert summary == {
        "phase": "Succeeded",
        "reason": "Succeeded",
        "metric": "exact_match",
        "score": 0.75,
        "threshold": 0.75,
        "examples": 4,
        "message": summary["message"],
    }

    code, summary = eval_endpoint(capsys, tmp_path, url, dataset, 0.8)
    assert code == ExitCode.GATES_FAILED, summary
    assert (summary["phase"], summary["reason"], summary["score"]) == ("Failed", "OnlineEvalFailed", 0.75)
    assert "exact_match 0.7500 < 0.8 over 4 examples" in summary["message"]
    assert "heldout.jsonl:4: expected 'NOT/THIS'" in summary["message"]

    code, summary = eval_endpoint(capsys, tmp_path, url, dataset, 1.0, "--max-examples", "3")
    assert (code, summary["score"], summary["examples"]) == (ExitCode.OK, 1.0, 3)


def test_eval_endpoint_exits_75_when_the_endpoint_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = tmp_path / "heldout.jsonl"
    dataset.write_text(json.dumps({"prompt": PROMPTS[0], "response": "x"}) + "\n")
    closed = f"http://127.0.0.1:{free_port()}"
    code, summary = eval_endpoint(capsys, tmp_path, closed, dataset, 0.8, "--connect-attempts", "2")
    assert code == ExitCode.STORAGE_UNAVAILABLE
    assert (summary["phase"], summary["reason"], summary["score"]) == ("Failed", "EndpointUnavailable", None)
    assert "gave up after 2 attempts" in summary["message"]


def test_eval_endpoint_fails_a_canary_that_does_not_serve_the_model(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = tmp_path / "heldout.jsonl"
    dataset.write_text(json.dumps({"prompt": PROMPTS[0], "response": "x"}) + "\n")
    code, summary = eval_endpoint(capsys, tmp_path, url, dataset, 0.8, "--model", "support-bot-v9")
    assert code == ExitCode.GATES_FAILED
    assert (summary["phase"], summary["reason"]) == ("Failed", "OnlineEvalFailed")
    assert "answered 404: the model 'support-bot-v9' does not exist" in summary["message"]


# ----------------------------------------------------------------------------- shutdown (last: it stops the server)


def test_sigterm_finishes_the_request_in_flight_then_exits_0(
    server: tuple[Server, list[int]], expected: dict[tuple[str, str, int], Expected]
) -> None:
    started, _ = server
    want = expected["router-a", PROMPTS[0], LONG_TOKENS]
    assert want.completion_tokens == LONG_TOKENS, "the adapter stopped early: pick another prompt"
    result: list[tuple[int, Any]] = []
    body = {"model": "router-a", "messages": chat(PROMPTS[0]), "temperature": 0, "max_tokens": LONG_TOKENS}
    thread = threading.Thread(target=lambda: result.append(request(started.url + "/v1/chat/completions", body)))
    thread.start()
    deadline = time.monotonic() + 10
    while metrics(started.url).get(("kubetune_serve_requests_in_flight", ()), 0) < 1:
        assert time.monotonic() < deadline, "the request never arrived"
        time.sleep(0.005)

    started.process.send_signal(signal.SIGTERM)
    assert started.process.wait(timeout=30) == 0, started.output()
    thread.join(timeout=30)
    status, response = result[0]
    assert status == 200, response
    assert response["choices"][0]["message"]["content"] == want.text
