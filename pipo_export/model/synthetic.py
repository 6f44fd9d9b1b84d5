"""Tiny PIPO checkpoints for tests and demos, in every layout the loader accepts."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipo_export.model.config import CompressorType, parse_config
from pipo_export.errors import PipoError
from pipo_export.model.modules import PipoModel
from pipo_export.model.shapes import pipo_text_config

TINY_TEXT_CONFIG = {
    "model_type": "qwen3_5_text", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "attention_bias": False, "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    "compressor_type": "mlp", "mtp_num_hidden_layers": 1, "pad_token_id": 319, "eos_token_id": 318,
}


SMALL_TEXT_CONFIG = dict(
    TINY_TEXT_CONFIG, vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, linear_key_head_dim=32,
    linear_value_head_dim=32, linear_num_key_heads=4, linear_num_value_heads=8,
    layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3
    + ["full_attention"], pad_token_id=8191, eos_token_id=8190)
# Qwen3.5-0.8B's published text config (pipo_export.model.shapes) as a flat PIPO text config,
# for the in-memory writers below; real shapes at full size are written tensor by tensor by
# pipo_export.model.shapes.write_shape_checkpoint.
QWEN35_08B_TEXT_CONFIG = pipo_text_config("qwen3.5-0.8b")
SHAPES = {"tiny": TINY_TEXT_CONFIG, "small": SMALL_TEXT_CONFIG,
          "qwen3.5-0.8b": QWEN35_08B_TEXT_CONFIG}


def with_layers(text_config: dict, layers: int | None, max_positions: int | None = None) -> dict:
    """The config cut to its first `layers` layers (the layer pattern kept), optionally with a
    larger max_position_embeddings."""
    out = dict(text_config)
    if layers:
        if not 1 <= layers <= text_config["num_hidden_layers"]:
            raise PipoError(f"--layers must be in [1, {text_config['num_hidden_layers']}], "
                            f"got {layers}")
        out.update(num_hidden_layers=layers, layer_types=text_config["layer_types"][:layers])
    if max_positions:
        out["max_position_embeddings"] = max(out["max_position_embeddings"], max_positions)
    return out


@dataclass
class TinyLayout:
    """How write_tiny_checkpoint lays out a folder."""

    multimodal: bool = False  # qwen3_5 wrapper config + model.language_model.* keys + visual keys
    shards: int = 1  # >1 writes shards plus model.safetensors.index.json
    tied: bool = True
    compressor: str = "mlp"
    compressor_in_config: bool = True
    weight_dtype: torch.dtype = torch.float32


def random_model(text_config: dict, seed: int = 0) -> PipoModel:
    """A PipoModel with seeded random weights; every parameter non-trivial (norms too)."""
    cfg = parse_config(dict(text_config))
    cfg.compressor_type = CompressorType(text_config.get("compressor_type", "mlp"))
    torch.manual_seed(seed)
    model = PipoModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.0, 1.5, generator=gen))
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / p.shape[-1] ** 0.5) * 2)
    return model.eval()


def write_tiny_checkpoint(folder: str | Path, layout: TinyLayout = TinyLayout(), seed: int = 0,
                          text_config: dict | None = None) -> Path:
    """Write a seeded random PIPO checkpoint in the given layout; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = dict(text_config or TINY_TEXT_CONFIG, tie_word_embeddings=layout.tied,
                compressor_type=layout.compressor)
    model = random_model(text, seed)
    state = {k: v.detach().to(layout.weight_dtype).contiguous()
             for k, v in model.state_dict().items()}
    if layout.tied:
        state.pop("lm_head.weight", None)
    if not layout.compressor_in_config:
        text.pop("compressor_type")
    if text["vocab_size"] <= 16384:  # real-vocab shapes get no toy tokenizer
        write_tiny_tokenizer(folder, text["vocab_size"], text["eos_token_id"],
                             text["pad_token_id"])
    if layout.multimodal:
        state = {("model.language_model." + k[6:] if k.startswith("model.") else k): v
                 for k, v in state.items()}
        state["model.visual.patch_embed.proj.weight"] = torch.randn(8, 3, 2, 2)
        pipo = {k: text.pop(k) for k in ("compressor_type", "pad_token_id", "eos_token_id",
                                         "mtp_num_hidden_layers") if k in text}
        config = {"model_type": "qwen3_5", "text_config": text, "vision_config": {"depth": 1},
                  "tie_word_embeddings": layout.tied, **pipo}
    else:
        config = text
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    keys = sorted(state)
    if layout.shards <= 1:
        save_file(state, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for i in range(layout.shards):
        name = f"model-{i + 1:05d}-of-{layout.shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::layout.shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return folder


CORPUS = """PIPO folds each pair of input tokens into one latent, runs the backbone on sequences of half
the length, and unfolds every hidden state into two output tokens. A small confidence head decides
whether the second token is kept. The exporter writes two graphs: prefill compress and decode
unfold, with sampling and the confidence gate inside the graph. Engineers ship these models on
servers and on edge boxes, and they expect the tokens to match the reference exactly."""


def write_tiny_tokenizer(folder: Path, vocab_size: int, eos_id: int, pad_id: int) -> None:
    """A byte-level BPE tokenizer.json sized to the model: bytes, merges learned on a built-in
    paragraph, reserved fillers, then <|eos|> and <|pad|> at the config's ids (the last two)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    assert {eos_id, pad_id} == {vocab_size - 2, vocab_size - 1}, "tiny shapes end with eos, pad"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.split("\n"), trainer)
    fill = vocab_size - 2 - tok.get_vocab_size()
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(fill)])  # dropped when decoding
    names = {eos_id: "<|eos|>", pad_id: "<|pad|>"}
    tok.add_special_tokens([names[vocab_size - 2], names[vocab_size - 1]])
    assert tok.token_to_id("<|pad|>") == pad_id and tok.get_vocab_size() == vocab_size
    tok.save(str(folder / "tokenizer.json"))
