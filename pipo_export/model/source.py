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
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from pipo_graphs.dtypes import SAFETENSORS_DTYPES, itemsize

from pipo_export.errors import CheckpointError
from pipo_export.fsutil import read_checkpoint_json

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' long-standing max_shard_size "5GB"
BACKBONE_PREFIXES = ("model.language_model.", "language_model.")  # -> "model."
IGNORED_PREFIXES = ("model.visual.", "visual.")  # vision tower: not part of the text model
MAX_HEADER = 100 << 20


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """No NaN or Inf in `tensor` (any shape; integer tensors always pass), checked a chunk of
    elements at a time so the mask never costs more than 16 MB."""
    if not tensor.is_floating_point():
        return True
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header -> ({key: {dtype, shape, data_offsets}}, data start), checked
    as the safetensors library checks it (check_header). Tensors are then read with plain file
    reads (no mmap: pages of a mapped file count toward the process's resident memory, which
    would grow to the whole checkpoint)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
            if n is None or n > MAX_HEADER:
                raise ValueError("not a safetensors file (bad header length)")
            size = os.fstat(f.fileno()).st_size
            if 8 + n > size:
                raise ValueError(f"header length {n} runs past the end of the file")
            text = f.read(n)
            if not text.startswith(b"{"):
                raise ValueError("header does not start with '{'")
            header = json.loads(text)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied; make it readable") from None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors ({exc})") from None
    header.pop("__metadata__", None)
    check_header(path, header, size - 8 - n)
    return header, 8 + n


def _entry(path: Path, key: str, info) -> tuple[int, int, int]:
    """(begin, end, bytes the dtype and shape need) of one header entry; CheckpointError for
    a malformed one (offsets and dims are non-negative integers, a known dtype)."""
    def ints(v, n=None):
        return (isinstance(v, list) and (n is None or len(v) == n)
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v))
    if not (isinstance(info, dict) and ints(info.get("data_offsets"), 2)
            and ints(info.get("shape")) and info.get("dtype") in SAFETENSORS_DTYPES):
        raise CheckpointError(f"{path}: bad safetensors header entry for tensor {key} (dtype, "
                              "shape and data_offsets must be a known dtype and non-negative "
                              "integers); the file is corrupt, download it again")
    begin, end = info["data_offsets"]
    return begin, end, math.prod(info["shape"]) * itemsize(SAFETENSORS_DTYPES[info["dtype"]])


def check_header(path: Path, header: dict, data_bytes: int) -> None:
    """The safetensors library's checks (Metadata::validate): sorted by offset, the tensors'
    byte ranges start at 0, follow each other with no gap or overlap (so no two tensors alias
    one range), each is exactly as long as its dtype and shape need, and the last ends at the
    end of the file. CheckpointError naming the file and the tensor."""
    entries = sorted((_entry(path, key, info), key) for key, info in header.items())
    at = 0
    for (begin, end, need), key in entries:
        if begin != at or end < begin:
            why = ("overlaps the tensor before it" if begin < at else
                   "leaves a gap after the tensor before it" if begin > at else
                   "ends before it begins")
            raise CheckpointError(f"{path}: tensor {key} has data_offsets [{begin}, {end}] "
                                  f"that {why}; the file is corrupt, download it again")
        if end - begin != need:
            raise CheckpointError(f"{path}: tensor {key} holds {end - begin} bytes but its dtype "
                                  f"and shape need {need}; the file is corrupt, download it again")
        at = end
    if at != data_bytes:
        raise CheckpointError(f"{path}: the tensors cover {at} bytes but the file holds "
                              f"{data_bytes} after the header (truncated or padded); download "
                              "it again")


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
        weight_map = read_checkpoint_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                       for v in weight_map.values()):
            raise CheckpointError(f"{index}: not a valid safetensors index (expected a "
                                  "'weight_map' object of tensor name -> shard file)")
        names = sorted(set(weight_map.values()))
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
    _where: dict[str, tuple] = field(default_factory=dict)  # name -> (file, key, begin, end)
    _meta: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | Path) -> "SafetensorsSource":
        folder = Path(folder)
        src = cls(folder, weight_files(folder))
        for path in src.files:
            header, start = read_header(path)
            for key, info in header.items():
                name, prefix = normalize_key(key)
                if name is None:
                    src.ignored.append(key)
                    continue
                if prefix:
                    src.key_prefix = prefix
                if name in src._where:
                    raise CheckpointError(f"{folder}: tensor {name} is stored twice ({key} in "
                                          f"{path.name} and {src._where[name][1]})")
                begin, end = (start + o for o in info["data_offsets"])  # checked by read_header
                src._where[name] = (path, key, begin, end)
                src._meta[name] = (tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]])
        return src

    def names(self) -> list[str]:
        return sorted(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> str:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        path, key, begin, end = self._where[name]
        shape, dtype = self._meta[name]
        buf = bytearray(end - begin)
        try:
            with open(path, "rb", buffering=0) as f:
                got = os.preadv(f.fileno(), [buf], begin) if buf else 0
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read tensor {key} ({exc})") from None
        if got != len(buf):
            raise CheckpointError(f"{path}: tensor {key} is truncated (file too short); "
                                  "download the checkpoint again")
        if not buf:
            return torch.empty(shape, dtype=getattr(torch, dtype))
        tensor = torch.frombuffer(buf, dtype=getattr(torch, dtype)).reshape(shape)
        if not all_finite(tensor):
            raise CheckpointError(f"{path}: tensor {key} holds NaN or Inf; the checkpoint is "
                                  "corrupt (download it again)")
        return tensor

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
