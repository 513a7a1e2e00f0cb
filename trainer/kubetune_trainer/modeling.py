"""Loading the base model and applying the fine-tuning method to it.

One place decides device, precision and which modules an adapter targets, so
training, evaluation and serving agree on them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubetune_trainer.config import MethodConfig

log = logging.getLogger(__name__)

# Projections worth adapting per architecture: attention and MLP. Covering the
# MLP too is what QLoRA's authors found necessary to match full fine-tuning.
TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


class MethodUnavailableError(Exception):
    """The method cannot run here (e.g. QLoRA without a CUDA GPU): retrying will not help."""


class MethodConfigError(ValueError):
    """The method's settings do not fit the base model (unknown module, rank too large)."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    autocast: torch.dtype | None

    @property
    def precision(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.autocast or self.dtype, "fp32")


@functools.cache
def cpu_has_bf16() -> bool:
    """Native bf16 matrix instructions on this CPU (avx512_bf16 or AMX), where bf16 autocast pays off.

    Without them PyTorch emulates bf16 matmuls, slower than fp32; with them SmolLM2-135M trained 1.4x
    as fast on 2 cores (461 against 327 tokens/s) to the same eval scores (docs/trainer.md).
    """
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_runtime(precision: str) -> Runtime:
    """Device and precision for training: bf16 autocast where the GPU or the CPU has native bf16, else fp32."""
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        if precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
            return Runtime(device, torch.float32, torch.bfloat16)
        if precision == "bf16":
            raise MethodUnavailableError("precision bf16 needs a GPU that supports bfloat16")
        if precision == "fp16":
            return Runtime(device, torch.float32, torch.float16)
        return Runtime(device, torch.float32, None)
    cpu = torch.device("cpu")
    if precision in ("auto", "bf16") and cpu_has_bf16():
        return Runtime(cpu, torch.float32, torch.bfloat16)
    if precision == "bf16":
        raise MethodUnavailableError(
            "precision bf16 needs a CUDA GPU or a CPU with avx512_bf16 or amx_bf16, which this one lacks; "
            "use precision: auto or fp32"
        )
    if precision == "fp16":
        raise MethodUnavailableError("precision fp16 needs a CUDA GPU; use precision: auto or fp32 on a CPU")
    return Runtime(cpu, torch.float32, None)


def for_evaluation(runtime: Runtime) -> Runtime:
    """The runtime that scores and serves: on a CPU always fp32, on a GPU the training runtime.

    bf16 autocast on a CPU is for training speed. Scores computed in fp32 are the same on every
    CPU, whether it has bf16 or not, equal what the reference server answers, and keep batched
    generation's answers equal to one-at-a-time generation's.
    """
    return Runtime(runtime.device, runtime.dtype, None) if runtime.device.type == "cpu" else runtime


def _linear_layers(model: Any) -> dict[str, list[Any]]:
    """Linear-like layers by their short name (``q_proj``), lm_head excluded."""
    found: dict[str, list[Any]] = {}
    for name, module in model.named_modules():
        if "lm_head" in name or not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            continue
        found.setdefault(name.rsplit(".", 1)[-1], []).append(module)
    return found


def check_lora_fits(model: Any, modules: list[str], rank: int) -> None:
    """Refuse, naming the field, target modules the model lacks and ranks its layers cannot hold."""
    layers = _linear_layers(model)
    unknown = [m for m in modules if m not in layers]
    if unknown:
        raise MethodConfigError(
            f"method.lora.targetModules: {', '.join(unknown)} not found in this {type(model).__name__}; "
            f"its linear layers are: {', '.join(sorted(layers))}"
        )
    smallest = min(min(layer.in_features, layer.out_features) for m in modules for layer in layers[m])
    if rank > smallest:
        raise MethodConfigError(
            f"method.lora.rank {rank} is larger than the smallest dimension ({smallest}) of the adapted "
            f"layers ({', '.join(modules)}); choose a rank of at most {smallest}"
        )


