"""Where the operator's CPU goes during a burst: py-spy on its process, summed by function.

py-spy samples the operator's Python stacks from outside (no change to the
operator). Only threads the kernel reports running are sampled (py-spy's
default, no ``--idle``): a thread waiting on a socket or a lock is not. Not
``--gil``: in a test of this benchmark it put a third of the samples in
``json.loads`` of API responses, which instrumenting the operator measured at
about 1% of its time (py-spy reads the GIL's last holder, which stays set while
that thread waits on a socket). The collapsed stacks
are written next to the run's logs; the summary names the functions where the
samples end (``self``) and those they pass through (``inclusive``).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RATE = 100  # samples per second
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def _py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


@dataclass
class Profiler:
    popen: subprocess.Popen[bytes]
    path: Path

    @classmethod
    def start(cls, pid: int, path: Path) -> Profiler:
        argv = [_py_spy(), "record", "--pid", str(pid), "--gil", "--rate", str(RATE)]
        argv += ["--format", "raw", "--output", str(path)]
        log = path.with_suffix(".log").open("wb")
        return cls(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), path)

    def stop(self) -> dict[str, Any]:
        self.popen.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        if not self.path.exists():
            return {"error": f"py-spy wrote nothing (see {self.path.with_suffix('.log')})"}
        return {"collapsed_stacks": str(self.path), **summarize(self.path.read_text(errors="replace"))}


def _name(frame: str) -> str:
    """``func (path/to/module.py:12)`` as ``module.py:func`` (the package folder kept for site-packages)."""
    match = FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    parts = Path(match["file"]).parts
    short = "/".join(parts[-2:]) if "site-packages" in parts or "lib" in parts else parts[-1]
    return f"{short}:{match['func']}"


def summarize(collapsed: str, top: int = 20) -> dict[str, Any]:
    """The samples by function: where they end (self) and what they pass through (inclusive), as shares."""
    own: Counter[str] = Counter()
    through: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_name(f) for f in stack.split(";") if f.strip() and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            through[name] += count

    def shares(counter: Counter[str]) -> dict[str, float]:
        return {name: round(n / total, 3) for name, n in counter.most_common(top)} if total else {}

    return {"samples": total, "rate_hz": RATE, "self": shares(own), "inclusive": shares(through)}
