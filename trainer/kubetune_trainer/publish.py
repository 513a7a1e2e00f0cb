"""Publishing: the adapter (or full model) and its manifest, write-once, with lineage.

The manifest is what makes an adapter a versioned software artifact: which
base model (and its digest) it belongs to, which data (and their digests) it
learned from, with which hyperparameters and package versions, how it scored
against its baselines, and the sha256 of every file. ``adapter_digest`` is the
digest over that file listing; serving refuses an adapter whose files do not
reproduce it.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from kubetune_trainer import storage
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.contract import now_iso

MANIFEST_KIND = "kubetune.io/adapter-manifest/v1"
ANOTHER_POD_WAIT_SECONDS = 60.0
"""How long a refused publish waits for the manifest of another pod of the same run."""

log = logging.getLogger(__name__)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "safetensors", "kubetune"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def artifact_folder(cfg: TrainerConfig) -> str:
    """``adapter`` for adapter methods, ``model`` for a full fine-tune."""
    return "model" if cfg.method.type == "Full" else "adapter"


def save_artifact(model: Any, tokenizer: Any, cfg: TrainerConfig, dest: Path) -> Path:
    """Write the PEFT adapter (or the full model with its tokenizer) to ``dest``."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    model.save_pretrained(dest, safe_serialization=True)
    if cfg.method.type == "Full":
        tokenizer.save_pretrained(dest)
    else:
        _sort_set_fields(dest / "adapter_config.json", model)
    return dest


def _sort_set_fields(path: Path, model: Any) -> None:
    """Write PEFT's set-valued fields (``target_modules``) sorted.

    PEFT writes them in set order, which string hashing makes differ from one
    process to the next: a rerun would publish other bytes than the first
    attempt, and published files are write-once.
    """
    peft_config = getattr(model, "peft_config", {}).get("default")
    if peft_config is None or not path.is_file():
        return
    doc = json.loads(path.read_text())
    for key, value in vars(peft_config).items():
        if isinstance(value, set) and isinstance(doc.get(key), list):
            doc[key] = sorted(doc[key], key=str)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True))


def build_manifest(
    cfg: TrainerConfig,
    *,
    files: dict[str, str],
    base_model_digest: str,
    data: dict[str, Any],
    training: dict[str, Any],
    evaluation: dict[str, Any],
    parameters: dict[str, int],
    promotable: bool,
) -> dict[str, Any]:
    folder = artifact_folder(cfg)
    return {
        "kind": MANIFEST_KIND,
        "runId": cfg.run_id,
        "created": now_iso(),
        "lineage": cfg.lineage.model_dump(),
        "method": cfg.method.type,
        "baseModel": {"uri": cfg.base_model.uri, "revision": cfg.base_model.revision, "digest": base_model_digest},
        "data": data,
        "config": cfg.model_dump(mode="json"),
        "training": training,
        "evaluation": evaluation,
        "parameters": parameters,
        "packages": package_versions(),
        "artifact": {
            "uri": storage.join(cfg.output_uri, folder) + "/",
            "digest": storage.digest_of_files(files),
            "files": files,
            "sizeBytes": None,
        },
        "promotable": promotable,
    }


def publish(local_artifact: Path, manifest: dict[str, Any], cfg: TrainerConfig, settings: storage.S3Settings) -> None:
    """Upload the artifact folder, then the manifest; both write-once.

    The manifest goes last: its presence means the run's artifacts are complete.
    """
    folder = artifact_folder(cfg)
    manifest["artifact"]["sizeBytes"] = sum(p.stat().st_size for p in local_artifact.rglob("*") if p.is_file())
    storage.publish_dir(local_artifact, storage.join(cfg.output_uri, folder), settings)
    staging = Path(cfg.work_dir) / "manifest"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    storage.publish_dir(staging, cfg.output_uri, settings)


def publish_or_adopt(
    local_artifact: Path,
    manifest: dict[str, Any],
    cfg: TrainerConfig,
    settings: storage.S3Settings,
    *,
    wait_seconds: float = ANOTHER_POD_WAIT_SECONDS,
    poll_seconds: float = 1.0,
) -> dict[str, Any]:
    """Publish; the manifest that stands for the run: this pod's, or the one another pod published first.

    Two pods of one run can train at once: a Job deleted while its pod is still running
    (a slow or unreachable node) is created again by the operator. The first to publish
    wins and the other reports that run's result instead of failing on write-once files
    (its own manifest differs at least in its timestamps). A refused publish whose run
    has no manifest within ``wait_seconds`` is a real conflict: the error is raised.
    """
    try:
        publish(local_artifact, manifest, cfg, settings)
        return manifest
    except storage.WriteOnceError:
        deadline = time.monotonic() + wait_seconds
        while True:
            published = published_manifest(cfg, settings)
            if published is not None and published.get("runId") == cfg.run_id:
                log.info("another pod of run %s published first; reporting its result", cfg.run_id)
                return published
            if time.monotonic() >= deadline:
                raise
            time.sleep(poll_seconds)


def published_manifest(cfg: TrainerConfig, settings: storage.S3Settings) -> dict[str, Any] | None:
    """The run's manifest if the run already published (a restarted pod must not redo it)."""
    try:
        manifest: dict[str, Any] = storage.read_json(storage.join(cfg.output_uri, "manifest.json"), settings)
    except storage.NotFoundError:
        return None
    return manifest
