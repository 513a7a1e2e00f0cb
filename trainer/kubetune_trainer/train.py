"""The training loop: resumable, checkpointed to the artifact store, honest about throughput.

A plain PyTorch loop rather than ``transformers.Trainer``: the checkpoint has
to live in the artifact store (a rescheduled pod has a fresh disk) and carry
everything a resume needs — adapter or model weights, optimizer, scheduler,
RNG states and the position in the data — and progress has to reach
``progress.json``. Both are a few lines here and a fight with callbacks there.

A checkpoint is complete only once its ``COMPLETE`` marker is written, after
every other file; a pod killed mid-upload leaves an incomplete checkpoint that
resume ignores. Checkpoints go up on a background thread (``outage.py``), so a
storage outage never stops training. The last one, taken when training ends,
holds the trained weights and the training result: a rerun (a pod killed while
publishing) loads it instead of training again, so it publishes the same bytes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kubetune_trainer import outage, storage
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.data import IGNORE_INDEX, Encoded, Packed, collate, pack
from kubetune_trainer.modeling import Runtime, attention_for_training, frozen_weights_in_compute_dtype
from kubetune_trainer.progress import ProgressReporter

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"


@dataclass
class TrainResult:
    steps: int
    epochs: float
    final_loss: float | None
    final_eval_loss: float | None
    tokens_per_second: float
    train_seconds: float
    resumed_from_step: int | None


@dataclass
class _State:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens: int = 0


def _batches(examples: Sequence[Encoded], cfg: TrainerConfig) -> list[list[Packed] | list[Encoded]]:
    """Fixed micro-batches (packed or not); their order is shuffled per epoch."""
    max_len = cfg.training.max_seq_length
    units: list[Any] = pack(examples, max_len) if cfg.training.packing else list(examples)
    # Sort by length so micro-batches pad little, then batch; shuffling whole batches keeps that.
    units.sort(key=lambda u: len(u.input_ids))
    size = cfg.training.batch_size
    return [units[i : i + size] for i in range(0, len(units), size)]


def _shard(batch: list[Any], world: World) -> list[Any]:
    """This rank's share of a global micro-batch: every size-th unit from its rank on.

    A batch smaller than the world (the epoch's last one) lends a rank with no unit
    of its own one of the batch's, so every rank still takes part in the all-reduce.
    """
    share = batch[world.rank :: world.size]
    return share or [batch[world.rank % len(batch)]]


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = int(cfg.training.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup"}.get(cfg.training.lr_scheduler, cfg.training.lr_scheduler)
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def to_device(batch: dict[str, torch.Tensor], runtime: Runtime) -> dict[str, torch.Tensor]:
    return {k: v.to(runtime.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _output_head(model: Any) -> torch.nn.Module | None:
    unwrapped = _unwrap(model)
    getter = getattr(unwrapped, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, torch.nn.Module) else None


def forward_loss(model: Any, batch: dict[str, torch.Tensor], runtime: Runtime) -> torch.Tensor:
    """Mean cross-entropy over the target tokens, computing logits for the target positions only.

    Only response tokens carry loss, and in instruction data they are a small
    share of all tokens; the output head (hidden x vocabulary, the largest
    matmul of a small model) and the softmax over the vocabulary are spent on
    those positions alone. A pre-hook on the head picks the hidden states of
    the positions whose next token is a target; the result equals the model's
    own loss on the same labels (tested).
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    mask = inputs["attention_mask"]
    if mask.dim() == 4:
        inputs["attention_mask"] = mask.to(runtime.autocast or runtime.dtype)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    head = _output_head(model)
    autocast = torch.autocast(runtime.device.type, dtype=runtime.autocast, enabled=runtime.autocast is not None)
    if head is None:
        with autocast:
            loss: torch.Tensor = model(**inputs, labels=batch["labels"]).loss
        return loss

    def select(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][:, :-1][keep], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        with autocast:
            logits = model(**inputs, use_cache=False).logits
    finally:
        handle.remove()
    if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
        raise RuntimeError(f"the output head of {type(_unwrap(model)).__name__} was not applied once to every position")
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="mean")


