"""Batched generation answers exactly as one-at-a-time generation does; the training loss skips no target.

On the tiny Llama (see the ``tiny_model`` fixture), nothing mocked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_trainer import baselines, data, evaluate, generation, modeling, train
from kubetune_trainer.config import EvaluationConfig, MethodConfig
from tests.conftest import SUPPORT_DATA


@pytest.fixture(scope="module")
def loaded(tiny_model: Path) -> tuple[Any, Any, modeling.Runtime]:
    runtime = modeling.pick_runtime("fp32")
    tokenizer = modeling.load_tokenizer(tiny_model)
    model = modeling.load_base_model(tiny_model, MethodConfig(), runtime).eval()
    return model, tokenizer, runtime


def test_left_padding_and_per_row_stops() -> None:
    ids, mask = generation.left_pad([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    new = torch.tensor([[3, 4, 2, 2], [3, 2, 9, 9], [1, 1, 1, 1]])
    outputs = generation.split_outputs(new, stop_ids=[2], budgets=[4, 4, 2])
    assert outputs == [
        generation.Output([3, 4], True, True),
        generation.Output([3], True, True),
        generation.Output([1, 1], False),  # no stop within its own budget of 2
    ]
    assert [o.generated for o in outputs] == [3, 2, 2]
    # A row stopped by a stop string is padded afterwards: the padding ends it, and is not counted.
    (padded,) = generation.split_outputs(torch.tensor([[3, 0, 0]]), stop_ids=[2], budgets=[3], pad_id=0)
    assert padded == generation.Output([3], True, False)


def test_batched_generation_equals_one_at_a_time(loaded: tuple[Any, Any, modeling.Runtime]) -> None:
    model, tokenizer, runtime = loaded
    examples = data.load_jsonl(SUPPORT_DATA / "heldout.jsonl").examples[:12]
    train_set = data.load_jsonl(SUPPORT_DATA / "val.jsonl").examples
    # Prompts of very different lengths in one batch: zero-shot and retrieved few-shot mixed.
    few_shot, _ = baselines.prompted_conversations(
        examples[6:], train_set, few_shot=3, shot_selection="retrieved", system_prompt=None, seed=0
    )
    prompts = [data.render_prompt(tokenizer, e.prompt) for e in examples[:6]]
    prompts += [data.render_prompt(tokenizer, p) for p in few_shot]
    assert max(map(len, prompts)) > 2 * min(map(len, prompts))
    alone = [generation.generate(model, tokenizer, [p], runtime, max_new_tokens=10)[0] for p in prompts]
    together = generation.generate(model, tokenizer, prompts, runtime, max_new_tokens=10)
    assert together == alone
    # Different budgets in one batch: each row is cut at its own.
    budgets = [3 + i % 5 for i in range(len(prompts))]
    mixed = generation.generate(model, tokenizer, prompts, runtime, max_new_tokens=budgets)
    one_by_one = [
        generation.generate(model, tokenizer, [p], runtime, max_new_tokens=b)[0]
        for p, b in zip(prompts, budgets, strict=True)
    ]
    assert mixed == one_by_one


def test_batched_scores_equal_unbatched_scores(loaded: tuple[Any, Any, modeling.Runtime]) -> None:
    model, tokenizer, runtime = loaded
    examples = data.load_jsonl(SUPPORT_DATA / "heldout.jsonl").examples[:20]
    cfg = EvaluationConfig(metrics=["exact_match", "token_f1", "contains"], max_new_tokens=8)
    prompts = [e.prompt for e in examples]
    one = evaluate.score_candidate("x", model, tokenizer, examples, prompts, cfg, runtime, 256, batch_size=1)
    many = evaluate.score_candidate("x", model, tokenizer, examples, prompts, cfg, runtime, 256, batch_size=8)
    assert many.metrics == one.metrics
    assert many.samples == one.samples
    assert many.prompt_tokens_mean == one.prompt_tokens_mean
    assert (one.batch_size, many.batch_size) == (1, 8)


def test_target_only_loss_equals_the_models_own_loss(tiny_model: Path) -> None:
    runtime = modeling.pick_runtime("fp32")
    tokenizer = modeling.load_tokenizer(tiny_model)
    method = MethodConfig()
    model = modeling.apply_method(
        modeling.load_base_model(tiny_model, method, runtime), method, gradient_checkpointing=False
    ).eval()
    examples = data.load_jsonl(SUPPORT_DATA / "val.jsonl").examples[:16]
    encoded = [data.encode(tokenizer, e, 128) for e in examples]
    for batch in (data.collate(data.pack(encoded, 128)[:4], tokenizer.pad_token_id), data.collate(encoded[:6], 0)):
        ours = train.forward_loss(model, batch, runtime)
        theirs = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            labels=batch["labels"],
        ).loss
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        ours.backward()  # gradients flow into the adapter through the selected positions
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
        model.zero_grad()


def test_response_loss_is_the_token_weighted_loss_of_each_example(loaded: tuple[Any, Any, modeling.Runtime]) -> None:
    """Batched by length, logits for the responses only: the mean per response token of each example's own loss."""
    model, tokenizer, runtime = loaded
    examples = data.load_jsonl(SUPPORT_DATA / "heldout.jsonl").examples[:13]  # a short last batch
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            enc = data.encode(tokenizer, example, 256)
            labels = torch.tensor([enc.labels])
            n = int((labels[:, 1:] != data.IGNORE_INDEX).sum())
            total += float(model(input_ids=torch.tensor([enc.input_ids]), labels=labels).loss) * n
            count += n
    ours = evaluate.response_loss(model, tokenizer, examples, 256, runtime)
    assert ours == pytest.approx(total / count, rel=1e-5)


