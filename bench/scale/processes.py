"""The processes a scale run measures: the operator, the counting proxy in front of the API server, CPU and RSS."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.scale.common import ROOT, free_port
from tests.cluster import Cluster

PROXY = Path(__file__).resolve().parents[1] / "_proxy.py"


# ---------------------------------------------------------------------------------------------- processes


def process_cpu_s(proc: psutil.Process) -> float:
    """User+system CPU of a process and its waited-for children; 0 once it is gone."""
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system + t.children_user + t.children_system)


def tree_cpu_s(proc: psutil.Process) -> float:
    total = process_cpu_s(proc)
    with contextlib.suppress(psutil.Error):
        for child in proc.children(recursive=True):
            total += process_cpu_s(child)
    return total


class RssSampler(threading.Thread):
    """Peak RSS of a process and its children, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.marked_peak: int | None = None
        self.before_burst: int | None = None  # RSS when the first create was sent (the operator idle)
        self.last = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        try:
            rss = self.proc.memory_info().rss
            for child in self.proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    rss += child.memory_info().rss
        except psutil.Error:
            return
        self.peak = max(self.peak, rss)
        self.last = rss
        self.samples += 1

    def start_of_burst(self) -> None:
        self.sample()
        self.before_burst = self.last

    def mark(self) -> None:
        """Remember the peak so far (the peak up to the last Job)."""
        self.sample()
        self.marked_peak = self.peak

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


@dataclass
class ProxyProcess:
    """``bench/_proxy.py`` as a subprocess, and the JSON-lines log of what it forwarded."""

    popen: subprocess.Popen[str]
    port: int
    log_path: Path

    @classmethod
    def start(cls, cluster: Cluster, workdir: Path) -> ProxyProcess:
        log_path = workdir / "requests.jsonl"
        with (workdir / "proxy.err").open("ab") as err:
            popen = subprocess.Popen(
                [
                    sys.executable,
                    str(PROXY),
                    f"--upstream={cluster.server}",
                    f"--ca={cluster.control_plane.ca_file}",
                    f"--log={log_path}",
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        assert popen.stdout is not None
        line = popen.stdout.readline().strip()
        if not line.startswith("listening "):
            popen.kill()
            raise RuntimeError(f"the proxy did not start: {line!r}; see {workdir / 'proxy.err'}")
        return cls(popen, int(line.split()[1]), log_path)

    def requests(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        out = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):  # the last line may be half written
                out.append(json.loads(line))
        return out

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


@dataclass
class OperatorProcess:
    """``python -m kubetune.cli operator`` as the bench runs it."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    health_port: int
    metrics_port: int
    env: dict[str, str]

    @classmethod
    def start(
        cls,
        cluster: Cluster,
        workdir: Path,
        kubeconfig: Path,
        extra_args: list[str],
        store: str | None = None,
        profile: Path | None = None,
    ) -> OperatorProcess:
        """Start it; with ``profile``, under yappi (``bench/scale/profile.py``), its pstats written there at exit."""
        health_port, metrics_port = free_port(), free_port()
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(workdir),
            "KUBECONFIG": str(kubeconfig),
            "KUBETUNE_TRAINER_COMMAND": "true",
            "KUBETUNE_DEFAULT_OUTPUT_URI": "s3://adapters/",
            "KUBETUNE_DEFAULT_STORAGE_ENDPOINT": store or cluster.s3.endpoint_url,
            "KUBETUNE_DEFAULT_STORAGE_SECRET": "s3-credentials",
            "KUBETUNE_METRICS_PORT": str(metrics_port),
            "KUBETUNE_HEALTH_PORT": str(health_port),
            "MALLOC_ARENA_MAX": "2",  # as the operator image sets it
        }
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]  # to measure another checkout's operator with this bench
        log_path = workdir / "operator.log"
        runner = [sys.executable, "-m", "kubetune.cli"]
        if profile is not None:
            runner = [sys.executable, "-m", "bench.scale.profile", str(profile)]  # cwd: the checkout
        with log_path.open("ab") as out:
            popen = subprocess.Popen(
                [*runner, "operator", *extra_args],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(popen, log_path, health_port, metrics_port, env)

    def healthy(self) -> bool:
        if self.popen.poll() is not None:
            raise RuntimeError(f"the operator exited ({self.popen.returncode}):\n{self.log()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        return self.popen.returncode
