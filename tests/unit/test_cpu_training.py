"""What makes a training step fast on a CPU, and that it changes nothing it should not.

Three measures (modeling.py): the adapter's dropout draws its mask a quarter of
a random number per element, frozen linear weights are held in bf16 while
training under bf16 autocast, and attention is eager while its saved weights
fit a budget. Each is checked here against what it replaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_trainer import data, modeling, train
from kubetune_trainer.config import MethodConfig
from kubetune_trainer.modeling import CpuDropout, Runtime
from tests.conftest import SUPPORT_DATA

CPU_FP32 = Runtime(torch.device("cpu"), torch.float32, None)
CPU_BF16 = Runtime(torch.device("cpu"), torch.float32, torch.bfloat16)


def _lora(model_dir: Path, method: str = "LoRA", dropout: float = 0.05) -> Any:
    cfg = MethodConfig.model_validate({"type": method, "lora": {"rank": 8, "alpha": 16, "dropout": dropout}})
    torch.manual_seed(0)
    return modeling.apply_method(modeling.load_base_model(model_dir, cfg, CPU_FP32), cfg, gradient_checkpointing=False)


def _packed_batch(model_dir: Path, rows: int = 2) -> dict[str, torch.Tensor]:
    tokenizer = modeling.load_tokenizer(model_dir)
    data.ensure_chat_template(tokenizer)
    examples = data.load_jsonl(SUPPORT_DATA / "train.jsonl").examples[:24]
    packed = data.pack([data.encode(tokenizer, e, 128) for e in examples], 128)
    return data.collate(packed[:rows], tokenizer.pad_token_id)


def _loss_and_grads(model: Any, batch: dict[str, torch.Tensor], runtime: Runtime) -> tuple[torch.Tensor, list[Any]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks on both sides
    loss = train.forward_loss(model, batch, runtime)
    loss.backward()  # type: ignore[no-untyped-call]
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- dropout


def test_cpu_dropout_drops_p_of_the_elements_and_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    ones = torch.ones(1000, 1000)
    out = CpuDropout(0.05).train()(ones)
    dropped = float((out == 0).float().mean())
    assert abs(dropped - 0.05) < 0.002  # ~9 standard deviations of a binomial over 1e6 draws
    assert abs(float(out.mean()) - 1.0) < 0.003
    assert out.unique().tolist() == [0.0, pytest.approx(65536 / (65536 - 3277))]


def test_cpu_dropout_draws_from_the_seeded_generator_and_a_new_mask_each_call() -> None:
    dropout = CpuDropout(0.5).train()
    x = torch.ones(64, 64)
    torch.manual_seed(3)
    first, second = dropout(x), dropout(x)
    torch.manual_seed(3)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(first, second)


def test_cpu_dropout_gradient_is_the_mask() -> None:
    torch.manual_seed(0)
    x = torch.ones(32, 48, requires_grad=True)
    out = CpuDropout(0.2).train()(x)
    out.sum().backward()  # type: ignore[no-untyped-call]
    assert x.grad is not None
    assert torch.equal(x.grad, out.detach())


@pytest.mark.parametrize(
    ("p", "training", "expected"),
    [
        (0.05, False, "same"),  # evaluation: no dropout
        (0.0, True, "same"),
        (1.0, True, "zeros"),
    ],
)
def test_cpu_dropout_edges(p: float, training: bool, expected: str) -> None:
    x = torch.randn(8, 8)
    out = CpuDropout(p).train(training)(x)
    assert torch.equal(out, x if expected == "same" else torch.zeros_like(x))


def test_apply_method_on_a_cpu_swaps_every_adapter_dropout(tiny_model: Path) -> None:
    model = _lora(tiny_model)
    dropouts = [d for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert dropouts
    assert all(type(d) is CpuDropout and d.p == 0.05 for d in dropouts)
    assert not [d for d in _lora(tiny_model, dropout=0.0).modules() if isinstance(d, (CpuDropout, torch.nn.Dropout))]


# ----------------------------------------------------------------------------- frozen weights in bf16


def test_frozen_weights_in_bf16_give_the_same_loss_and_gradients_bit_for_bit(tiny_model: Path) -> None:
    model = _lora(tiny_model).train()
    batch = _packed_batch(tiny_model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss, grads = _loss_and_grads(model, batch, CPU_BF16)
    with modeling.frozen_weights_in_compute_dtype(model, CPU_BF16) as cast:
        assert cast > 0
        linear = [m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
        assert {m.weight.dtype for m in linear} == {torch.bfloat16}
        assert model.get_input_embeddings().weight.dtype == torch.float32
        cast_loss, cast_grads = _loss_and_grads(model, batch, CPU_BF16)
    assert torch.equal(loss, cast_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, cast_grads, strict=True))
    after = dict(model.named_parameters())
    assert all(after[name].dtype == torch.float32 and torch.equal(after[name], value) for name, value in before.items())


@pytest.mark.parametrize(
    ("method", "runtime", "cast"),
    [
        ("LoRA", CPU_FP32, False),  # no autocast: nothing would be cast
        ("DoRA", CPU_BF16, False),  # DoRA takes norms of the base weight
        ("LoRA", CPU_BF16, True),
    ],
)
def test_frozen_weights_are_cast_only_for_lora_under_autocast(
    tiny_model: Path, method: str, runtime: Runtime, cast: bool
) -> None:
    model = _lora(tiny_model, method)
    with modeling.frozen_weights_in_compute_dtype(model, runtime) as count:
        assert (count > 0) == cast


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize(
    ("current", "device", "scores", "layers", "chosen"),
    [
        ("sdpa", "cpu", 8 * 9 * 256**2, 30, "eager"),  # the demo: 850 MB of saved weights
        ("sdpa", "cpu", 4 * 9 * 512**2, 30, "sdpa"),  # 1.7 GB: over the budget
        ("sdpa", "cpu", 4 * 9 * 512**2, 1, "eager"),  # gradient checkpointing keeps one layer's
        ("sdpa", "cuda", 8 * 9 * 256**2, 30, "sdpa"),  # a GPU's fused kernel is the fast one
        ("flash_attention_2", "cpu", 1, 1, "flash_attention_2"),  # a user's choice is kept
        ("eager", "cpu", 10**12, 30, "eager"),
    ],
)
def test_training_attention(current: str, device: str, scores: int, layers: int, chosen: str) -> None:
    assert modeling.training_attention(current, device, scores, layers) == chosen


def test_training_attention_switches_for_training_and_back(tiny_model: Path) -> None:
    model = _lora(tiny_model, dropout=0.0).train()
    batch = _packed_batch(tiny_model)
    assert model.config._attn_implementation == "sdpa"
    sdpa_loss, sdpa_grads = _loss_and_grads(model, batch, CPU_FP32)
    with modeling.attention_for_training(model, CPU_FP32, rows=2, seq_length=128, checkpointing=False) as chosen:
        assert chosen == model.config._attn_implementation == "eager"
        eager_loss, eager_grads = _loss_and_grads(model, batch, CPU_FP32)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(eager_loss, sdpa_loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(eager_grads, sdpa_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
