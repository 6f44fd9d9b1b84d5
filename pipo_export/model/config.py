"""PIPO configuration: parse a checkpoint's config.json (text or multimodal wrapper)."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

from pipo_export.errors import CheckpointError

PIPO_FIELDS = ("compressor_type", "mtp_num_hidden_layers", "pad_token_id", "eos_token_id")


class CompressorType(str, Enum):
    MLP = "mlp"
    LINEAR = "linear"


@dataclass
class PipoConfig:
    """Everything the PIPO model needs besides weights.

    text: the backbone's transformers config; compressor_type None means "infer from keys".
    """

    text: Qwen3_5TextConfig
    compressor_type: CompressorType | None
    pad_token_id: int
    eos_token_ids: list[int] = field(default_factory=list)
    mtp_num_hidden_layers: int = 1
    config_layout: str = "text"  # "text" (qwen3_5_text) or "multimodal" (qwen3_5 + text_config)

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    def mtp_text_config(self) -> Qwen3_5TextConfig:
        """Config of the MTP block: one full-attention Qwen3.5 decoder layer."""
        cfg = copy.deepcopy(self.text)
        cfg.layer_types = ["full_attention"]
        cfg.num_hidden_layers = 1
        return cfg


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def parse_config(raw: dict, source: str = "config.json") -> PipoConfig:
    """Build a PipoConfig from the dict of a config.json (either layout)."""
    model_type = raw.get("model_type")
    if model_type == "qwen3_5":
        if not isinstance(raw.get("text_config"), dict):
            raise CheckpointError(f"{source}: model_type 'qwen3_5' needs a 'text_config' object")
        text_fields = dict(raw["text_config"])
        for key in PIPO_FIELDS:  # PIPO fields may sit beside text_config
            if key in raw and raw[key] is not None:
                text_fields.setdefault(key, raw[key])
        layout = "multimodal"
    elif model_type == "qwen3_5_text":
        text_fields, layout = dict(raw), "text"
    else:
        raise CheckpointError(
            f"{source}: model_type is {model_type!r}; a PIPO checkpoint has 'qwen3_5_text' or "
            "'qwen3_5' (with text_config)")
    text_fields["model_type"] = "qwen3_5_text"
    pipo = {k: text_fields.pop(k, None) for k in PIPO_FIELDS}
    for drop in ("architectures", "transformers_version", "dtype", "torch_dtype"):
        text_fields.pop(drop, None)
    try:
        text = Qwen3_5TextConfig(**text_fields)
    except Exception as exc:  # transformers raises several types for bad fields
        raise CheckpointError(f"{source}: not a valid Qwen3.5 text config: {exc}") from None
    text._attn_implementation = "eager"
    comp = pipo["compressor_type"]
    if comp is not None:
        try:
            comp = CompressorType(comp)
        except ValueError:
            raise CheckpointError(
                f"{source}: unknown compressor_type {comp!r}; expected 'mlp' or 'linear'") from None
    if pipo["pad_token_id"] is None:
        raise CheckpointError(f"{source}: pad_token_id is missing; PIPO pads pairs with it "
                              "(248044 for the Qwen3.5 tokenizer)")
    text.pad_token_id = int(pipo["pad_token_id"])
    mtp_layers = int(pipo["mtp_num_hidden_layers"] or 1)
    if mtp_layers != 1:
        raise CheckpointError(f"{source}: mtp_num_hidden_layers={mtp_layers}; PIPO uses exactly 1")
    return PipoConfig(text=text, compressor_type=comp, pad_token_id=int(pipo["pad_token_id"]),
                      eos_token_ids=_as_list(pipo["eos_token_id"]), mtp_num_hidden_layers=1,
                      config_layout=layout)


def load_config(folder: Path) -> PipoConfig:
    """Read folder/config.json (and generation_config.json's eos ids when config has none)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json; a PIPO checkpoint is a Hugging Face "
                              "folder with config.json and safetensors weights")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    cfg = parse_config(raw, str(path))
    gen = Path(folder) / "generation_config.json"
    if not cfg.eos_token_ids and gen.is_file():
        try:
            cfg.eos_token_ids = _as_list(json.loads(gen.read_text()).get("eos_token_id"))
        except json.JSONDecodeError:
            pass
    return cfg
