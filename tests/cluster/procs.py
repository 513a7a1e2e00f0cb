"""Child-process plumbing shared by the test cluster's launchers.

Every long-running helper (etcd, kube-apiserver, the fake kubelet, moto, the
kubelet's containers) runs in a process group of its own, so that Ctrl-C in a
terminal reaches only the supervisor, which then stops everything in order. The
flip side is that nothing kills those groups for us when the supervisor dies
hard, hence the parent-death signal (``die_with_parent``) and the group-wide
kill in ``stop_all``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Loaded before any fork: the pre-exec hook below runs between fork and exec,
# where loading a library (and the allocations that come with it) is unsafe.
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> None:
    """Pre-exec hook: the kernel sends ``sig`` to the child when its parent dies.

    Without it, a supervisor killed with SIGKILL (or an OOM kill) would leave
    etcd, the API server and every container process running.
    """
    _LIBC.prctl(_PR_SET_PDEATHSIG, sig)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, max_bytes: int = 4000) -> str:
    """The end of a log file, for error messages."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Service:
    """A started helper process whose output goes to a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        on_parent_death: signal.Signals = signal.SIGTERM,
    ) -> Service:
        """Start ``argv``; ``on_parent_death`` is the signal it gets if this process dies first.

        SIGTERM lets a helper clean up on its way out; SIGKILL is for one whose
        graceful stop needs peers that die at the same moment (the API server's
        waits on etcd).
        """
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=functools.partial(die_with_parent, on_parent_death),  # noqa: PLW1509 - only prctl(2)
            )
        return cls(name, popen, log)

    def ensure_running(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with code {code}; end of {self.log}:\n{tail(self.log)}")


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    services: Iterable[Service] = (),
    interval: float = 0.1,
) -> None:
    """Poll ``check`` until it returns True; fail early when a service died."""
    watched = list(services)
    deadline = time.monotonic() + timeout
    while True:
        for service in watched:
            service.ensure_running()
        if check():
            return
        if time.monotonic() > deadline:
            logs = ", ".join(str(s.log) for s in watched)
            raise TimeoutError(
                f"timed out after {timeout:.0f}s waiting for {what}" + (f" (logs: {logs})" if logs else "")
            )
        time.sleep(interval)


def _signal_group(popen: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


def stop_all(services: Sequence[Service], timeout: float = 10.0) -> None:
    """SIGTERM every service's process group, SIGKILL what is left after ``timeout``.

    Groups, not just the leader: a helper's own children (moto's reloader, a
    shell's sleep) must not outlive it.
    """
    for service in services:
        if service.popen.poll() is None:
            _signal_group(service.popen, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for service in services:
        try:
            service.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(service.popen, signal.SIGKILL)
            service.popen.wait()
        # Leftover members of the group (the leader is gone, they are not).
        _signal_group(service.popen, signal.SIGKILL)
