"""Evaluation: does the fine-tune beat the base model and a well-prompted baseline?

Three candidates answer every held-out example with greedy decoding:

- ``fine_tuned`` — the base model with the adapter, given the example's prompt;
- ``base`` — the un-tuned base model, same prompt (zero-shot);
- ``prompted`` — the un-tuned base model with a system prompt and k few-shot
  examples from the training set: what you get without fine-tuning.

Each is scored on the task metrics, and each records its mean prompt tokens
and mean latency per example, so the report shows what the fine-tune saves
over prompting, not only whether it is better. ``loss`` is the mean token loss
on the eval responses (teacher-forced); ``perplexity`` is measured on a
general-text sample and is the catastrophic-forgetting check.

Gates turn scores into a ship/no-ship decision. With no gates configured the
fine-tune must beat every enabled baseline on the headline metric: a
fine-tune that does not beat good prompting must not ship.
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import torch

from kubetune_trainer import baselines, generation, train
from kubetune_trainer.config import EvaluationConfig, GateConfig, LiftOverConfig
from kubetune_trainer.data import Example, collate, encode, render_prompt
from kubetune_trainer.modeling import Runtime

log = logging.getLogger(__name__)

LOWER_IS_BETTER = ("loss", "perplexity")

# ----------------------------------------------------------------------------- metrics


def normalize(text: str) -> str:
    text = text.casefold().strip()
    text = text.strip(string.punctuation + string.whitespace)
    return re.sub(r"\s+", " ", text)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, reference: str) -> float:
    return float(normalize(reference) in normalize(prediction))


def _json(text: str) -> Any:
    try:
        return json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None


def json_valid(prediction: str, reference: str) -> float:
    return float(_json(prediction) is not None)


def json_field_match(prediction: str, reference: str) -> float:
    """Share of the reference object's top-level fields the prediction reproduces exactly."""
    ref, pred = _json(reference), _json(prediction)
    if not isinstance(ref, dict) or not ref:
        return float(ref == pred)
    if not isinstance(pred, dict):
        return 0.0
    return sum(1 for k, v in ref.items() if pred.get(k) == v) / len(ref)


TEXT_METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "token_f1": token_f1,
    "contains": contains,
    "json_valid": json_valid,
    "json_field_match": json_field_match,
}

# ----------------------------------------------------------------------------- candidates


@dataclass
class CandidateResult:
    name: str
    metrics: dict[str, float]
    prompt_tokens_mean: float
    latency_ms_mean: float
    samples: list[dict[str, str]] = field(default_factory=list)
    examples_per_second: float = 0.0
    batch_size: int = 1
    # Per example, in the eval set's order: each text metric's score, and the answer itself.
    per_example: dict[str, list[float]] = field(default_factory=dict)
    predictions: list[str] = field(default_factory=list)


@dataclass
class GateResult:
    metric: str
    rule: str
    value: float | None
    threshold: float | None
    passed: bool
    message: str
    # minLiftOver on a per-example metric: the examples the fine-tune scored higher and lower on than
    # the baseline, and the one-sided sign test's p-value (how often chance alone would do as well).
    better: int | None = None
    worse: int | None = None
    p_value: float | None = None


@dataclass
class Report:
    headline: str
    candidates: dict[str, CandidateResult]
    gates: list[GateResult]
    passed: bool
    examples: int
    general_perplexity: dict[str, float]
    prompt: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    misses: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "headline_metric": self.headline,
            "examples": self.examples,
            "passed": self.passed,
            "candidates": {k: asdict(v) for k, v in self.candidates.items()},
            "gates": [asdict(g) for g in self.gates],
            "general_perplexity": self.general_perplexity,
            "prompt": self.prompt,
            "notes": self.notes,
            "misses": self.misses,
        }


