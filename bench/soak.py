"""Soak: many FineTunes trained at once while the operator restarts, the store goes away and writes are refused.

What it shows: under the faults a platform runs into — an operator restarted
(upgrades, evictions), an object store that is unreachable for a minute, an API
server that refuses some writes — every FineTune still ends Succeeded, with
exactly one Job and one published adapter each. Nothing is lost and nothing is
done twice.

One run:

1. start the test cluster (``tests/cluster``), seed S3 with the tiny base model
   and the support-ticket data;
2. start the operator with its API server behind a fault proxy (which refuses
   ``--refuse-status`` of the FineTunes' status PATCHes with 500, from
   ``--seed``) and its default store behind another;
3. create ``--finetunes`` FineTunes at once (the quickstart's fine-tune, one
   epoch, with a gate any adapter passes: ``tests.e2e.helpers.quick``);
4. at random but seeded times: restart the operator ``--restarts`` times
   (SIGKILL, then start), take the store away ``--outages`` times for
   ``--outage-seconds`` (connections reset);
5. wait until every FineTune is Succeeded or Failed, then check: phases, Jobs
   per FineTune, adapters stored per FineTune (and that status' digest is the
   stored manifest's).

Prints one JSON document; exit status 0 when every check passed.

Usage: ``.venv/bin/python bench/soak.py [--finetunes 20] [--seed 7] [--keep]``.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.scale.common import log  # noqa: E402
from kubetune_trainer import storage  # noqa: E402
from tests.cluster import Cluster  # noqa: E402
from tests.cluster.faults import FaultProxy, Rule, cluster_kubeconfig  # noqa: E402
from tests.e2e.helpers import ACCESS_KEY, SECRET_KEY, HostOperator, apply, quick, status  # noqa: E402

SUPPORT = ROOT / "docs" / "examples" / "data" / "support"
NAMESPACE = "soak"


def seed_storage(cluster: Cluster, workdir: Path) -> None:
    """The tiny base model and the support data in the loopback S3 server (as the e2e suite seeds it)."""
    from kubetune_trainer.evaluate import general_text_sample
    from kubetune_trainer.tiny import build_tiny_model, corpus_from_jsonl

    texts = corpus_from_jsonl(SUPPORT / "train.jsonl") + general_text_sample().split("\n\n")
    model = build_tiny_model(workdir / "tiny-model", texts, pretrain_steps=200)
    client = cluster.s3.client()
    for bucket in ("models", "datasets", "adapters"):
        cluster.s3.create_bucket(bucket)
    for path in sorted(model.iterdir()):
        meta = {"Metadata": {"sha256": storage.sha256_file(path)}}
        client.upload_file(str(path), "models", f"tiny-llama/{path.name}", ExtraArgs=meta)
    for name in ("train.jsonl", "val.jsonl", "heldout.jsonl"):
        client.upload_file(str(SUPPORT / name), "datasets", f"support/{name}")


def schedule(rng: random.Random, args: argparse.Namespace) -> list[tuple[float, str]]:
    """(seconds after the creates, what) for every fault, drawn from ``rng``; outages never overlap."""
    events = [(rng.uniform(20, args.window), "restart") for _ in range(args.restarts)]
    slots = sorted(rng.sample(range(int(args.window // (args.outage_seconds + 10))), args.outages))
    events += [(15 + slot * (args.outage_seconds + 10), "outage") for slot in slots]
    return sorted(events)


class Faults(threading.Thread):
    """Carries out the schedule while the FineTunes run."""

    def __init__(self, events: list[tuple[float, str]], operator: HostOperator, s3: FaultProxy, outage: float) -> None:
        super().__init__(name="faults", daemon=True)
        self.events, self.operator, self.s3, self.outage = events, operator, s3, outage
        self.done: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.stop_event = threading.Event()

    def run(self) -> None:
        for at, what in self.events:
            if self.stop_event.wait(max(0.0, self.started + at - time.monotonic())):
                return
            log(f"fault: {what} at +{at:.0f}s")
            if what == "restart":
                self.operator.stop(signal.SIGKILL)
                self.operator.start()
            else:
                self.s3.down(self.outage)
            self.done.append({"at_s": round(time.monotonic() - self.started, 1), "fault": what})


def adapters_of(cluster: Cluster, name: str) -> list[str]:
    """The adapter folders stored for a FineTune (one per published run)."""
    client = cluster.s3.client()
    listed = client.list_objects_v2(Bucket="adapters", Prefix=f"{NAMESPACE}/{name}/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    return sorted({k.rsplit("/", 1)[0] for k in keys if k.endswith("/adapter/adapter_model.safetensors")})


def outcome(cluster: Cluster, name: str) -> dict[str, Any]:
    st = status(cluster, NAMESPACE, name)
    out: dict[str, Any] = {"phase": st.get("phase"), "attempts": st.get("attempts"), "message": st.get("message", "")}
    out["adapters"] = adapters_of(cluster, name)
    digest = (st.get("adapter") or {}).get("digest")
    if digest and len(out["adapters"]) == 1:
        key = out["adapters"][0].rsplit("/adapter", 1)[0] + "/manifest.json"
        manifest = json.loads(cluster.s3.client().get_object(Bucket="adapters", Key=key)["Body"].read())
        out["digest_matches_manifest"] = manifest["artifact"]["digest"] == digest
    return out


def jobs_per_finetune(cluster: Cluster) -> Counter[str]:
    items = json.loads(cluster.kubectl("get", "jobs", "-n", NAMESPACE, "-o", "json").stdout)["items"]
    return Counter(j["metadata"]["labels"].get("kubetune.io/finetune", "?") for j in items)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    began = time.monotonic()
    cluster = Cluster.start(workdir / "cluster")
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(ROOT / "crds"))
        seed_storage(cluster, workdir)
        cluster.kubectl("create", "namespace", NAMESPACE)
        cluster.kubectl(
            "create", "secret", "generic", "s3-credentials", "-n", NAMESPACE,
            f"--from-literal=AWS_ACCESS_KEY_ID={ACCESS_KEY}", f"--from-literal=AWS_SECRET_ACCESS_KEY={SECRET_KEY}",
        )  # fmt: skip
        with (
            FaultProxy(cluster.server, ca=cluster.control_plane.ca_file) as api,
            FaultProxy(cluster.s3.endpoint_url, host=cluster.s3.host) as s3,
        ):
            refused = api.add(Rule("refuse", verb="PATCH", path=r"/finetunes/[^/]+/status$", status=500,
                                   probability=args.refuse_status, seed=args.seed))  # fmt: skip
            kubeconfig = cluster_kubeconfig(workdir / "operator-kubeconfig", api.url, cluster.token)
            operator = HostOperator(cluster, workdir / "operator", env={
                "KUBECONFIG": str(kubeconfig), "KUBETUNE_DEFAULT_STORAGE_ENDPOINT": s3.url})  # fmt: skip
            (workdir / "operator").mkdir(exist_ok=True)
            operator.start()
            names = [f"soak-{i:02d}" for i in range(1, args.finetunes + 1)]
            for name in names:
                # quick(): the example cut to one epoch with a gate any adapter passes. The subject
                # here is nothing lost under faults, not quality: one tiny-model epoch scores 0.00 on
                # the example's own gates (exact_match min 0.5), so all 20 ended Failed on them.
                apply(cluster, NAMESPACE, quick(name, training={"checkpointEverySteps": 8}))
            faults = Faults(schedule(rng, args), operator, s3, args.outage_seconds)
            faults.start()
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                phases = Counter(status(cluster, NAMESPACE, n).get("phase") for n in names)
                log(f"phases: {dict(phases)}")
                if phases["Succeeded"] + phases["Failed"] == len(names) and not faults.is_alive():
                    break
                time.sleep(10)
            faults.stop_event.set()
            results = {n: outcome(cluster, n) for n in names}
            jobs = jobs_per_finetune(cluster)
            operator.stop()
            return {
                "wall_s": round(time.monotonic() - began, 1),
                "faults": {"scheduled": faults.events, "done": faults.done,
                           "status_patches_refused": refused.hits, "s3_connections_reset": s3.injected["reset"]},
                "finetunes": results,
                "jobs_per_finetune": dict(jobs),
            }  # fmt: skip
    finally:
        cluster.stop()


def checks(report: dict[str, Any], args: argparse.Namespace) -> dict[str, bool]:
    results = report["finetunes"].values()
    return {
        "every_finetune_succeeded": all(r["phase"] == "Succeeded" for r in results),
        "exactly_one_job_each": sorted(report["jobs_per_finetune"]) == sorted(report["finetunes"])
        and set(report["jobs_per_finetune"].values()) == {1},
        "exactly_one_adapter_each": all(len(r["adapters"]) == 1 for r in results),
        "status_digest_is_the_stored_one": all(r.get("digest_matches_manifest") for r in results),
        "all_faults_happened": len(report["faults"]["done"]) == args.restarts + args.outages,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--finetunes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--restarts", type=int, default=3, help="operator restarts (SIGKILL + start)")
    parser.add_argument("--outages", type=int, default=2, help="times the store goes away")
    parser.add_argument("--outage-seconds", type=float, default=60)
    parser.add_argument("--refuse-status", type=float, default=0.05, help="share of status PATCHes refused")
    parser.add_argument("--window", type=float, default=300, help="seconds after the creates in which faults happen")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--workdir")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kubetune-soak-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "soak",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {k: v for k, v in vars(args).items() if k not in ("workdir", "keep")},
    }
    report.update(run(args, workdir))
    report["checks"] = checks(report, args)
    report["passed"] = all(report["checks"].values())
    report["workdir"] = str(workdir) if args.keep else None
    print(json.dumps(report, indent=2))
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
