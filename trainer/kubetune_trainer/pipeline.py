"""One fine-tuning run, start to end: prepare → train → evaluate → publish.

This is what a training pod (and ``kubetune run`` on a laptop) executes. It is
restartable at any point: data preparation is deterministic, training resumes
from the newest complete checkpoint, and a run that already published returns
its recorded result instead of doing the work again.

Failures are classified so the operator can act on them (see
``docs/trainer.md``): bad input exits with ``ExitCode.BAD_INPUT`` and the Job
fails at once (a retry cannot fix a dataset); a storage outage is waited out
(``outage.py``: training goes on, what must reach the store after training
waits up to ``storage.outage_wait_seconds``), and only then exits
``ExitCode.STORAGE_UNAVAILABLE`` for the Job to retry; a fine-tune that misses
its gates is published as unpromotable and exits ``GATES_FAILED``.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from kubetune_trainer import outage, storage
from kubetune_trainer.config import DatasetConfig, TrainerConfig
from kubetune_trainer.contract import (
    EvaluationSummary,
    ExitCode,
    GateOutcome,
    Summary,
    TrainingSummary,
    summary_from_manifest,
)
from kubetune_trainer.progress import ProgressReporter

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class RunError(Exception):
    """A classified failure: an exit code, a CamelCase reason and a message for status."""

    def __init__(self, code: ExitCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


def _settings(cfg: TrainerConfig) -> storage.S3Settings:
    return storage.S3Settings(endpoint=cfg.storage.endpoint, region=cfg.storage.region, attempts=cfg.storage.attempts)


def data_file_names(cfg: TrainerConfig) -> dict[str, str]:
    """What messages and reports call each split's file (``name:line``): the user's file name, or the whole
    URI where two splits' files share a name (``s3://a/data.jsonl`` and ``s3://b/data.jsonl``)."""
    uris = {split: uri for split in ("train", "validation", "eval") if (uri := getattr(cfg.dataset, split))}
    short = {split: storage.uri_name(uri) for split, uri in uris.items()}
    return {split: uris[split] if list(short.values()).count(name) > 1 else name for split, name in short.items()}


def prepare(
    cfg: TrainerConfig, tokenizer: Any, progress: ProgressReporter, *, write_report: bool = True
) -> tuple[Any, dict[str, Any]]:
    """Fetch, validate and curate the data; write data/report.json. Returns (curation result, summary)."""
    from kubetune_trainer import data

    settings = _settings(cfg)
    work = Path(cfg.work_dir) / "data"
    loaded: dict[str, data.LoadResult] = {}
    names = data_file_names(cfg)
    for split in ("train", "validation", "eval"):
        uri = getattr(cfg.dataset, split)
        if uri is None:
            continue
        progress.stage("prepare", f"fetching {split} data")
        try:
            local = storage.fetch_file(uri, work / f"{split}.jsonl", settings)
        except storage.NotFoundError as e:
            raise RunError(ExitCode.BAD_INPUT, "DataNotFound", f"dataset.{split}: {e}") from e
        except storage.InvalidURIError as e:
            raise RunError(ExitCode.BAD_INPUT, "ConfigInvalid", f"dataset.{split}: {e}") from e
        loaded[split] = data.load_jsonl(local, cfg.dataset.format, name=names[split])

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
    check_enough(report, cfg.dataset)
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


def check_enough(report: dict[str, Any], dataset: DatasetConfig) -> None:
    """Refuse data that curation left too small to learn from, naming what was dropped and why."""
    from kubetune_trainer import data

    minimum = dataset.curation.min_train_examples
    splits = report["splits"]
    left = splits["train"]["examples"]
    if left >= minimum:
        return
    # eval_duplicate is about the eval file; everything else made train smaller.
    reasons = {k: v for k, v in report["dropped"].items() if v and k != "eval_duplicate"}
    dropped = ", ".join(f"{reason} {count}" for reason, count in reasons.items()) or "nothing"
    held = [
        f"{split} {splits[split]['examples']}" for split in ("validation", "eval") if getattr(dataset, split) is None
    ]
    raise data.DataError(
        f"dataset.train: {left} training example{'' if left == 1 else 's'} left after curation of its "
        f"{report['files']['train']['records']} records, fewer than dataset.curation.minTrainExamples ({minimum}); "
        f"dropped: {dropped}"
        + (f"; held out for {', '.join(held)}" if held else "")
        + " (data/report.json lists the dropped lines)"
    )


