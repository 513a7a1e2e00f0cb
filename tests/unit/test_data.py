"""The prepare stage: loading, curation, the data report, tokenization, packing and collation."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kubetune_trainer.data import (
    DEFAULT_CHAT_TEMPLATE,
    CurationConfig,
    DataError,
    Encoded,
    Example,
    build_report,
    collate,
    curate,
    dataset_digest,
    encode,
    ensure_chat_template,
    load_jsonl,
    pack,
    render_prompt,
    token_counter,
)
from kubetune_trainer.tiny import build_tokenizer

LONG_TEXT = (
    "the quarterly report shows that revenue grew by twelve percent while operating costs stayed flat "
    "which the board attributes to the new pricing model and lower churn among enterprise customers"
)


def write_jsonl(tmp_path: Path, records: list[Any], name: str = "train.jsonl") -> Path:
    """One line per record: dicts as JSON, strings verbatim (for broken lines)."""
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def chat(user: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def ex(response: str, prompt: str | None = None, source: str = "t.jsonl:1") -> Example:
    turns = () if prompt is None else ({"role": "user", "content": prompt},)
    return Example(prompt=turns, response=response, source=source)


def words(example: Example) -> int:
    return len(example.text().split())


def run_curate(
    train: list[Example],
    *,
    validation: list[Example] | None = None,
    eval: list[Example] | None = None,
    count: Callable[[Example], int] = words,
    **config: Any,
) -> Any:
    return curate(
        train,
        validation=validation,
        eval=[] if eval is None else eval,
        count_tokens=count,
        config=CurationConfig(**config),
    )


@pytest.fixture(scope="module")
def tok() -> Any:
    corpus = [LONG_TEXT, "What is the capital of France? Paris.", "Tell me a joke about cats, please."] * 5
    return build_tokenizer(corpus, vocab_size=320)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    ("record", "fmt", "prompt", "response"),
    [
        (chat("Hi?", "Hello."), "chat", [{"role": "user", "content": "Hi?"}], "Hello."),
        ({"prompt": "2+2?", "response": "4"}, "instruction", [{"role": "user", "content": "2+2?"}], "4"),
        (
            {"instruction": "Translate.", "input": "chat", "output": "cat"},
            "instruction",
            [{"role": "user", "content": "Translate.\n\nchat"}],
            "cat",
        ),
        (
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            "instruction",
            [{"role": "user", "content": "Say hi."}],
            "hi",
        ),
        ({"text": "Once upon a time."}, "completion", [], "Once upon a time."),
    ],
)
def test_detects_each_format(
    tmp_path: Path, record: dict[str, Any], fmt: str, prompt: list[Any], response: str
) -> None:
    loaded = load_jsonl(write_jsonl(tmp_path, [record, record]))
    assert loaded.format == fmt
    assert [list(e.prompt) for e in loaded.examples] == [prompt, prompt]
    assert [e.response for e in loaded.examples] == [response, response]
    assert [e.source for e in loaded.examples] == ["train.jsonl:1", "train.jsonl:2"]


def test_chat_keeps_earlier_turns_in_the_prompt(tmp_path: Path) -> None:
    record = {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye", "extra": "ignored"},
        ]
    }
    (example,) = load_jsonl(write_jsonl(tmp_path, [record])).examples
    assert [m["role"] for m in example.prompt] == ["system", "user", "assistant", "user"]
    assert example.response == "Bye"
    assert example.text() == "Be terse.\nHi\nHello\nBye\nBye"


def test_load_counts_records_and_hashes_raw_bytes(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    # Blank lines are skipped but still counted for line numbers; U+2028 inside a string is not a line break.
    raw = '{"text": "a\u2028b"}\n\n   \n{"text": "c"}\r\n'.encode()
    path.write_bytes(raw)
    loaded = load_jsonl(path)
    assert loaded.records == 2
    assert [(e.response, e.source) for e in loaded.examples] == [("a\u2028b", "train.jsonl:1"), ("c", "train.jsonl:4")]
    assert loaded.digest == "sha256:" + hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got an array"),
        ({"text": "a completion"}, "expected a JSON object with 'messages' (chat format detected from line 1)"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "the last message must be the assistant's"),
        ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "role 'tool'"),
        ({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "y"}]}, "must be a string"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty response"),
        ({"messages": [{"role": "assistant", "content": "y"}]}, "no message before the final assistant turn"),
        ({"messages": []}, "non-empty array"),
    ],
)
def test_invalid_line_is_reported_with_file_and_line(tmp_path: Path, line: Any, reason: str) -> None:
    good = [chat(f"question {i}", f"answer {i}") for i in range(25)]
    loaded = load_jsonl(write_jsonl(tmp_path, [good[0], line, *good[1:]]))
    assert len(loaded.examples) == 25
    assert loaded.records == 26
    assert len(loaded.invalid) == 1
    source, message = loaded.invalid[0]
    assert source == "train.jsonl:2"
    assert reason in message


def test_declared_format_rejects_other_shapes(tmp_path: Path) -> None:
    records = [{"prompt": "p", "response": "r"}] * 30 + [{"text": "t"}]
    loaded = load_jsonl(write_jsonl(tmp_path, records), "instruction")
    assert loaded.format == "instruction"
    assert loaded.invalid == [
        (
            "train.jsonl:31",
            "expected a JSON object with 'prompt'/'response' or 'instruction'/'output' (instruction format declared); "
            "this line looks like completion format",
        )
    ]


def test_instruction_variants_validate_their_fields(tmp_path: Path) -> None:
    records = [{"prompt": "p", "response": "r"}] * 40 + [
        {"prompt": "p"},
        {"instruction": "i", "input": 3, "output": "o"},
        {"prompt": " ", "response": "r"},
    ]
    with pytest.raises(DataError) as err:
        load_jsonl(write_jsonl(tmp_path, records))
    message = str(err.value)
    assert "train.jsonl: 3 of 43 records invalid" in message
    assert "train.jsonl:41: missing 'response'" in message
    assert "train.jsonl:42: 'input' must be a string, got a number" in message
    assert "train.jsonl:43: empty prompt" in message


def test_too_many_invalid_lines_name_the_first_five(tmp_path: Path) -> None:
    records: list[Any] = [{"text": f"doc {i}"} for i in range(10)] + ["oops"] * 7
    with pytest.raises(DataError) as err:
        load_jsonl(write_jsonl(tmp_path, records))
    message = str(err.value)
    assert message.startswith("train.jsonl: 7 of 17 records invalid")
    assert [f"train.jsonl:{n}:" in message for n in range(11, 18)] == [True] * 5 + [False] * 2
    assert "and 2 more" in message


def test_invalid_share_is_configurable(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [{"text": "a"}, {"text": "b"}, "oops"])
    assert len(load_jsonl(path, max_invalid_fraction=0.5).invalid) == 1
    with pytest.raises(DataError, match=r"train\.jsonl:3: invalid JSON"):
        load_jsonl(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "train.jsonl: no records"),
        (b"\n  \n\n", "train.jsonl: no records"),
        (b'{"foo": 1}\n[]\n', "train.jsonl: no valid example in 2 records\n  train.jsonl:1: unrecognized record"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "train.jsonl:2: not UTF-8 (byte 0xe9)"),
    ],
)
def test_unusable_file_raises(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert str(err.value).startswith(message)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^eval\.jsonl: file not found"):
        load_jsonl(tmp_path / "eval.jsonl")


# --------------------------------------------------------------------------- curation


def test_exact_dedup_normalizes_case_whitespace_and_end_punctuation() -> None:
    train = [
        ex("Paris is the capital.", "What is the capital of France?", "t:1"),
        ex("paris  is the\ncapital", "what is the capital of france", "t:2"),
        ex("Paris is the capital.", "What is the capital of Spain?", "t:3"),
        ex("Paris is, the capital.", "What is the capital of France?", "t:4"),
    ]
    result = run_curate(train, dedup="exact")
    assert [e.source for e in result.train] == ["t:1", "t:3", "t:4"]
    assert result.dropped["duplicate"] == 1
    assert result.examples_dropped["duplicate"] == ["t:2"]


def test_near_dedup_drops_a_one_word_edit_and_keeps_different_texts() -> None:
    edited = LONG_TEXT.replace("stayed flat", "stayed level")
    assert edited != LONG_TEXT
    assert len(LONG_TEXT.split()) == 30
    other = "the annual survey found that most employees prefer hybrid work and want more focus time during the week"
    train = [ex(LONG_TEXT, source="t:1"), ex(edited, source="t:2"), ex(other, source="t:3")]
    result = run_curate(train)
    assert [e.source for e in result.train] == ["t:1", "t:3"]
    assert result.dropped["near_duplicate"] == 1
    assert result.examples_dropped["near_duplicate"] == ["t:2"]
    assert [e.source for e in run_curate(train, dedup="exact").train] == ["t:1", "t:2", "t:3"]
    assert len(run_curate(train, dedup="near", near_duplicate_threshold=0.95).train) == 3


def test_near_dedup_finds_pairs_just_above_the_threshold() -> None:
    # LSH tuned for balanced errors finds only about half the pairs at 0.85; the index must find them all.
    rng = random.Random(0)
    vocabulary = [*LONG_TEXT.split(), "alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta"]
    originals = [[rng.choice(vocabulary) for _ in range(30)] for _ in range(20)]
    train = []
    for i, text in enumerate(originals):
        edited = [*text[:15], "zzyzx", *text[16:]]
        train += [ex(" ".join(text), source=f"t:{i}"), ex(" ".join(edited), source=f"t:{i}'")]
    result = run_curate(train)  # each pair's Jaccard is 0.88 to 0.93
    assert result.examples_dropped["near_duplicate"] == [f"t:{i}'" for i in range(20)]


def test_near_dedup_on_long_texts() -> None:
    long_text = " ".join(f"{LONG_TEXT} section {i}" for i in range(5))  # 160 words
    edited = long_text.replace("grew", "rose", 1)
    shuffled = " ".join(reversed(long_text.split()))
    result = run_curate([ex(long_text, source="t:1"), ex(edited, source="t:2"), ex(shuffled, source="t:3")])
    # The same words in another order are another text.
    assert [e.source for e in result.train] == ["t:1", "t:3"]


def test_no_dedup_keeps_everything() -> None:
    train = [ex("same answer", "q", "t:1"), ex("same answer", "q", "t:2")]
    assert len(run_curate(train, dedup="none").train) == 2


def test_length_filter_uses_the_token_counter() -> None:
    train = [
        ex("one", source="t:1"),
        ex("two words", source="t:2"),
        ex("a b c d e f", source="t:3"),
        ex("...", source="t:4"),
    ]
    result = run_curate(train, min_tokens=2, max_tokens=5)
    assert [e.source for e in result.train] == ["t:2"]
    assert (result.dropped["too_short"], result.dropped["too_long"], result.dropped["empty"]) == (1, 1, 1)
    assert result.examples_dropped["too_short"] == ["t:1"]
    assert result.examples_dropped["too_long"] == ["t:3"]
    assert result.examples_dropped["empty"] == ["t:4"]


def test_eval_leakage_is_removed_from_train_only() -> None:
    eval_set = [
        ex("Four.", "What is 2 + 2?", "e:1"),
        ex(LONG_TEXT, "Summarize the report.", "e:2"),
        ex("four", "what is 2 + 2", "e:3"),
    ]
    train = [
        ex("four", "What is 2+2 ?", "t:1"),  # different prompt text: kept
        ex("Four!", "what is 2 + 2", "t:2"),  # exact after normalization
        ex(LONG_TEXT.replace("twelve", "eleven"), "Summarize the report.", "t:3"),  # near
        ex("Blue.", "What colour is the sky?", "t:4"),
    ]
    result = run_curate(train, eval=list(eval_set))
    assert [e.source for e in result.train] == ["t:1", "t:4"]
    assert result.examples_dropped["eval_leakage"] == ["t:2", "t:3"]
    assert [e.source for e in result.eval] == ["e:1", "e:2"]
    assert result.examples_dropped["eval_duplicate"] == ["e:3"]
    kept = run_curate(train, eval=list(eval_set), remove_eval_leakage=False)
    assert len(kept.train) == 4
    assert kept.dropped["eval_leakage"] == 0


def test_splits_are_deterministic_and_disjoint() -> None:
    train = [ex(f"answer number {i} is {i * 7}", f"question {i}", f"t:{i}") for i in range(100)]

    def split(seed: int) -> tuple[list[str], list[str], list[str]]:
        r = curate(train, validation=None, eval=None, count_tokens=words, config=CurationConfig(seed=seed))
        return [e.source for e in r.train], [e.source for e in r.validation], [e.source for e in r.eval]

    first = split(42)
    assert first == split(42)
    assert first != split(7)
    tr, val, ev = first
    assert (len(tr), len(val), len(ev)) == (80, 10, 10)
    assert sorted(tr + val + ev) == sorted(e.source for e in train)
    assert tr == [s for s in (e.source for e in train) if s in set(tr)]  # file order kept


@pytest.mark.parametrize(("n", "sizes"), [(10, (8, 1, 1)), (9, (8, 0, 1)), (4, (4, 0, 0)), (1, (1, 0, 0))])
def test_small_datasets_split_sparingly(n: int, sizes: tuple[int, int, int]) -> None:
    train = [ex(f"distinct answer {i}", f"q{i}", f"t:{i}") for i in range(n)]
    r = curate(train, validation=None, eval=None, count_tokens=words, config=CurationConfig())
    assert (len(r.train), len(r.validation), len(r.eval)) == sizes


def test_given_validation_and_eval_are_not_split_from_train() -> None:
    train = [ex(f"distinct answer {i}", f"q{i}", f"t:{i}") for i in range(50)]
    val = [ex("validation answer", "vq", "v:1")]
    result = run_curate(train, validation=val, eval=[ex("eval answer", "eq", "e:1")])
    assert (len(result.train), result.validation, len(result.eval)) == (50, val, 1)


def test_empty_train_after_curation_raises_with_counts() -> None:
    train = [ex("hi", source="t:1"), ex("Four.", "What is 2 + 2?", "t:2")]
    with pytest.raises(DataError, match=r"of 2 \(too_short: 1, eval_leakage: 1\)$"):
        run_curate(train, eval=[ex("four", "what is 2 + 2", "e:1")])


# --------------------------------------------------------------------------- report


def test_report_accounts_for_every_record(tmp_path: Path) -> None:
    records: list[Any] = [chat(f"question {i}", f"answer {i}") for i in range(40)]
    records += [chat("question 3", "answer 3"), chat("x", "y"), "broken"]
    train = load_jsonl(write_jsonl(tmp_path, records), max_invalid_fraction=0.1)
    evals = load_jsonl(
        write_jsonl(tmp_path, [chat("question 5", "answer 5"), chat("q", "a long eval answer")], "eval.jsonl")
    )
    counter: Callable[[Example], int] = words
    result = curate(
        train.examples,
        validation=None,
        eval=evals.examples,
        count_tokens=counter,
        config=CurationConfig(min_tokens=3),
    )
    created = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    report: dict[str, Any] = build_report(
        files={"train": train, "eval": evals}, curation=result, count_tokens=counter, created=created
    )
    json.dumps(report)  # must be writable as report.json

    dropped = report["dropped"]
    splits = report["splits"]
    assert dropped["invalid"] == 1
    assert dropped["duplicate"] == 1
    assert dropped["too_short"] == 1
    assert dropped["eval_leakage"] == 1
    kept = sum(s["examples"] for s in splits.values())
    assert kept + sum(dropped.values()) == report["records"] == train.records + evals.records
    assert (splits["eval"]["examples"], splits["validation"]["examples"]) == (2, 4)
    assert splits["eval"]["tokens"] == {"min": 4.0, "mean": 4.5, "p50": 4.0, "p95": 5.0, "max": 5.0}
    assert report["created"] == "2025-01-02T03:04:05Z"
    assert report["format"] == "chat"
    assert report["files"]["train"]["digest"] == train.digest
    assert report["files"]["train"]["invalid"] == [{"source": "train.jsonl:43", "reason": train.invalid[0][1]}]
    assert report["examples_dropped"]["invalid"] == ["train.jsonl:43"]
    assert report["train_digest"] == dataset_digest(result.train)


def test_dataset_digest_covers_content_not_sources() -> None:
    a = [ex("answer", "question", "t:1"), ex("b", "q", "t:2")]
    moved = [ex("answer", "question", "t:9"), ex("b", "q", "t:12")]
    assert dataset_digest(a) == dataset_digest(moved)
    assert dataset_digest(a) != dataset_digest([ex("answer!", "question", "t:1"), a[1]])
    assert dataset_digest(a) != dataset_digest(a[::-1])
    assert dataset_digest(a).startswith("sha256:")


# --------------------------------------------------------------------------- tokenization


def test_loss_is_masked_exactly_on_prompt_tokens(tok: Any) -> None:
    example = Example(
        prompt=(
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"},
        ),
        response="Paris.",
        source="t:1",
    )
    prompt = render_prompt(tok, example.prompt)
    assert tok.decode(prompt) == tok.apply_chat_template(
        list(example.prompt), tokenize=False, add_generation_prompt=True
    )
    encoded = encode(tok, example, max_len=512)
    n = len(prompt)
    assert encoded.input_ids[:n] == prompt
    assert encoded.labels[:n] == [-100] * n
    assert encoded.labels[n:] == encoded.input_ids[n:]
    assert tok.decode(encoded.labels[n:]) == "Paris.<|end|>"
    assert encoded.labels[-1] == tok.eos_token_id


def test_completion_starts_with_bos_and_never_learns_the_first_token(tok: Any) -> None:
    encoded = encode(tok, ex("Once upon a time."), max_len=512)
    assert encoded.input_ids[0] == tok.bos_token_id
    assert encoded.labels[0] == -100
    assert tok.decode(encoded.labels[1:]) == "Once upon a time.<|end|>"


def test_first_token_is_never_a_target_without_bos() -> None:
    # Packed, it would be "predicted" from the previous example's last token.
    no_bos: Any = build_tokenizer(["Once upon a time."] * 3, vocab_size=300)
    no_bos.bos_token = None
    encoded = encode(no_bos, ex("Once upon a time."), max_len=512)
    assert no_bos.decode(encoded.input_ids) == "Once upon a time.<|end|>"
    assert encoded.labels == [-100, *encoded.input_ids[1:]]


def test_truncation_keeps_prompt_and_cuts_the_response(tok: Any) -> None:
    example = ex(LONG_TEXT, "Summarize.")
    prompt_len = len(render_prompt(tok, example.prompt))
    cut = encode(tok, example, max_len=prompt_len + 3)
    assert len(cut.input_ids) == prompt_len + 3
    assert cut.labels[prompt_len:] == cut.input_ids[prompt_len:]
    assert tok.eos_token_id not in cut.labels
    nothing = encode(tok, example, max_len=prompt_len - 1)
    assert len(nothing.input_ids) == prompt_len - 1
    assert set(nothing.labels) == {-100}


def test_token_counter_is_the_untruncated_length(tok: Any) -> None:
    example = ex(LONG_TEXT, "Summarize.")
    assert token_counter(tok)(example) == len(encode(tok, example, max_len=10_000).input_ids)


def test_default_chat_template_for_tokenizers_without_one() -> None:
    bare: Any = build_tokenizer(["hello there general kenobi"] * 3, vocab_size=300)
    bare.chat_template = None
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    # Rendering works without mutating the tokenizer ...
    assert bare.decode(render_prompt(bare, messages)) == "<|bos|>### System:\nS\n\n### User:\nU\n\n### Assistant:\n"
    assert bare.chat_template is None
    # ... and ensure_chat_template installs the same template for generation at serving time.
    ensure_chat_template(bare)
    assert bare.chat_template == DEFAULT_CHAT_TEMPLATE
    full = bare.apply_chat_template([*messages, {"role": "assistant", "content": "A"}], tokenize=False)
    assert full.endswith("### Assistant:\nA<|end|>\n\n")


# --------------------------------------------------------------------------- packing and collation


def make_encoded(length: int, first: int = 10) -> Encoded:
    ids = list(range(first, first + length))
    return Encoded(input_ids=ids, labels=[-100, *ids[1:]])


def test_pack_respects_max_len_and_restarts_positions() -> None:
    lengths = [7, 5, 5, 4, 3, 3, 2, 1]
    encoded = [make_encoded(n, first=100 * i) for i, n in enumerate(lengths)]
    packed = pack(encoded, max_len=10)
    assert len(packed) == 3  # 30 tokens in bins of 10: first-fit-decreasing reaches the optimum here
    seen = []
    for row in packed:
        assert len(row.input_ids) == len(row.labels) == len(row.position_ids) == len(row.segment_ids) <= 10
        segments = sorted(set(row.segment_ids))
        assert segments == list(range(1, len(segments) + 1))
        for k in segments:
            idx = [i for i, s in enumerate(row.segment_ids) if s == k]
            assert idx == list(range(idx[0], idx[0] + len(idx)))  # contiguous
            assert [row.position_ids[i] for i in idx] == list(range(len(idx)))
            seen.append(([row.input_ids[i] for i in idx], [row.labels[i] for i in idx]))
    assert sorted(seen) == sorted((e.input_ids, e.labels) for e in encoded)


def test_pack_rejects_examples_longer_than_max_len() -> None:
    with pytest.raises(ValueError, match="more than max_len"):
        pack([make_encoded(11)], max_len=10)


def test_collate_pads_and_masks_by_segment() -> None:
    packed = pack([make_encoded(3), make_encoded(2, first=50)], max_len=5)
    batch = collate([*packed, *pack([make_encoded(2, first=70)], max_len=5)], pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 50, 51], [70, 71, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, 51], [-100, 71, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert int(batch["num_tokens"]) == 7
    assert int(batch["num_target_tokens"]) == 4
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 5, 5)
    assert mask.dtype == torch.float32
    allowed = (mask[:, 0] == 0).int().tolist()
    assert allowed[0] == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert allowed[1][1] == [1, 1, 0, 0, 0]  # real tokens never see pads
    assert allowed[1][4] == [0, 0, 1, 1, 1]  # pads see only pads: no fully masked row
    assert mask.min().item() == torch.finfo(torch.float32).min
    assert collate([make_encoded(2)], pad_id=0, dtype=torch.bfloat16)["attention_mask"].dtype == torch.bfloat16


def test_collate_treats_each_encoded_row_as_one_segment() -> None:
    batch = collate([make_encoded(3), make_encoded(1)], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert (batch["attention_mask"][1, 0, 0] == 0).tolist() == [True, False, False]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_examples_do_not_attend_to_each_other(tok: Any, attn: str) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        attn_implementation=attn,
    )
    model = LlamaForCausalLM(config).eval()
    long = encode(tok, ex(LONG_TEXT, "Summarize the report.", "t:1"), max_len=256)
    short = encode(tok, ex("Paris.", "What is the capital of France?", "t:2"), max_len=256)
    (row,) = pack([short, long], max_len=256)
    second = [i for i, s in enumerate(row.segment_ids) if s == 2]
    assert [row.input_ids[i] for i in second] == short.input_ids  # longest first: the short one comes second

    batch = collate([row], pad_id=tok.pad_token_id)
    alone = collate([short], pad_id=tok.pad_token_id)
    with torch.no_grad():
        packed_logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits[0, second]
        alone_logits = model(
            input_ids=alone["input_ids"], attention_mask=alone["attention_mask"], position_ids=alone["position_ids"]
        ).logits[0]
        # Control: a plain causal mask over the packed row lets the second example see the first.
        leaky_logits = model(
            input_ids=batch["input_ids"],
            attention_mask=torch.ones_like(batch["input_ids"]),
            position_ids=batch["position_ids"],
        ).logits[0, second]
    torch.testing.assert_close(packed_logits, alone_logits, atol=1e-4, rtol=0)
    assert (leaky_logits - alone_logits).abs().max() > 1e-2
