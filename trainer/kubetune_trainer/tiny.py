"""Tiny Llama-style models with locally trained tokenizers, for the demo and the tests.

No model hub is reachable from the machines kubetune is developed and tested
on, so the quickstart and the test suite build their base model here: a
byte-level BPE tokenizer trained on the given text, a Llama config a few
hundred thousand parameters big, random init, and optionally a brief causal-LM
pretraining on that text so the base model is a language model, not noise.
The result is an ordinary Hugging Face folder that every loading path
(``file://``, ``s3://``) and the trainer treat like any real base model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# The same turn format the trainer falls back to for tokenizers without one.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> object:
    """Train a byte-level BPE tokenizer on ``texts``; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    out_dir: Path,
    texts: Sequence[str],
    *,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    vocab_size: int = 1024,
    max_positions: int = 512,
    pretrain_steps: int = 0,
    seed: int = 0,
) -> Path:
    """Write a tiny Llama model and its tokenizer to ``out_dir``; return the folder.

    With ``pretrain_steps`` > 0 the model is first trained as a plain language
    model on ``texts`` (a few hundred steps take seconds on a CPU).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    if pretrain_steps > 0:
        _pretrain(model, tokenizer, texts, steps=pretrain_steps, seq_len=min(128, max_positions), seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)  # type: ignore[attr-defined]
    return out_dir


def _pretrain(model: object, tokenizer: object, texts: Sequence[str], *, steps: int, seq_len: int, seed: int) -> None:
    import torch

    rng = random.Random(seed)
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text + "\n")["input_ids"]  # type: ignore[operator]
    if len(stream) < seq_len + 1:
        stream = stream * math.ceil((seq_len + 1) / max(1, len(stream)))
    params = [p for p in model.parameters() if p.requires_grad]  # type: ignore[attr-defined]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    model.train()  # type: ignore[attr-defined]
    batch = 16
    for step in range(steps):
        starts = [rng.randrange(0, len(stream) - seq_len) for _ in range(batch)]
        ids = torch.tensor([stream[s : s + seq_len] for s in starts])
        loss = model(input_ids=ids, labels=ids).loss  # type: ignore[operator]
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        optimizer.step()
        optimizer.zero_grad()
    model.eval()  # type: ignore[attr-defined]


def corpus_from_jsonl(path: Path) -> list[str]:
    """Every string value of every parseable record: the text a tiny base model pretrains on."""
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            texts.append(" ".join(_strings(record)))
    return texts


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def main(argv: list[str] | None = None) -> int:
    from kubetune_trainer.evaluate import general_text_sample

    parser = argparse.ArgumentParser(
        prog="python -m kubetune_trainer.tiny", description="Build a tiny Llama base model for demos and tests."
    )
    parser.add_argument("--out", required=True, type=Path, help="folder to write the model to")
    parser.add_argument("--corpus", type=Path, action="append", default=[], help="JSONL file(s) to pretrain on")
    parser.add_argument("--pretrain-steps", type=int, default=200, help="causal-LM steps on the corpus (default 200)")
    parser.add_argument("--hidden-size", type=int, default=128, help="hidden size (default 128)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if (args.out / "config.json").is_file():
        print(f"{args.out} already holds a model; remove it to rebuild")
        return 0
    texts = [t for path in args.corpus for t in corpus_from_jsonl(path)]
    texts += [p for p in general_text_sample().split("\n\n") if p.strip()]
    build_tiny_model(
        args.out,
        texts,
        hidden_size=args.hidden_size,
        layers=args.layers,
        pretrain_steps=args.pretrain_steps,
        seed=args.seed,
    )
    print(f"wrote a tiny Llama model to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
