"""Request accounting: what the operator asked of the API server, by window, resource, purpose and FineTune."""

from __future__ import annotations

import re
import urllib.request
from collections import Counter
from typing import Any

from bench.scale.common import CATEGORIES, WRITE_METHODS, Created, percentiles


def summarize_requests(requests: list[dict[str, Any]], size: int) -> dict[str, Any]:
    writes = [r for r in requests if r["m"] in WRITE_METHODS]
    reads = [r for r in requests if r["m"] not in WRITE_METHODS]
    by_method = Counter(r["m"] for r in requests)
    by_category = {
        c: dict(Counter(r["m"] + (" (watch)" if r["w"] else "") for r in requests if r["c"] == c))
        for c in CATEGORIES
        if any(r["c"] == c for r in requests)
    }
    writes_by = Counter(f"{r['m']} {r['c']}" for r in writes)
    return {
        "total": len(requests),
        "writes": len(writes),
        "reads": len(reads),
        "watches": sum(1 for r in reads if r["w"]),
        "writes_per_finetune": round(len(writes) / size, 3),
        "reads_per_finetune": round(len(reads) / size, 3),
        "writes_per_finetune_by_kind": {k: round(v / size, 3) for k, v in sorted(writes_by.items())},
        "by_method": dict(sorted(by_method.items())),
        "by_category": by_category,
        "non_2xx_by_status": dict(
            sorted(Counter(f"{r['m']} {r['c']} {r['s']}" for r in requests if r["s"] >= 300).items())
        ),
        "write_response_s": percentiles(r["dt"] for r in writes),
        "read_response_s": percentiles(r["dt"] for r in reads if not r["w"]),
    }


OWNED_SUFFIXES = ("-trainer-config", "-train")
FT_NAME = re.compile(r"^ft-\d{4,}$")


def owner(request: dict[str, Any]) -> str | None:
    """The bench FineTune a request is about: named in the path (finetunes/<name>) or in the body."""
    parts = request["p"].split("/")
    if "finetunes" in parts and parts.index("finetunes") + 1 < len(parts):
        name: str | None = parts[parts.index("finetunes") + 1]
    else:
        name = request.get("n")
        for suffix in OWNED_SUFFIXES:
            if name and name.endswith(suffix):
                name = name.removesuffix(suffix)
                break
    return name if name and FT_NAME.match(name) else None


def per_finetune(
    requests: list[dict[str, Any]], created: list[Created], job_seen: dict[str, float], size: int
) -> dict[str, Any]:
    """Writes attributed to each FineTune, and where its create→Job time went."""
    writes: dict[str, list[dict[str, Any]]] = {}
    unattributed = 0
    for r in requests:
        if r["m"] not in WRITE_METHODS:
            continue
        name = owner(r)
        if name is None:
            unattributed += 1
        else:
            writes.setdefault(name, []).append(r)
    up_to_own_job, waiting, handling, delivery = [], [], [], []
    for c in created:
        mine = sorted(writes.get(c.name, []), key=lambda r: r["t"])
        seen = job_seen.get(c.name)
        if seen is None or not mine:
            continue
        up_to_own_job.append(sum(1 for r in mine if r["t"] <= seen))
        job_post = next((r for r in mine if r["m"] == "POST" and r["c"] == "jobs" and r["s"] < 300), None)
        waiting.append(mine[0]["t"] - c.after)
        if job_post is not None:
            handling.append(job_post["t"] + job_post["dt"] - mine[0]["t"])
            delivery.append(seen - (job_post["t"] + job_post["dt"]))
    purposes = Counter(
        f"{r['m']} {r['c']}" + (f" [{r['b']}]" if r.get("b") else "") + (f" -> {r['s']}" if r["s"] >= 300 else "")
        for rs in writes.values()
        for r in rs
    )
    return {
        "writes_up_to_own_job": percentiles(up_to_own_job),
        "writes_per_finetune_by_purpose": {k: round(v / size, 3) for k, v in purposes.most_common()},
        "unattributed_writes": unattributed,
        "create_to_job_breakdown_s": {
            "create_end_to_first_operator_write": percentiles(waiting),
            "first_operator_write_to_job_post_response": percentiles(handling),
            "job_post_response_to_watch_arrival": percentiles(delivery),
        },
    }


CREATED_JOB = re.compile(r"INFO kubetune\.finetune: \S+: created Job ")
LEVEL = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def operator_log_summary(text: str, limit: int = 12) -> dict[str, Any]:
    """Lines by level, and the first distinct WARNING/ERROR lines (digits and names masked to group them)."""
    levels: Counter[str] = Counter()
    excerpts: list[str] = []
    shapes: Counter[str] = Counter()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = LEVEL.match(line)
        if not match:
            continue
        level = match.group(1)
        levels[level] += 1
        if level in ("WARNING", "ERROR", "CRITICAL"):
            message = line[match.end() :]
            shape = re.sub(r"ft-\d+|\d+(\.\d+)?", "#", message)[:160]
            shapes[shape] += 1
            if shapes[shape] == 1 and len(excerpts) < limit:
                # Of a traceback, keep what explains it (the exception, an API error's reason and body), not frames.
                follow = []
                for ln in lines[i + 1 : i + 60]:
                    if LEVEL.match(ln):
                        break
                    if ln and not ln[0].isspace() and not ln.startswith(("Traceback", "HTTP response headers")):
                        follow.append(ln[:400])
                excerpts.append("\n".join([line[:600], *follow[:4]]))
    created_jobs = sum(1 for line in lines if CREATED_JOB.search(line))
    return {
        "lines_by_level": dict(levels),
        "created_job_lines": created_jobs,
        "distinct_warning_error_shapes": dict(shapes.most_common(limit)),
        "excerpts": excerpts,
    }


def scrape_metrics(port: int) -> dict[str, float]:
    """The operator's kubetune_* samples (reconcile histogram sum/count, launches)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError as e:
        return {"error": str(e)}  # type: ignore[dict-item]
    wanted = (
        "kubetune_job_launches_total",
        "kubetune_reconcile_duration_seconds_sum",
        "kubetune_reconcile_duration_seconds_count",
    )
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(wanted):
            key, _, value = line.rpartition(" ")
            out[key] = round(float(value), 3)
    return out
