"""Named tensors read lazily, one at a time: the way every weight enters pipo-export.

A `TensorSource` maps PipoModel parameter names (``model.layers.3.mlp.up_proj.weight``,
``mtp.fc.weight``, ...) to tensors it reads only when asked, so a 9B checkpoint is never in
memory at once. `SafetensorsSource` reads a Hugging Face folder (single file or shards with an
index; ``model.language_model.*`` and ``language_model.*`` keys mapped to ``model.*``; visual
tensors ignored). `pipo_export.model.adapters.AdapterSource` merges a PEFT LoRA adapter over a
base source tensor by tensor.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from pipo_export.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
BACKBONE_PREFIXES = ("model.language_model.", "language_model.")  # -> "model."
IGNORED_PREFIXES = ("model.visual.", "visual.")  # vision tower: not part of the text model
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class TensorSource(Protocol):
    """Read-only named tensors with PipoModel key names, loaded on demand."""

    def names(self) -> list[str]:
        """Every tensor name the source holds (sorted)."""

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of `name` without reading it."""

    def dtype(self, name: str) -> str:
        """Stored dtype name of `name` ("bfloat16", "float32", ...) without reading it."""

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (in its stored dtype)."""


def normalize_key(key: str) -> tuple[str | None, str]:
    """A checkpoint key -> (PipoModel name or None when ignored, the backbone prefix it had)."""
    if key.startswith(IGNORED_PREFIXES):
        return None, ""
    for prefix in BACKBONE_PREFIXES:
        if key.startswith(prefix):
            return "model." + key[len(prefix):], prefix
    return key, "model." if key.startswith("model.") else ""


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: shards from the index, or the single file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        files = [folder / name for name in names]
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


@dataclass
class SafetensorsSource:
    """The tensors of a Hugging Face checkpoint folder, by PipoModel name, read lazily."""

    folder: Path
    files: list[Path] = field(default_factory=list)
    key_prefix: str = "model."  # backbone prefix found: "model." or "model.language_model."
    ignored: list[str] = field(default_factory=list)  # visual keys
    _where: dict[str, tuple[Path, str]] = field(default_factory=dict)  # name -> (file, raw key)
    _meta: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    _handles: dict[Path, object] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | Path) -> "SafetensorsSource":
        folder = Path(folder)
        src = cls(folder, weight_files(folder))
        for path in src.files:
            handle = src._handle(path)
            for key in handle.keys():
                name, prefix = normalize_key(key)
                if name is None:
                    src.ignored.append(key)
                    continue
                if prefix:
                    src.key_prefix = prefix
                if name in src._where:
                    raise CheckpointError(f"{folder}: tensor {name} is stored twice ({key} in "
                                          f"{path.name} and {src._where[name][1]})")
                info = handle.get_slice(key)
                src._where[name] = (path, key)
                src._meta[name] = (tuple(info.get_shape()),
                                   SAFETENSORS_DTYPES.get(info.get_dtype(), info.get_dtype()))
        return src

    def _handle(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except PermissionError:
                raise CheckpointError(f"{path}: permission denied; make it readable") from None
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: cannot read safetensors ({exc})") from None
        return self._handles[path]

    def names(self) -> list[str]:
        return sorted(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> str:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        path, key = self._where[name]
        try:
            return self._handle(path).get_tensor(key)
        except Exception as exc:  # a truncated or corrupted file
            raise CheckpointError(f"{path}: cannot read tensor {key} ({exc})") from None

    def stored_dtypes(self) -> list[str]:
        return sorted({d for _, d in self._meta.values()})


def parameter_bytes(source: TensorSource, names, itemsize: int) -> int:
    """Bytes `names` take at `itemsize` bytes per element (the export's weight bytes)."""
    total = 0
    for name in names:
        n = 1
        for d in source.shape(name):
            n *= d
        total += n * itemsize
    return total
