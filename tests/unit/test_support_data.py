"""The support-ticket dataset of the quickstart: reproducible, and its reworded held-out set really reworded.

``heldout.jsonl`` draws on the training tickets' wordings (a prompt that
retrieves the nearest training tickets scores like a lookup table there);
``heldout-reworded.jsonl`` is the held-out set that does not. These tests keep
that true: the files are what ``generate.py`` writes, and no reworded ticket's
sentence occurs in any training ticket.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import re
import shutil
from pathlib import Path
from types import ModuleType

from tests.conftest import SUPPORT_DATA

FILES = ("train.jsonl", "val.jsonl", "heldout.jsonl", "heldout-reworded.jsonl")


def _generator(folder: Path) -> ModuleType:
    shutil.copy(SUPPORT_DATA / "generate.py", folder / "generate.py")
    spec = importlib.util.spec_from_file_location("support_generate", folder / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _records(name: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (SUPPORT_DATA / name).read_text().splitlines() if line.endswith("}")]


def _body(prompt: str, generator: ModuleType) -> str:
    """The ticket's sentence without the instruction, the greeting and the sign-off, lower-cased."""
    text = re.sub(r"^(please )?route this support ticket: ", "", prompt, flags=re.IGNORECASE)
    for opener in sorted(generator.OPENERS, key=len, reverse=True):
        if opener and text.lower().startswith(opener.lower()):
            text = text[len(opener) :]
            break
    for closer in sorted(generator.CLOSERS, key=len, reverse=True):
        if closer and text.endswith(closer):
            text = text[: -len(closer)]
            break
    return text.rstrip(".").lower()


def test_the_files_are_what_generate_py_writes(tmp_path: Path) -> None:
    _generator(tmp_path).main()
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (SUPPORT_DATA / name).read_bytes(), name


def test_no_reworded_ticket_uses_a_training_tickets_wording(tmp_path: Path) -> None:
    generator = _generator(tmp_path)
    mask = re.compile(r"#\d{5}|" + "|".join(re.escape(i) for i in generator.ITEMS + generator.DAYS), re.IGNORECASE)

    def wording(prompt: str) -> str:
        return mask.sub("_", _body(prompt, generator))

    train = {wording(r["prompt"]) for r in _records("train.jsonl")}
    heldout = {wording(r["prompt"]) for r in _records("heldout.jsonl")}
    reworded = [wording(r["prompt"]) for r in _records("heldout-reworded.jsonl")]
    assert len(train) >= sum(len(v) for v in generator.TRAIN_WORDINGS.values())  # every training wording used
    assert heldout <= train
    assert not set(reworded) & train, sorted(set(reworded) & train)
    assert len(set(reworded)) == sum(len(v) for v in generator.REWORDED.values())


def test_the_reworded_set_covers_every_queue_equally() -> None:
    counts = collections.Counter(r["response"] for r in _records("heldout-reworded.jsonl"))
    assert set(counts) == {r["response"] for r in _records("heldout.jsonl")}
    assert set(counts.values()) == {12}, counts