@torch.no_grad()
def validation_loss(
    model: Any, examples: Sequence[Encoded], cfg: TrainerConfig, runtime: Runtime, pad_id: int
) -> float:
    """Mean loss per target token over the validation set."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    for i in range(0, len(ordered), cfg.training.batch_size):
        batch = collate(ordered[i : i + cfg.training.batch_size], pad_id)
        n = int(batch["num_target_tokens"])
        if n == 0:
            continue
        loss = forward_loss(model, to_device(batch, runtime), runtime)
        total += float(loss) * n
        count += n
    if was_training:
        model.train()
    return total / max(count, 1)


# ----------------------------------------------------------------------------- checkpoints


def _trainable_state(model: Any, full: bool) -> dict[str, torch.Tensor]:
    if full:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {k: v.detach().cpu() for k, v in model.named_parameters() if v.requires_grad}


def write_checkpoint(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: _State,
    cfg: TrainerConfig,
    *,
    final: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint to the local disk; returns its folder.

    ``final`` marks the checkpoint taken when training ends: it holds the
    weights and the training result (``final``), not the optimizer state.
    """
    from safetensors.torch import save_file

    local = Path(cfg.work_dir) / "checkpoints" / f"step-{state.step:08d}"
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    save_file(_trainable_state(model, cfg.method.type == "Full"), str(local / "weights.safetensors"))
    if final is None:
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": {
                    "python": random.getstate(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
            },
            local / "trainer_state.pt",
        )
    position: dict[str, Any] = dict(state.__dict__)
    if final is not None:
        position["final"] = final
    (local / "position.json").write_text(json.dumps(position))
    return local


def upload_checkpoint(local: Path, cfg: TrainerConfig, settings: storage.S3Settings) -> str:
    """Upload a checkpoint folder, then mark it complete. Returns its URI."""
    uri = storage.join(cfg.output_uri, "checkpoints", local.name)
    files = storage.upload_dir(local, uri, settings)
    marker = {"step": json.loads((local / "position.json").read_text())["step"], "files": files, "created": time.time()}
    storage.write_json(storage.join(uri, COMPLETE), marker, settings)
    log.info("checkpoint %s written", uri)
    return uri


def newest_checkpoint(cfg: TrainerConfig, settings: storage.S3Settings) -> tuple[str, int] | None:
    """The newest complete checkpoint of this run: (uri, step)."""
    loc = storage.resolve(storage.join(cfg.output_uri, "checkpoints"), settings)
    prefix = loc.key.rstrip("/") + "/"
    steps = []
    for key in loc.store.list(prefix):
        rel = key[len(prefix) :]
        if rel.endswith("/" + COMPLETE) and rel.count("/") == 1:
            name = rel.split("/", 1)[0]
            steps.append((int(name.removeprefix("step-")), name))
    if not steps:
        return None
    step, name = max(steps)
    return storage.join(cfg.output_uri, "checkpoints", name), step