def score_candidate(
    name: str,
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    prompts: Sequence[tuple[dict[str, str], ...]],
    cfg: EvaluationConfig,
    runtime: Runtime,
    max_prompt_tokens: int,
    *,
    batch_size: int | None = None,
) -> CandidateResult:
    """Generate an answer for every example (in length-sorted batches) and score it.

    A request's latency is the wall time of the batch it was answered in: what
    a caller of a batching server would wait, at this batch size.
    """
    text_metrics = [m for m in cfg.metrics if m in TEXT_METRICS]
    size = batch_size or cfg.batch_size
    encoded = [render_prompt(tokenizer, p)[-max_prompt_tokens:] for p in prompts]
    predictions: list[str] = [""] * len(encoded)
    latencies: list[float] = [0.0] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    started_all = time.perf_counter()
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        started = time.perf_counter()
        outputs = generation.generate(
            model, tokenizer, [encoded[i] for i in rows], runtime, max_new_tokens=cfg.max_new_tokens
        )
        elapsed = time.perf_counter() - started
        for i, out in zip(rows, outputs, strict=True):
            predictions[i] = tokenizer.decode(out.tokens, skip_special_tokens=True).strip()
            latencies[i] = elapsed
    total = time.perf_counter() - started_all
    per_example: dict[str, list[float]] = {m: [] for m in text_metrics}
    samples: list[dict[str, str]] = []
    for example, prediction in zip(examples, predictions, strict=True):
        for metric in text_metrics:
            per_example[metric].append(round(TEXT_METRICS[metric](prediction, example.response), 4))
        if len(samples) < 10:
            samples.append({"source": example.source, "prediction": prediction, "reference": example.response})
    n = max(len(examples), 1)
    return CandidateResult(
        name=name,
        metrics={m: round(sum(v) / n, 4) for m, v in per_example.items()},
        prompt_tokens_mean=round(sum(len(e) for e in encoded) / n, 1),
        latency_ms_mean=round(1000 * sum(latencies) / n, 2),
        samples=samples,
        examples_per_second=round(len(examples) / total, 2) if total > 0 else 0.0,
        batch_size=size,
        per_example=per_example,
        predictions=predictions,
    )


@torch.no_grad()
def response_loss(model: Any, tokenizer: Any, examples: Sequence[Example], max_len: int, runtime: Runtime) -> float:
    """Mean token loss on the reference responses, teacher-forced.

    Batches of similar length (less padding), and logits for the response positions only
    (``train.forward_loss``): on SmolLM2-135M, 96 held-out tickets took 10.3 s instead of 12.9 s.
    """
    encoded = [e for e in (encode(tokenizer, x, max_len) for x in examples) if any(t != -100 for t in e.labels)]
    encoded.sort(key=lambda e: len(e.input_ids))
    total, count = 0.0, 0
    for i in range(0, len(encoded), 8):
        batch = collate(encoded[i : i + 8], tokenizer.pad_token_id)
        n = int(batch["num_target_tokens"])
        total += float(train.forward_loss(model, train.to_device(batch, runtime), runtime)) * n
        count += n
    return total / max(count, 1)


def general_text_sample() -> str:
    return resources.files("kubetune_trainer").joinpath("general_text.txt").read_text(encoding="utf-8")


@torch.no_grad()
def text_perplexity(model: Any, tokenizer: Any, text: str, max_len: int, runtime: Runtime) -> float:
    ids = tokenizer(text)["input_ids"]
    total, count = 0.0, 0
    window = max(16, min(max_len, 512))
    for start in range(0, max(len(ids) - 1, 1), window):
        chunk = torch.tensor([ids[start : start + window]], device=runtime.device)
        if chunk.shape[1] < 2:
            break
        loss = float(model(input_ids=chunk, labels=chunk).loss)
        total += loss * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    return math.exp(total / max(count, 1))


# ----------------------------------------------------------------------------- gates


def paired(fine_tuned: Sequence[float], baseline: Sequence[float]) -> tuple[int, int]:
    """On how many examples the fine-tune scored higher, and lower, than a baseline (same examples, same order)."""
    better = sum(1 for a, b in zip(fine_tuned, baseline, strict=True) if a > b)
    worse = sum(1 for a, b in zip(fine_tuned, baseline, strict=True) if a < b)
    return better, worse


def sign_test_p(better: int, worse: int) -> float:
    """One-sided exact sign test (McNemar's exact test when scores are 0 or 1).

    Of the ``better + worse`` examples where the two differ, the chance that at least
    ``better`` go the fine-tune's way if neither were better (each way with p = 1/2).
    Ties carry no evidence either way; with no differing example the p-value is 1.
    """
    n = better + worse
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(better, n + 1)) / (1 << n)


