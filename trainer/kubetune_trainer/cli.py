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


def _launch(args: argparse.Namespace) -> int:
    """torchrun, but with the trainer's exit code: the Job's podFailurePolicy keys on it.

    torchrun reports any failed worker as exit 1. Rank 0 writes the run's
    summary to the termination log; its reason says which code the run meant.
    """
    import subprocess

    from kubetune_trainer.pipeline import exit_code_for

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
    code = subprocess.call([*torchrun, "-m", "kubetune_trainer.cli", *trainer_args])
    if code == 0 or "--termination-log" not in trainer_args:
        return code
    log_path = Path(trainer_args[trainer_args.index("--termination-log") + 1])
    try:
        reason = str(json.loads(log_path.read_text()).get("reason", ""))
    except (OSError, ValueError):
        return code
    return int(exit_code_for(reason)) or code


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