def _encode_all(tokenizer: Any, examples: Sequence[Any], max_len: int) -> list[Any]:
    from kubetune_trainer import data

    encoded = [data.encode(tokenizer, e, max_len) for e in examples]
    return [e for e in encoded if any(t != -100 for t in e.labels)]


@dataclass
class _Trained:
    """What training left for evaluation and publishing."""

    model: Any
    tokenizer: Any
    runtime: Any
    model_dir: Path
    model_digest: str
    curated: Any
    data_info: dict[str, Any]
    training: TrainingSummary
    trainable: int
    total: int


def run(cfg: TrainerConfig, *, progress_bar: bool | None = None) -> Summary | None:
    """Execute the whole run and return its summary; raises RunError for classified failures.

    Under torchrun every rank trains its share; rank 0 alone reports, evaluates
    and publishes, and the other ranks return None once training is done.
    """
    from kubetune_trainer import train

    world = train.init_world()
    try:
        return _run_in_world(cfg, world, progress_bar)
    finally:
        train.leave_world(world)


def _run_in_world(cfg: TrainerConfig, world: Any, progress_bar: bool | None) -> Summary | None:
    if world.size > 1:  # ranks on one node must not share download and checkpoint folders
        cfg = cfg.model_copy(update={"work_dir": str(Path(cfg.work_dir) / f"rank-{world.rank}")})
    settings = _settings(cfg)
    progress = ProgressReporter(
        storage.join(cfg.output_uri, "progress.json") if world.main else None,
        settings,
        interval=cfg.progress_interval_seconds,
        bar=progress_bar if world.main else False,
    )
    manifest_uri = storage.join(cfg.output_uri, "manifest.json")
    from kubetune_trainer import publish

    done = publish.published_manifest(cfg, settings)
    if done is not None:
        log.info("run %s already published; reporting its result", cfg.run_id)
        return summary_from_manifest(done, manifest_uri, cfg.run_id) if world.main else None
    trained = _train(cfg, settings, progress, world)
    if trained is None:
        return None
    evaluation = _evaluate(cfg, settings, progress, trained)
    manifest = _publish(cfg, settings, progress, trained, evaluation)
    return summary_from_manifest(manifest, manifest_uri, cfg.run_id)


def _fetch_base_model(cfg: TrainerConfig, settings: storage.S3Settings, progress: ProgressReporter) -> tuple[Path, str]:
    """The base model's local folder and its digest (checked against ``baseModel.digest``)."""
    progress.stage("prepare", "fetching the base model")
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = storage.fetch_dir(
            cfg.base_model.uri, work / "base-model", settings, revision=cfg.base_model.revision
        )
    except storage.NotFoundError as e:
        raise RunError(ExitCode.BAD_INPUT, "BaseModelNotFound", f"baseModel.uri: {e}") from e
    except storage.InvalidURIError as e:
        raise RunError(ExitCode.BAD_INPUT, "ConfigInvalid", f"baseModel.uri: {e}") from e
    model_digest, _ = storage.digest_of_dir(model_dir)
    if cfg.base_model.digest and cfg.base_model.digest != model_digest:
        raise RunError(
            ExitCode.BAD_INPUT,
            "BaseModelDigestMismatch",
            f"baseModel.digest is {cfg.base_model.digest} but the files at {cfg.base_model.uri} hash to {model_digest}",
        )
    return model_dir, model_digest


def _train(cfg: TrainerConfig, settings: storage.S3Settings, progress: ProgressReporter, world: Any) -> _Trained | None:
    """Fetch the base model and data, curate, train (resuming). None on ranks other than 0."""
    import torch

    from kubetune_trainer import data, modeling, train

    model_dir, model_digest = _fetch_base_model(cfg, settings, progress)
    tokenizer = modeling.load_tokenizer(model_dir)
    try:
        curated, data_info = prepare(cfg, tokenizer, progress, write_report=world.main)
    except data.DataError as e:
        raise RunError(ExitCode.BAD_INPUT, "DataInvalid", str(e)) from e

    runtime = modeling.pick_runtime(cfg.training.precision)
    log.info("device %s, %d CPU threads", runtime.device, torch.get_num_threads())
    base = modeling.load_base_model(model_dir, cfg.method, runtime)
    # The adapter's initial weights are drawn here: from the run's seed, not from whatever state
    # loading the base left the global generator in, so every rank and every rerun starts alike.
    torch.manual_seed(cfg.training.seed)
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
    training = TrainingSummary(
        steps=result.steps,
        epochs=result.epochs,
        final_loss=result.final_loss,
        final_eval_loss=result.final_eval_loss,
        tokens_per_second=round(result.tokens_per_second, 1),
        seconds=round(result.train_seconds, 1),
        resumed_from_step=result.resumed_from_step,
        precision=runtime.precision,
        device=runtime.device.type,
        world_size=world.size,
    )
    return _Trained(model, tokenizer, runtime, model_dir, model_digest, curated, data_info, training, trainable, total)


