"""The trainer against the loopback S3 server: storage operations, faults, and a whole run on s3://."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_trainer import storage
from kubetune_trainer.contract import ExitCode
from tests.cluster.faults import FaultProxy, Rule
from tests.cluster.s3 import S3Server
from tests.conftest import ROOT, SUPPORT_DATA, run_trainer

# standalone: the trainer against S3, no kubetune object on the cluster (tests/e2e/lanes.py)
pytestmark = pytest.mark.standalone

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


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_transient_errors_are_retried_for_file_transfers(s3: S3Server, bucket: str, tmp_path: Path, mode: str) -> None:
    """Checkpoints and models go up and down as files (boto3's transfer manager wraps its errors differently)."""
    src = tmp_path / "checkpoint"
    src.mkdir()
    (src / "weights.safetensors").write_bytes(b"w" * 1000)
    proxy = FlakyProxy(s3.endpoint_url, failures=2, mode=mode)
    try:
        flaky = storage.S3Settings(endpoint=proxy.endpoint, region=s3.region, attempts=4)
        files = storage.upload_dir(src, f"s3://{bucket}/ckpt", flaky)
        assert proxy.failed == 2
        proxy.remaining = 2
        back = storage.fetch_dir(f"s3://{bucket}/ckpt", tmp_path / "back", flaky)
        assert proxy.failed == 4
        assert storage.sha256_file(back / "weights.safetensors") == files["weights.safetensors"]
        proxy.remaining = 1000
        with pytest.raises(storage.StorageError, match="gave up after 4 attempts"):
            storage.upload_dir(src, f"s3://{bucket}/ckpt2", flaky)
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


def test_fetch_refuses_keys_that_lead_out_of_the_destination(s3: S3Server, bucket: str, tmp_path: Path) -> None:
    """S3 keys are plain strings: a bucket can hold ``model/../../x``, which must not land in ``dest/../../x``."""
    client = s3.client()
    client.put_object(Bucket=bucket, Key="model/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="model/../../escaped.txt", Body=b"owned")
    assert "model/../../escaped.txt" in storage.resolve(f"s3://{bucket}/", settings(s3)).store.list("model/")
    dest = tmp_path / "work" / "cache" / "model"
    with pytest.raises(storage.InvalidURIError, match=r"refusing to fetch '\.\./\.\./escaped\.txt'"):
        storage.fetch_dir(f"s3://{bucket}/model", dest, settings(s3))
    assert not (tmp_path / "work" / "escaped.txt").exists()


# ----------------------------------------------------------------------------- outages during a run


def _run_config(bucket: str, endpoint: str, work: Path, **storage_cfg: Any) -> dict[str, Any]:
    """A short LoRA run with everything on s3:// through ``endpoint`` (the fault proxy)."""
    return {
        "run_id": "r1",
        "output_uri": f"s3://{bucket}/runs/r1/",
        "lineage": {"name": "outage"},
        "base_model": {"uri": f"s3://{bucket}/models/tiny/"},
        "dataset": {
            "train": f"s3://{bucket}/datasets/support/train.jsonl",
            "validation": f"s3://{bucket}/datasets/support/val.jsonl",
            "eval": f"s3://{bucket}/datasets/support/heldout.jsonl",
        },
        "training": {"max_steps": 30, "checkpoint_every_steps": 5, "batch_size": 8, "max_seq_length": 256},
        "evaluation": {"max_new_tokens": 4, "max_examples": 4, "prompted": {"few_shot": 1}},
        "storage": {"endpoint": endpoint, **storage_cfg},
        "progress_interval_seconds": 0.5,
        "work_dir": str(work),
    }


def _checkpoints(s3: S3Server, bucket: str) -> dict[int, set[str]]:
    """Step -> file names of every checkpoint in the store, complete or not."""
    found: dict[int, set[str]] = {}
    for key in storage.resolve(f"s3://{bucket}/", settings(s3)).store.list("runs/r1/checkpoints/"):
        step, name = key.removeprefix("runs/r1/checkpoints/step-").split("/", 1)
        found.setdefault(int(step), set()).add(name)
    return found


def _wait_for(what: str, condition: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the trainer exited while waiting for {what}: {proc.communicate()[0]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_storage_outage_mid_training_loses_no_work(s3: S3Server, s3_inputs: str, tmp_path: Path) -> None:
    """S3 goes away after the first checkpoint and stays away until training is over (and a while longer).

    Training goes on through the outage with its checkpoints kept on local
    disk; the trainer then waits for the store, uploads the final checkpoint
    and publishes, within the same pod: the same number of steps, nothing redone.
    """
    bucket = s3_inputs
    work = tmp_path / "w"
    termination = tmp_path / "termination"
    with FaultProxy(s3.endpoint_url, host=s3.host) as proxy:
        cfg = _run_config(bucket, proxy.url, work, attempts=2, outage_wait_seconds=300)
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        command = [sys.executable, "-m", "kubetune_trainer.cli", "run", "--config", str(tmp_path / "config.json")]
        proc = subprocess.Popen(
            [*command, "--termination-log", str(termination), "--no-progress-bar"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            _wait_for("the first checkpoint", lambda: "COMPLETE" in _checkpoints(s3, bucket).get(5, set()), proc)
            down = proxy.add(Rule("reset"))
            down_at = time.monotonic()
            final = work / "checkpoints" / "step-00000030" / "position.json"
            _wait_for("the final checkpoint on local disk", final.exists, proc)
            time.sleep(5)  # training is done; the trainer now waits for the store
            assert proc.poll() is None, "the trainer gave up during the outage"
            proxy.remove(down)
            outage_seconds = time.monotonic() - down_at
            output, _ = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    summary = json.loads(termination.read_text())
    assert proc.returncode in (ExitCode.OK, ExitCode.GATES_FAILED), output
    assert down.hits > 0
    assert summary["training"]["steps"] == 30
    assert "resumedFromStep" not in summary["training"], "training restarted"
    assert "kept on local disk: the store did not answer" in output
    checkpoints = _checkpoints(s3, bucket)
    assert all("COMPLETE" in files for files in checkpoints.values()), checkpoints
    assert {5, 30} <= set(checkpoints), checkpoints  # the last one before the outage and the final one
    assert {"weights.safetensors", "position.json"} <= checkpoints[30]
    assert not list((work / "checkpoints").glob("step-*")), "uploaded checkpoints stay on local disk"
    progress = storage.read_json(f"s3://{bucket}/runs/r1/progress.json", settings(s3))
    assert progress["stage"] == "done"
    assert progress["step"] == 30
    measured = {"outage_seconds": round(outage_seconds, 1), "refused": down.hits, "checkpoints": sorted(checkpoints)}
    print(json.dumps(measured))


def test_publish_interrupted_before_the_manifest_converges_on_the_same_adapter(
    s3: S3Server, s3_inputs: str, tmp_path: Path
) -> None:
    """The store refuses manifest.json after the adapter went up: exit 75; the rerun publishes the same bytes."""
    bucket = s3_inputs
    store = storage.resolve(f"s3://{bucket}/", settings(s3)).store
    with FaultProxy(s3.endpoint_url, host=s3.host) as proxy:
        cfg = _run_config(bucket, proxy.url, tmp_path / "w", attempts=1, outage_wait_seconds=2)
        with proxy.fault(Rule("refuse", verb="PUT", path=r"/runs/r1/manifest\.json$", status=503)) as refused:
            code, summary, output = run_trainer(json.dumps(cfg), tmp_path)
        assert code == ExitCode.STORAGE_UNAVAILABLE, output
        assert refused.hits >= 2, "the publish was not retried through the outage"
        assert summary["reason"] == "StorageUnavailable"
        assert "publishing: the store did not answer" in summary["message"]
        first = {key: store.stored_sha256(key) or "" for key in store.list("runs/r1/adapter/")}
        assert first, "the adapter was not uploaded before the manifest"
        assert store.stored_sha256("runs/r1/manifest.json") is None

        code, summary, output = run_trainer(json.dumps(cfg), tmp_path, "rerun.json")
    assert code in (ExitCode.OK, ExitCode.GATES_FAILED), output
    assert "trained already: loaded the final checkpoint" in output
    assert summary["training"]["resumedFromStep"] == summary["training"]["steps"] == 30
    files = {key.removeprefix("runs/r1/adapter/"): digest for key, digest in first.items()}
    assert summary["adapter"]["digest"] == storage.digest_of_files(files)
    assert {key: store.stored_sha256(key) for key in store.list("runs/r1/adapter/")} == first