def adapted_layers(model: Any, last_layers: int | None) -> list[int] | None:
    """The block indices an adapter wraps when ``method.lora.lastLayers`` is set (None: every block)."""
    if last_layers is None:
        return None
    blocks = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(blocks, int):
        raise MethodConfigError(
            f"method.lora.lastLayers: this {type(model).__name__} does not say how many blocks it has "
            "(config.num_hidden_layers); leave lastLayers out to adapt every block"
        )
    if last_layers > blocks:
        raise MethodConfigError(
            f"method.lora.lastLayers {last_layers} is more than the {blocks} blocks of this "
            f"{type(model).__name__}; choose at most {blocks}"
        )
    return list(range(blocks - last_layers, blocks))


def target_modules(model: Any, requested: list[str] | None) -> list[str]:
    """The module names an adapter wraps: the request, the architecture's list, or every Linear."""
    if requested:
        return requested
    model_type = getattr(model.config, "model_type", "")
    if model_type in TARGET_MODULES:
        return TARGET_MODULES[model_type]
    names = sorted(_linear_layers(model))
    log.info("no target module list for model type %r; adapting every linear layer: %s", model_type, names)
    return names


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_dir: Path, method: MethodConfig, runtime: Runtime) -> Any:
    """The base model on the runtime's device; 4-bit quantized for QLoRA."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": runtime.dtype}
    if method.type == "QLoRA":
        if runtime.device.type != "cuda":
            raise MethodUnavailableError(
                "QLoRA loads the base model in 4 bits with bitsandbytes, which needs a CUDA GPU; "
                "use method LoRA or DoRA on CPU, or give the FineTune resources.gpus >= 1"
            )
        try:
            from transformers import BitsAndBytesConfig
        except ImportError as e:  # pragma: no cover - depends on the image
            raise MethodUnavailableError("QLoRA needs bitsandbytes in the trainer image") from e
        kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=runtime.autocast or torch.bfloat16,
        )
        kwargs["device_map"] = {"": runtime.device.index or 0}
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if method.type != "QLoRA":
        model.to(runtime.device)
    return model


class CpuDropout(torch.nn.Module):
    """Dropout whose mask costs a quarter of a random draw per element, for the adapter's input on a CPU.

    ``nn.Dropout`` on a CPU draws one Mersenne-Twister number per element, one
    element at a time: on SmolLM2-135M with LoRA on every projection that was a
    quarter of a training step, more than the attention. Here each 64-bit draw
    gives four 16-bit numbers, and an element is kept when its number is at or
    above ``p`` of the 16-bit range. So ``p`` is rounded to a multiple of 1/65536
    (0.05 becomes 0.0500031) and kept elements are scaled by 1/(1 - that), which
    keeps the expectation exact. Draws come from torch's default generator, as
    ``nn.Dropout``'s do, so seeding and a resumed run's saved RNG state govern it.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.cut = min(round(p * 65536), 65536)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cut == 0:
            return x
        if self.cut == 65536:
            return torch.zeros_like(x)
        n = x.numel()
        draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        numbers = draws.view(torch.int16)[:n].view(x.shape)
        keep = (numbers >= self.cut - 32768).to(x.dtype)
        return x * keep.mul_(65536 / (65536 - self.cut))

    def extra_repr(self) -> str:
        return f"p={self.p}"


