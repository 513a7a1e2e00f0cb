"""One fine-tuning run, start to end: prepare → train → evaluate → publish.

This is what a training pod (and ``kubetune run`` on a laptop) executes. It is
restartable at any point: data preparation is deterministic, training resumes
from the newest complete checkpoint, and a run that already published returns
its recorded result instead of doing the work again.

Failures are classified so the operator can act on them (see
``docs/trainer.md``): bad input exits with ``ExitCode.BAD_INPUT`` and the Job
fails at once (a retry cannot fix a dataset); storage trouble exits with
``ExitCode.STORAGE_UNAVAILABLE`` and the Job retries; a fine-tune that misses
its gates is published as unpromotable and exits ``GATES_FAILED``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from kubetune_trainer import storage
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.progress import ProgressReporter

log = logging.getLogger(__name__)


class ExitCode(IntEnum):
    """The trainer's exit codes; the operator's podFailurePolicy keys on them."""

    OK = 0
    FAILED = 1  # unexpected error: the Job retries within its backoffLimit
    USAGE = 2  # wrong command line (argparse)
    BAD_INPUT = 10  # invalid data, config or method for this hardware: never retried
    GATES_FAILED = 11  # trained and published, but the eval gates failed: not retried
    OUT_OF_MEMORY = 12  # GPU out of memory: the same settings fail again, not retried
    STORAGE_UNAVAILABLE = 75  # EX_TEMPFAIL: the store is unreachable, retried


BAD_INPUT_REASONS = (
    "ConfigInvalid",
    "DataInvalid",
    "DataNotFound",
    "BaseModelNotFound",
    "BaseModelDigestMismatch",
    "MethodUnavailable",
    "ArtifactConflict",
)


def exit_code_for(reason: str) -> ExitCode:
    """The exit code that goes with a summary's reason (``launch`` restores it after torchrun)."""
    if reason == "Succeeded":
        return ExitCode.OK
    if reason in BAD_INPUT_REASONS:
        return ExitCode.BAD_INPUT
    return {
        "EvalGateFailed": ExitCode.GATES_FAILED,
        "OutOfMemory": ExitCode.OUT_OF_MEMORY,
        "StorageUnavailable": ExitCode.STORAGE_UNAVAILABLE,
    }.get(reason, ExitCode.FAILED)


