"""The trainer on local files: methods, publishing, resume, gates, and bad input.

Everything trains a real tiny Llama on the CPU (see the ``tiny_model``
fixture); nothing about torch, transformers or peft is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kubetune_trainer import data, evaluate, modeling, outage, pipeline, publish, storage, train
from kubetune_trainer.config import (
    EvaluationConfig,
    GateConfig,
    LiftOverConfig,
    MethodConfig,
    TrainerConfig,
)
from kubetune_trainer.pipeline import ExitCode
from kubetune_trainer.progress import ProgressReporter
from tests.conftest import SUPPORT_DATA, run_trainer


def make_config(tmp: Path, model: Path, **overrides: Any) -> TrainerConfig:
    """A small, fast run over the support-ticket data, all on file://."""
    cfg: dict[str, Any] = {
        "run_id": "run-1",
        "output_uri": f"file://{tmp}/out/run-1/",
        "lineage": {"namespace": "team-a", "name": "support-router", "uid": "uid-1", "generation": 1},
        "base_model": {"uri": f"file://{model}"},
        "dataset": {
            "train": f"file://{SUPPORT_DATA}/train.jsonl",
            "validation": f"file://{SUPPORT_DATA}/val.jsonl",
            "eval": f"file://{SUPPORT_DATA}/heldout.jsonl",
        },
        "method": {"type": "LoRA", "lora": {"rank": 32, "alpha": 64}},
        "training": {
            "epochs": 12,
            "learning_rate": 3e-3,
            "batch_size": 8,
            "max_seq_length": 256,
            "checkpoint_every_steps": 1000,
        },
        "evaluation": {"max_new_tokens": 8, "max_examples": 24, "prompted": {"few_shot": 2}},
        "work_dir": str(tmp / "work"),
        "progress_interval_seconds": 0.2,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return TrainerConfig.model_validate(cfg)


def run_cli(cfg: TrainerConfig, tmp: Path, name: str = "config.json") -> tuple[int, dict[str, Any], str]:
    """Run ``kubetune-trainer run`` as a pod would; return (exit code, termination summary, output)."""
    return run_trainer(cfg.model_dump_json(), tmp, name)


def local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


# ----------------------------------------------------------------------------- methods


def _curated(tokenizer: Any, limit: int = 96) -> tuple[list[data.Encoded], list[data.Encoded]]:
    train_set = data.load_jsonl(SUPPORT_DATA / "train.jsonl").examples[:limit]
    val_set = data.load_jsonl(SUPPORT_DATA / "val.jsonl").examples[:24]
    data.ensure_chat_template(tokenizer)
    return [data.encode(tokenizer, e, 256) for e in train_set], [data.encode(tokenizer, e, 256) for e in val_set]


def _adapted_model(model_dir: Path, cfg: TrainerConfig, gradient_checkpointing: bool = False) -> tuple[Any, Any, Any]:
    """(tokenizer, runtime, the base model wrapped by cfg.method), as the pipeline builds them."""
    tokenizer = modeling.load_tokenizer(model_dir)
    runtime = modeling.pick_runtime("auto")
    model = modeling.apply_method(
        modeling.load_base_model(model_dir, cfg.method, runtime),
        cfg.method,
        gradient_checkpointing=gradient_checkpointing,
    )
    return tokenizer, runtime, model


def _train(model: Any, tokenizer: Any, runtime: Any, cfg: TrainerConfig, train_set: Any, val_set: Any) -> Any:
    """train.train with no progress bar and no store."""
    progress = ProgressReporter(None, None, bar=False)
    return train.train(model, train_set, val_set, cfg, runtime, tokenizer.pad_token_id, progress, storage.S3Settings())


@pytest.mark.parametrize(("method", "lr"), [("LoRA", 3e-3), ("DoRA", 3e-3), ("Full", 1e-3)])
def test_method_trains_and_validation_loss_falls(tiny_model: Path, tmp_path: Path, method: str, lr: float) -> None:
    cfg = make_config(tmp_path, tiny_model, method={"type": method}, training={"max_steps": 12, "learning_rate": lr})
    tokenizer, runtime, model = _adapted_model(tiny_model, cfg)
    trainable, total = modeling.count_parameters(model)
    if method == "Full":
        assert trainable == total
    else:
        assert 0 < trainable < total / 2
    train_set, val_set = _curated(tokenizer)
    before = train.validation_loss(model, val_set, cfg, runtime, tokenizer.pad_token_id)
    result = _train(model, tokenizer, runtime, cfg, train_set, val_set)
    assert result.steps == 12
    assert result.final_eval_loss is not None
    assert result.final_eval_loss < 0.9 * before, (before, result.final_eval_loss)
    assert result.tokens_per_second > 0


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


def test_last_layers_adapts_only_the_top_blocks_and_backpropagates_no_further(tiny_model: Path, tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path, tiny_model, method={"type": "LoRA", "lora": {"last_layers": 1}}, training={"max_steps": 4}
    )
    tokenizer, runtime, model = _adapted_model(tiny_model, cfg)
    blocks = model.config.num_hidden_layers
    assert blocks > 1
    adapted = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {blocks - 1}
    needs_grad: dict[int, bool] = {}
    for i in (0, blocks - 1):
        block = model.get_base_model().model.layers[i]
        block.register_forward_hook(  # ever, over training's forwards (validation's run without a graph)
            lambda _m, _a, out, i=i: needs_grad.__setitem__(i, needs_grad.get(i, False) or _first(out).requires_grad)
        )
    train_set, val_set = _curated(tokenizer, limit=32)
    _train(model, tokenizer, runtime, cfg, train_set, val_set)
    assert needs_grad == {0: False, blocks - 1: True}  # no graph, so no backward, below the adapted block
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b
    assert all(p.abs().sum() > 0 for p in lora_b)  # the top block learned (B starts at zero)
    with pytest.raises(modeling.MethodConfigError, match=f"lastLayers {blocks + 1} is more than the {blocks} blocks"):
        modeling.adapted_layers(model, blocks + 1)
    assert modeling.adapted_layers(model, None) is None


def test_gradient_checkpointing_trains_too(tiny_model: Path, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, tiny_model, training={"max_steps": 4, "gradient_checkpointing": True})
    tokenizer, runtime, model = _adapted_model(tiny_model, cfg, gradient_checkpointing=True)
    train_set, val_set = _curated(tokenizer, 32)
    result = _train(model, tokenizer, runtime, cfg, train_set, val_set)
    assert result.steps == 4
    assert result.final_loss is not None
    assert result.final_loss == result.final_loss  # not NaN


def test_torchrun_data_parallel_on_cpu(tiny_model: Path, tmp_path: Path) -> None:
    """What a multi-node Job runs (torchrun), on two local processes over gloo: the same steps on the same
    examples as one process, so the same adapter up to the order of float sums."""
    from safetensors.torch import load_file

    cfg = make_config(
        tmp_path,
        tiny_model,
        # No adapter dropout: one process and two ranks would draw different masks.
        method={"type": "LoRA", "lora": {"rank": 32, "alpha": 64, "dropout": 0}},
        # fp32: the comparison below allows the float-sum order, not bf16's rounding (on a CPU with bf16, auto).
        training={"max_steps": 6, "checkpoint_every_steps": 3, "precision": "fp32"},
        evaluation={"max_new_tokens": 4, "max_examples": 4},
    )
    alone = cfg.model_copy(update={"output_uri": f"file://{tmp_path}/out/alone/", "work_dir": str(tmp_path / "w1")})
    assert run_cli(alone, tmp_path, "alone.json")[0] in (ExitCode.OK, ExitCode.GATES_FAILED)
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json())
    termination = tmp_path / "termination"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetune_trainer.cli",
            "launch",
            "--nproc-per-node=2",
            "--",
            "run",
            "--config",
            str(path),
            "--termination-log",
            str(termination),
            "--no-progress-bar",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    summary = json.loads(termination.read_text())  # written once, by rank 0
    # torchrun itself would exit 1 for a failed worker; launch restores the trainer's code.
    expected = ExitCode.OK if summary["reason"] == "Succeeded" else ExitCode.GATES_FAILED
    assert result.returncode == expected, result.stdout + result.stderr
    assert summary["training"]["worldSize"] == 2
    assert summary["training"]["steps"] == 6
    assert summary["adapter"]["digest"].startswith("sha256:")
    assert list(local(storage.join(cfg.output_uri, "checkpoints")).glob("step-*/COMPLETE"))
    one, two = (load_file(local(storage.join(c.output_uri, "checkpoints")) / "step-00000006" / "weights.safetensors")
                for c in (alone, cfg))  # fmt: skip
    assert one.keys() == two.keys()
    drift = max(float((one[k] - two[k]).abs().max() / one[k].abs().max()) for k in one)
    assert drift < 1e-3, drift