def test_a_shared_prefix_is_run_once_and_changes_no_answer(loaded: tuple[Any, Any, modeling.Runtime]) -> None:
    """The prompted baseline's prompts share their system prompt and shots: batched, they are run once."""
    model, tokenizer, runtime = loaded
    examples = data.load_jsonl(SUPPORT_DATA / "heldout.jsonl").examples[:10]
    train_set = data.load_jsonl(SUPPORT_DATA / "val.jsonl").examples
    stratified, _ = baselines.prompted_conversations(
        examples, train_set, few_shot=4, shot_selection="stratified", system_prompt=None, seed=0
    )
    prompts = [data.render_prompt(tokenizer, p) for p in stratified]
    shared = generation.shared_prefix(prompts)
    assert shared > 0.7 * min(map(len, prompts))  # the system prompt and the shots: most of each prompt
    assert all(p[:shared] == prompts[0][:shared] for p in prompts)
    assert len({p[shared] for p in prompts}) > 1  # and not one token further
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: calls.append(kw["input_ids"].numel()), with_kwargs=True)
    try:
        together = generation.generate(model, tokenizer, prompts, runtime, max_new_tokens=6)
    finally:
        hook.remove()
    assert calls[0] == shared  # the prefix, once
    assert calls[1] == len(prompts) * max(len(p) - shared for p in prompts)  # then each row's own tokens
    alone = [generation.generate(model, tokenizer, [p], runtime, max_new_tokens=6)[0] for p in prompts]
    assert together == alone


@pytest.mark.parametrize(
    ("prompts", "shared"),
    [
        ([[1, 2, 3]], 0),  # one prompt: nothing to share
        ([[1, 2, 3], [1, 2, 4]], 2),
        ([[1, 2, 3], [1, 2, 3]], 2),  # identical: each keeps its last token
        ([[1, 2], [1, 2, 3, 4]], 1),
        ([[5, 2], [1, 2]], 0),
    ],
)
def test_shared_prefix(prompts: list[list[int]], shared: int) -> None:
    assert generation.shared_prefix(prompts) == shared
