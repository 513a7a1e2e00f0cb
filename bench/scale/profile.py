"""Where the operator's CPU goes during a burst: the operator run under yappi on the CPU clock.

``--profile`` starts the operator through this module (``python -m
bench.scale.profile OUT kubetune-args...`` in the checkout): yappi measures the CPU time
of every function in every thread (the event loop and the handler threads
alike) from the start; the totals are written to ``OUT`` (pstats format: open
it with ``python -m pstats OUT`` or snakeviz) when the operator stops, and
``summarize`` names the functions with the most CPU of their own (``self``)
and under them (``inclusive``), as shares of the whole.

A sampling profiler from outside (py-spy) was tried first and misled: without
``--gil`` it counts threads waiting on a socket as busy (they are not idle to
the kernel's eye while in a read), and with ``--gil`` it put a third of the
samples in ``json.loads``, which the CPU profile measures at 6%. yappi makes
the profiled run slower (its latencies mean nothing), not its proportions.
"""

from __future__ import annotations

import atexit
import pstats
import signal
import sys
from pathlib import Path
from typing import Any


def _short(where: tuple[str, int, str]) -> str:
    """``(file, line, function)`` as ``package/module.py:function``."""
    path, _, func = where
    parts = Path(path).parts
    return f"{'/'.join(parts[-2:]) if len(parts) > 1 else path}:{func}"


def summarize(path: Path, top: int = 20) -> dict[str, Any]:
    """The functions with the most CPU of their own and under them, as shares of the operator's total."""
    stats = pstats.Stats(str(path))
    entries = stats.stats  # type: ignore[attr-defined]
    total = float(getattr(stats, "total_tt", 0.0)) or sum(e[2] for e in entries.values())

    def shares(index: int) -> dict[str, float]:
        ranked = sorted(entries.items(), key=lambda item: item[1][index], reverse=True)[:top]
        return {_short(where): round(e[index] / total, 3) for where, e in ranked} if total else {}

    return {"profile": str(path), "cpu_s_profiled": round(total, 2), "self": shares(2), "inclusive": shares(3)}


def main() -> int:
    import yappi  # type: ignore[import-untyped]

    out = Path(sys.argv[1])
    yappi.set_clock_type("cpu")
    yappi.start(builtins=True)

    def save() -> None:
        yappi.stop()
        yappi.get_func_stats().save(str(out), type="pstat")

    atexit.register(save)
    # SIGUSR1 starts the count again: the steady-state measurement profiles its window only.
    signal.signal(signal.SIGUSR1, lambda *_: yappi.clear_stats())
    sys.argv = ["kubetune", *sys.argv[2:]]
    from kubetune.cli import main as kubetune

    return kubetune()


if __name__ == "__main__":
    sys.exit(main())
