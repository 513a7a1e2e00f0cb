"""``kubetune-trainer import-gguf``: a GGUF file becomes a Hugging Face folder that computes the same logits.

The GGUF files are written here, from a tiny Llama, with the ``gguf``
package's writer and llama.cpp's conventions (tensor names, the rotary
permutation of q/k, a byte-level BPE vocabulary with merges, the chat
template), quantized the way real files are. So the round trip is tested
without a model download; the real SmolLM2 file goes through the same code in
``make demo`` and the e2e suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kubetune_trainer import gguf_import
from kubetune_trainer.tiny import build_tiny_model

TEXTS = [
    "Route this support ticket: my parcel is late again",
    "Route this support ticket: the refund for my kettle never came",
    "the quick brown fox jumps over the lazy dog",
] * 20


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k layout: rotary halves interleaved per head (its convert script's ``permute``)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(model_dir: Path, path: Path, weight_type: str) -> None:
    """Write the tiny Llama at ``model_dir`` as a llama.cpp GGUF file, 2-D weights as ``weight_type``."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_rope_freq_base(config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 1e4))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])

    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    tokens = [""] * config["vocab_size"]
    types = [gguf.TokenType.NORMAL] * config["vocab_size"]
    for token, index in {**vocab, **added}.items():
        tokens[index] = token
        if token in added:
            types[index] = gguf.TokenType.CONTROL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    template = tokenizer_config.get("chat_template") or (model_dir / "chat_template.jinja").read_text()
    writer.add_chat_template(template)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(config["num_hidden_layers"]):
        for hf, cpp in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{cpp}.weight"
    qtype = gguf.GGMLQuantizationType[weight_type]
    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        array = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            array = _permute(array, heads)
        elif name.endswith("k_proj.weight"):
            array = _permute(array, kv_heads)
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(names[name], gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(names[name], array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-hf") / "model"
    return build_tiny_model(out, TEXTS, hidden_size=64, layers=2, heads=4, vocab_size=300, max_positions=128)


def _logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=torch.tensor([ids])).logits[0]
    return out


@pytest.mark.parametrize("weight_type", ["Q4_1", "Q8_0", "F32"])
def test_import_round_trip_matches_transformers_gguf_load(tiny_hf: Path, tmp_path: Path, weight_type: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / f"tiny.{weight_type}.gguf"
    write_gguf(tiny_hf, path, weight_type)
    reference, reference_tokenizer = gguf_import.load_gguf(path)

    out = gguf_import.import_gguf(path, tmp_path / "imported")
    imported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)

    text = "Route this support ticket: the kettle arrived broken"
    ids = tokenizer(text)["input_ids"]
    assert ids == reference_tokenizer(text)["input_ids"]
    assert torch.equal(_logits(imported, ids), _logits(reference, ids))
    # The chat template travels with the tokenizer: the imported folder renders chats as the file says.
    chat = [{"role": "user", "content": "hello"}]
    assert tokenizer.chat_template is not None
    assert tokenizer.apply_chat_template(chat, tokenize=False) == reference_tokenizer.apply_chat_template(
        chat, tokenize=False
    )
    assert not (out / "config.json").read_text().count("quantization_config")
    record = json.loads((out / gguf_import.RECORD).read_text())
    assert record["gguf"]["architecture"] == "llama"
    assert record["sourceDigest"] == gguf_import.file_sha256(path)
    assert weight_type in record["gguf"]["tensor_types"]

    if weight_type == "F32":
        # Unquantized, the GGUF detour is lossless: the imported model is the original tiny Llama.
        original = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
        torch.testing.assert_close(_logits(imported, ids), _logits(original, ids), rtol=1e-5, atol=1e-5)


def test_import_refuses_what_is_not_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(gguf_import.GGUFImportError, match="not a GGUF file"):
        gguf_import.import_gguf(bogus, tmp_path / "out")
    with pytest.raises(gguf_import.GGUFImportError, match="no such file"):
        gguf_import.import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_exit_codes(tiny_hf: Path, tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_hf, path, "Q8_0")
    out = tmp_path / "imported"
    command = [sys.executable, "-m", "kubetune_trainer.cli", "import-gguf"]
    done = subprocess.run([*command, str(path), str(out)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["model"] == str(out)
    assert (out / "model.safetensors").is_file()
    # A second import does not silently replace the first.
    again = subprocess.run([*command, str(path), str(out)], capture_output=True, text=True, check=False)
    assert again.returncode == 10
    assert "already exists" in again.stderr
    missing = [*command, str(tmp_path / "none.gguf"), str(tmp_path / "x")]
    bad = subprocess.run(missing, capture_output=True, text=True, check=False)
    assert bad.returncode == 10
    assert "no such file" in bad.stderr
