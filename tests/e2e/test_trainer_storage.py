"""The trainer against the loopback S3 server: storage operations, faults, and a whole run on s3://."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_trainer import storage
from kubetune_trainer.contract import ExitCode
from tests.cluster.s3 import S3Server
from tests.conftest import ROOT, SUPPORT_DATA, run_trainer

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FlakyProxy:
    """An HTTP proxy in front of the S3 server that fails the first ``failures`` requests.

    ``mode`` "503" answers them with S3's SlowDown error; "reset" closes the
    connection without an answer. Everything after is forwarded unchanged.
    """

    def __init__(self, upstream: str, failures: int, mode: str = "503") -> None:
        self.upstream = upstream.removeprefix("http://")
        self.remaining = failures
        self.failed = 0
        self.forwarded = 0
        self.mode = mode
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    fail = proxy.remaining > 0
                    if fail:
                        proxy.remaining -= 1
                        proxy.failed += 1
                    else:
                        proxy.forwarded += 1
                if fail and proxy.mode == "reset":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = proxy.upstream
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815 (http.server's names)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def bucket(s3: S3Server, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    name = "".join(c if c.isalnum() or c == "-" else "-" for c in name)
    s3.create_bucket(name)
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return name


def settings(s3: S3Server, **kw: Any) -> storage.S3Settings:
    return storage.S3Settings(endpoint=s3.endpoint_url, region=s3.region, **kw)


def test_store_round_trips(s3: S3Server, bucket: str, tmp_path: Path) -> None:
    loc = storage.resolve(f"s3://{bucket}/runs/a/", settings(s3))
    loc.store.write_bytes("runs/a/x.json", b'{"a": 1}')
    assert storage.read_json(f"s3://{bucket}/runs/a/x.json", settings(s3)) == {"a": 1}
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "one.bin").write_bytes(b"1" * 1000)
    (src / "sub" / "two.bin").write_bytes(b"2" * 10)
    files = storage.upload_dir(src, f"s3://{bucket}/runs/a/dir", settings(s3))
    assert loc.store.list("runs/a/dir/") == ["runs/a/dir/one.bin", "runs/a/dir/sub/two.bin"]
    assert loc.store.stored_sha256("runs/a/dir/one.bin") == files["one.bin"]
    assert loc.store.stored_sha256("runs/a/nothing") is None
    fetched = storage.fetch_dir(f"s3://{bucket}/runs/a/dir", tmp_path / "back", settings(s3))
    assert storage.digest_of_dir(fetched) == storage.digest_of_dir(src)
    assert loc.store.delete_prefix("runs/a/") == 3
    assert loc.store.list("runs/a/") == []
    with pytest.raises(storage.NotFoundError):
        storage.read_json(f"s3://{bucket}/runs/a/x.json", settings(s3))


def test_large_files_go_up_in_parts(s3: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)  # S3's smallest part size
    big = tmp_path / "big" / "weights.bin"
    big.parent.mkdir()
    big.write_bytes(bytes(range(256)) * (12 * 4096))  # 12 MiB: three parts
    storage.publish_dir(big.parent, f"s3://{bucket}/model", settings(s3))
    head = s3.client().head_object(Bucket=bucket, Key="model/weights.bin")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]
    assert head["Metadata"]["sha256"] == storage.sha256_file(big)
    back = storage.fetch_dir(f"s3://{bucket}/model", tmp_path / "back", settings(s3))
    assert storage.sha256_file(back / "weights.bin") == storage.sha256_file(big)


def test_write_once_holds_on_s3(s3: S3Server, bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"weights-v1")
    uri = f"s3://{bucket}/runs/r1/adapter"
    storage.publish_dir(src, uri, settings(s3))
    storage.publish_dir(src, uri, settings(s3))
    (src / "adapter_model.safetensors").write_bytes(b"weights-v2")
    with pytest.raises(storage.WriteOnceError, match="never overwritten"):
        storage.publish_dir(src, uri, settings(s3))
    body = s3.client().get_object(Bucket=bucket, Key="runs/r1/adapter/adapter_model.safetensors")["Body"].read()
    assert body == b"weights-v1"


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_transient_errors_are_retried(s3: S3Server, bucket: str, mode: str) -> None:
    proxy = FlakyProxy(s3.endpoint_url, failures=2, mode=mode)
    try:
        flaky = storage.S3Settings(endpoint=proxy.endpoint, region=s3.region, attempts=4)
        storage.write_json(f"s3://{bucket}/progress.json", {"step": 7}, flaky)
        assert proxy.failed == 2
        assert storage.read_json(f"s3://{bucket}/progress.json", flaky) == {"step": 7}
    finally:
        proxy.close()


def test_persistent_errors_give_up_with_storage_error(s3: S3Server, bucket: str) -> None:
    proxy = FlakyProxy(s3.endpoint_url, failures=1000)
    try:
        flaky = storage.S3Settings(endpoint=proxy.endpoint, region=s3.region, attempts=3)
        with pytest.raises(storage.StorageError, match="gave up after 3 attempts"):
            storage.write_json(f"s3://{bucket}/progress.json", {"step": 7}, flaky)
        assert proxy.failed == 3
    finally:
        proxy.close()


# ----------------------------------------------------------------------------- a whole run on s3://


@pytest.fixture
def s3_inputs(s3: S3Server, bucket: str, tiny_model: Path) -> str:
    storage.upload_dir(tiny_model, f"s3://{bucket}/models/tiny", settings(s3))
    for name in ("train.jsonl", "val.jsonl", "heldout.jsonl"):
        loc = storage.resolve(f"s3://{bucket}/datasets/support/{name}", settings(s3))
        loc.store.upload(SUPPORT_DATA / name, loc.key, sha256=storage.sha256_file(SUPPORT_DATA / name))
    return bucket


def _manifest(bucket: str, endpoint: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docs/examples/finetune-local.yaml").read_text())
    doc["spec"]["baseModel"]["uri"] = f"s3://{bucket}/models/tiny/"
    doc["spec"]["dataset"] = {
        "train": f"s3://{bucket}/datasets/support/train.jsonl",
        "validation": f"s3://{bucket}/datasets/support/val.jsonl",
        "eval": f"s3://{bucket}/datasets/support/heldout.jsonl",
    }
    doc["spec"]["output"] = {"uri": f"s3://{bucket}/adapters/"}
    doc["spec"]["storage"] = {"endpoint": endpoint}
    # The manifest is tuned for SmolLM2; the tiny model from scratch wants a larger step and adapter.
    doc["spec"]["method"] = {"type": "LoRA", "lora": {"rank": 32, "alpha": 64}}
    doc["spec"]["training"].update(epochs=8, learningRate="3e-3", batchSize=8, maxSeqLength=256)
    doc["spec"]["training"].pop("maxSteps", None)
    doc["spec"]["evaluation"]["maxExamples"] = 24
    doc["spec"]["evaluation"]["baselines"] = {"prompted": {"fewShot": 2}}
    doc["spec"]["evaluation"]["gates"] = [{"metric": "exact_match", "min": "0.5"}]
    return doc


def test_kubetune_run_on_s3_publishes_a_loadable_adapter(s3: S3Server, s3_inputs: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bucket = s3_inputs
    manifest = tmp_path / "finetune.yaml"
    manifest.write_text(yaml.safe_dump(_manifest(bucket, s3.endpoint_url)))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetune.cli",
            "run",
            str(manifest),
            "--run-id",
            "r1",
            "--work-dir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    prefix = f"s3://{bucket}/adapters/local/support-router/r1"
    assert summary["adapter"]["uri"] == prefix + "/adapter/"
    keys = set(storage.resolve(prefix, settings(s3)).store.list("adapters/local/support-router/r1/"))
    run = "adapters/local/support-router/r1/"
    for key in (
        "manifest.json",
        "progress.json",
        "data/report.json",
        "eval/report.json",
        "eval/report.md",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ):
        assert run + key in keys, key

    adapter = storage.fetch_dir(summary["adapter"]["uri"], tmp_path / "adapter", settings(s3))
    digest, _ = storage.digest_of_dir(adapter)
    assert digest == summary["adapter"]["digest"]
    base = storage.fetch_dir(f"s3://{bucket}/models/tiny", tmp_path / "base", settings(s3))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    assert model.peft_config["default"].r == 32


def test_unreachable_storage_exits_as_transient(tmp_path: Path, tiny_model: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]  # nothing listens once the socket is closed
    cfg = {
        "run_id": "r1",
        "output_uri": "s3://nowhere/runs/r1/",
        "lineage": {"name": "x"},
        "base_model": {"uri": f"file://{tiny_model}"},
        "dataset": {"train": f"file://{SUPPORT_DATA}/train.jsonl"},
        "storage": {"endpoint": f"http://127.0.0.1:{closed}", "attempts": 2},
        "work_dir": str(tmp_path / "w"),
    }
    env = {"PATH": "/usr/bin:/bin", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "HOME": str(tmp_path)}
    code, summary, output = run_trainer(json.dumps(cfg), tmp_path, env=env)
    assert code == ExitCode.STORAGE_UNAVAILABLE, output
    assert summary["reason"] == "StorageUnavailable"
    assert f"127.0.0.1:{closed}" in summary["message"] or "gave up" in summary["message"]


def test_hf_base_model_loads_through_the_hub_protocol(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from tests.cluster.hfhub import LocalHub

    shutil.copytree(tiny_model, tmp_path / "hub" / "acme" / "tiny-llama")
    hub = LocalHub(tmp_path / "hub")
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        fetched = storage.fetch_dir("hf://acme/tiny-llama", tmp_path / "fetched")
        assert storage.digest_of_dir(fetched) == storage.digest_of_dir(tiny_model)
        assert any("/acme/tiny-llama/resolve/" in r for r in hub.requests)
        with pytest.raises(Exception, match=r"404|not found|Repository"):
            storage.fetch_dir("hf://acme/missing", tmp_path / "missing")
    finally:
        hub.close()
