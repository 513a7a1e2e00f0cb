"""Training throughput: the kubetune trainer vs the common transformers Trainer + PEFT recipe.

Both train the same LoRA adapter on the same tiny Llama and the same
variable-length dataset, each in its own subprocess (so peak RSS is its own),
in one run of this script. Reported per candidate, nanoGPT-style: warm-up
steps first, then timed steps; throughput counts *non-padding* tokens only;
MFU is measured against a matmul peak taken on this machine in the same run.

Candidates:

- ``kubetune``: ``kubetune_trainer.train.train`` with packing (examples share
  sequences, a block-diagonal mask keeps them apart), batches sorted by length.
- ``hf_pad_max_length``: ``transformers.Trainer`` + ``peft.get_peft_model`` with
  every example padded to ``max_seq_length`` — the recipe of most tutorials.
- ``hf_pad_longest``: the same with dynamic padding to the longest example of
  each batch (``DataCollatorForSeq2Seq``), a stronger baseline.

Usage: ``python bench/trainer_throughput.py [--steps 30] [--warmup 5]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MAX_LEN = 512
BATCH = 8
LORA = {"rank": 16, "alpha": 32}


def make_dataset(path: Path, n: int, seed: int) -> None:
    """Variable-length instruction pairs: lengths log-uniform between ~10 and ~400 tokens."""
    rng = random.Random(seed)
    words = [
        "the",
        "order",
        "invoice",
        "refund",
        "package",
        "account",
        "password",
        "delivery",
        "app",
        "error",
        "screen",
        "item",
        "box",
    ]
    with path.open("w") as f:
        for _ in range(n):
            prompt_len = int(2 ** rng.uniform(3, 8.5))
            answer_len = int(2 ** rng.uniform(1, 5))
            prompt = " ".join(rng.choice(words) for _ in range(prompt_len))
            answer = " ".join(rng.choice(words) for _ in range(answer_len))
            f.write(json.dumps({"prompt": prompt, "response": answer}) + "\n")


def matmul_peak_flops(size: int = 1024, repeats: int = 20) -> float:
    """fp32 matmul FLOP/s on this machine (the MFU denominator)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        torch.mm(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def flops_per_token(total_params: int, trainable_params: int) -> float:
    # Forward 2N, backward through frozen weights 2N (input gradients), plus 2 per
    # trainable parameter for weight gradients. Attention scores are ignored (tiny here).
    return 4 * total_params + 2 * trainable_params


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_kubetune(model_dir: Path, data_path: Path, steps: int, warmup: int) -> dict[str, Any]:
    from kubetune_trainer import data, modeling, storage, train
    from kubetune_trainer.config import TrainerConfig
    from kubetune_trainer.progress import ProgressReporter

    with tempfile.TemporaryDirectory() as tmp:

        def config(max_steps: int, run: str) -> TrainerConfig:
            return TrainerConfig.model_validate(
                {
                    "run_id": run,
                    "output_uri": f"file://{tmp}/{run}/",
                    "lineage": {"name": "bench"},
                    "base_model": {"uri": f"file://{model_dir}"},
                    "dataset": {"train": f"file://{data_path}"},
                    "method": {"type": "LoRA", "lora": LORA},
                    "training": {
                        "max_steps": max_steps,
                        "batch_size": BATCH,
                        "max_seq_length": MAX_LEN,
                        "packing": True,
                        "checkpoint_every_steps": 10**6,
                        "eval_every_steps": 10**6,
                    },
                    "work_dir": f"{tmp}/work",
                }
            )

        tokenizer = modeling.load_tokenizer(model_dir)
        data.ensure_chat_template(tokenizer)
        examples = [data.encode(tokenizer, e, MAX_LEN) for e in data.load_jsonl(data_path).examples]
        runtime = modeling.pick_runtime("auto")
        cfg = config(warmup, "warmup")
        model = modeling.apply_method(
            modeling.load_base_model(model_dir, cfg.method, runtime), cfg.method, gradient_checkpointing=False
        )
        quiet = ProgressReporter(None, None, bar=False)
        train.train(model, examples, [], cfg, runtime, tokenizer.pad_token_id, quiet, storage.S3Settings())
        result = train.train(
            model, examples, [], config(steps, "timed"), runtime, tokenizer.pad_token_id, quiet, storage.S3Settings()
        )
        trainable, total = modeling.count_parameters(model)
    return {
        "tokens_per_second": result.tokens_per_second,
        "seconds": result.train_seconds,
        "steps": result.steps,
        "trainable_params": trainable,
        "total_params": total,
    }


def worker_hf(model_dir: Path, data_path: Path, steps: int, warmup: int, padding: str) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = [json.loads(line) for line in data_path.read_text().splitlines()]

    def tokenize(record: dict[str, str]) -> dict[str, list[int]]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}],
            tokenize=False,
        )
        enc = tokenizer(
            text,
            truncation=True,
            max_length=MAX_LEN,
            padding="max_length" if padding == "max_length" else False,
        )
        labels = [t if m else -100 for t, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    dataset = [tokenize(r) for r in records]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    # Non-padding tokens of each batch, in the order the steps consume them
    # (num_workers=0: the collator runs right before its step, nothing prefetched).
    batch_tokens: list[int] = []
    clock = {"start": 0.0, "end": 0.0}

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = collator(batch)
        batch_tokens.append(int(out["attention_mask"].sum()))
        return out

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == warmup:
                clock["start"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock["end"] = time.perf_counter()

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["rank"],
            lora_alpha=LORA["alpha"],
            lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=BATCH,
            max_steps=warmup + steps,
            learning_rate=2e-4,
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[Clock()])
        trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    elapsed = clock["end"] - clock["start"]
    tokens = sum(batch_tokens[warmup : warmup + steps])
    return {
        "tokens_per_second": tokens / elapsed,
        "seconds": elapsed,
        "steps": steps,
        "trainable_params": trainable,
        "total_params": total,
    }


def run_worker(name: str, model_dir: Path, data_path: Path, steps: int, warmup: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--model",
            str(model_dir),
            "--data",
            str(data_path),
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per candidate (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps (default 5)")
    parser.add_argument("--examples", type=int, default=1024, help="dataset size (default 1024)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import logging

        logging.disable(logging.WARNING)
        if args.worker == "kubetune":
            result = worker_kubetune(args.model, args.data, args.steps, args.warmup)
        else:
            padding = "max_length" if args.worker == "hf_pad_max_length" else "longest"
            result = worker_hf(args.model, args.data, args.steps, args.warmup, padding)
        result["peak_rss_mib"] = round(_peak_rss_mib(), 1)
        print(json.dumps(result))
        return 0

    import torch
    import transformers

    from kubetune_trainer.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "train.jsonl"
        make_dataset(data_path, args.examples, seed=0)
        texts = [json.loads(line)["prompt"] for line in data_path.read_text().splitlines()[:200]]
        model_dir = build_tiny_model(
            Path(tmp) / "model", texts, hidden_size=256, layers=4, heads=4, max_positions=MAX_LEN
        )
        peak = matmul_peak_flops()
        results = {
            name: run_worker(name, model_dir, data_path, args.steps, args.warmup)
            for name in ("kubetune", "hf_pad_max_length", "hf_pad_longest")
        }
    for r in results.values():
        r["mfu"] = round(r["tokens_per_second"] * flops_per_token(r["total_params"], r["trainable_params"]) / peak, 4)
        r["tokens_per_second"] = round(r["tokens_per_second"], 1)
        r["seconds"] = round(r["seconds"], 2)
    kt = results["kubetune"]["tokens_per_second"]
    print(
        json.dumps(
            {
                "benchmark": "trainer_throughput",
                "model": {
                    "arch": "llama",
                    "hidden_size": 256,
                    "layers": 4,
                    "params": results["kubetune"]["total_params"],
                },
                "dataset": {"examples": args.examples, "max_seq_length": MAX_LEN, "batch_size": BATCH},
                "steps": {"warmup": args.warmup, "timed": args.steps},
                "machine": {
                    "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                },
                "matmul_peak_flops": round(peak),
                "results": results,
                "ratio_vs_hf_pad_max_length": round(kt / results["hf_pad_max_length"]["tokens_per_second"], 2),
                "ratio_vs_hf_pad_longest": round(kt / results["hf_pad_longest"]["tokens_per_second"], 2),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