def _paired_with(report: Report, baseline: str, metric: str) -> tuple[int, int, float] | None:
    mine, theirs = report.candidates.get("fine_tuned"), report.candidates.get(baseline)
    if mine is None or theirs is None or metric not in mine.per_example or metric not in theirs.per_example:
        return None
    better, worse = paired(mine.per_example[metric], theirs.per_example[metric])
    return better, worse, sign_test_p(better, worse)


def _value(report: Report, candidate: str, metric: str) -> float | None:
    c = report.candidates.get(candidate)
    return None if c is None else c.metrics.get(metric)


def evaluate_gate(gate: GateConfig, report: Report) -> GateResult:
    metric = gate.metric
    value = _value(report, "fine_tuned", metric)
    lower_better = metric in LOWER_IS_BETTER

    def result(rule: str, threshold: float | None, ok: bool, why: str) -> GateResult:
        return GateResult(metric, rule, value, None if threshold is None else round(threshold, 4), ok, why)

    if value is None:
        return result("metric present", None, False, f"{metric} was not measured for the fine-tune")
    if gate.min is not None:
        ok = value >= gate.min
        return result(f"min {gate.min}", gate.min, ok, f"{metric} {value:.4f} {'>=' if ok else '<'} {gate.min}")
    if gate.max is not None:
        ok = value <= gate.max
        return result(f"max {gate.max}", gate.max, ok, f"{metric} {value:.4f} {'<=' if ok else '>'} {gate.max}")
    if gate.min_lift_over is not None:
        baseline, by = gate.min_lift_over.baseline, gate.min_lift_over.by
        significance = gate.min_lift_over.significance
        other = _value(report, baseline, metric)
        rule = f"minLiftOver {baseline} by {by}" + ("" if significance is None else f" at p <= {significance}")
        if other is None:
            return result(rule, None, False, f"baseline {baseline} has no {metric} score")
        threshold = other - by if lower_better else other + by
        lift = (other - value) if lower_better else (value - other)
        # "by 0" means strictly better: a tie with the baseline is no reason to ship.
        ok = lift > 0 if by == 0 else lift >= by - 1e-12
        need = "> 0" if by == 0 else f">= {by}"
        outcome = result(
            rule, threshold, ok, f"{metric} {value:.4f} vs {baseline} {other:.4f}: lift {lift:+.4f} (need {need})"
        )
        pair = _paired_with(report, baseline, metric)
        if pair is None:
            if significance is not None:  # nothing to test (the API refuses such a gate)
                outcome.passed = False
                outcome.message += f"; no per-example {metric} scores to test the lift's significance"
            return outcome
        better, worse, p = pair
        outcome.better, outcome.worse, outcome.p_value = better, worse, round(p, 4)
        outcome.message += f"; better on {better}, worse on {worse} examples (one-sided sign test p={p:.3g}"
        outcome.message += ")" if significance is None else f", need <= {significance})"
        outcome.passed = outcome.passed and (significance is None or p <= significance)
        return outcome
    if gate.max_regression is not None:
        base = _value(report, "base", metric)
        rule = f"maxRegression {gate.max_regression}"
        if base is None:
            return result(rule, None, False, f"the base model has no {metric} score")
        if metric == "perplexity":
            threshold = base * (1 + gate.max_regression)
            ok = value <= threshold
            change = (value - base) / base if base else 0.0
            return result(rule, threshold, ok, f"perplexity {value:.3f} vs base {base:.3f}: {change:+.1%}")
        threshold = base + gate.max_regression if lower_better else base - gate.max_regression
        ok = value <= threshold if lower_better else value >= threshold
        return result(rule, threshold, ok, f"{metric} {value:.4f} vs base {base:.4f}")
    return result("none", None, False, "gate has no rule")


def default_gates(cfg: EvaluationConfig) -> list[GateConfig]:
    """Without configured gates: strictly beat every enabled baseline on the headline metric."""
    gates = []
    if cfg.prompted.enabled:
        gates.append(GateConfig(metric=cfg.headline, min_lift_over=LiftOverConfig(baseline="prompted")))
    if cfg.base:
        gates.append(GateConfig(metric=cfg.headline, min_lift_over=LiftOverConfig(baseline="base")))
    return gates