@contextmanager
def frozen_weights_in_compute_dtype(model: Any, runtime: Runtime) -> Iterator[int]:
    """While training under bf16 autocast on a CPU, hold the frozen linear weights in bf16.

    Autocast casts a weight to bf16 on every forward, and it caches the cast
    only for weights that require grad: an adapter's frozen base was cast anew
    on each call. Cast once here instead; the matmuls see the same bf16 values
    autocast would have made, so the losses are bit for bit the same (tested).
    The fp32 weights are kept and put back on leaving, so evaluation (fp32 on a
    CPU) and anything after it see the base unchanged. Yields how many weights
    were cast. Weights shared with the input embedding (a tied output head) are
    left alone, and DoRA is left alone (it takes norms of the base weight).
    """
    if runtime.device.type != "cpu" or runtime.autocast is None or _uses_dora(model):
        yield 0
        return
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    tied = embeddings.weight if isinstance(embeddings, torch.nn.Embedding) else None
    kept: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(module) is not torch.nn.Linear or not isinstance(weight, torch.nn.Parameter):
            continue
        if weight.requires_grad or weight is tied or weight.dtype != runtime.dtype:
            continue
        kept.append((weight, weight.data))
        weight.data = weight.data.to(runtime.autocast)
    try:
        yield len(kept)
    finally:
        for weight, data in kept:
            weight.data = data


# Eager attention keeps each layer's attention weights for the backward pass, about 6 bytes per
# score (the fp32 softmax and its bf16 copy); training switches to it only while those stay under this.
EAGER_ATTENTION_BUDGET_BYTES = 1 << 30


def training_attention(current: str | None, device: str, scores_per_layer: int, saved_layers: int) -> str | None:
    """The attention implementation to train with: eager on a CPU while its saved weights fit the budget.

    On a CPU, PyTorch's fused SDPA kernel is slower than eager attention's two
    bf16 matmuls and a softmax at the sequence lengths a CPU trains on (one
    SmolLM2-135M LoRA step: 15-24% faster at 256-512 tokens), but eager keeps
    ``scores_per_layer`` (rows x heads x length²) scores per layer until the
    backward pass. Anything but SDPA on a CPU is left as it is.
    """
    if device != "cpu" or current != "sdpa":
        return current
    return "eager" if 6 * scores_per_layer * saved_layers <= EAGER_ATTENTION_BUDGET_BYTES else current


@contextmanager
def attention_for_training(
    model: Any, runtime: Runtime, rows: int, seq_length: int, checkpointing: bool
) -> Iterator[str]:
    """Train with :func:`training_attention`'s choice, and put the model's own back on leaving."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    layers = 1 if checkpointing else int(getattr(config, "num_hidden_layers", 0) or 0)
    chosen = training_attention(current, runtime.device.type, rows * heads * seq_length**2, layers)
    if chosen == current or chosen is None or current is None:
        yield str(current)
        return
    model.set_attn_implementation(chosen)
    try:
        yield chosen
    finally:
        model.set_attn_implementation(current)


def _uses_dora(model: Any) -> bool:
    config = getattr(model, "peft_config", None)
    return isinstance(config, dict) and any(getattr(c, "use_dora", False) for c in config.values())


def use_cpu_dropout(model: Any) -> int:
    """Swap the adapter's ``nn.Dropout`` modules for :class:`CpuDropout`; the number swapped.

    Only on a CPU: a GPU's dropout is one fused kernel already.
    """
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is torch.nn.Dropout:
                dropouts[name] = CpuDropout(dropout.p)
                swapped += 1
    return swapped


def apply_method(model: Any, method: MethodConfig, *, gradient_checkpointing: bool) -> Any:
    """Wrap the base model for training: a PEFT adapter, or every weight trainable for Full."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if method.type == "Full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method.type == "QLoRA":
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    modules = target_modules(model, method.lora.target_modules)
    check_lora_fits(model, modules, method.lora.rank)
    layers = adapted_layers(model, method.lora.last_layers)
    config = LoraConfig(
        r=method.lora.rank,
        lora_alpha=method.lora.alpha,
        lora_dropout=method.lora.dropout,
        target_modules=modules,
        layers_to_transform=layers,
        use_dora=method.type == "DoRA",
        task_type="CAUSAL_LM",
        bias="none",
    )
    if gradient_checkpointing:
        model.enable_input_require_grads()
    adapted = get_peft_model(model, config)
    if next(adapted.parameters()).device.type == "cpu":
        use_cpu_dropout(adapted)
    return adapted


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