def _evaluate(
    cfg: TrainerConfig, settings: storage.S3Settings, progress: ProgressReporter, trained: _Trained
) -> tuple[EvaluationSummary, bool]:
    """Score the fine-tune and its baselines, write eval/report.{json,md}; (summary, gates passed)."""
    from kubetune_trainer import evaluate, modeling

    progress.stage("evaluate", "scoring the fine-tune and its baselines")
    general = evaluate.general_text_sample()
    if cfg.evaluation.general_text:
        uri, local = cfg.evaluation.general_text, Path(cfg.work_dir) / "general.txt"
        fetched = _durably(
            cfg, progress, "fetching evaluation.generalText", lambda: storage.fetch_file(uri, local, settings)
        )
        general = fetched.read_text("utf-8")
    runtime = modeling.for_evaluation(trained.runtime)  # fp32 on a CPU, whatever training used
    separate_base = (
        modeling.load_base_model(trained.model_dir, cfg.method, runtime) if cfg.method.type == "Full" else None
    )
    report = evaluate.run_evaluation(
        trained.model,
        separate_base,
        trained.tokenizer,
        trained.curated.eval,
        trained.curated.train,
        cfg.evaluation,
        runtime,
        max_seq_length=cfg.training.max_seq_length,
        seed=cfg.training.seed,
        general_text=general,
        on_candidate=lambda name: progress.stage("evaluate", f"scoring {name}"),
    )
    report_uri = storage.join(cfg.output_uri, "eval", "report.json")
    _durably(
        cfg, progress, "writing eval/report.json", lambda: storage.write_json(report_uri, report.as_json(), settings)
    )
    markdown = evaluate.markdown(report)
    loc = storage.resolve(storage.join(cfg.output_uri, "eval", "report.md"), settings)
    _durably(cfg, progress, "writing eval/report.md", lambda: loc.store.write_bytes(loc.key, markdown.encode()))
    log.info("\n%s", markdown)

    headline = report.headline
    tuned = report.candidates["fine_tuned"].metrics
    lines = [f"{headline} {tuned.get(headline, float('nan')):.4f}"]
    for name in ("prompted", "base"):
        if name in report.candidates:
            lines.append(f"{name} {report.candidates[name].metrics.get(headline, float('nan')):.4f}")
    failed = [f"{g.metric} {g.rule}: {g.message}" for g in report.gates if not g.passed]
    summary = EvaluationSummary(
        passed=report.passed,
        headline=headline,
        score=tuned.get(headline),
        metrics=tuned,
        baselines={k: v.metrics for k, v in report.candidates.items() if k != "fine_tuned"},
        gates=[GateOutcome.model_validate(asdict(g)) for g in report.gates],
        report_uri=report_uri,
        summary="; ".join(lines) + ("" if report.passed else " — gates failed: " + "; ".join(failed)),
    )
    return summary, report.passed


def _publish(
    cfg: TrainerConfig,
    settings: storage.S3Settings,
    progress: ProgressReporter,
    trained: _Trained,
    evaluated: tuple[EvaluationSummary, bool],
) -> dict[str, Any]:
    """Save and upload the adapter and its manifest (write-once); the manifest."""
    from kubetune_trainer import publish

    evaluation, passed = evaluated
    progress.stage("publish", "uploading the adapter")
    artifact = publish.save_artifact(trained.model, trained.tokenizer, cfg, Path(cfg.work_dir) / "artifact")
    _, files = storage.digest_of_dir(artifact)
    manifest = publish.build_manifest(
        cfg,
        files=files,
        base_model_digest=trained.model_digest,
        data={
            "summary": trained.data_info["summary"],
            "sources": trained.data_info["report"].get("files", {}),
        },
        training=trained.training.model_dump(mode="json", by_alias=True, exclude_none=True),
        evaluation=evaluation.model_dump(mode="json", by_alias=True, exclude_none=True),
        parameters={"trainable": trained.trainable, "total": trained.total},
        promotable=passed,
    )
    try:
        manifest = _durably(
            cfg, progress, "publishing", lambda: publish.publish_or_adopt(artifact, manifest, cfg, settings)
        )
    except storage.WriteOnceError as e:
        raise RunError(ExitCode.BAD_INPUT, "ArtifactConflict", str(e)) from e
    progress.stage("done", str((manifest.get("evaluation") or {}).get("summary") or evaluation.summary))
    progress.close()
    return manifest


