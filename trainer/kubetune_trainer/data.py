"""The trainer's "prepare" stage: from raw JSONL files to curated, tokenized, packed batches.

A fine-tune learns whatever its examples exhibit, including their errors and
repetitions, so the cheapest way to improve one is to clean its data before
any GPU time is spent. This module is that step, as pure functions over local
files (storage download happens elsewhere):

* ``load_jsonl`` parses one file in one of three record formats, collects bad
  lines with ``file:line`` reasons and refuses a file that is mostly broken
  (``DataError``: bad input, the trainer exits without retrying);
* ``curate`` filters by length, removes exact and near duplicates, drops
  training examples that leak into the eval set and, when no separate files
  were given, holds out validation and eval examples deterministically;
* ``build_report`` records what was kept and dropped, and why, for
  ``data/report.json``;
* ``encode``, ``pack`` and ``collate`` turn examples into causal-LM batches
  where only response tokens carry loss and packed examples cannot see each
  other, whatever attention backend the model uses.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import numpy.typing as npt
import torch
from datasketch import MinHash, MinHashLSH

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Format = Literal["auto", "chat", "instruction", "completion"]

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and so every HF model) skips

# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Example:
    """One training pair, whatever record format it came from."""

    prompt: tuple[dict[str, str], ...]
    response: str
    source: str

    def text(self) -> str:
        return "\n".join([*(m["content"] for m in self.prompt), self.response])


class DataError(Exception):
    """Bad input data; the message names the file and the offending lines."""


@dataclass
class LoadResult:
    examples: list[Example]
    format: str
    invalid: list[tuple[str, str]]
    digest: str
    records: int


class _RecordError(Exception):
    """A record that cannot become an example; the message is the reason."""


_FORMAT_KEYS = {
    "chat": "'messages'",
    "instruction": "'prompt'/'response' or 'instruction'/'output'",
    "completion": "'text'",
}
_MAX_LINES_IN_ERROR = 5


def load_jsonl(
    path: Path, fmt: Format = "auto", *, max_invalid_fraction: float = 0.05, name: str | None = None
) -> LoadResult:
    """Parse ``path`` into examples; raise ``DataError`` when it is unusable.

    ``name``: what errors and examples' sources call the file (``name:line``); the file's own name by
    default. A fetched copy passes the name the user gave it, not the copy's.
    """
    if fmt not in get_args(Format):
        raise ValueError(f"unknown format {fmt!r}")
    name = name or path.name
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: file not found ({path})") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read ({e.strerror}: {path})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bad_line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{name}:{bad_line}: not UTF-8 (byte 0x{raw[e.start]:02x})") from None

    detected: str | None = None if fmt == "auto" else fmt
    origin = "declared"
    examples: list[Example] = []
    invalid: list[tuple[str, str]] = []
    records = 0
    # Not splitlines(): it also splits on U+2028 and friends, which JSON allows raw inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        records += 1
        source = f"{name}:{number}"
        try:
            record = _parse_object(line)
            shape = _shape(record)
            if detected is None:
                if shape is None:
                    raise _RecordError(f"unrecognized record: expected {' or '.join(_FORMAT_KEYS.values())}")
                detected, origin = shape, f"detected from line {number}"
            if shape != detected:
                hint = f"; this line looks like {shape} format" if shape else ""
                raise _RecordError(
                    f"expected a JSON object with {_FORMAT_KEYS[detected]} ({detected} format {origin}){hint}"
                )
            prompt, response = _PARSERS[detected](record)
            examples.append(Example(prompt=prompt, response=response, source=source))
        except _RecordError as e:
            invalid.append((source, str(e)))

    if records == 0:
        raise DataError(f"{name}: no records (the file is empty)")
    if not examples:
        raise DataError(_problems(f"{name}: no valid example in {records} records", invalid))
    if len(invalid) / records > max_invalid_fraction:
        share = f"{len(invalid) / records:.1%} > {max_invalid_fraction:.0%} allowed"
        raise DataError(_problems(f"{name}: {len(invalid)} of {records} records invalid ({share})", invalid))
    assert detected is not None  # set by the first valid example at the latest
    return LoadResult(
        examples=examples,
        format=detected,
        invalid=invalid,
        digest="sha256:" + hashlib.sha256(raw).hexdigest(),
        records=records,
    )


def _problems(headline: str, invalid: Sequence[tuple[str, str]]) -> str:
    lines = [headline, *(f"  {source}: {reason}" for source, reason in invalid[:_MAX_LINES_IN_ERROR])]
    if len(invalid) > _MAX_LINES_IN_ERROR:
        lines.append(f"  ... and {len(invalid) - _MAX_LINES_IN_ERROR} more")
    return "\n".join(lines)


def _parse_object(line: str) -> dict[str, object]:
    try:
        value: object = json.loads(line)
    except json.JSONDecodeError as e:
        raise _RecordError(f"invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(value, dict):
        raise _RecordError(f"expected a JSON object, got {_json_type(value)}")
    return value


def _shape(record: Mapping[str, object]) -> str | None:
    """The format a record's keys say it is in, before checking its values."""
    if "messages" in record:
        return "chat"
    if record.keys() & {"prompt", "response", "instruction", "output"}:
        return "instruction"
    if "text" in record:
        return "completion"
    return None


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _string(record: Mapping[str, object], key: str, where: str = "") -> str:
    if key not in record:
        raise _RecordError(f"{where}missing '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise _RecordError(f"{where}'{key}' must be a string, got {_json_type(value)}")
    return value


def _nonempty(value: str, what: str) -> str:
    if not value.strip():
        raise _RecordError(f"empty {what}")
    return value


def _parse_chat(record: Mapping[str, object]) -> tuple[tuple[dict[str, str], ...], str]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise _RecordError("'messages' must be a non-empty array")
    turns: list[dict[str, str]] = []
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise _RecordError(f"message {i}: expected an object, got {_json_type(message)}")
        role = _string(message, "role", f"message {i}: ")
        if role not in ROLES:
            raise _RecordError(f"message {i}: role '{role}' is not one of {', '.join(ROLES)}")
        turns.append({"role": role, "content": _string(message, "content", f"message {i}: ")})
    if turns[-1]["role"] != "assistant":
        raise _RecordError(f"the last message must be the assistant's (got '{turns[-1]['role']}')")
    if len(turns) == 1:
        # Without a prompt, there is no assistant turn to start: this is a completion, not a chat.
        raise _RecordError("no message before the final assistant turn")
    return tuple(turns[:-1]), _nonempty(turns[-1]["content"], "response")


def _parse_instruction(record: Mapping[str, object]) -> tuple[tuple[dict[str, str], ...], str]:
    if record.keys() & {"prompt", "response"}:
        prompt, response = _string(record, "prompt"), _string(record, "response")
    else:
        prompt, response = _string(record, "instruction"), _string(record, "output")
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise _RecordError(f"'input' must be a string, got {_json_type(extra)}")
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
    return ({"role": "user", "content": _nonempty(prompt, "prompt")},), _nonempty(response, "response")


def _parse_completion(record: Mapping[str, object]) -> tuple[tuple[dict[str, str], ...], str]:
    return (), _nonempty(_string(record, "text"), "text")


_PARSERS: dict[str, Callable[[Mapping[str, object]], tuple[tuple[dict[str, str], ...], str]]] = {
    "chat": _parse_chat,
    "instruction": _parse_instruction,
    "completion": _parse_completion,
}

# --------------------------------------------------------------------------- curation

DropReason = Literal[
    "invalid", "empty", "too_short", "too_long", "duplicate", "near_duplicate", "eval_leakage", "eval_duplicate"
]
_EXAMPLES_PER_REASON = 20
_NUM_PERM = 128
_SHINGLE = 5
_MIN_TO_SPLIT = 10


@dataclass
class CurationConfig:
    dedup: Literal["none", "exact", "near"] = "near"
    near_duplicate_threshold: float = 0.85
    min_tokens: int = 2
    max_tokens: int = 2048
    remove_eval_leakage: bool = True
    seed: int = 42

    def __post_init__(self) -> None:
        if not 0.0 < self.near_duplicate_threshold <= 1.0:
            raise ValueError(f"near_duplicate_threshold must be in (0, 1], got {self.near_duplicate_threshold}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens {self.min_tokens} > max_tokens {self.max_tokens}")


@dataclass
class CurationResult:
    train: list[Example]
    validation: list[Example]
    eval: list[Example]
    dropped: dict[str, int]
    examples_dropped: dict[str, list[str]]

    def drop(self, reason: DropReason, example: Example) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        sources = self.examples_dropped.setdefault(reason, [])
        if len(sources) < _EXAMPLES_PER_REASON:
            sources.append(example.source)


def curate(
    train: list[Example],
    *,
    validation: list[Example] | None,
    eval: list[Example] | None,
    count_tokens: Callable[[Example], int],
    config: CurationConfig,
    validation_split: float = 0.1,
    eval_split: float = 0.1,
) -> CurationResult:
    """Clean ``train`` (and dedup ``eval``); split off missing held-out sets. Inputs are not mutated."""
    if not (0.0 <= validation_split < 1.0 and 0.0 <= eval_split < 1.0 and validation_split + eval_split < 1.0):
        raise ValueError(f"splits must be in [0, 1) and sum below 1: {validation_split=}, {eval_split=}")
    result = CurationResult(train=[], validation=[], eval=[], dropped={}, examples_dropped={})
    for reason in get_args(DropReason):
        if reason != "invalid":  # the loader's business; build_report adds it
            result.dropped[reason] = 0

    sized: list[Example] = []
    for example in train:
        if not _normalize(example.response):
            result.drop("empty", example)
            continue
        tokens = count_tokens(example)
        if tokens < config.min_tokens:
            result.drop("too_short", example)
        elif tokens > config.max_tokens:
            result.drop("too_long", example)
        else:
            sized.append(example)

    kept = _dedup(sized, config, result, exact="duplicate", near="near_duplicate")
    held_eval = None if eval is None else _dedup(eval, config, result, exact="eval_duplicate", near="eval_duplicate")
    if held_eval and config.remove_eval_leakage:
        # Always near-matched, whatever config.dedup says: a reworded eval question in train still inflates scores.
        leaks = _Index(config.near_duplicate_threshold, near=True)
        for example in held_eval:
            leaks.admit(example)
        clean = []
        for example in kept:
            if leaks.match(example):
                result.drop("eval_leakage", example)
            else:
                clean.append(example)
        kept = clean

    # Below _MIN_TO_SPLIT examples a validation loss is noise; eval still gets its (rounded) share.
    n = len(kept)
    n_eval = 0 if held_eval is not None else _holdout(n, eval_split, minimum_one=n >= _MIN_TO_SPLIT)
    n_val = 0 if validation is not None or n < _MIN_TO_SPLIT else _holdout(n, validation_split, minimum_one=True)
    n_eval = min(n_eval, max(0, n - 1))
    n_val = min(n_val, max(0, n - 1 - n_eval))
    order = list(range(n))
    random.Random(config.seed).shuffle(order)
    # Held-out examples keep file order too, so reports and digests read naturally.
    eval_ids, val_ids = set(order[:n_eval]), set(order[n_eval : n_eval + n_val])
    result.eval = list(held_eval) if held_eval is not None else [e for i, e in enumerate(kept) if i in eval_ids]
    result.validation = list(validation) if validation is not None else [e for i, e in enumerate(kept) if i in val_ids]
    result.train = [e for i, e in enumerate(kept) if i not in eval_ids and i not in val_ids]

    if not result.train:
        counts = ", ".join(f"{reason}: {n}" for reason, n in result.dropped.items() if n)
        raise DataError(f"no training example left after curation of {len(train)} ({counts or 'nothing dropped'})")
    return result


def _holdout(n: int, fraction: float, *, minimum_one: bool) -> int:
    if fraction <= 0.0:
        return 0
    return max(1, round(n * fraction)) if minimum_one else round(n * fraction)


def _normalize(text: str) -> str:
    """Casefolded, whitespace collapsed, punctuation stripped at both ends: what "the same text" means here."""
    text = " ".join(text.casefold().split())
    start, end = 0, len(text)
    while start < end and _is_trim(text[start]):
        start += 1
    while end > start and _is_trim(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_trim(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith("P")


def _exact_key(example: Example) -> str:
    # Per part, so "Q" + "A B" and "Q A" + "B" stay different pairs.
    return "\x1f".join(_normalize(part) for part in (*(m["content"] for m in example.prompt), example.response))


def _shingles(text: str, threshold: float) -> set[str]:
    """Word 5-grams for long texts, character 5-grams for short ones.

    One changed word alters up to 10 of a text's word 5-grams (5 lost, 5
    gained), so below about 10 / (1 - threshold) words (67 at 0.85) a single
    edit already pushes Jaccard under the threshold and word shingles would
    miss every reworded short example. Character 5-grams lose only a handful
    of hundreds per changed word.
    """
    words = text.casefold().split()
    if threshold < 1.0 and len(words) >= 2 * _SHINGLE / (1.0 - threshold):
        return {" ".join(words[i : i + _SHINGLE]) for i in range(len(words) - _SHINGLE + 1)}
    joined = " ".join(words)
    return {joined[i : i + _SHINGLE] for i in range(max(1, len(joined) - _SHINGLE + 1))}


def _lsh_bands(threshold: float) -> tuple[int, int]:
    """LSH (bands, rows) that find ~99% of pairs at the threshold.

    datasketch's default optimiser balances false positives and negatives,
    which at 0.85 finds barely half of the pairs right at the threshold. Its
    candidates are verified here anyway, so recall is what matters: the most
    rows per band (fewest spurious candidates) that still reach 99%.
    """
    best = (_NUM_PERM // 2, 2)
    for rows in range(1, _NUM_PERM // 2 + 1):
        bands = _NUM_PERM // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= 0.99:
            best = (bands, rows)
    return best


class _Index:
    """Exact keys, plus MinHash LSH when near matching, of the examples added so far.

    LSH only proposes candidates; each is confirmed with the exact Jaccard of
    the shingle sets, because the 128-permutation estimate is off by about
    0.03 near 0.85, enough to decide a borderline pair by chance. Shingles are
    kept as sorted 32-bit hashes, a few KiB per example.
    """

    def __init__(self, threshold: float, *, near: bool) -> None:
        self._threshold = threshold
        self._keys: set[str] = set()
        self._lsh = MinHashLSH(threshold=threshold, num_perm=_NUM_PERM, params=_lsh_bands(threshold)) if near else None
        self._shingles: list[npt.NDArray[np.uint32]] = []

    def match(self, example: Example) -> Literal["exact", "near"] | None:
        """How ``example`` matches one already added, or None."""
        return self._match(example, admit=False)

    def admit(self, example: Example) -> Literal["exact", "near"] | None:
        """Like ``match``, but an example that matches nothing is added."""
        return self._match(example, admit=True)

    def _match(self, example: Example, *, admit: bool) -> Literal["exact", "near"] | None:
        key = _exact_key(example)
        if key in self._keys:
            return "exact"
        if self._lsh is not None:
            shingles = _shingle_hashes(example.text(), self._threshold)
            minhash = MinHash(num_perm=_NUM_PERM, hashfunc=int)
            minhash.update_batch(shingles)
            for candidate in self._lsh.query(minhash):
                if _jaccard(self._shingles[candidate], shingles) >= self._threshold:
                    return "near"
            if admit:
                self._lsh.insert(len(self._shingles), minhash)
                self._shingles.append(shingles)
        if admit:
            self._keys.add(key)
        return None


def _shingle_hashes(text: str, threshold: float) -> npt.NDArray[np.uint32]:
    # CRC-32 is plenty to tell shingles apart (MinHash's own permutations do the mixing) and fast in C.
    hashes = (zlib.crc32(s.encode("utf-8")) for s in _shingles(text, threshold))
    return np.unique(np.fromiter(hashes, dtype=np.uint32))


def _jaccard(a: npt.NDArray[np.uint32], b: npt.NDArray[np.uint32]) -> float:
    common = np.intersect1d(a, b, assume_unique=True).size
    return common / (a.size + b.size - common)


def _dedup(
    examples: Iterable[Example], config: CurationConfig, result: CurationResult, *, exact: DropReason, near: DropReason
) -> list[Example]:
    if config.dedup == "none":
        return list(examples)
    index = _Index(config.near_duplicate_threshold, near=config.dedup == "near")
    kept: list[Example] = []
    for example in examples:
        match = index.admit(example)
        if match is None:
            kept.append(example)
        else:
            result.drop(exact if match == "exact" else near, example)
    return kept


# --------------------------------------------------------------------------- report


def dataset_digest(examples: list[Example]) -> str:
    """sha256 over the examples' content in order; sources are left out, so moving lines in a file does not count."""
    canonical = [{"prompt": list(e.prompt), "response": e.response} for e in examples]
    blob = json.dumps(canonical, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def build_report(
    files: Mapping[str, LoadResult],
    curation: CurationResult,
    count_tokens: Callable[[Example], int],
    *,
    created: datetime | None = None,
) -> dict[str, object]:
    """The content of ``data/report.json``. ``files`` maps "train" (and "validation"/"eval" when given) to loads.

    Everything read is accounted for: the split sizes plus every dropped count
    equal the records of all files together.
    """
    dropped = {"invalid": sum(len(f.invalid) for f in files.values()), **curation.dropped}
    examples_dropped = {
        "invalid": [source for f in files.values() for source, _ in f.invalid][:_EXAMPLES_PER_REASON],
        **curation.examples_dropped,
    }
    splits = {"train": curation.train, "validation": curation.validation, "eval": curation.eval}
    return {
        "created": (created or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
        "format": files["train"].format,
        "files": {
            split: {
                "digest": f.digest,
                "format": f.format,
                "records": f.records,
                "invalid": [{"source": s, "reason": r} for s, r in f.invalid[:_EXAMPLES_PER_REASON]],
            }
            for split, f in files.items()
        },
        "records": sum(f.records for f in files.values()),
        "splits": {
            split: {"examples": len(examples), "tokens": _length_stats([count_tokens(e) for e in examples])}
            for split, examples in splits.items()
        },
        "dropped": dropped,
        "examples_dropped": {reason: sources for reason, sources in examples_dropped.items() if sources},
        "train_digest": dataset_digest(curation.train),
    }


def _length_stats(lengths: list[int]) -> dict[str, float] | None:
    if not lengths:
        return None
    ordered = sorted(lengths)

    def nearest_rank(q: float) -> float:
        return float(ordered[max(0, math.ceil(q * len(ordered)) - 1)])

    return {
        "min": float(ordered[0]),
        "mean": round(sum(ordered) / len(ordered), 2),
        "p50": nearest_rank(0.5),
        "p95": nearest_rank(0.95),
        "max": float(ordered[-1]),
    }


# --------------------------------------------------------------------------- tokenization and packing

# For base models without a template of their own. The assistant turn ends in
# eos so a generation stops where the learned response stops. Newlines after a
# block tag are written as expressions: transformers renders with trim_blocks,
# which would eat the first of them.
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Install the fallback template, so the saved tokenizer serves the format the adapter was trained on."""
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of ``prompt`` up to and including the start of the assistant's turn."""
    if not prompt:
        return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    # The fallback is passed, not installed: rendering must not change the tokenizer it is given.
    text = tokenizer.apply_chat_template(
        list(prompt),
        chat_template=DEFAULT_CHAT_TEMPLATE if tokenizer.chat_template is None else None,
        add_generation_prompt=True,
        tokenize=False,
    )
    if not isinstance(text, str):
        raise TypeError(f"chat template rendered {type(text).__name__}, not text")
    # Templates write bos themselves when the model wants one; adding it again would double it.
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    return ids


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


def encode(tokenizer: PreTrainedTokenizerBase, example: Example, max_len: int) -> Encoded:
    """Prompt, response and eos; loss on the response and eos only.

    Truncation keeps the prompt's head and as much of the response as fits;
    when none of it fits, every label is ignored and the caller drops the example.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; a fine-tune could never learn to stop")
    prompt = render_prompt(tokenizer, example.prompt)[:max_len]
    response = [*tokenizer.encode(example.response, add_special_tokens=False), eos][: max_len - len(prompt)]
    labels = [IGNORE_INDEX] * len(prompt) + response
    if labels:
        # Nothing precedes the first token, so it is never a target; in a packed
        # row it would otherwise be learned from the previous example's last token.
        labels[0] = IGNORE_INDEX
    return Encoded(input_ids=prompt + response, labels=labels)


def token_counter(tokenizer: PreTrainedTokenizerBase) -> Callable[[Example], int]:
    """``count_tokens`` for ``curate``: the untruncated encoded length."""
    return lambda example: len(encode(tokenizer, example, sys.maxsize).input_ids)


@dataclass(frozen=True)
class Packed:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    segment_ids: list[int]


def pack(encoded: Sequence[Encoded], max_len: int) -> list[Packed]:
    """First-fit-decreasing: each example, longest first, goes into the first sequence with room."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    lengths = [len(encoded[i].input_ids) for i in order]
    if lengths and lengths[0] > max_len:
        raise ValueError(f"an example has {lengths[0]} tokens, more than max_len {max_len}; encode with max_len")
    bins: dict[int, list[Encoded]] = {}
    for i, slot in zip(order, _first_fit(lengths, max_len), strict=True):
        bins.setdefault(slot, []).append(encoded[i])
    packed = []
    for slot in sorted(bins):
        members = bins[slot]
        packed.append(
            Packed(
                input_ids=[t for e in members for t in e.input_ids],
                labels=[t for e in members for t in e.labels],
                position_ids=[p for e in members for p in range(len(e.input_ids))],
                segment_ids=[k for k, e in enumerate(members, start=1) for _ in e.input_ids],
            )
        )
    return packed


def _first_fit(lengths: Sequence[int], capacity: int) -> list[int]:
    """Bin index per length, first fit, in O(n log n).

    A max-tree over the bins' free space finds the leftmost bin with room
    without scanning the thousands of bins a large dataset fills. Unused
    leaves start with full capacity, so "no open bin fits" opens a new one.
    """
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    free = [capacity] * (2 * size)
    slots = []
    for length in lengths:
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        free[node] -= length
        slots.append(node - size)
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return slots


def collate(
    batch: Sequence[Packed] | Sequence[Encoded], pad_id: int, *, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Right-padded tensors and a 4D additive mask: causal, and only within one example.

    A (B, 1, L, L) float mask is the one form eager and SDPA attention both
    apply as given, so packing never lets examples attend to each other; the
    restarting position_ids also serve flash-attention's own packing path.
    Pads form segment 0 and attend among themselves, so no row is fully masked.
    """
    items: Sequence[Packed | Encoded] = batch
    if not items:
        raise ValueError("empty batch")
    rows, length = len(items), max(len(item.input_ids) for item in items)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((rows, length), dtype=torch.long)
    segments = torch.zeros((rows, length), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(item.labels, dtype=torch.long)
        if isinstance(item, Packed):
            position_ids[row, :n] = torch.tensor(item.position_ids, dtype=torch.long)
            segments[row, :n] = torch.tensor(item.segment_ids, dtype=torch.long)
        else:
            position_ids[row, :n] = torch.arange(n)
            segments[row, :n] = 1
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    mask = torch.zeros((rows, 1, length, length), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": mask,
        "num_tokens": (segments > 0).sum(),
        "num_target_tokens": (labels != IGNORE_INDEX).sum(),
    }