def prompt_budget(model: Any, max_seq_length: int, max_new_tokens: int) -> int:
    """The longest prompt a candidate is given: the model's context less the answer's budget.

    Not ``training.maxSeqLength``: that bounds training rows, and cutting a few-shot prompt to it
    would drop the front of its system prompt, a weaker baseline than the one configured.
    """
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    limit = context if isinstance(context, int) and context > max_seq_length else max_seq_length
    return max(16, limit - max_new_tokens)


def cut_off_note(tokenizer: Any, examples: Sequence[Example], max_new_tokens: int) -> str | None:
    """Say so when some references are longer than the generation budget: no answer can match them."""
    lengths = [len(tokenizer(e.response, add_special_tokens=False)["input_ids"]) for e in examples]
    long = [n for n in lengths if n > max_new_tokens]
    if not long:
        return None
    return (
        f"{len(long)} of {len(examples)} references are longer than evaluation.maxNewTokens ({max_new_tokens}); "
        f"the longest is {max(long)} tokens, so no candidate can match them exactly: "
        f"set maxNewTokens to at least {max(long)}"
    )


@contextmanager
def adapter_disabled(model: Any) -> Iterator[None]:
    """The base model's behaviour from a PEFT model, without a second copy in memory."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


def run_evaluation(
    tuned: Any,
    base: Any | None,
    tokenizer: Any,
    eval_set: Sequence[Example],
    train_set: Sequence[Example],
    cfg: EvaluationConfig,
    runtime: Runtime,
    *,
    max_seq_length: int,
    seed: int,
    general_text: str,
    on_candidate: Callable[[str], None] | None = None,
) -> Report:
    """Score the fine-tune and its baselines; apply the gates.

    ``base`` is a separate base model for full fine-tunes; for adapters it is
    None and the base is the tuned model with its adapter disabled.
    """
    examples = list(eval_set)
    if cfg.max_examples is not None:
        examples = examples[: cfg.max_examples]
    max_prompt = prompt_budget(tuned, max_seq_length, cfg.max_new_tokens)
    notes = [note] if (note := cut_off_note(tokenizer, examples, cfg.max_new_tokens)) else []
    for line in notes:
        log.warning("%s", line)
    zero_shot = [e.prompt for e in examples]

    def base_ctx() -> Any:
        return nullcontext() if base is not None else adapter_disabled(tuned)

    base_model = base if base is not None else tuned
    plan: list[tuple[str, Any, Callable[[], Any], Sequence[tuple[dict[str, str], ...]]]] = [
        ("fine_tuned", tuned, nullcontext, zero_shot)
    ]
    if cfg.base:
        plan.append(("base", base_model, base_ctx, zero_shot))
    prompt_info: dict[str, Any] = {}
    if cfg.prompted.enabled:
        prompted, prompt_plan = baselines.prompted_conversations(
            examples,
            list(train_set),
            few_shot=cfg.prompted.few_shot,
            shot_selection=cfg.prompted.shot_selection,
            system_prompt=cfg.prompted.system_prompt,
            seed=seed,
        )
        plan.append(("prompted", base_model, base_ctx, prompted))
        prompt_info = _prompt_info(prompt_plan, tokenizer, prompted[0] if prompted else (), max_prompt)

    candidates: dict[str, CandidateResult] = {}
    perplexity: dict[str, float] = {}
    for name, model, ctx, prompts in plan:
        if on_candidate:
            on_candidate(name)
        with ctx():
            result = score_candidate(name, model, tokenizer, examples, prompts, cfg, runtime, max_prompt)
            if "loss" in cfg.metrics or name != "prompted":
                result.metrics["loss"] = round(response_loss(model, tokenizer, examples, max_seq_length, runtime), 4)
            if name != "prompted":
                ppl = text_perplexity(model, tokenizer, general_text, max_seq_length, runtime)
                perplexity[name] = round(ppl, 4)
                result.metrics["perplexity"] = round(ppl, 4)
        candidates[name] = result
        log.info("%s: %s", name, result.metrics)

    report = Report(cfg.headline, candidates, [], False, len(examples), perplexity, prompt_info, notes)
    report.misses = misses(examples, candidates, cfg.headline)
    gates = cfg.gates or default_gates(cfg)
    report.gates = [evaluate_gate(g, report) for g in gates]
    report.passed = all(g.passed for g in report.gates)
    return report


def misses(
    examples: Sequence[Example], candidates: dict[str, CandidateResult], metric: str, limit: int = 20
) -> list[dict[str, Any]]:
    """The first ``limit`` eval examples the fine-tune did not get fully right on ``metric``, with every
    candidate's answer and score: what a lift gate's verdict is made of."""
    tuned = candidates.get("fine_tuned")
    if tuned is None or metric not in tuned.per_example:
        return []
    scored = {n: c for n, c in candidates.items() if metric in c.per_example and c.predictions}
    out: list[dict[str, Any]] = []
    for i, score in enumerate(tuned.per_example[metric]):
        if score >= 1.0:
            continue
        if len(out) == limit:
            break
        out.append(
            {
                "source": examples[i].source,
                "reference": examples[i].response,
                "answers": {n: c.predictions[i] for n, c in scored.items()},
                metric: {n: c.per_example[metric][i] for n, c in scored.items()},
            }
        )
    return out


def _cell(text: str, width: int = 60) -> str:
    one_line = " ".join(text.split()).replace("|", "\\|")
    return one_line if len(one_line) <= width else one_line[: width - 1] + "…"


def _misses_markdown(report: Report, shown: int = 10) -> list[str]:
    if not report.misses:
        return []
    names = list(report.misses[0]["answers"])
    lines = [
        f"Held-out examples the fine-tune missed ({report.headline}; the first {min(shown, len(report.misses))} "
        f"of {sum(1 for s in report.candidates['fine_tuned'].per_example[report.headline] if s < 1.0)}):",
        "",
        "| source | reference | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for miss in report.misses[:shown]:
        answers = [_cell(miss["answers"][n]) or "(empty)" for n in names]
        lines.append(f"| {miss['source']} | {_cell(miss['reference'])} | " + " | ".join(answers) + " |")
    return [*lines, ""]


def _prompt_info(
    plan: baselines.PromptPlan, tokenizer: Any, first: tuple[dict[str, str], ...], max_prompt: int
) -> dict[str, Any]:
    """What the report says about the prompted baseline: how it was built and the first prompt, rendered."""
    ids = render_prompt(tokenizer, first)[-max_prompt:] if first else []
    return {
        "shot_selection": plan.shot_selection,
        "few_shot": plan.few_shot,
        "system_prompt": plan.system_prompt,
        "labels": plan.labels,
        "rendered_example": tokenizer.decode(ids) if ids else "",
    }


def markdown(report: Report) -> str:
    """The report as a Markdown table, for humans and CI logs."""
    names = list(report.candidates)
    metrics = sorted({m for c in report.candidates.values() for m in c.metrics})
    lines = [
        f"## Evaluation ({report.examples} held-out examples)",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for m in metrics:
        row = [f"{report.candidates[n].metrics[m]:.4f}" if m in report.candidates[n].metrics else "-" for n in names]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines.append(
        "| prompt tokens (mean) | " + " | ".join(f"{report.candidates[n].prompt_tokens_mean:.1f}" for n in names) + " |"
    )
    lines.append(
        "| latency ms per request (mean, batched) | "
        + " | ".join(f"{report.candidates[n].latency_ms_mean:.1f}" for n in names)
        + " |"
    )
    lines.append(
        "| examples/s | " + " | ".join(f"{report.candidates[n].examples_per_second:.2f}" for n in names) + " |"
    )
    lines += ["", "| gate | value | threshold | result |", "|---|---|---|---|"]
    for g in report.gates:
        value = "-" if g.value is None else f"{g.value:.4f}"
        threshold = "-" if g.threshold is None else f"{g.threshold:.4f}"
        lines.append(f"| {g.metric} {g.rule} | {value} | {threshold} | {'pass' if g.passed else 'FAIL'}: {g.message} |")
    lines += ["", f"**{'PASSED' if report.passed else 'FAILED'}**", ""]
    lines += [f"Note: {n}." for n in report.notes] + ([""] if report.notes else [])
    lines += _misses_markdown(report)
    if report.prompt:
        p = report.prompt
        labels = p.get("labels")
        lines += [
            f"Prompted baseline: {p['few_shot']} shots, shot selection `{p['shot_selection']}`, "
            + (f"system prompt listing the {len(labels)} labels." if labels else "system prompt as configured."),
            "The first eval example's prompt, as the base model sees it:",
            "",
            "```",
            p["rendered_example"].strip(),
            "```",
            "",
        ]
    return "\n".join(lines)
