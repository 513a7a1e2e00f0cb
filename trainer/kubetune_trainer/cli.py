"""The ``kubetune-trainer`` command: the entrypoint of training (and later serving) pods.

    kubetune-trainer run --config /etc/kubetune/config.json

runs one fine-tune end to end (see :mod:`kubetune_trainer.pipeline`), prints
a one-line JSON summary and writes it to the termination-message path.
Exit codes are listed in :class:`kubetune_trainer.contract.ExitCode`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from kubetune_trainer import __version__
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.contract import ExitCode, Summary

if TYPE_CHECKING:
    from kubetune_trainer.storage import S3Settings

_V = TypeVar("_V")


def _load_config(path: str) -> TrainerConfig:
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    return TrainerConfig.model_validate(json.loads(text))


def _run(args: argparse.Namespace) -> int:
    from kubetune_trainer.pipeline import default_termination_log, execute, stop_on_sigterm

    termination_log = Path(args.termination_log) if args.termination_log else default_termination_log()
    try:
        cfg = _load_config(args.config)
    except (OSError, ValueError, ValidationError) as e:
        summary = Summary.failed("ConfigInvalid", f"{args.config}: {e}", "")
        print(summary.to_json(), flush=True)
        if termination_log is not None:
            termination_log.write_text(summary.to_json())
        return int(ExitCode.BAD_INPUT)
    if args.work_dir:
        cfg = cfg.model_copy(update={"work_dir": args.work_dir})
    bar = False if args.no_progress_bar else None
    stop_on_sigterm()
    return execute(cfg, termination_log=termination_log, progress_bar=bar)


def _launch(args: argparse.Namespace) -> int:
    """torchrun, but with the trainer's exit code: the Job's podFailurePolicy keys on it.

    torchrun reports any failed worker as exit 1. Rank 0 writes the run's
    summary to the termination log; its reason says which code the run meant.
    """
    import subprocess

    trainer_args = list(args.trainer_args)
    if trainer_args[:1] == ["--"]:
        trainer_args = trainer_args[1:]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={args.nnodes}",
        f"--nproc-per-node={args.nproc_per_node}",
    ]
    if args.nnodes > 1:
        torchrun += [
            f"--node-rank={args.node_rank}",
            f"--master-addr={args.master_addr}",
            f"--master-port={args.master_port}",
        ]
    else:
        torchrun.append("--standalone")
    child = subprocess.Popen([*torchrun, "-m", "kubetune_trainer.cli", *trainer_args])
    # PID 1 in the pod: pass SIGTERM on to torchrun (which stops its workers) instead of ignoring it.
    signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum))
    code = child.wait()
    if code == 0 or "--termination-log" not in trainer_args:
        return code
    log_path = Path(trainer_args[trainer_args.index("--termination-log") + 1])
    try:
        summary = Summary.parse(log_path.read_text())
    except OSError:
        return code
    return int(summary.exit_code) if summary is not None and summary.exit_code else code


def _digest(value: str) -> str:
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a digest (sha256: and 64 lowercase hex digits)")
    return value


def _named(kind: Callable[[str], _V]) -> Callable[[str], tuple[str, _V]]:
    """An argparse type for NAME=VALUE."""

    def parse(text: str) -> tuple[str, _V]:
        name, sep, value = text.partition("=")
        if not sep or not name or not value:
            raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
        return name, kind(value)

    return parse


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def _storage_settings(endpoint: str | None, region: str | None) -> S3Settings:
    from kubetune_trainer import storage

    # Credentials stay in the environment (AWS_ACCESS_KEY_ID, ...), where boto3 reads them.
    return storage.S3Settings(
        endpoint=endpoint or os.environ.get("KUBETUNE_STORAGE_ENDPOINT") or None,
        region=region or os.environ.get("AWS_REGION") or "us-east-1",
    )


def _serve(args: argparse.Namespace) -> int:
    from kubetune_trainer.serve import ServeOptions, serve

    base_name = args.base_model_name or args.base_model.resolve().name
    adapters: dict[str, Path] = {}
    for name, folder in args.adapter:
        if name in adapters or name == base_name:
            print(f"kubetune-trainer serve: model name {name!r} is used twice (base and adapters)", file=sys.stderr)
            return int(ExitCode.USAGE)
        adapters[name] = folder
    digests = dict(args.adapter_digest)
    unknown = sorted(set(digests) - set(adapters))
    if unknown:
        print(f"kubetune-trainer serve: --adapter-digest for unknown adapter(s): {', '.join(unknown)}", file=sys.stderr)
        return int(ExitCode.USAGE)
    missing = [str(p) for p in (args.base_model, *adapters.values()) if not p.is_dir()]
    if missing:
        print(f"kubetune-trainer serve: not a folder: {', '.join(missing)}", file=sys.stderr)
        return int(ExitCode.BAD_INPUT)
    options = ServeOptions(
        base_model=args.base_model,
        base_model_name=base_name,
        adapters=adapters,
        adapter_digests=digests,
        host=args.host,
        port=args.port,
        max_tokens_limit=args.max_tokens_limit,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
    )
    return serve(options)


def _fetch(args: argparse.Namespace) -> int:
    from kubetune_trainer import storage
    from kubetune_trainer.serve import DigestMismatchError, fetch

    try:
        digest = fetch(args.uri, args.dir, args.digest, _storage_settings(args.endpoint, args.region))
    except (DigestMismatchError, storage.NotFoundError, storage.InvalidURIError) as e:
        # A missing or different artifact stays so on a retry: bad input, as for a training run.
        print(f"kubetune-trainer fetch: {e}", file=sys.stderr)
        return int(ExitCode.BAD_INPUT)
    except (storage.StorageError, OSError) as e:
        print(f"kubetune-trainer fetch: {args.uri}: {e}", file=sys.stderr)
        return int(ExitCode.STORAGE_UNAVAILABLE)
    print(json.dumps({"uri": args.uri, "dir": str(args.dir), "digest": digest}), flush=True)
    return int(ExitCode.OK)


def _eval_endpoint(args: argparse.Namespace) -> int:
    from kubetune_trainer.endpoint_eval import Client, evaluate_endpoint, report
    from kubetune_trainer.pipeline import default_termination_log

    client = Client(args.endpoint, args.model, args.max_tokens, timeout=args.timeout, attempts=args.connect_attempts)
    summary, code = evaluate_endpoint(
        client,
        args.dataset,
        args.metric,
        args.min,
        max_examples=args.max_examples,
        settings=_storage_settings(args.storage_endpoint, args.region),
    )
    report(summary, Path(args.termination_log) if args.termination_log else default_termination_log())
    return int(code)


def _import_gguf(args: argparse.Namespace) -> int:
    from kubetune_trainer.gguf_import import GGUFImportError, import_gguf

    try:
        out = import_gguf(args.file, args.out, overwrite=args.overwrite)
    except GGUFImportError as e:
        print(f"kubetune-trainer import-gguf: {e}", file=sys.stderr)
        return int(ExitCode.BAD_INPUT)
    print(json.dumps({"source": str(args.file), "model": str(out)}), flush=True)
    return int(ExitCode.OK)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune-trainer", description="kubetune's training and serving workload.")
    parser.add_argument("--version", action="version", version=f"kubetune-trainer {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_launch, _add_serve, _add_fetch, _add_eval_endpoint, _add_import_gguf):
        add(sub)
    return parser


def _add_run(sub: Any) -> None:
    run = sub.add_parser("run", help="run one fine-tune: prepare, train, evaluate, publish")
    run.add_argument("--config", required=True, help="TrainerConfig JSON file, or - for stdin")
    run.add_argument(
        "--termination-log",
        help="where to write the JSON summary (default: $KUBETUNE_TERMINATION_LOG, else /dev/termination-log)",
    )
    run.add_argument("--work-dir", help="local scratch folder (overrides the config's work_dir)")
    run.add_argument("--no-progress-bar", action="store_true", help="never draw a progress bar")
    run.set_defaults(func=_run)


def _add_launch(sub: Any) -> None:
    launch = sub.add_parser(
        "launch",
        help="run `run` under torchrun (several GPUs or nodes), keeping the trainer's exit code",
        description="Example: kubetune-trainer launch --nproc-per-node 8 -- run --config config.json",
    )
    launch.add_argument("--nnodes", type=int, default=1, help="nodes (default 1)")
    launch.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per node (default 1)")
    launch.add_argument("--node-rank", type=int, default=0, help="this node's rank (multi-node)")
    launch.add_argument("--master-addr", default="127.0.0.1", help="rank 0's address (multi-node)")
    launch.add_argument("--master-port", type=int, default=29500, help="rendezvous port (multi-node)")
    launch.add_argument("trainer_args", nargs=argparse.REMAINDER, help="-- then the trainer's arguments")
    launch.set_defaults(func=_launch)


def _add_serve(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve a base model and its PEFT adapters with an OpenAI-compatible API (reference server)",
        description="Example: kubetune-trainer serve --base-model /models/base --adapter support-bot=/models/adapter",
    )
    serve.add_argument("--base-model", required=True, type=Path, help="local Hugging Face model folder")
    serve.add_argument("--base-model-name", help="served name of the base model (default: the folder's name)")
    serve.add_argument(
        "--adapter", action="append", default=[], type=_named(Path), metavar="NAME=DIR", help="PEFT adapter to serve"
    )
    serve.add_argument(
        "--adapter-digest",
        action="append",
        default=[],
        type=_named(_digest),
        metavar="NAME=sha256:...",
        help="refuse to start (exit 10) unless adapter NAME's files hash to this digest",
    )
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument(
        "--max-tokens-limit", type=_positive, default=512, help="largest max_tokens a request may ask for (default 512)"
    )
    serve.add_argument(
        "--max-batch-size",
        type=_positive,
        default=16,
        help="queued requests (same model and sampling) generated together (default 16; 1: one at a time)",
    )
    serve.add_argument(
        "--max-queue",
        type=_positive,
        default=64,
        help="requests that may wait for the model; more get 429 (default 64)",
    )
    serve.add_argument(
        "--request-timeout", type=float, default=120.0, help="seconds before a request gets 504 (default 120)"
    )
    serve.add_argument(
        "--max-body-bytes", type=_positive, default=1 << 20, help="largest request body; more gets 413 (default 1 MiB)"
    )
    serve.set_defaults(func=_serve)


def _add_fetch(sub: Any) -> None:
    fetch = sub.add_parser(
        "fetch",
        help="download a model or adapter folder (s3://, file://, pvc://, hf://), verifying its digest",
        description="The init container of serving pods. Exit 10: digest mismatch or nothing at URI; 75: storage.",
    )
    fetch.add_argument("uri", help="folder to download")
    fetch.add_argument("dir", type=Path, help="local folder to download into")
    fetch.add_argument("--digest", type=_digest, help="refuse (exit 10) unless the files hash to this sha256:...")
    fetch.add_argument("--endpoint", help="S3 endpoint URL (default $KUBETUNE_STORAGE_ENDPOINT)")
    fetch.add_argument("--region", help="S3 region (default $AWS_REGION, else us-east-1)")
    fetch.set_defaults(func=_fetch)


def _add_eval_endpoint(sub: Any) -> None:
    online = sub.add_parser(
        "eval-endpoint",
        help="score an OpenAI-compatible endpoint on a JSONL dataset (the online eval of a canary)",
        description="Exit 0: score >= --min; 11: below; 75: endpoint or storage unreachable; 10: bad dataset/metric.",
    )
    online.add_argument("--endpoint", required=True, help="base URL of the server, e.g. http://canary:8000")
    online.add_argument("--model", required=True, help="the model name to send")
    online.add_argument("--dataset", required=True, help="JSONL file of examples (s3://, file://, pvc://)")
    online.add_argument("--metric", default="exact_match", help="text metric (default exact_match)")
    online.add_argument("--min", type=float, required=True, help="the lowest passing score")
    online.add_argument("--max-examples", type=_positive, default=100, help="examples sent (default 100)")
    online.add_argument("--max-tokens", type=_positive, default=32, help="max_tokens per request (default 32)")
    online.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    online.add_argument(
        "--connect-attempts", type=_positive, default=5, help="tries per request while unreachable (default 5)"
    )
    online.add_argument(
        "--termination-log",
        help="where to write the JSON summary (default: $KUBETUNE_TERMINATION_LOG, else /dev/termination-log)",
    )
    online.add_argument(
        "--storage-endpoint", help="S3 endpoint URL of the dataset (default $KUBETUNE_STORAGE_ENDPOINT)"
    )
    online.add_argument("--region", help="S3 region (default $AWS_REGION, else us-east-1)")
    online.set_defaults(func=_eval_endpoint)


def _add_import_gguf(sub: Any) -> None:
    gguf = sub.add_parser(
        "import-gguf",
        help="convert a GGUF model file (llama.cpp, Ollama) into a Hugging Face folder usable as a base model",
        description="Dequantizes to float32 and keeps the tokenizer and chat template. Exit 10: not a loadable GGUF.",
    )
    gguf.add_argument("file", type=Path, help="the .gguf file")
    gguf.add_argument("out", type=Path, help="folder to write (config, model.safetensors, tokenizer)")
    gguf.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds files")
    gguf.set_defaults(func=_import_gguf)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # As PID 1 in a pod a process without a SIGTERM handler ignores SIGTERM; subcommands that must
    # do more (run, launch, serve) install their own.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
