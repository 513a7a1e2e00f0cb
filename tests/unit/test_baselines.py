"""The prompted baseline's prompt: label set, system prompt, and the three ways of choosing shots."""

from __future__ import annotations

from collections import Counter

import pytest

from kubetune_trainer import baselines
from kubetune_trainer.data import Example, load_jsonl
from tests.conftest import SUPPORT_DATA


def ex(prompt: str, response: str, i: int = 0) -> Example:
    return Example(prompt=({"role": "user", "content": prompt},), response=response, source=f"t:{i}")


LABELLED = [
    ex(f"ticket {i} about {topic}", label, i)
    for i, (topic, label) in enumerate(
        [("refund money back", "REFUND"), ("password reset", "PASSWORD"), ("late parcel", "DELAY")] * 6
        + [("broken screen app", "BUG")] * 2
    )
]


@pytest.mark.parametrize(
    ("responses", "expected"),
    [
        (["A", "B"] * 5, ["A", "B"]),
        (["B", "A", "B", "B", "A", "C"], ["B", "A", "C"]),  # most frequent first, ties by name
        ([f"free text answer {i}" for i in range(10)], None),  # nothing repeats: open-ended
        (["A"] * 10, None),  # one label is not a choice
        (["x" * 100, "y" * 100] * 5, None),  # long answers are not labels
        (["line one\nline two", "other"] * 5, None),
        ([f"L{i % 40}" for i in range(200)], None),  # more than MAX_LABELS
    ],
)
def test_label_set(responses: list[str], expected: list[str] | None) -> None:
    assert baselines.label_set([ex("q", r, i) for i, r in enumerate(responses)]) == expected


def test_system_prompt_lists_every_label_unless_the_user_gave_one() -> None:
    built = baselines.system_prompt_for(["B/X", "A/Y"], None)
    assert "- A/Y\n- B/X" in built
    assert "exactly one" in built
    assert baselines.system_prompt_for(["A", "B"], "Mine.") == "Mine."
    assert baselines.system_prompt_for(None, None) == baselines.DEFAULT_SYSTEM_PROMPT


def test_stratified_shots_cover_the_label_set() -> None:
    labels = baselines.label_set(LABELLED)
    assert labels is not None
    shots = baselines.stratified_shots(LABELLED, 4, seed=1, labels=labels)
    assert Counter(s.response for s in shots) == Counter({"REFUND": 1, "PASSWORD": 1, "DELAY": 1, "BUG": 1})
    # More shots than labels: round-robin, so no label gets two before every label has one.
    eight = baselines.stratified_shots(LABELLED, 8, seed=1, labels=labels)
    assert Counter(s.response for s in eight) == Counter({"REFUND": 2, "PASSWORD": 2, "DELAY": 2, "BUG": 2})
    # A label with too few examples is exhausted; the others fill the rest.
    many = baselines.stratified_shots(LABELLED, 12, seed=1, labels=labels)
    assert Counter(s.response for s in many)["BUG"] == 2
    assert len(many) == len({s.source for s in many}) == 12
    assert baselines.stratified_shots(LABELLED, 8, seed=1, labels=labels) == eight  # seeded
    # Random shots on the same data usually miss labels: that is what stratified is for.
    assert len({s.response for s in baselines.random_shots(LABELLED, 4, seed=1)}) < 4


def test_stratified_falls_back_to_random_for_open_ended_answers() -> None:
    open_ended = [ex(f"q{i}", f"answer {i}", i) for i in range(10)]
    assert baselines.stratified_shots(open_ended, 3, 7, None) == baselines.random_shots(open_ended, 3, 7)


def test_retrieved_shots_are_the_nearest_training_examples_most_similar_last() -> None:
    query = ex("my parcel is late, where is it", "DELAY")
    (shots,) = baselines.retrieved_shots(LABELLED, [query], 3)
    assert [s.response for s in shots] == ["DELAY"] * 3
    texts = [
        ex("kettle refund, and a long story about my weekend and the weather", "REFUND", 1),
        ex("kettle refund", "REFUND", 2),
        ex("the weather is fine", "OTHER", 3),
    ]
    (ranked,) = baselines.retrieved_shots(texts, [ex("kettle refund please", "?")], 3)
    assert ranked[-1].source == "t:2"  # the same terms in a shorter text: the best match, next to the question
    assert ranked[0].source == "t:3"  # nothing in common: the least similar, furthest away


def test_bm25_scores_rare_terms_higher() -> None:
    index = baselines.BM25.index(["late parcel", "late refund", "late password"])
    scores = index.scores("parcel late")
    assert scores[0] > scores[1] == scores[2] > 0


def test_prompted_conversations_record_the_plan_and_end_with_the_question() -> None:
    train = [e for e in load_jsonl(SUPPORT_DATA / "train.jsonl").examples if e.response != "..."]  # curation's job
    heldout = load_jsonl(SUPPORT_DATA / "heldout.jsonl").examples[:5]
    conversations, plan = baselines.prompted_conversations(
        heldout, train, few_shot=8, shot_selection="stratified", system_prompt=None, seed=42
    )
    assert plan.labels is not None
    assert len(plan.labels) == 8
    first = conversations[0]
    assert first[0]["role"] == "system"
    assert all(label in first[0]["content"] for label in plan.labels)
    answers = [m["content"] for m in first if m["role"] == "assistant"]
    assert sorted(answers) == sorted(plan.labels)  # 8 shots, one per queue
    assert first[-1] == heldout[0].prompt[-1]
    retrieved, plan = baselines.prompted_conversations(
        heldout, train, few_shot=4, shot_selection="retrieved", system_prompt="Route it.", seed=42
    )
    assert plan.system_prompt == "Route it."
    assert all(len([m for m in c if m["role"] == "assistant"]) == 4 for c in retrieved)
    assert retrieved[0] != retrieved[1]  # per-example shots
