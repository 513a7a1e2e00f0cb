"""``python -m tests.cluster up``: the test cluster for a person (``make cluster-up``).

Starts the same cluster the end-to-end tests use, prints how to reach it, and
runs until Ctrl-C (or SIGTERM), then stops every process it started.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import tempfile
import threading
from pathlib import Path
from types import FrameType

from tests.cluster import Cluster, NodeKind


def up(workdir: Path, node: NodeKind, images: list[Path]) -> None:
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"starting the test cluster in {workdir} ...", flush=True)
    cluster = Cluster.start(workdir, node=node, images=images)
    try:
        exports = {"KUBECONFIG": str(cluster.kubeconfig), **cluster.s3.env()}
        lines = [f"export {name}={shlex.quote(value)}" for name, value in exports.items()]
        print(
            "\n".join(
                [
                    "",
                    "test cluster is up; in another shell:",
                    *lines,
                    f"export PATH={shlex.quote(str(cluster.bin_dir))}:$PATH   # kubectl, helm",
                    "",
                    *_node_lines(cluster),
                    f"component logs: {cluster.workdir / 'logs'}",
                    "Ctrl-C stops everything.",
                ]
            ),
            flush=True,
        )
        while not stopping.wait(1.0):
            cluster.ensure_running()
    finally:
        print("stopping the test cluster ...", flush=True)
        cluster.stop()


def _node_lines(cluster: Cluster) -> list[str]:
    if cluster.node is None:
        return [f"pod logs: {cluster.workdir / 'pods'}/<namespace>_<pod>_<uid>/<container>.log"]
    real = cluster.node
    endpoint = f"unix://{real.paths.socket}"
    return [
        f"pod logs: kubectl logs; the node's network namespace: {real.network.netns}",
        f"crictl: {real.node_bin / 'crictl'} --runtime-endpoint={endpoint}",
        f"images: {real.node_bin / 'ctr'} --address={real.paths.socket} -n k8s.io images import <archive>",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.cluster", description=__doc__.splitlines()[0] if __doc__ else None
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start the cluster and run until Ctrl-C")
    start.add_argument("--workdir", type=Path, help="folder for data and logs (default: a new temporary folder, kept)")
    start.add_argument(
        "--node",
        choices=["real", "fake"],
        default="real",
        help="real: kubelet + containerd (root); fake: pods as local processes (default: real)",
    )
    start.add_argument("--image", type=Path, action="append", default=[], help="an image archive to import (repeat)")
    args = parser.parse_args(argv)
    up(args.workdir or Path(tempfile.mkdtemp(prefix="kubetune-cluster-")), args.node, args.image)


if __name__ == "__main__":
    main()