def load_checkpoint(
    uri: str,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: TrainerConfig,
    settings: storage.S3Settings,
) -> tuple[_State, dict[str, Any] | None]:
    """Load a checkpoint into the model (and, unless it is the final one, the optimizer and scheduler).

    Returns the position in the data and, for the final checkpoint, the training result it recorded.
    """
    from safetensors.torch import load_file

    local = Path(cfg.work_dir) / "resume"
    shutil.rmtree(local, ignore_errors=True)
    storage.fetch_dir(uri, local, settings)
    weights = load_file(str(local / "weights.safetensors"))
    if cfg.method.type == "Full":
        model.load_state_dict(weights)
    else:
        missing = set(weights) - {k for k, _ in model.named_parameters()}
        if missing:
            raise ValueError(f"checkpoint {uri} does not match the model: unknown tensors {sorted(missing)[:3]}")
        model.load_state_dict(weights, strict=False)
    position = json.loads((local / "position.json").read_text())
    final = position.pop("final", None)
    if final is None:
        saved = torch.load(local / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        random.setstate(saved["rng"]["python"])
        torch.set_rng_state(saved["rng"]["torch"])
        if saved["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    shutil.rmtree(local, ignore_errors=True)
    return _State(**position), final


# ----------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the process group when started by torchrun; a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank)


def leave_world(world: World) -> None:
    """Leave the process group once this rank's part of the run is over (rank 0 after publishing, the
    others after training). A rank that exits with its group still up can abort in the group's
    destructor ("terminate called without an active exception"), and torchrun then stops every rank."""
    if world.size <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def global_targets(local: int, world: World, device: torch.device) -> int:
    """The target tokens of one optimizer step summed over every rank (one scalar all-reduce on ``device``:
    NCCL reduces GPU tensors only)."""
    if world.size == 1:
        return local
    import torch.distributed as dist

    total = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def _unwrap(model: Any) -> Any:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def train(
    model: Any,
    train_set: Sequence[Encoded],
    validation_set: Sequence[Encoded],
    cfg: TrainerConfig,
    runtime: Runtime,
    pad_id: int,
    progress: ProgressReporter,
    settings: storage.S3Settings,
    world: World | None = None,
) -> TrainResult:
    """Train ``model`` in place; resume from the run's newest complete checkpoint if there is one.

    Data-parallel when ``world.size`` > 1: ``batchSize`` is the global micro-batch,
    so every rank walks the same shuffled order of micro-batches and takes its
    share of each (:func:`_shard`); the run takes the same optimizer steps on the
    same examples on any number of devices. Rank 0 alone validates, writes
    checkpoints and reports progress.
    """
    world = world or World()
    tc = cfg.training
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    batches = _batches(train_set, cfg)
    if not batches:
        raise ValueError("no training batches: every example was dropped or truncated away")
    per_epoch = len(batches)
    steps_per_epoch = math.ceil(per_epoch / tc.gradient_accumulation_steps)
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    scheduler = _scheduler(optimizer, cfg, total_steps)

    state = _State()
    resumed_from = None
    found = newest_checkpoint(cfg, settings)
    if found is not None:
        uri, step = found
        state, final = load_checkpoint(uri, model, optimizer, scheduler, cfg, settings)
        resumed_from = state.step
        progress.update(resumed_from_step=step, checkpoint_step=step, checkpoint_uri=uri)
        if final is not None:
            return _trained_already(model, final, state, total_steps, progress)
        progress.stage("train", f"resumed from checkpoint at step {step}")
    else:
        progress.stage("train", f"{total_steps} steps, {per_epoch} micro-batches per epoch")

    uploader = (
        outage.CheckpointUploader(lambda local, _: upload_checkpoint(local, cfg, settings)) if world.main else None
    )
    net = model
    if world.size > 1:
        device_ids = [world.local_rank] if runtime.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    loop = _Loop(
        model, net, params, optimizer, scheduler, cfg, runtime, pad_id, progress, world, uploader,
        validation_set, state, total_steps, per_epoch, tc.eval_every_steps or steps_per_epoch, resumed_from,
    )  # fmt: skip
    progress.update(total_steps=total_steps, step=state.step)
    net.train()
    attention = attention_for_training(
        model, runtime, tc.batch_size, tc.max_seq_length, checkpointing=tc.gradient_checkpointing
    )
    with frozen_weights_in_compute_dtype(model, runtime), attention as implementation:
        log.info("training with %s attention", implementation)
        while state.step < total_steps:
            order = _epoch_order(len(batches), tc.seed, state.epoch)
            while state.batch_in_epoch < per_epoch and state.step < total_steps:
                end = min(state.batch_in_epoch + tc.gradient_accumulation_steps, per_epoch)
                shares = [_shard(batches[i], world) for i in order[state.batch_in_epoch : end]]
                loop.step([collate(share, pad_id) for share in shares])
                state.batch_in_epoch = end
                loop.report()
            if state.batch_in_epoch >= per_epoch:
                state.epoch += 1
                state.batch_in_epoch = 0
    return loop.finish()


@dataclass
class _Loop:
    """What the training loop carries from step to step: the model, its optimizer, and how far it got."""

    model: Any
    net: Any  # the model, or its DistributedDataParallel wrapper
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    cfg: TrainerConfig
    runtime: Runtime
    pad_id: int
    progress: ProgressReporter
    world: World
    uploader: outage.CheckpointUploader | None
    validation_set: Sequence[Encoded]
    state: _State
    total_steps: int
    per_epoch: int  # micro-batches in one epoch
    eval_every: int
    resumed_from: int | None
    started: float = field(default_factory=time.monotonic)
    tokens_at_start: int = -1
    window: list[float] = field(default_factory=list)
    last_loss: float | None = None
    last_eval: float | None = None

    def __post_init__(self) -> None:
        self.tokens_at_start = self.state.tokens

    def step(self, collated: list[dict[str, torch.Tensor]]) -> None:
        """One optimizer step over ``collated`` micro-batches (gradient accumulation)."""
        local = sum(int(b["num_target_tokens"]) for b in collated)
        targets = global_targets(local, self.world, self.runtime.device)
        step_loss = 0.0
        for index, batch in enumerate(collated):
            n = int(batch["num_target_tokens"])
            # Gradients are all-reduced once per step, on the last micro-batch.
            last = index == len(collated) - 1
            sync = nullcontext() if last or self.world.size == 1 else self.net.no_sync()
            with sync:
                loss = forward_loss(self.net, to_device(batch, self.runtime), self.runtime)
                # Weight every micro-batch of every rank by its share of the step's target tokens, so
                # accumulation and the all-reduce (a mean over ranks, hence the world size) equal one big batch.
                (loss * n * self.world.size / max(targets, 1)).backward()  # type: ignore[no-untyped-call]
            step_loss += float(loss.detach()) * n / max(local, 1)
            self.state.tokens += int(batch["num_tokens"])
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.training.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.window.append(step_loss)
        del self.window[:-20]
        self.last_loss = sum(self.window) / len(self.window)

    def tokens_per_second(self, elapsed: float) -> float:
        return self.world.size * (self.state.tokens - self.tokens_at_start) / elapsed if elapsed > 0 else 0.0

    def report(self) -> None:
        """After a step: validate when due, update progress, take a checkpoint when due."""
        state, total, loss = self.state, self.total_steps, self.last_loss or 0.0
        elapsed = time.monotonic() - self.started
        done_steps = state.step - (self.resumed_from or 0)
        eta = elapsed / done_steps * (total - state.step) if done_steps else None
        if state.step % self.eval_every == 0 or state.step == total:
            if self.world.main:
                self.last_eval = validation_loss(
                    _unwrap(self.net), self.validation_set, self.cfg, self.runtime, self.pad_id
                )
                self.net.train()
                self.progress.record(step=state.step, loss=round(loss, 4), eval_loss=round(self.last_eval, 4))
                log.info("step %d/%d loss %.4f val %.4f", state.step, total, loss, self.last_eval)
            else:
                # Only rank 0 reports progress.json; every other rank says in its own log how far it is.
                log.info("rank %d/%d step %d/%d loss %.4f", self.world.rank, self.world.size, state.step, total, loss)
        self.progress.update(
            step=state.step,
            epoch=round(state.epoch + state.batch_in_epoch / self.per_epoch, 3),
            loss=round(loss, 4),
            eval_loss=None if self.last_eval is None else round(self.last_eval, 4),
            tokens_per_second=round(self.tokens_per_second(elapsed), 1),
            eta_seconds=None if eta is None else round(eta, 1),
        )
        if self.uploader is not None:
            if state.step % self.cfg.training.checkpoint_every_steps == 0 and state.step < total:
                checkpoint = write_checkpoint(self.model, self.optimizer, self.scheduler, state, self.cfg)
                self.uploader.submit(checkpoint, state.step)
            _report_checkpoints(self.uploader, self.progress)

    def finish(self) -> TrainResult:
        """The training result; rank 0 uploads the final checkpoint before anything is published."""
        elapsed = time.monotonic() - self.started
        self.model.eval()
        state = self.state
        result = TrainResult(
            steps=state.step,
            epochs=round(state.epoch + state.batch_in_epoch / self.per_epoch, 3),
            final_loss=self.last_loss,
            final_eval_loss=self.last_eval,
            tokens_per_second=self.tokens_per_second(elapsed),
            train_seconds=elapsed,
            resumed_from_step=self.resumed_from,
        )
        if self.uploader is not None:
            _save_final(
                self.model, self.optimizer, self.scheduler, state, self.cfg, result, self.uploader, self.progress
            )
        return result


def _report_checkpoints(uploader: outage.CheckpointUploader, progress: ProgressReporter) -> None:
    """Mirror the uploader into progress: the newest uploaded checkpoint, or the outage it waits out."""
    done = uploader.uploaded
    if done is not None and done.step != progress.state.checkpoint_step:
        progress.state.message = f"checkpoint at step {done.step}"
        progress.state.checkpoint_step, progress.state.checkpoint_uri = done.step, done.uri
        progress.flush()  # the store answers: say so now, not at the next periodic write
    since, waiting = uploader.failing_since, uploader.waiting
    if since is not None and waiting is not None:
        progress.state.message = (
            f"storage unavailable for {time.monotonic() - since:.0f} s; "
            f"checkpoint step {waiting} waits on local disk, training goes on"
        )


def _save_final(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: _State,
    cfg: TrainerConfig,
    result: TrainResult,
    uploader: outage.CheckpointUploader,
    progress: ProgressReporter,
) -> None:
    """Upload the trained weights and the result as the final checkpoint; wait out an outage (bounded).

    Nothing is published before this checkpoint is in the store, so a rerun
    either finds it (and publishes the same bytes) or trains the same steps again.
    """
    final = {"result": asdict(result), "history": progress.state.history}
    uploader.submit(write_checkpoint(model, optimizer, scheduler, state, cfg, final=final), state.step)
    progress.stage("train", f"uploading the final checkpoint (step {state.step})")
    budget = cfg.storage.outage_wait_seconds
    if not uploader.drain(budget):
        done = uploader.uploaded
        resume = f"step {done.step}" if done is not None else "the newest checkpoint before this attempt"
        raise outage.OutageTooLong(
            f"the final checkpoint (step {state.step}) could not be uploaded: the store did not answer for "
            f"{budget:.0f} s (storage.outageWaitSeconds): {uploader.last_failure}; "
            f"the next attempt resumes from {resume}"
        )
    uploader.close()
    _report_checkpoints(uploader, progress)


def _trained_already(
    model: Any, final: dict[str, Any], state: _State, total_steps: int, progress: ProgressReporter
) -> TrainResult:
    """The result of a run whose final checkpoint was loaded: its weights are the trained ones, nothing to redo."""
    model.eval()
    progress.state.history = list(final.get("history") or [])
    progress.update(total_steps=total_steps, step=state.step)
    progress.stage("train", f"trained already: loaded the final checkpoint (step {state.step})")
    return TrainResult(**{**final["result"], "resumed_from_step": state.step})
