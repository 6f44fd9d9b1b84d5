"""Load a PIPO checkpoint folder (config.json + safetensors) into a PipoModel."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from pipo_export.model.config import CompressorType, PipoConfig, load_config
from pipo_export.errors import CheckpointError
from pipo_export.model.modules import PipoModel

INDEX_FILE = "model.safetensors.index.json"
PIPO_MODULES = ("compressor", "mtp", "confidence_head")


@dataclass
class CheckpointLayout:
    """What the loader found in a folder, for `inspect` and error messages."""

    folder: Path
    weight_files: list[Path]
    key_prefix: str  # "model." or "model.language_model."
    config_layout: str
    tied_lm_head: bool
    weight_dtypes: list[str]
    ignored_keys: list[str] = field(default_factory=list)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: shards from the index, or the single file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no model.safetensors (or shards with {INDEX_FILE})")
    if len(files) > 1:
        raise CheckpointError(f"{folder}: {len(files)} safetensors files but no {INDEX_FILE}; "
                              "add the index or keep a single model.safetensors")
    return files


def read_tensors(files: list[Path]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """All tensors of the files, by key, and the set of dtypes they were stored in."""
    tensors, dtypes = {}, set()
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
                    dtypes.add(str(tensors[key].dtype).replace("torch.", ""))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: cannot read safetensors ({exc})") from None
    return tensors, sorted(dtypes)


def normalize_keys(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Map `model.language_model.*` to `model.*` and drop `model.visual.*`.

    Returns (tensors with PipoModel key names, backbone prefix found, ignored keys).
    """
    out, ignored, prefix = {}, [], "model."
    for key, value in tensors.items():
        if key.startswith("model.visual.") or key.startswith("visual."):
            ignored.append(key)
            continue
        if key.startswith("model.language_model."):
            prefix = "model.language_model."
            key = "model." + key[len("model.language_model."):]
        elif key.startswith("language_model."):
            prefix = "language_model."
            key = "model." + key[len("language_model."):]
        out[key] = value
    return out, prefix, ignored


def infer_compressor(cfg: PipoConfig, keys: set[str]) -> CompressorType:
    if cfg.compressor_type is not None:
        return cfg.compressor_type
    if "compressor.mlp.0.weight" in keys:
        return CompressorType.MLP
    if "compressor.linear.weight" in keys:
        return CompressorType.LINEAR
    raise CheckpointError("config.json has no compressor_type and the weights hold neither "
                          "compressor.mlp.* nor compressor.linear.*")


def _check_pipo_modules(keys: set[str], folder: Path) -> None:
    missing = [m for m in PIPO_MODULES if not any(k.startswith(m + ".") for k in keys)]
    if missing:
        plain = " (this looks like a plain Qwen3.5 checkpoint)" if len(missing) == 3 else ""
        raise CheckpointError(f"{folder}: missing PIPO modules {', '.join(missing)}{plain}; "
                              "a PIPO checkpoint also holds compressor.*, mtp.* and confidence_head.*")


def _bind(model: PipoModel, tensors: dict[str, torch.Tensor], dtype: torch.dtype, folder: Path) -> None:
    """Copy tensors into the model, naming every missing, unused or mis-shaped tensor."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.config.text.tie_word_embeddings
    if tied and "lm_head.weight" in tensors:
        extra = tensors.pop("lm_head.weight")
        if not torch.equal(extra, tensors.get("model.embed_tokens.weight", extra)):
            raise CheckpointError(f"{folder}: tie_word_embeddings is true but lm_head.weight differs "
                                  "from model.embed_tokens.weight; set tie_word_embeddings false")
    expected = {k for k in params if not (tied and k == "lm_head.weight")}
    missing = sorted(expected - tensors.keys())
    if missing:
        raise CheckpointError(f"{folder}: missing tensors: {', '.join(missing[:8])}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    unused = sorted(tensors.keys() - expected)
    if unused:
        raise CheckpointError(f"{folder}: tensors left unused (not part of a PIPO model with this "
                              f"config): {', '.join(unused[:8])}"
                              + (f" and {len(unused) - 8} more" if len(unused) > 8 else ""))
    for name in sorted(expected):
        target, value = params[name], tensors[name]
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{folder}: tensor {name} has shape {tuple(value.shape)}, "
                                  f"expected {tuple(target.shape)} from config.json")
        with torch.no_grad():
            target.copy_(value.to(dtype))


def inspect_checkpoint(path: str | Path) -> tuple[PipoConfig, CheckpointLayout, dict[str, torch.Tensor]]:
    """Parse config and weights without building the model (for `inspect` and the loader)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    cfg = load_config(folder)
    files = weight_files(folder)
    raw, dtypes = read_tensors(files)
    tensors, prefix, ignored = normalize_keys(raw)
    _check_pipo_modules(set(tensors), folder)
    cfg.compressor_type = infer_compressor(cfg, set(tensors))
    layout = CheckpointLayout(folder=folder, weight_files=files, key_prefix=prefix,
                              config_layout=cfg.config_layout,
                              tied_lm_head=bool(cfg.text.tie_word_embeddings),
                              weight_dtypes=dtypes, ignored_keys=ignored)
    return cfg, layout, tensors


def torch_dtype(dtype) -> torch.dtype:
    """A contract dtype (pipo_graphs.dtypes.DType or its name) as a torch dtype."""
    return getattr(torch, getattr(dtype, "value", dtype))


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> PipoModel:
    """Load a PIPO checkpoint folder into an eval-mode PipoModel of the given dtype."""
    cfg, _, tensors = inspect_checkpoint(path)
    with torch.device("cpu"):
        model = PipoModel(cfg)
    _bind(model, tensors, dtype, Path(path))
    return model.to(dtype).eval()