class RunError(Exception):
    """A classified failure: an exit code, a CamelCase reason and a message for status."""

    def __init__(self, code: ExitCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


@dataclass
class Summary:
    """The one-line JSON result: the termination message the operator reads."""

    phase: str
    reason: str
    message: str
    run_id: str
    adapter: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    def to_json(self, limit: int = 4096) -> str:
        """Compact JSON within the termination-message limit (the message is cut first)."""
        data = asdict(self)
        text = json.dumps(data, separators=(",", ":"), sort_keys=True)
        while len(text.encode()) > limit and len(data["message"]) > 20:
            data["message"] = data["message"][: len(data["message"]) // 2] + "..."
            text = json.dumps(data, separators=(",", ":"), sort_keys=True)
        if len(text.encode()) > limit:
            data = {k: data[k] for k in ("phase", "reason", "message", "run_id")}
            text = json.dumps(data, separators=(",", ":"), sort_keys=True)
        return text


def _settings(cfg: TrainerConfig) -> storage.S3Settings:
    return storage.S3Settings(endpoint=cfg.storage.endpoint, region=cfg.storage.region, attempts=cfg.storage.attempts)


def _summary_from_manifest(cfg: TrainerConfig, manifest: dict[str, Any]) -> Summary:
    evaluation = manifest.get("evaluation", {})
    passed = bool(manifest.get("promotable"))
    artifact = manifest["artifact"]
    return Summary(
        phase="Succeeded" if passed else "Failed",
        reason="Succeeded" if passed else "EvalGateFailed",
        message=evaluation.get("summary", ""),
        run_id=cfg.run_id,
        adapter={
            "uri": artifact["uri"],
            "digest": artifact["digest"],
            "sizeBytes": artifact["sizeBytes"],
            "trainableParams": manifest["parameters"]["trainable"],
            "manifestUri": storage.join(cfg.output_uri, "manifest.json"),
            "promotable": passed,
        },
        evaluation=evaluation,
        data=manifest.get("data", {}).get("summary", {}),
        training=manifest.get("training", {}),
    )


def prepare(
    cfg: TrainerConfig, tokenizer: Any, progress: ProgressReporter, *, write_report: bool = True
) -> tuple[Any, dict[str, Any]]:
    """Fetch, validate and curate the data; write data/report.json. Returns (curation result, summary)."""
    from kubetune_trainer import data

    settings = _settings(cfg)
    work = Path(cfg.work_dir) / "data"
    loaded: dict[str, data.LoadResult] = {}
    for split in ("train", "validation", "eval"):
        uri = getattr(cfg.dataset, split)
        if uri is None:
            continue
        progress.stage("prepare", f"fetching {split} data")
        try:
            local = storage.fetch_file(uri, work / f"{split}.jsonl", settings)
        except storage.NotFoundError as e:
            raise RunError(ExitCode.BAD_INPUT, "DataNotFound", f"dataset.{split}: {e}") from e
        loaded[split] = data.load_jsonl(local, cfg.dataset.format)

    data.ensure_chat_template(tokenizer)
    max_tokens = cfg.dataset.curation.max_tokens or cfg.training.max_seq_length

    def count_tokens(example: data.Example) -> int:
        return len(data.encode(tokenizer, example, 10**9).input_ids)

    progress.stage("prepare", "curating")
    curated = data.curate(
        loaded["train"].examples,
        validation=loaded["validation"].examples if "validation" in loaded else None,
        eval=loaded["eval"].examples if "eval" in loaded else None,
        count_tokens=count_tokens,
        config=data.CurationConfig(
            dedup=cfg.dataset.curation.dedup,
            near_duplicate_threshold=cfg.dataset.curation.near_duplicate_threshold,
            min_tokens=cfg.dataset.curation.min_tokens,
            max_tokens=max_tokens,
            remove_eval_leakage=cfg.dataset.curation.remove_eval_leakage,
            seed=cfg.training.seed,
        ),
        validation_split=cfg.dataset.validation_split,
        eval_split=cfg.dataset.eval_split,
    )
    report = data.build_report(loaded, curated, count_tokens)
    if write_report:
        storage.write_json(storage.join(cfg.output_uri, "data", "report.json"), report, settings)
    summary = {
        "train": len(curated.train),
        "validation": len(curated.validation),
        "eval": len(curated.eval),
        "dropped": {k: v for k, v in curated.dropped.items() if v},
        "digest": data.dataset_digest(curated.train),
        "reportUri": storage.join(cfg.output_uri, "data", "report.json"),
    }
    log.info("data: %s", summary)
    return curated, {"summary": summary, "report": report}


def _encode_all(tokenizer: Any, examples: Sequence[Any], max_len: int) -> list[Any]:
    from kubetune_trainer import data

    encoded = [data.encode(tokenizer, e, max_len) for e in examples]
    return [e for e in encoded if any(t != -100 for t in e.labels)]


def run(cfg: TrainerConfig, *, progress_bar: bool | None = None) -> Summary | None:
    """Execute the whole run and return its summary; raises RunError for classified failures.

    Under torchrun every rank trains its share; rank 0 alone reports, evaluates
    and publishes, and the other ranks return None once training is done.
    """
    from kubetune_trainer import data, evaluate, modeling, publish, train

    world = train.init_world()
    if world.size > 1:  # ranks on one node must not share download and checkpoint folders
        cfg = cfg.model_copy(update={"work_dir": str(Path(cfg.work_dir) / f"rank-{world.rank}")})
    settings = _settings(cfg)
    progress = ProgressReporter(
        storage.join(cfg.output_uri, "progress.json") if world.main else None,
        settings,
        interval=cfg.progress_interval_seconds,
        bar=progress_bar if world.main else False,
    )
    done = publish.published_manifest(cfg, settings)
    if done is not None:
        log.info("run %s already published; reporting its result", cfg.run_id)
        return _summary_from_manifest(cfg, done) if world.main else None

    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    progress.stage("prepare", "fetching the base model")
    try:
        model_dir = storage.fetch_dir(
            cfg.base_model.uri, work / "base-model", settings, revision=cfg.base_model.revision
        )
    except storage.NotFoundError as e:
        raise RunError(ExitCode.BAD_INPUT, "BaseModelNotFound", f"baseModel.uri: {e}") from e
    model_digest, _ = storage.digest_of_dir(model_dir)
    if cfg.base_model.digest and cfg.base_model.digest != model_digest:
        raise RunError(
            ExitCode.BAD_INPUT,
            "BaseModelDigestMismatch",
            f"baseModel.digest is {cfg.base_model.digest} but the files at {cfg.base_model.uri} hash to {model_digest}",
        )
    tokenizer = modeling.load_tokenizer(model_dir)
    try:
        curated, data_info = prepare(cfg, tokenizer, progress, write_report=world.main)
    except data.DataError as e:
        raise RunError(ExitCode.BAD_INPUT, "DataInvalid", str(e)) from e

    runtime = modeling.pick_runtime(cfg.training.precision)
    base = modeling.load_base_model(model_dir, cfg.method, runtime)
    model = modeling.apply_method(base, cfg.method, gradient_checkpointing=cfg.training.gradient_checkpointing)
    trainable, total = modeling.count_parameters(model)
    log.info(
        "method %s: %d of %d parameters trainable (%.2f%%)", cfg.method.type, trainable, total, 100 * trainable / total
    )
    max_len = cfg.training.max_seq_length
    result = train.train(
        model,
        _encode_all(tokenizer, curated.train, max_len),
        _encode_all(tokenizer, curated.validation, max_len),
        cfg,
        runtime,
        tokenizer.pad_token_id,
        progress,
        settings,
        world,
    )
    if not world.main:
        return None
    training = {
        "steps": result.steps,
        "epochs": result.epochs,
        "finalLoss": result.final_loss,
        "finalEvalLoss": result.final_eval_loss,
        "tokensPerSecond": round(result.tokens_per_second, 1),
        "seconds": round(result.train_seconds, 1),
        "resumedFromStep": result.resumed_from_step,
        "precision": runtime.precision,
        "device": runtime.device.type,
        "worldSize": world.size,
    }

    progress.stage("evaluate", "scoring the fine-tune and its baselines")
    general = evaluate.general_text_sample()
    if cfg.evaluation.general_text:
        general = storage.fetch_file(cfg.evaluation.general_text, work / "general.txt", settings).read_text("utf-8")
    separate_base = modeling.load_base_model(model_dir, cfg.method, runtime) if cfg.method.type == "Full" else None
    report = evaluate.run_evaluation(
        model,
        separate_base,
        tokenizer,
        curated.eval,
        curated.train,
        cfg.evaluation,
        runtime,
        max_seq_length=max_len,
        seed=cfg.training.seed,
        general_text=general,
        on_candidate=lambda name: progress.stage("evaluate", f"scoring {name}"),
    )
    report_uri = storage.join(cfg.output_uri, "eval", "report.json")
    storage.write_json(report_uri, report.as_json(), settings)
    markdown = evaluate.markdown(report)
    loc = storage.resolve(storage.join(cfg.output_uri, "eval", "report.md"), settings)
    loc.store.write_bytes(loc.key, markdown.encode())
    log.info("\n%s", markdown)

    headline = report.headline
    tuned = report.candidates["fine_tuned"].metrics
    lines = [f"{headline} {tuned.get(headline, float('nan')):.4f}"]
    for name in ("prompted", "base"):
        if name in report.candidates:
            lines.append(f"{name} {report.candidates[name].metrics.get(headline, float('nan')):.4f}")
    failed = [f"{g.metric} {g.rule}: {g.message}" for g in report.gates if not g.passed]
    evaluation = {
        "passed": report.passed,
        "headline": headline,
        "score": tuned.get(headline),
        "metrics": tuned,
        "baselines": {k: v.metrics for k, v in report.candidates.items() if k != "fine_tuned"},
        "gates": [asdict(g) for g in report.gates],
        "reportUri": report_uri,
        "summary": "; ".join(lines) + ("" if report.passed else " — gates failed: " + "; ".join(failed)),
    }

    progress.stage("publish", "uploading the adapter")
    artifact = publish.save_artifact(model, tokenizer, cfg, work / "artifact")
    _, files = storage.digest_of_dir(artifact)
    manifest = publish.build_manifest(
        cfg,
        files=files,
        base_model_digest=model_digest,
        data={
            "summary": data_info["summary"],
            "sources": data_info["report"].get("files", {}),
        },
        training=training,
        evaluation=evaluation,
        parameters={"trainable": trainable, "total": total},
        promotable=report.passed,
    )
    try:
        publish.publish(artifact, manifest, cfg, settings)
    except storage.WriteOnceError as e:
        raise RunError(ExitCode.BAD_INPUT, "ArtifactConflict", str(e)) from e
    progress.stage("done", str(evaluation["summary"]))
    progress.close()
    return _summary_from_manifest(cfg, manifest)


def execute(cfg: TrainerConfig, *, termination_log: Path | None, progress_bar: bool | None = None) -> int:
    """Run, classify the outcome, write the termination message; return the exit code."""
    import torch

    from kubetune_trainer.modeling import MethodConfigError, MethodUnavailableError

    try:
        result = run(cfg, progress_bar=progress_bar)
        if result is None:  # a torchrun worker: rank 0 reports for the run
            return int(ExitCode.OK)
        summary = result
        code = ExitCode.OK if summary.phase == "Succeeded" else ExitCode.GATES_FAILED
    except RunError as e:
        summary, code = Summary("Failed", e.reason, e.message, cfg.run_id), e.code
    except torch.cuda.OutOfMemoryError as e:
        message = f"GPU out of memory ({e}); lower training.batchSize or maxSeqLength, or enable gradientCheckpointing"
        summary, code = Summary("Failed", "OutOfMemory", message, cfg.run_id), ExitCode.OUT_OF_MEMORY
    except MethodUnavailableError as e:
        summary, code = Summary("Failed", "MethodUnavailable", str(e), cfg.run_id), ExitCode.BAD_INPUT
    except MethodConfigError as e:
        summary, code = Summary("Failed", "ConfigInvalid", str(e), cfg.run_id), ExitCode.BAD_INPUT
    except storage.StorageError as e:
        summary, code = Summary("Failed", "StorageUnavailable", str(e), cfg.run_id), ExitCode.STORAGE_UNAVAILABLE
    except Exception as e:
        log.exception("run failed")
        summary, code = Summary("Failed", "TrainerError", f"{type(e).__name__}: {e}", cfg.run_id), ExitCode.FAILED
    announce(summary.to_json(), termination_log)
    return int(code)


def announce(line: str, termination_log: Path | None) -> None:
    """Print the one-line JSON result and write it where Kubernetes reads the termination message."""
    print(line, flush=True)
    if termination_log is not None:
        try:
            termination_log.write_text(line)
        except OSError as e:
            log.warning("could not write the termination message to %s: %s", termination_log, e)


def default_termination_log() -> Path | None:
    """``$KUBETUNE_TERMINATION_LOG``, else Kubernetes' default path when it is writable."""
    env = os.environ.get("KUBETUNE_TERMINATION_LOG")
    if env:
        return Path(env)
    default = Path("/dev/termination-log")
    return default if default.exists() and os.access(default, os.W_OK) else None
