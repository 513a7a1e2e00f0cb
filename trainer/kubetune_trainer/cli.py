"""The ``kubetune-trainer`` command: the entrypoint of training (and later serving) pods.

    kubetune-trainer run --config /etc/kubetune/config.json

runs one fine-tune end to end (see :mod:`kubetune_trainer.pipeline`), prints
a one-line JSON summary and writes it to the termination-message path.
Exit codes are listed in :class:`kubetune_trainer.pipeline.ExitCode`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from kubetune_trainer import __version__
from kubetune_trainer.config import TrainerConfig


def _load_config(path: str) -> TrainerConfig:
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    return TrainerConfig.model_validate(json.loads(text))


def _run(args: argparse.Namespace) -> int:
    from kubetune_trainer.pipeline import ExitCode, Summary, default_termination_log, execute

    termination_log = Path(args.termination_log) if args.termination_log else default_termination_log()
    try:
        cfg = _load_config(args.config)
    except (OSError, ValueError, ValidationError) as e:
        summary = Summary("Failed", "ConfigInvalid", f"{args.config}: {e}", "")
        print(summary.to_json(), flush=True)
        if termination_log is not None:
            termination_log.write_text(summary.to_json())
        return int(ExitCode.BAD_INPUT)
    if args.work_dir:
        cfg = cfg.model_copy(update={"work_dir": args.work_dir})
    bar = False if args.no_progress_bar else None
    return execute(cfg, termination_log=termination_log, progress_bar=bar)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune-trainer", description="kubetune's training and serving workload.")
    parser.add_argument("--version", action="version", version=f"kubetune-trainer {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one fine-tune: prepare, train, evaluate, publish")
    run.add_argument("--config", required=True, help="TrainerConfig JSON file, or - for stdin")
    run.add_argument(
        "--termination-log",
        help="where to write the JSON summary (default: $KUBETUNE_TERMINATION_LOG, else /dev/termination-log)",
    )
    run.add_argument("--work-dir", help="local scratch folder (overrides the config's work_dir)")
    run.add_argument("--no-progress-bar", action="store_true", help="never draw a progress bar")
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
