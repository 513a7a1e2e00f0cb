"""The prompted baseline: the best a team gets from the base model without fine-tuning.

A fine-tune ships only if it beats good prompting, so the prompt has to be
good, not a strawman. It is built from three parts:

- a **system prompt**: the user's, or — when the training responses form a
  small closed set (labels, queue names, verdicts) — one that lists every
  allowed answer, so the base model knows the answer space it must pick from;
- **shots** from the training set, chosen by ``shot_selection``:

  ``random``      k examples drawn at random (seeded);
  ``stratified``  k examples spread over the labels round-robin, so k at
                  least the number of labels covers the whole label set; for
                  open-ended responses it is the same as ``random``;
  ``retrieved``   per eval example, the k training examples most similar to
                  it (BM25 over the prompt text), the most similar last, next
                  to the question: in-context retrieval, the strongest
                  prompting recipe when similar solved cases exist;

- the eval example's own prompt.

Everything here is a pure function of the data and the seed, so a report can
say exactly which prompt was used, and tests can pin it down.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kubetune_trainer.data import Example

ShotSelection = Literal["random", "stratified", "retrieved"]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer exactly in the format the examples show."
MAX_LABELS = 32  # more distinct responses than this is not a "small closed set"
MAX_LABEL_CHARS = 64


def label_set(train: Sequence[Example]) -> list[str] | None:
    """The distinct responses, most frequent first, when they form a small closed set; else None.

    A closed set: 2 to MAX_LABELS distinct short single-line responses, each
    seen at least twice on average (open-ended answers almost never repeat).
    """
    counts = Counter(e.response.strip() for e in train)
    if not 2 <= len(counts) <= MAX_LABELS or len(counts) * 2 > len(train):
        return None
    if any(len(label) > MAX_LABEL_CHARS or "\n" in label or not label for label in counts):
        return None
    return [label for label, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def system_prompt_for(labels: Sequence[str] | None, given: str | None) -> str:
    """The user's system prompt, else one naming the allowed answers, else a neutral default."""
    if given:
        return given
    if labels:
        allowed = "\n".join(f"- {label}" for label in sorted(labels))
        return (
            "You are a precise classifier. Reply with exactly one of the following labels, "
            f"written exactly as shown, and nothing else:\n{allowed}"
        )
    return DEFAULT_SYSTEM_PROMPT


def random_shots(train: Sequence[Example], k: int, seed: int) -> list[Example]:
    return random.Random(seed).sample(list(train), min(k, len(train)))


def stratified_shots(train: Sequence[Example], k: int, seed: int, labels: Sequence[str] | None) -> list[Example]:
    """k shots taken round-robin over the labels (most frequent label first), shuffled within each label."""
    if not labels:
        return random_shots(train, k, seed)
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = defaultdict(list)
    for example in train:
        by_label[example.response.strip()].append(example)
    pools = []
    for label in labels:
        pool = list(by_label[label])
        rng.shuffle(pool)
        pools.append(pool)
    shots: list[Example] = []
    depth = 0
    while len(shots) < min(k, len(train)):
        for pool in pools:
            if depth < len(pool) and len(shots) < k:
                shots.append(pool[depth])
        depth += 1
    # Interleaved labels, but not always in the same order: a fixed label order is a pattern to copy.
    rng.shuffle(shots)
    return shots


_WORD = re.compile(r"\w+")


def _terms(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def _query_text(example: Example) -> str:
    return " ".join(m["content"] for m in example.prompt if m["role"] != "system")


@dataclass
class BM25:
    """Okapi BM25 over the training prompts (k1 1.5, b 0.75): small, exact, no dependency."""

    docs: list[Counter[str]]
    lengths: list[int]
    idf: dict[str, float]
    average: float
    k1: float = 1.5
    b: float = 0.75

    @classmethod
    def index(cls, texts: Sequence[str]) -> BM25:
        docs = [Counter(_terms(t)) for t in texts]
        df: Counter[str] = Counter()
        for doc in docs:
            df.update(doc.keys())
        n = len(docs)
        idf = {term: math.log(1 + (n - f + 0.5) / (f + 0.5)) for term, f in df.items()}
        lengths = [sum(d.values()) for d in docs]
        return cls(docs, lengths, idf, sum(lengths) / max(n, 1))

    def scores(self, query: str) -> list[float]:
        terms = [t for t in set(_terms(query)) if t in self.idf]
        out = []
        for doc, length in zip(self.docs, self.lengths, strict=True):
            norm = self.k1 * (1 - self.b + self.b * length / max(self.average, 1e-9))
            out.append(
                sum(self.idf[t] * doc[t] * (self.k1 + 1) / (doc[t] + norm) for t in terms if t in doc),
            )
        return out


def retrieved_shots(train: Sequence[Example], queries: Sequence[Example], k: int) -> list[list[Example]]:
    """Per query, the k most similar training examples, least similar first (the best next to the question)."""
    index = BM25.index([_query_text(e) for e in train])
    out = []
    for query in queries:
        scores = index.scores(_query_text(query))
        # Ties broken by position in train, so the choice is deterministic.
        best = sorted(range(len(train)), key=lambda i: (-scores[i], i))[: min(k, len(train))]
        out.append([train[i] for i in reversed(best)])
    return out


@dataclass(frozen=True)
class PromptPlan:
    """Which prompt the baseline used: recorded in the report."""

    shot_selection: ShotSelection
    few_shot: int
    system_prompt: str
    labels: list[str] | None


def few_shot_prompt(example: Example, shots: Sequence[Example], system_prompt: str) -> tuple[dict[str, str], ...]:
    """The conversation: system prompt, k solved examples as earlier turns, then the question."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt}]
    for shot in shots:
        messages += [m for m in shot.prompt if m["role"] != "system"]
        messages.append({"role": "assistant", "content": shot.response})
    messages += [m for m in example.prompt if m["role"] != "system"]
    return tuple(messages)


def prompted_conversations(
    examples: Sequence[Example],
    train: Sequence[Example],
    *,
    few_shot: int,
    shot_selection: ShotSelection,
    system_prompt: str | None,
    seed: int,
) -> tuple[list[tuple[dict[str, str], ...]], PromptPlan]:
    """The prompted baseline's conversation for every eval example, and the plan that built them."""
    labels = label_set(train)
    system = system_prompt_for(labels, system_prompt)
    if shot_selection == "retrieved":
        per_example = retrieved_shots(train, examples, few_shot)
    else:
        shots = (
            stratified_shots(train, few_shot, seed, labels)
            if shot_selection == "stratified"
            else random_shots(train, few_shot, seed)
        )
        per_example = [shots] * len(examples)
    conversations = [few_shot_prompt(e, s, system) for e, s in zip(examples, per_example, strict=True)]
    return conversations, PromptPlan(shot_selection, few_shot, system, labels)
