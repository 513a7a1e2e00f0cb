"""GGUF → Hugging Face folder: use llama.cpp / Ollama model files as base models.

``kubetune-trainer import-gguf MODEL.gguf OUT`` reads a GGUF file with
transformers' own GGUF loader (the ``gguf`` package parses it), dequantizes
every tensor to float32 and writes an ordinary Hugging Face folder: config,
``model.safetensors``, the tokenizer with the chat template the file carries,
and ``kubetune-import.json`` recording where it came from. The trainer, the
evaluation and the reference server then treat it like any other base model.

The folder is written next to ``OUT`` and renamed into place at the end, so an
interrupted import never leaves a half-written model where a run would find it.
Quantized weights are dequantized, not re-quantized: the imported model
computes the same logits as transformers' in-memory GGUF load (tested), in
full precision, ready to carry an adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
RECORD = "kubetune-import.json"


class GGUFImportError(Exception):
    """The file is not a GGUF model transformers can load; the message says why."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The few header fields worth recording: architecture, name, quantization type, tensor count."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        if f is None or not f.data:
            return None
        value = f.parts[f.data[0]]
        if f.types and f.types[0].name == "STRING":
            return bytes(value).decode("utf-8", errors="replace")
        return value.tolist()[0] if hasattr(value, "tolist") else value

    quant_types = sorted({t.tensor_type.name for t in reader.tensors})
    return {
        "architecture": field("general.architecture"),
        "name": field("general.name"),
        "file_type": field("general.file_type"),
        "tensor_types": quant_types,
        "tensors": len(reader.tensors),
    }


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise GGUFImportError(f"{path}: no such file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFImportError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")


def _dequantize_kwargs() -> dict[str, Any]:
    """Ask for a dense load where transformers can keep GGUF blocks packed (newer releases)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older releases always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_gguf(path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file, as transformers loads it, float32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_file(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model: Any
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32, **_dequantize_kwargs()
            )
        except TypeError:  # a release whose GGUF path takes no quantization_config
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise GGUFImportError(f"{path}: transformers cannot load this GGUF file: {e}") from e
    model.eval()
    return model, tokenizer


def _make_plain(model: Any) -> None:
    """Drop the GGUF loader's marks so the model saves as an ordinary dense checkpoint."""
    import torch

    odd = sorted({str(p.dtype) for p in model.parameters() if not torch.is_floating_point(p)})
    if odd:
        raise GGUFImportError(f"the loaded model still holds packed GGUF weights ({', '.join(odd)}); cannot dequantize")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    if hasattr(model, "is_quantized") and not isinstance(getattr(type(model), "is_quantized", None), property):
        model.is_quantized = False


def import_gguf(path: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Convert ``path`` into a Hugging Face model folder at ``out``; returns ``out``."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise GGUFImportError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
    started = time.monotonic()
    model, tokenizer = load_gguf(path)
    _make_plain(model)
    staging = out.with_name(f".{out.name}.importing")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    record = {
        "source": path.name,
        "sourceDigest": file_sha256(path),
        "gguf": gguf_metadata(path),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "chatTemplate": tokenizer.chat_template is not None,
        "transformers": _version("transformers"),
        "gguf_package": _version("gguf"),
    }
    (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(out)
    log.info("imported %s into %s in %.1fs", path, out, time.monotonic() - started)
    return out


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