def _durably(cfg: TrainerConfig, progress: ProgressReporter, what: str, fn: Callable[[], _T]) -> _T:
    """``fn()``, waiting out a storage outage for up to ``storage.outage_wait_seconds``.

    The wait is logged; progress.json is written again as soon as the store answers.
    """
    return outage.ride_out(
        fn, what=what, budget=cfg.storage.outage_wait_seconds, on_recover=lambda _waited: progress.flush()
    )


class TerminatedError(Exception):
    """SIGTERM arrived: the pod is being stopped (Job suspended, preempted, evicted, deleted)."""


def stop_on_sigterm() -> None:
    """Turn SIGTERM into :class:`TerminatedError` in the main thread, so the run stops at once.

    Where the trainer is PID 1 (a container without an init; training pods share
    their process namespace so the pause container is theirs), the kernel does not
    deliver a signal to a namespace's init unless it has a handler: without this, a
    suspended or preempted trainer would go on training (and could publish) for the
    whole grace period, until the kubelet's SIGKILL.
    """

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second one must not cut the clean-up short
        raise TerminatedError(f"stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)


def execute(cfg: TrainerConfig, *, termination_log: Path | None, progress_bar: bool | None = None) -> int:
    """Run, classify the outcome, write the termination message; return the exit code."""
    try:
        result = run(cfg, progress_bar=progress_bar)
        if result is None:  # a torchrun worker: rank 0 reports for the run
            return int(ExitCode.OK)
        summary = result
        code = ExitCode.OK if summary.phase == "Succeeded" else ExitCode.GATES_FAILED
    except Exception as e:
        summary, code = classify(e, cfg.run_id)
        if code == ExitCode.FAILED:
            log.exception("run failed")
        if not isinstance(e, storage.StorageError):  # keep the checkpoint whose upload is under way
            outage.finish_uploads(cfg.storage.outage_wait_seconds)
    announce(summary.to_json(), termination_log)
    return int(code)


_CPU_OOM = ("can't allocate memory", "not enough memory")


def classify(error: Exception, run_id: str) -> tuple[Summary, ExitCode]:
    """The termination summary and exit code of a run that raised ``error``."""
    import torch

    from kubetune_trainer.modeling import MethodConfigError, MethodUnavailableError

    def failed(reason: str, message: str, code: ExitCode) -> tuple[Summary, ExitCode]:
        return Summary.failed(reason, message, run_id), code

    if isinstance(error, RunError):
        return failed(error.reason, error.message, error.code)
    if isinstance(error, TerminatedError):
        message = f"{error}: the next pod resumes from the newest complete checkpoint"
        return failed("Terminated", message, ExitCode.TERMINATED)
    if isinstance(error, torch.cuda.OutOfMemoryError):
        advice = "lower training.batchSize or maxSeqLength, or enable gradientCheckpointing"
        return failed("OutOfMemory", f"GPU out of memory ({error}); {advice}", ExitCode.OUT_OF_MEMORY)
    if isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and any(s in str(error) for s in _CPU_OOM)):
        advice = "raise resources.memory, lower training.batchSize or maxSeqLength, or enable gradientCheckpointing"
        detail = str(error).strip() or type(error).__name__
        return failed("OutOfMemory", f"out of memory in host RAM ({detail[:300]}); {advice}", ExitCode.OUT_OF_MEMORY)
    if isinstance(error, MethodUnavailableError):
        return failed("MethodUnavailable", str(error), ExitCode.BAD_INPUT)
    if isinstance(error, MethodConfigError | storage.InvalidURIError):
        return failed("ConfigInvalid", str(error), ExitCode.BAD_INPUT)
    if isinstance(error, storage.StorageError):
        return failed("StorageUnavailable", str(error), ExitCode.STORAGE_UNAVAILABLE)
    return failed("TrainerError", f"{type(error).__name__}: {error}", ExitCode.FAILED)


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