@pytest.mark.parametrize(
    ("batch", "size", "shares"),
    [
        ("abcdefgh", 1, ["abcdefgh"]),
        ("abcdefgh", 2, ["aceg", "bdfh"]),
        ("abcdefg", 2, ["aceg", "bdf"]),
        ("abc", 4, ["a", "b", "c", "a"]),  # the epoch's last batch: rank 3 borrows a unit
        ("a", 2, ["a", "a"]),
    ],
)
def test_every_rank_takes_its_share_of_the_global_batch(batch: str, size: int, shares: list[str]) -> None:
    """batchSize is global: the ranks' shares of a micro-batch together are the batch, each unit once."""
    got = ["".join(train._shard(list(batch), train.World(rank=r, size=size))) for r in range(size)]
    assert got == shares
    if len(batch) >= size:
        assert sorted("".join(got)) == sorted(batch)


@pytest.mark.parametrize(
    ("precision", "native_bf16", "autocast"),
    [
        ("auto", True, torch.bfloat16),
        ("bf16", True, torch.bfloat16),
        ("auto", False, None),
        ("fp32", True, None),
        ("bf16", False, "error"),
        ("fp16", True, "error"),
    ],
)
def test_cpu_precision_bf16_only_with_native_instructions(
    monkeypatch: pytest.MonkeyPatch, precision: str, native_bf16: bool, autocast: Any
) -> None:
    """This machine's CPU decides one row; the others are what a CPU with (or without) avx512_bf16 gets."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine picks the GPU")
    monkeypatch.setattr(modeling, "cpu_has_bf16", lambda: native_bf16)
    if autocast == "error":
        with pytest.raises(modeling.MethodUnavailableError, match=f"precision {precision} needs a CUDA GPU"):
            modeling.pick_runtime(precision)
        return
    runtime = modeling.pick_runtime(precision)
    assert (runtime.device.type, runtime.dtype, runtime.autocast) == ("cpu", torch.float32, autocast)
    scoring = modeling.for_evaluation(runtime)  # evaluation and serving: fp32 on a CPU
    assert (scoring.dtype, scoring.autocast, scoring.precision) == (torch.float32, None, "fp32")


def test_qlora_on_cpu_fails_fast_with_a_clear_reason(tiny_model: Path, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, tiny_model, method={"type": "QLoRA"})
    code, summary, _ = run_cli(cfg, tmp_path)
    assert code == ExitCode.BAD_INPUT
    assert summary["reason"] == "MethodUnavailable"
    assert "CUDA GPU" in summary["message"]


@pytest.mark.gpu
def test_qlora_trains_on_a_gpu(tiny_model: Path, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, tiny_model, method={"type": "QLoRA"}, training={"max_steps": 20})
    code, summary, output = run_cli(cfg, tmp_path)
    assert code in (ExitCode.OK, ExitCode.GATES_FAILED), output
    assert summary["reason"] in ("Succeeded", "EvalGateFailed"), output
    assert summary["training"]["device"] == "cuda"
    assert summary["adapter"]["trainableParams"] > 0


def test_published_adapter_reloads_with_identical_logits(tiny_model: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = make_config(tmp_path, tiny_model, training={"max_steps": 6})
    tokenizer, runtime, model = _adapted_model(tiny_model, cfg)
    train_set, val_set = _curated(tokenizer, 32)
    _train(model, tokenizer, runtime, cfg, train_set, val_set)
    artifact = publish.save_artifact(model, tokenizer, cfg, tmp_path / "artifact")
    assert (artifact / "adapter_config.json").is_file()
    assert (artifact / "adapter_model.safetensors").is_file()

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), artifact).eval()
    ids = torch.tensor([train_set[0].input_ids])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        actual = reloaded(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model)(input_ids=ids).logits
    assert torch.allclose(expected, actual, atol=1e-5)
    assert not torch.allclose(expected, base, atol=1e-3), "the adapter changed nothing"


def test_saved_adapter_bytes_do_not_depend_on_the_process(tiny_model: Path, tmp_path: Path) -> None:
    """PEFT writes target_modules in set order; string hashing differs per process (PYTHONHASHSEED)."""
    script = (
        "import sys; from pathlib import Path\n"
        "from kubetune_trainer import modeling, publish\n"
        "from kubetune_trainer.config import TrainerConfig\n"
        "cfg = TrainerConfig.model_validate_json(Path(sys.argv[1]).read_text())\n"
        "runtime = modeling.pick_runtime('fp32')\n"
        "model = modeling.apply_method(modeling.load_base_model(Path(sys.argv[2]), cfg.method, runtime), cfg.method,"
        " gradient_checkpointing=False)\n"
        "publish.save_artifact(model, None, cfg, Path(sys.argv[3]))\n"
    )
    (tmp_path / "config.json").write_text(make_config(tmp_path, tiny_model).model_dump_json())
    digests = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"artifact-{seed}"
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "config.json"), str(tiny_model), str(out)],
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            timeout=300,
        )
        digests.append(storage.sha256_file(out / "adapter_config.json"))
    assert len(set(digests)) == 1, digests


# ----------------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def finished_run(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainerConfig, dict[str, Any], str]:
    tmp = tmp_path_factory.mktemp("run")
    cfg = make_config(
        tmp,
        tiny_model,
        evaluation={
            "max_new_tokens": 8,
            "max_examples": 24,
            "prompted": {"few_shot": 2},
            "gates": [
                {"metric": "exact_match", "min": 0.5},
                {"metric": "exact_match", "min_lift_over": {"baseline": "prompted", "by": 0.2}},
            ],
        },
    )
    code, summary, output = run_cli(cfg, tmp)
    assert code == ExitCode.OK, output
    return cfg, summary, output


def test_run_beats_both_baselines_and_reports_cost(finished_run: tuple[TrainerConfig, dict[str, Any], str]) -> None:
    cfg, summary, _ = finished_run
    assert summary["phase"] == "Succeeded"
    report = json.loads(local(storage.join(cfg.output_uri, "eval", "report.json")).read_text())
    candidates = report["candidates"]
    tuned = candidates["fine_tuned"]["metrics"]["exact_match"]
    assert tuned > candidates["prompted"]["metrics"]["exact_match"]
    assert tuned > candidates["base"]["metrics"]["exact_match"]
    # The prompted baseline pays for its few-shot examples in prompt tokens.
    assert candidates["prompted"]["prompt_tokens_mean"] > 2 * candidates["fine_tuned"]["prompt_tokens_mean"]
    assert all(g["passed"] for g in report["gates"])
    assert set(report["general_perplexity"]) == {"fine_tuned", "base"}
    assert all(v > 1.0 for v in report["general_perplexity"].values())
    table = local(storage.join(cfg.output_uri, "eval", "report.md")).read_text()
    assert "| exact_match |" in table
    assert "prompt tokens (mean)" in table


def test_run_publishes_a_verifiable_adapter_with_lineage(
    finished_run: tuple[TrainerConfig, dict[str, Any], str],
) -> None:
    cfg, summary, _ = finished_run
    manifest = json.loads(local(storage.join(cfg.output_uri, "manifest.json")).read_text())
    folder = local(manifest["artifact"]["uri"])
    files = {p.relative_to(folder).as_posix(): storage.sha256_file(p) for p in folder.rglob("*") if p.is_file()}
    assert files == manifest["artifact"]["files"]
    assert storage.digest_of_files(files) == manifest["artifact"]["digest"] == summary["adapter"]["digest"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert manifest["lineage"] == {"namespace": "team-a", "name": "support-router", "uid": "uid-1", "generation": 1}
    assert manifest["baseModel"]["digest"] == storage.digest_of_dir(local(cfg.base_model.uri))[0]
    assert manifest["data"]["sources"]["train"]["digest"].startswith("sha256:")
    assert manifest["config"]["training"]["learning_rate"] == cfg.training.learning_rate
    assert {"torch", "transformers", "peft"} <= set(manifest["packages"])
    assert manifest["promotable"] is True


def test_run_reports_every_curation_rule(finished_run: tuple[TrainerConfig, dict[str, Any], str]) -> None:
    cfg, summary, _ = finished_run
    report = json.loads(local(storage.join(cfg.output_uri, "data", "report.json")).read_text())
    # The support data carries one fault of each kind (see its generate.py).
    for reason in ("invalid", "empty", "duplicate", "near_duplicate", "eval_leakage"):
        assert report["dropped"][reason] >= 1, reason
    assert summary["data"]["train"] == report["splits"]["train"]["examples"]


def test_progress_json_ends_complete(finished_run: tuple[TrainerConfig, dict[str, Any], str]) -> None:
    cfg, _, _ = finished_run
    progress = json.loads(local(storage.join(cfg.output_uri, "progress.json")).read_text())
    assert progress["stage"] == "done"
    assert progress["step"] == progress["total_steps"] > 0
    assert progress["percent"] == 100
    assert progress["tokens_per_second"] > 0
    assert progress["history"], "no validation-loss history"


def test_rerun_after_publish_reports_the_recorded_result(
    finished_run: tuple[TrainerConfig, dict[str, Any], str], tmp_path: Path
) -> None:
    cfg, summary, _ = finished_run
    started = time.monotonic()
    code, again, output = run_cli(cfg, tmp_path)
    assert code == ExitCode.OK, output
    assert again["adapter"] == summary["adapter"]
    assert "already published" in output
    assert time.monotonic() - started < 30


def test_a_run_stopped_before_its_manifest_publishes_the_same_adapter_without_training_again(
    finished_run: tuple[TrainerConfig, dict[str, Any], str], tmp_path: Path
) -> None:
    """What a pod killed (or a store failing) between the adapter upload and the manifest leaves: all but manifest.json.

    The rerun must load the final checkpoint rather than train again (on a GPU
    retraining gives other bytes, and published files are write-once).
    """
    import shutil

    cfg, summary, _ = finished_run
    copy = tmp_path / "out" / "run-1"
    shutil.copytree(local(cfg.output_uri), copy)
    (copy / "manifest.json").unlink()
    adapter_files = {p.name: storage.sha256_file(p) for p in (copy / "adapter").iterdir()}
    rerun = cfg.model_copy(update={"output_uri": f"file://{copy}/"})
    code, again, output = run_cli(rerun, tmp_path)
    assert code == ExitCode.OK, output
    assert "trained already: loaded the final checkpoint" in output
    steps = summary["training"]["steps"]
    assert again["training"]["resumedFromStep"] == again["training"]["steps"] == steps
    assert again["training"]["finalLoss"] == summary["training"]["finalLoss"]
    assert again["adapter"]["digest"] == summary["adapter"]["digest"]
    assert {p.name: storage.sha256_file(p) for p in (copy / "adapter").iterdir()} == adapter_files
    assert json.loads((copy / "manifest.json").read_text())["artifact"]["digest"] == summary["adapter"]["digest"]
    progress = json.loads((copy / "progress.json").read_text())
    assert progress["stage"] == "done"
    assert progress["history"], "the loss curve was lost on the rerun"


def test_failed_gates_publish_an_unpromotable_adapter(tiny_model: Path, tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path,
        tiny_model,
        training={"max_steps": 3},
        evaluation={"max_new_tokens": 4, "max_examples": 4, "gates": [{"metric": "perplexity", "max": 1.0}]},
    )
    code, summary, _ = run_cli(cfg, tmp_path)
    assert code == ExitCode.GATES_FAILED
    assert summary["reason"] == "EvalGateFailed"
    assert summary["adapter"]["promotable"] is False
    assert "perplexity" in summary["message"]
    manifest = json.loads(local(storage.join(cfg.output_uri, "manifest.json")).read_text())
    assert manifest["promotable"] is False
    assert local(manifest["artifact"]["uri"]).joinpath("adapter_model.safetensors").is_file()


def _run_until_a_checkpoint(cfg: TrainerConfig, tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    """``kubetune-trainer run`` in its own session, returned once its first checkpoint is complete."""
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json())
    command = [sys.executable, "-m", "kubetune_trainer.cli", "run", "--config", str(path), "--no-progress-bar", *args]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = local(storage.join(cfg.output_uri, "checkpoints"))
    deadline = time.monotonic() + 300
    try:
        while not list(checkpoints.glob("step-*/COMPLETE")):
            assert proc.poll() is None, "the trainer exited before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc, checkpoints


def test_sigkill_mid_training_resumes_from_the_last_checkpoint(tiny_model: Path, tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path,
        tiny_model,
        training={"max_steps": 80, "checkpoint_every_steps": 5},
        evaluation={"max_new_tokens": 4, "max_examples": 4},
    )
    proc, checkpoints = _run_until_a_checkpoint(cfg, tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.parent.name.removeprefix("step-")) for p in checkpoints.glob("step-*/COMPLETE"))
    assert not local(storage.join(cfg.output_uri, "manifest.json")).exists()

    code, summary, output = run_cli(cfg, tmp_path, "rerun.json")
    assert code in (ExitCode.OK, ExitCode.GATES_FAILED), output
    assert summary["training"]["resumedFromStep"] >= killed_at > 0
    assert summary["training"]["steps"] == 80
    assert "resumed from checkpoint" in output


def test_sigterm_stops_training_at_once_and_says_so(tiny_model: Path, tmp_path: Path) -> None:
    """A suspended or preempted pod gets SIGTERM: the trainer stops now, not at the kubelet's SIGKILL.

    (In a container the trainer is PID 1, which ignores a signal it has no handler for; the e2e
    suspend test covers that side on the real node.)
    """
    cfg = make_config(
        tmp_path,
        tiny_model,
        training={"max_steps": 5000, "checkpoint_every_steps": 5},
        evaluation={"max_new_tokens": 4, "max_examples": 4},
    )
    termination = tmp_path / "termination"
    proc, _ = _run_until_a_checkpoint(cfg, tmp_path, "--termination-log", str(termination))
    try:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert code == ExitCode.TERMINATED
    summary = json.loads(termination.read_text())
    assert (summary["phase"], summary["reason"]) == ("Failed", "Terminated")
    assert "resumes from the newest complete checkpoint" in summary["message"]
    assert not local(storage.join(cfg.output_uri, "manifest.json")).exists()


# ----------------------------------------------------------------------------- bad input


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return f"file://{path}"


@pytest.mark.parametrize(
    ("dataset", "names"),
    [
        (
            {"train": "s3://b/t/train.jsonl", "validation": "s3://b/t/val.jsonl", "eval": "s3://b/t/heldout.jsonl"},
            {"train": "train.jsonl", "validation": "val.jsonl", "eval": "heldout.jsonl"},
        ),
        ({"train": "pvc://data/tickets.jsonl", "validation": None, "eval": None}, {"train": "tickets.jsonl"}),
        (
            {
                "train": "s3://b/2026-10/data.jsonl",
                "validation": "s3://b/val.jsonl",
                "eval": "s3://b/2026-11/data.jsonl",
            },
            {"train": "s3://b/2026-10/data.jsonl", "validation": "val.jsonl", "eval": "s3://b/2026-11/data.jsonl"},
        ),
    ],
)
def test_data_files_are_named_as_the_user_named_them(dataset: dict[str, str], names: dict[str, str]) -> None:
    cfg = make_config(Path("/tmp"), Path("/tmp/model"), dataset=dataset)
    assert pipeline.data_file_names(cfg) == names


GOOD = [
    json.dumps({"prompt": f"Route this support ticket: case {i} about item {i * 7}", "response": "BILLING/REFUND"})
    for i in range(30)
]


@pytest.mark.parametrize(
    ("case", "reason", "needle"),
    [
        ("malformed-json", "DataInvalid", "tickets.jsonl:3"),  # the user's file name, not the fetched copy's
        ("wrong-fields", "DataInvalid", "train.jsonl:1"),
        ("empty-after-curation", "DataInvalid", "too_long"),
        ("eval-inside-train", "DataInvalid", "eval_leakage"),
        ("unknown-target-module", "ConfigInvalid", "method.lora.targetModules"),
        ("rank-above-hidden-size", "ConfigInvalid", "method.lora.rank"),
        ("missing-base-model", "BaseModelNotFound", "baseModel.uri"),
        ("missing-dataset", "DataNotFound", "dataset.train"),
        ("hub-dataset", "ConfigInvalid", "dataset.train: hf://acme/tickets"),
        ("parent-segments", "ConfigInvalid", "dataset.validation: file:///"),
        ("one-line-fifty-times", "DataInvalid", "dataset.curation.minTrainExamples (16)"),
    ],
)
def test_bad_input_fails_fast_naming_the_problem(
    tiny_model: Path, tmp_path: Path, case: str, reason: str, needle: str
) -> None:
    overrides: dict[str, Any] = {}
    train_uri = f"file://{SUPPORT_DATA}/train.jsonl"
    if case == "malformed-json":
        lines = list(GOOD)
        lines[2] = '{"prompt": "broken'
        lines[5] = "not json at all"
        train_uri = _write(tmp_path / "tickets.jsonl", lines)
    elif case == "wrong-fields":
        train_uri = _write(tmp_path / "train.jsonl", [json.dumps({"question": "q", "answer": "a"})] * 5)
    elif case == "empty-after-curation":
        overrides["dataset"] = {"curation": {"max_tokens": 3}}
    elif case == "eval-inside-train":
        train_uri = _write(tmp_path / "train.jsonl", GOOD)
        overrides["dataset"] = {"eval": _write(tmp_path / "eval.jsonl", GOOD)}
    elif case == "unknown-target-module":
        overrides["method"] = {"type": "LoRA", "lora": {"target_modules": ["q_proj", "attn_qkv"]}}
    elif case == "rank-above-hidden-size":
        overrides["method"] = {"type": "LoRA", "lora": {"rank": 512}}
    elif case == "missing-base-model":
        overrides["base_model"] = {"uri": f"file://{tmp_path}/no-such-model"}
    elif case == "missing-dataset":
        train_uri = f"file://{tmp_path}/no-such-train.jsonl"
    elif case == "hub-dataset":
        train_uri = "hf://acme/tickets"
    elif case == "parent-segments":
        overrides["dataset"] = {"validation": f"file://{SUPPORT_DATA}/../support/val.jsonl"}
    elif case == "one-line-fifty-times":
        train_uri = _write(tmp_path / "train.jsonl", [GOOD[0]] * 50)
        overrides["dataset"] = {"eval": f"file://{SUPPORT_DATA}/heldout.jsonl"}
    dataset = {"train": train_uri, **overrides.pop("dataset", {})}
    cfg = make_config(tmp_path, tiny_model, dataset=dataset, **overrides)
    started = time.monotonic()
    code, summary, output = run_cli(cfg, tmp_path)
    assert code == ExitCode.BAD_INPUT, output
    assert summary["reason"] == reason, summary
    assert needle in summary["message"], summary["message"]
    assert not local(storage.join(cfg.output_uri, "checkpoints")).exists(), "it trained on bad input"
    assert time.monotonic() - started < 60


def test_curation_minimum_names_every_drop_reason(tiny_model: Path, tmp_path: Path) -> None:
    """50 copies of one line used to train "successfully" on one example."""
    lines = [GOOD[0]] * 50 + ["not json"] + [json.dumps({"prompt": "p", "response": "..."})]
    cfg = make_config(tmp_path, tiny_model, dataset={"train": _write(tmp_path / "train.jsonl", lines)})
    code, summary, output = run_cli(cfg, tmp_path)
    assert code == ExitCode.BAD_INPUT, output
    assert summary["reason"] == "DataInvalid"
    message = summary["message"]
    assert message.startswith("dataset.train: 1 training example left after curation of its 52 records"), message
    assert "fewer than dataset.curation.minTrainExamples (16); dropped: invalid 1, empty 1, duplicate 49 (" in message
    report = json.loads(local(storage.join(cfg.output_uri, "data", "report.json")).read_text())
    assert report["dropped"]["duplicate"] == 49, "the report that names the dropped lines was not written"

    lowered = make_config(
        tmp_path,
        tiny_model,
        dataset={
            "train": cfg.dataset.train,
            "validation": f"file://{SUPPORT_DATA}/val.jsonl",
            "eval": f"file://{SUPPORT_DATA}/heldout.jsonl",
            "curation": {"min_train_examples": 1},
        },
        training={"max_steps": 1},
        evaluation={"max_new_tokens": 2, "max_examples": 1},
        output_uri=f"file://{tmp_path}/out/lowered/",
    )
    code, summary, output = run_cli(lowered, tmp_path, "lowered.json")
    assert code in (ExitCode.OK, ExitCode.GATES_FAILED), output
    assert summary["data"]["train"] == 1


@pytest.mark.parametrize(
    ("error", "reason", "code", "needle"),
    [
        (MemoryError(), "OutOfMemory", ExitCode.OUT_OF_MEMORY, "resources.memory"),
        ("cpu-allocation", "OutOfMemory", ExitCode.OUT_OF_MEMORY, "DefaultCPUAllocator"),
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), "OutOfMemory", ExitCode.OUT_OF_MEMORY, "GPU"),
        (storage.InvalidURIError("x://y: unsupported scheme"), "ConfigInvalid", ExitCode.BAD_INPUT, "x://y"),
        (storage.StorageError("gave up"), "StorageUnavailable", ExitCode.STORAGE_UNAVAILABLE, "gave up"),
        (outage.OutageTooLong("no answer"), "StorageUnavailable", ExitCode.STORAGE_UNAVAILABLE, "no answer"),
        (modeling.MethodUnavailableError("CUDA GPU"), "MethodUnavailable", ExitCode.BAD_INPUT, "CUDA"),
        (RuntimeError("boom"), "TrainerError", ExitCode.FAILED, "RuntimeError: boom"),
    ],
)
def test_failures_are_classified(error: Exception | str, reason: str, code: ExitCode, needle: str) -> None:
    if error == "cpu-allocation":  # what torch raises when host memory runs out
        with pytest.raises(RuntimeError) as raised:
            torch.empty(1 << 52, dtype=torch.uint8)
        error = raised.value
    assert isinstance(error, Exception)
    summary, got = pipeline.classify(error, "r1")
    assert (summary.reason, got) == (reason, code)
    assert needle in summary.message


def test_invalid_config_file_is_bad_input(tmp_path: Path) -> None:
    code, summary, _ = run_trainer(json.dumps({"run_id": "x"}), tmp_path)
    assert code == ExitCode.BAD_INPUT
    assert summary["reason"] == "ConfigInvalid"
    assert "output_uri" in summary["message"]


# ----------------------------------------------------------------------------- storage and gates


def test_publish_is_write_once(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"one")
    (src / "b.bin").write_bytes(b"two")
    uri = f"file://{tmp_path}/published"
    first = storage.publish_dir(src, uri)
    assert storage.publish_dir(src, uri) == first  # the same bytes again: a no-op
    (src / "a.bin").write_bytes(b"changed")
    (src / "c.bin").write_bytes(b"new")
    with pytest.raises(storage.WriteOnceError, match=r"a\.bin already exists with different content"):
        storage.publish_dir(src, uri)
    assert (tmp_path / "published" / "a.bin").read_bytes() == b"one"
    assert not (tmp_path / "published" / "c.bin").exists(), "a refused publish wrote something"


def _two_pods_artifacts(tmp_path: Path, first: bytes, second: bytes) -> tuple[TrainerConfig, Path, Path]:
    cfg = make_config(tmp_path, tmp_path / "model")
    folders = []
    for name, content in (("first", first), ("second", second)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(content)
        folders.append(folder)
    return cfg, folders[0], folders[1]


def _manifest(cfg: TrainerConfig, folder: Path, created: str) -> dict[str, Any]:
    files = {p.name: storage.sha256_file(p) for p in folder.iterdir()}
    evaluation = {"summary": f"published at {created}"}
    manifest = publish.build_manifest(
        cfg, files=files, base_model_digest="sha256:0", data={}, training={}, evaluation=evaluation,
        parameters={}, promotable=True,
    )  # fmt: skip
    return manifest | {"created": created}


@pytest.mark.parametrize("second_bytes", [b"same weights", b"other weights"])
def test_a_second_pod_of_a_run_adopts_the_manifest_the_first_published(tmp_path: Path, second_bytes: bytes) -> None:
    """Two pods of one run (a Job created again under a pod still running): the first to publish wins.

    The second one's manifest differs in its timestamps, and on a GPU its weights may too;
    either way it reports the published result instead of failing on write-once files.
    """
    cfg, first, second = _two_pods_artifacts(tmp_path, b"same weights", second_bytes)
    settings = storage.S3Settings()
    ours = _manifest(cfg, first, "t1")
    assert publish.publish_or_adopt(first, ours, cfg, settings, wait_seconds=0) == ours
    stored = local(storage.join(cfg.output_uri, "manifest.json")).read_bytes()
    adopted = publish.publish_or_adopt(second, _manifest(cfg, second, "t2"), cfg, settings, wait_seconds=0)
    assert adopted["created"] == "t1"
    assert adopted["artifact"]["digest"] == ours["artifact"]["digest"]
    assert local(storage.join(cfg.output_uri, "manifest.json")).read_bytes() == stored


def test_a_refused_publish_waits_for_the_other_pods_manifest_then_fails_without_one(tmp_path: Path) -> None:
    import threading

    cfg, first, second = _two_pods_artifacts(tmp_path, b"weights of pod one", b"weights of pod two")
    settings = storage.S3Settings()
    ours = _manifest(cfg, first, "t1")
    storage.publish_dir(first, storage.join(cfg.output_uri, "adapter"), settings)  # pod one, before its manifest
    late = threading.Timer(0.3, publish.publish, (first, ours, cfg, settings))
    late.start()
    adopted = publish.publish_or_adopt(second, _manifest(cfg, second, "t2"), cfg, settings, poll_seconds=0.05)
    late.join()
    assert adopted["created"] == "t1"

    other = make_config(tmp_path / "other", tmp_path / "model")
    storage.publish_dir(first, storage.join(other.output_uri, "adapter"), settings)  # a pod that died mid-publish
    started = time.monotonic()
    with pytest.raises(storage.WriteOnceError, match="already exists with different content"):
        publish.publish_or_adopt(second, _manifest(other, second, "t2"), other, settings, wait_seconds=0.3,
                                 poll_seconds=0.05)  # fmt: skip
    assert 0.3 <= time.monotonic() - started < 5


def _report(**candidates: dict[str, float]) -> evaluate.Report:
    return evaluate.Report(
        headline="exact_match",
        candidates={k: evaluate.CandidateResult(k, v, 10.0, 1.0) for k, v in candidates.items()},
        gates=[],
        passed=False,
        examples=10,
        general_perplexity={},
    )


@pytest.mark.parametrize(
    ("gate", "passed"),
    [
        (GateConfig(metric="exact_match", min=0.8), True),
        (GateConfig(metric="exact_match", min=0.95), False),
        (GateConfig(metric="loss", max=1.0), True),
        (GateConfig(metric="loss", max=0.5), False),
        (GateConfig(metric="exact_match", min_lift_over=LiftOverConfig(baseline="prompted", by=0.2)), True),
        (GateConfig(metric="exact_match", min_lift_over=LiftOverConfig(baseline="prompted", by=0.3)), False),
        (GateConfig(metric="loss", min_lift_over=LiftOverConfig(baseline="base", by=0.5)), True),
        (GateConfig(metric="perplexity", max_regression=0.1), True),
        (GateConfig(metric="perplexity", max_regression=0.01), False),
        (GateConfig(metric="token_f1", max_regression=0.0), True),
        (GateConfig(metric="json_valid", min=0.1), False),
    ],
)
def test_gate_decisions(gate: GateConfig, passed: bool) -> None:
    report = _report(
        fine_tuned={"exact_match": 0.9, "loss": 0.7, "perplexity": 10.5, "token_f1": 0.9},
        base={"exact_match": 0.1, "loss": 2.0, "perplexity": 10.0, "token_f1": 0.2},
        prompted={"exact_match": 0.65, "token_f1": 0.7},
    )
    result = evaluate.evaluate_gate(gate, report)
    assert result.passed is passed, result.message


def test_default_gates_require_strictly_beating_prompting() -> None:
    gates = evaluate.default_gates(EvaluationConfig())
    tie = _report(fine_tuned={"exact_match": 0.6}, base={"exact_match": 0.1}, prompted={"exact_match": 0.6})
    assert [evaluate.evaluate_gate(g, tie).passed for g in gates] == [False, True]
    win = _report(fine_tuned={"exact_match": 0.61}, base={"exact_match": 0.1}, prompted={"exact_match": 0.6})
    assert all(evaluate.evaluate_gate(g, win).passed for g in gates)


@pytest.mark.parametrize(
    ("fine_tuned", "baseline", "better", "worse"),
    [
        ([1, 1, 0, 0], [1, 0, 1, 0], 1, 1),
        ([1, 1, 1], [0, 0, 0], 3, 0),
        ([0.5, 0.25], [0.25, 0.5], 1, 1),  # token_f1-like scores compare per example too
        ([1, 0], [1, 0], 0, 0),
    ],
)
def test_paired_counts_the_examples_each_side_won(
    fine_tuned: list[float], baseline: list[float], better: int, worse: int
) -> None:
    assert evaluate.paired(fine_tuned, baseline) == (better, worse)


@pytest.mark.parametrize(
    ("better", "worse", "p"),
    [
        (0, 0, 1.0),  # a tie on every example: no evidence either way
        (1, 0, 0.5),
        (5, 0, 1 / 32),
        (0, 5, 1.0),
        (6, 2, 37 / 256),  # P(X >= 6), X ~ Binomial(8, 1/2) = (28 + 8 + 1) / 256
        (10, 10, 0.5880985260009766),
    ],
)
def test_sign_test_p(better: int, worse: int, p: float) -> None:
    assert evaluate.sign_test_p(better, worse) == pytest.approx(p)


def test_a_lift_gate_says_on_how_many_examples_the_fine_tune_won_and_lost() -> None:
    report = _report(fine_tuned={"exact_match": 0.75}, prompted={"exact_match": 0.5})
    report.candidates["fine_tuned"].per_example = {"exact_match": [1, 1, 1, 0]}
    report.candidates["prompted"].per_example = {"exact_match": [1, 0, 0, 1]}
    gate = GateConfig(metric="exact_match", min_lift_over=LiftOverConfig(baseline="prompted", by=0))
    result = evaluate.evaluate_gate(gate, report)
    assert result.passed
    assert (result.better, result.worse, result.p_value) == (2, 1, 0.5)
    assert result.message.endswith("better on 2, worse on 1 examples (one-sided sign test p=0.5)")
    # Other gates, and lift gates on a metric without per-example scores (loss), are worded as before.
    for other in (
        GateConfig(metric="exact_match", min=0.5),
        GateConfig(metric="loss", min_lift_over=LiftOverConfig(baseline="prompted", by=0)),
    ):
        plain = evaluate.evaluate_gate(other, report)
        assert plain.better is None
        assert "sign test" not in plain.message


@pytest.mark.parametrize(
    ("fine_tuned", "prompted", "significance", "passed", "why"),
    [
        # 5 wins, 0 losses: p = 1/32 = 0.031
        ([1] * 10, [1] * 5 + [0] * 5, 0.05, True, "p=0.0312, need <= 0.05"),
        ([1] * 10, [1] * 5 + [0] * 5, 0.01, False, "p=0.0312, need <= 0.01"),
        # one ticket decides the lift: it passes "by 0" alone, not with a significance test
        ([1] * 10, [1] * 9 + [0], None, True, "better on 1, worse on 0 examples (one-sided sign test p=0.5)"),
        ([1] * 10, [1] * 9 + [0], 0.05, False, "p=0.5, need <= 0.05"),
    ],
)
def test_a_lift_gate_with_significance_needs_a_win_chance_rarely_gives(
    fine_tuned: list[int], prompted: list[int], significance: float | None, passed: bool, why: str
) -> None:
    n = len(fine_tuned)
    report = _report(fine_tuned={"exact_match": sum(fine_tuned) / n}, prompted={"exact_match": sum(prompted) / n})
    report.candidates["fine_tuned"].per_example = {"exact_match": [float(x) for x in fine_tuned]}
    report.candidates["prompted"].per_example = {"exact_match": [float(x) for x in prompted]}
    lift = LiftOverConfig(baseline="prompted", by=0, significance=significance)
    result = evaluate.evaluate_gate(GateConfig(metric="exact_match", min_lift_over=lift), report)
    assert result.passed is passed, result.message
    assert why in result.message
    assert result.rule == "minLiftOver prompted by 0.0" + ("" if significance is None else f" at p <= {significance}")
    # However significant, a lift short of the margin fails.
    short = LiftOverConfig(baseline="prompted", by=0.6, significance=0.05)
    assert not evaluate.evaluate_gate(GateConfig(metric="exact_match", min_lift_over=short), report).passed


def test_misses_list_the_fine_tunes_wrong_answers_next_to_the_baselines() -> None:
    examples = [
        data.Example(({"role": "user", "content": f"ticket {i}"},), f"LABEL/{i}", f"heldout.jsonl:{i + 1}")
        for i in range(3)
    ]
    report = _report(fine_tuned={"exact_match": 1 / 3}, prompted={"exact_match": 2 / 3})
    report.candidates["fine_tuned"].per_example = {"exact_match": [1, 0, 0]}
    report.candidates["fine_tuned"].predictions = ["LABEL/0", "LABEL/9", "a | b"]
    report.candidates["prompted"].per_example = {"exact_match": [0, 1, 1]}
    report.candidates["prompted"].predictions = ["x", "LABEL/1", "LABEL/2"]
    report.misses = evaluate.misses(examples, report.candidates, "exact_match")
    assert [m["source"] for m in report.misses] == ["heldout.jsonl:2", "heldout.jsonl:3"]
    assert report.misses[0]["answers"] == {"fine_tuned": "LABEL/9", "prompted": "LABEL/1"}
    assert report.misses[0]["exact_match"] == {"fine_tuned": 0, "prompted": 1}
    assert evaluate.misses(examples, report.candidates, "exact_match", limit=1) == report.misses[:1]
    text = evaluate.markdown(report)
    assert "the first 2 of 2" in text
    assert "| heldout.jsonl:3 | LABEL/2 | a \\| b | LABEL/2 |" in text


@pytest.mark.parametrize(
    ("metric", "prediction", "reference", "score"),
    [
        ("exact_match", " Billing/Refund. ", "BILLING/REFUND", 1.0),
        ("exact_match", "BILLING", "BILLING/REFUND", 0.0),
        ("token_f1", "the cat sat", "the cat sat down", 2 * 1.0 * 0.75 / 1.75),
        ("contains", "it is BILLING/REFUND I think", "billing/refund", 1.0),
        ("json_valid", '{"a": 1}', "", 1.0),
        ("json_valid", "{a: 1}", "", 0.0),
        ("json_field_match", '{"a": 1, "b": 3}', '{"a": 1, "b": 2}', 0.5),
        ("json_field_match", "nope", '{"a": 1}', 0.0),
    ],
)
def test_metrics(metric: str, prediction: str, reference: str, score: float) -> None:
    assert evaluate.TEXT_METRICS[metric](prediction, reference) == pytest.approx(score)


@pytest.mark.parametrize(
    ("context", "max_seq_length", "max_new_tokens", "budget"),
    [
        (8192, 256, 8, 8184),  # a few-shot prompt may be longer than a training row
        (None, 256, 8, 248),  # a model that does not say: the training bound
        (128, 256, 8, 248),  # never below the training bound
        (8192, 20, 8192, 16),  # a floor, so something is always asked
    ],
)
def test_prompt_budget_is_the_models_context_less_the_answer(
    context: int | None, max_seq_length: int, max_new_tokens: int, budget: int
) -> None:
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=context))
    assert evaluate.prompt_budget(model, max_seq_length, max_new_tokens) == budget


def test_references_longer_than_the_generation_budget_are_reported(tiny_model: Path) -> None:
    tokenizer = modeling.load_tokenizer(tiny_model)
    examples = data.load_jsonl(SUPPORT_DATA / "heldout.jsonl").examples
    lengths = [len(tokenizer(e.response, add_special_tokens=False)["input_ids"]) for e in examples]
    longest = max(lengths)
    assert evaluate.cut_off_note(tokenizer, examples, longest) is None
    note = evaluate.cut_off_note(tokenizer, examples, longest - 1)
    assert note is not None
    cut = sum(n == longest for n in lengths)
    assert note.startswith(
        f"{cut} of {len(examples)} references are longer than evaluation.maxNewTokens ({longest - 1})"
    )
    assert note.endswith(f"set maxNewTokens to at least {longest}")


def test_method_config_defaults_target_the_architecture(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert modeling.target_modules(model, None) == modeling.TARGET_MODULES["llama"]
    assert modeling.target_modules(model, ["q_proj"]) == ["q_proj"]
    with pytest.raises(modeling.MethodConfigError, match="targetModules: nope not found"):
        modeling.check_lora_fits(model, ["nope"], 8)
    assert MethodConfig().type == "LoRA"
