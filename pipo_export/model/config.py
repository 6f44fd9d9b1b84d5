"""PIPO configuration: parse a checkpoint's config.json (text or multimodal wrapper)."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

from pipo_export.errors import CheckpointError
from pipo_export.fsutil import read_checkpoint_json

PIPO_FIELDS = ("compressor_type", "mtp_num_hidden_layers", "pad_token_id", "eos_token_id")
# the text config's fields checked before transformers sees them (absent = its default)
POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim",
                 "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                 "linear_num_key_heads", "linear_num_value_heads", "max_position_embeddings")
POSITIVE_FLOATS = ("rms_norm_eps",)
BOOLS = ("tie_word_embeddings", "attention_bias", "use_cache")
OBJECTS = ("rope_parameters", "rope_scaling")
LAYER_TYPES = ("linear_attention", "full_attention")
MAX_DIM = 1 << 31  # a dim above this is a corrupt config, not a model


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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_text_fields(f: dict, source: str) -> None:
    """Type, range and finiteness of every text-config field PIPO relies on, and of the PIPO
    fields (pad and eos ids inside the vocabulary); CheckpointError naming the field."""
    def bad(name, want):
        raise CheckpointError(f"{source}: {name} is {f[name]!r}; expected {want}")
    for name in POSITIVE_INTS:
        if f.get(name) is not None and not (_is_int(f[name]) and 1 <= f[name] < MAX_DIM):
            bad(name, f"an integer in [1, {MAX_DIM})")
    for name in POSITIVE_FLOATS:
        v = f.get(name)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                  and math.isfinite(v) and v > 0):
            bad(name, "a finite number > 0")
    for name in BOOLS:
        if f.get(name) is not None and not isinstance(f[name], bool):
            bad(name, "true or false")
    for name in OBJECTS:
        if f.get(name) is not None and not isinstance(f[name], dict):
            bad(name, "an object")
    types = f.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or not all(t in LAYER_TYPES for t in types):
            bad("layer_types", f"a list of {' / '.join(LAYER_TYPES)}")
        if _is_int(f.get("num_hidden_layers")) and len(types) != f["num_hidden_layers"]:
            bad("layer_types", f"{f['num_hidden_layers']} entries (num_hidden_layers)")
    vocab = f.get("vocab_size")
    for name in ("pad_token_id", "eos_token_id"):
        v = f.get(name)
        ids = v if isinstance(v, list) else [v] if v is not None else []
        if not all(_is_int(i) and 0 <= i < (vocab or MAX_DIM) for i in ids):
            bad(name, f"token ids in [0, {vocab}) (the vocabulary)")
    mtp = f.get("mtp_num_hidden_layers")
    if mtp is not None and not _is_int(mtp):
        bad("mtp_num_hidden_layers", "1")


def parse_config(raw: dict, source: str = "config.json") -> PipoConfig:
    """Build a PipoConfig from the dict of a config.json (either layout)."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a JSON object, found {type(raw).__name__}")
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
    check_text_fields(text_fields, source)
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
    if not path.exists():
        raise CheckpointError(f"{folder}: no config.json; a PIPO checkpoint is a Hugging Face "
                              "folder with config.json and safetensors weights")
    cfg = parse_config(read_checkpoint_json(path), str(path))
    return eos_from_generation_config(cfg, Path(folder))


def eos_from_generation_config(cfg: PipoConfig, folder: Path) -> PipoConfig:
    """When config.json names no eos: folder/generation_config.json's eos ids, which must lie
    inside the vocabulary (CheckpointError naming the file otherwise)."""
    gen = read_checkpoint_json(Path(folder) / "generation_config.json", {})
    eos = gen.get("eos_token_id")
    if not cfg.eos_token_ids and eos is not None:
        eos = eos if isinstance(eos, list) else [eos]
        if not all(_is_int(i) and 0 <= i < cfg.vocab_size for i in eos):
            raise CheckpointError(f"{Path(folder) / 'generation_config.json'}: eos_token_id is "
                                  f"{gen['eos_token_id']!r}; expected token ids in "
                                  f"[0, {cfg.vocab_size}) (the vocabulary)")
        cfg.eos_token_ids = eos
    return cfg
