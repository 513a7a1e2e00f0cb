"""Batched generation: many prompts through the model at once, each stopping at its own end.

Evaluation and the reference server both generate for many prompts. One at a
time, a small model on a CPU spends most of each step on per-call overhead
and on matrix-vector products; a batch turns those into matrix-matrix
products. Prompts are left-padded (so every row's next token sits in the same
column), the attention mask hides the padding, and positions count real
tokens only, so each row computes what it would alone. Rows that reach an
end-of-sequence token stop contributing output; the batch stops when every
row has, or at the token budget.

Prompts of one batch often begin alike: the chat template's header and a
default system prompt, or a prompted baseline's whole system prompt and shots.
The longest prefix they share is run once, its attention keys and values are
copied to every row, and only the rest of each prompt goes through the model:
rows are then [shared prefix, padding, own tokens], with the padding masked
and not counted in positions, so each row still computes what it would alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from kubetune_trainer.modeling import Runtime


@dataclass(frozen=True)
class Output:
    tokens: list[int]  # new tokens, without the end-of-sequence token
    stopped: bool  # True: ended before its budget (end-of-sequence, or a stop string and then padding)
    eos: bool = False  # True: the token that ended it was an end-of-sequence token (generated, so counted)

    @property
    def generated(self) -> int:
        """Tokens the model produced for this row, the end-of-sequence token included."""
        return len(self.tokens) + int(self.eos)


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a turn: the model's generation config may list several, the tokenizer has one."""
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [found] if isinstance(found, int) else list(found or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded on the left to the longest prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def split_outputs(
    new: torch.Tensor, stop_ids: Sequence[int], budgets: Sequence[int], pad_id: int | None = None
) -> list[Output]:
    """Each row's tokens up to its first end-of-sequence (or padding) token, or up to its own budget."""
    ends = {*stop_ids, *([] if pad_id is None else [pad_id])}
    outputs = []
    for row, budget in zip(new.tolist(), budgets, strict=True):
        cut = next((i for i, t in enumerate(row) if t in ends), None)
        if cut is not None and cut < budget:
            outputs.append(Output(row[:cut], True, row[cut] in stop_ids))
        else:
            outputs.append(Output(row[:budget], False))
    return outputs


SHARED_PREFIX_MIN = 8
"""Shorter shared prefixes are not worth a forward pass of their own."""


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each at least one token of its own."""
    if len(prompts) < 2:
        return 0
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for i in range(max(limit, 0)):
        if any(p[i] != first[i] for p in prompts[1:]):
            return i
    return max(limit, 0)


def _forward_parameters(model: Any) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _prefill_shared(model: Any, prefix: torch.Tensor, rows: int) -> dict[str, Any]:
    """The keys and values of the prompts' shared prefix, computed once and repeated for every row.

    Returns the keyword argument that hands them to ``generate``: ``cache`` in transformers 5,
    ``past_key_values`` before.
    """
    from transformers import DynamicCache

    accepted = _forward_parameters(model)
    keyword = "cache" if "cache" in accepted else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}  # no logits wanted at all
    cache = DynamicCache(config=model.config)
    model(input_ids=prefix, use_cache=True, **{keyword: cache}, **extra)
    cache.batch_repeat_interleave(rows)
    return {keyword: cache}


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    runtime: Runtime,
    *,
    max_new_tokens: int | Sequence[int],
    sampling: dict[str, Any] | None = None,
) -> list[Output]:
    """Generate for every prompt in one batch; greedy unless ``sampling`` says otherwise.

    ``max_new_tokens`` may differ per prompt: the batch runs to the largest,
    and each row is cut at its own (greedy decoding makes that the same as
    having stopped there).
    """
    if not prompts:
        return []
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    stop_ids = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    shared = shared_prefix(prompts)
    if shared < SHARED_PREFIX_MIN:
        shared = 0
    ids, mask = left_pad([p[shared:] for p in prompts], pad_id, runtime.device)
    options: dict[str, Any] = {"do_sample": False} | (sampling or {})
    autocast = torch.autocast(runtime.device.type, dtype=runtime.autocast) if runtime.autocast else nullcontext()
    with autocast:
        if shared:
            prefix = torch.tensor([list(prompts[0][:shared])], dtype=torch.long, device=runtime.device)
            options |= _prefill_shared(model, prefix, len(prompts))
            ids = torch.cat([prefix.expand(len(prompts), -1), ids], dim=1)
            mask = torch.cat([torch.ones_like(prefix).expand(len(prompts), -1), mask], dim=1)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(budgets),
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
            **options,
        )
    # A row that finished early (a stop string) is filled with pad tokens: they end its output too.
    return split_outputs(out[:, ids.shape[1] :], stop_ids, budgets, pad_id)
