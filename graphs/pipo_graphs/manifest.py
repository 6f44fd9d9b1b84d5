"""manifest.json: the single description of an export (schema: manifest.schema.json).

`load_manifest(folder)` -> `Manifest`, a tree of dataclasses checked field by field on the way
in (`Manifest.from_json`: a missing field or a value of the wrong type raises ManifestError
naming the field, e.g. `manifest.model.vocab_size`) and written back with `to_json()`. Keys this
version does not know are kept (each object's `extra`) and written back unchanged, so the file
format stays what the C++ runtime reads.
"""
from __future__ import annotations

import hashlib
import json
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union

from .contract import CONTRACT_VERSION, DECODE, PREFILL, Mode, ModelDims, Target
from .dtypes import DType
from .errors import ManifestError  # noqa: F401 (re-exported: runtimes import it from here)
from .members import member
from .seal import read_sealed, seal_path

MANIFEST = "manifest.json"
SCHEMA = Path(__file__).with_name("manifest.schema.json")
LayerType = Literal["linear_attention", "full_attention"]
get_origin, get_args = typing.get_origin, typing.get_args
Shape = list[Union[int, str]]  # ints and symbolic dims ("batch", "past_pairs", ...)




# ---------------------------------------------------------------------------- typed JSON
def _type_name(tp) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (list, dict):
        return "an array" if get_origin(tp) is list else "an object"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return {type(None): "null", int: "an integer", float: "a number", str: "a string",
            bool: "true/false"}.get(tp, "an object")



def _convert(value, tp, where: str):
    """A JSON value as type `tp` (the subset of typing the manifest uses), or ManifestError."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        if value is not None and len(present) == 1:  # Optional[X]: X's own, precise error
            return _convert(value, present[0], where)
        for arg in args:
            try:
                return _convert(value, arg, where)
            except ManifestError:
                pass
    elif origin is Literal:
        if value in args:
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return {k: _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    elif is_dataclass(tp):
        return _from_json(tp, value, where)
    elif isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            pass
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ManifestError(f"{where} is {json.dumps(value)[:60]}, expected {_type_name(tp)}")


def _from_json(cls, data, where: str):
    if not isinstance(data, dict):
        raise ManifestError(f"{where} is {json.dumps(data)[:60]}, expected an object")
    hints = typing.get_type_hints(cls)
    values, known = {}, set()
    for f in fields(cls):
        if f.name == "extra":
            continue
        known.add(f.name)
        if f.name in data:
            values[f.name] = _convert(data[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ManifestError(f"{where}: missing '{f.name}'")
    obj = cls(**values)
    obj.extra = {k: v for k, v in data.items() if k not in known}
    return obj


def _to_json(value):
    if is_dataclass(value):
        out = {f.name: _to_json(getattr(value, f.name)) for f in fields(value) if f.name != "extra"
               and not (f.metadata.get("optional") and getattr(value, f.name) in (None, [], {}))}
        out.update(value.extra)
        return out
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


class _Json:
    """from_json / to_json for the manifest's dataclasses; `extra` keeps unknown keys."""

    extra: dict

    @classmethod
    def from_json(cls, data: dict, where: str = "manifest"):
        return _from_json(cls, data, where)

    def to_json(self) -> dict:
        return _to_json(self)

    def dumps(self) -> str:
        """The JSON text, checked first as a reader checks it (from_json of the result), so a
        value of the wrong type fails where it is written; a misspelt field already failed in
        the constructor. ValueError: a bug in the writer, not bad input."""
        data = self.to_json()
        try:
            type(self).from_json(json.loads(json.dumps(data)))
        except ManifestError as exc:
            raise ValueError(f"refusing to write {type(self).__name__}: {exc}") from None
        return json.dumps(data, indent=2)


def _extra():
    return field(default_factory=dict, repr=False, compare=False)


def _optional(factory=None):
    """A field only some exports have: written only when set (not None, not empty)."""
    if factory is None:
        return field(default=None, metadata={"optional": True})
    return field(default_factory=factory, metadata={"optional": True})


# ---------------------------------------------------------------------------- the manifest
@dataclass(kw_only=True)
class ModelInfo(_Json):
    """The exported model: dims that fix the state shapes, special ids, context limit."""

    vocab_size: int
    hidden_size: int
    layer_types: list[LayerType]
    num_key_value_heads: int
    head_dim: int
    conv_dim: int | None = None
    conv_kernel: int | None = None
    linear_num_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    pad_token_id: int
    eos_token_ids: list[int]
    compressor_type: Literal["mlp", "linear"]
    max_context: int  # tokens (prompt + generated) the graphs accept
    parameters: int | None = None
    extra: dict = _extra()

    def dims(self) -> ModelDims:
        return ModelDims(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                         layer_types=list(self.layer_types),
                         num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                         conv_dim=self.conv_dim, conv_kernel=self.conv_kernel,
                         linear_num_value_heads=self.linear_num_value_heads,
                         linear_key_head_dim=self.linear_key_head_dim,
                         linear_value_head_dim=self.linear_value_head_dim)


@dataclass(kw_only=True)
class ExportInfo(_Json):
    """How the export was made: mode, target, dtype, opset, tools, source, validation."""

    mode: Mode = Mode.PIPO
    target: Target
    dtype: DType
    opset: int
    sample_cap: int
    tool_versions: dict[str, str]
    source: str | None = None  # the checkpoint folder (the torch backend reloads it)
    base: str | None = None  # the Qwen3.5 base folder when `source` is a PEFT adapter
    adapters: list[str] = field(default_factory=list)  # every adapter over `base`, merge order
    # sha256 of every file of `source` (and `base`, as "base/NAME") the export read; the torch
    # backend refuses a source that no longer matches
    source_files: dict[str, FileEntry] | None = None
    created: str | None = None
    timings: dict[str, float] | None = None
    validation: dict[str, Any] | None = None
    extra: dict = _extra()


@dataclass(kw_only=True)
class TensorInfo(_Json):
    """One graph input or output."""

    name: str
    dtype: str
    shape: Shape
    extra: dict = _extra()


@dataclass(kw_only=True)
class GraphInfo(_Json):
    file: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    extra: dict = _extra()

    def tensors(self) -> list[TensorInfo]:
        return self.inputs + self.outputs


@dataclass(kw_only=True)
class WeightsInfo(_Json):
    """The one weights file both graphs point into, and its weight-only quantization (`export
    --weights`; the fields after `format` are written by quantized exports only)."""

    file: str
    tensors: int
    bytes: int
    format: Literal["float", "int8", "int4"] = "float"  # older exports lack it: float
    bits: int | None = _optional()
    block_size: int | None = _optional()  # along K
    accuracy_level: int | None = _optional()  # MatMulNBits compute
    symmetric: bool | None = _optional()  # no stored zero points (older exports: asymmetric)
    quantized: list[str] = _optional(list)  # weights stored quantized (MatMulNBits)
    bits_by_weight: dict[str, int] = _optional(dict)  # quantized weights at other bits than
    # `bits` (mixed precision, `export --head-weights int8`: the lm_head)
    accuracy: dict[str, Any] | None = _optional()  # against a float32 twin (export.accuracy)
    extra: dict = _extra()  # "float": the weights a quantized export keeps in float


@dataclass(kw_only=True)
class StateInfo(_Json):
    """One state (present.X of a step is past.X of the next)."""

    name: str
    dtype: str
    shape: Shape
    kind: str
    layer: int | None = None
    extra: dict = _extra()


@dataclass(kw_only=True)
class FileEntry(_Json):
    sha256: str
    bytes: int
    extra: dict = _extra()


@dataclass(kw_only=True)
class Manifest(_Json):
    """manifest.json, typed. `from_json` checks every field; `to_json` writes it back."""

    format: Literal["pipo-export"]
    contract_version: str
    model: ModelInfo
    export: ExportInfo
    graphs: dict[str, GraphInfo]
    weights: WeightsInfo | None = None
    states: list[StateInfo]
    files: dict[str, FileEntry]
    extra: dict = _extra()

    @classmethod
    def from_json(cls, data: dict, where: str = "manifest") -> "Manifest":
        manifest = _from_json(cls, data, where)
        for graph in (PREFILL, DECODE):
            if graph not in manifest.graphs:
                raise ManifestError(f"{where}.graphs: missing '{graph}'")
        m = manifest.model
        for name in ("vocab_size", "hidden_size", "num_key_value_heads", "head_dim",
                     "max_context"):
            if getattr(m, name) < 1:
                raise ManifestError(f"{where}.model.{name} is {getattr(m, name)}, expected >= 1")
        for name, ids in (("pad_token_id", [m.pad_token_id]), ("eos_token_ids", m.eos_token_ids)):
            outside = [i for i in ids if not 0 <= i < m.vocab_size]
            if outside:
                raise ManifestError(f"{where}.model.{name} {outside} outside the vocabulary "
                                    f"[0, {m.vocab_size})")
        return manifest

    def graph(self, name: str) -> GraphInfo:
        return self.graphs[name]

    def tensor_dtypes(self) -> dict[str, str]:
        """Every graph input and output name -> its dtype."""
        return {t.name: t.dtype for g in (PREFILL, DECODE) for t in self.graphs[g].tensors()}


# ---------------------------------------------------------------------------- files
def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_entries(folder: Path, names: list[str]) -> dict:
    return {n: {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size}
            for n in sorted(names)}


def _check_schema(data: dict, schema: dict, where: str) -> None:
    """The subset of JSON Schema engines.json's schema uses: required keys, const, enum."""
    for key in schema.get("required", []):
        if key not in data:
            raise ManifestError(f"{where}: missing '{key}'")
    for key, sub in schema.get("properties", {}).items():
        if key not in data:
            continue
        value = data[key]
        if "const" in sub and value != sub["const"]:
            raise ManifestError(f"{where}.{key} is {value!r}, expected {sub['const']!r}")
        if "enum" in sub and value not in sub["enum"]:
            raise ManifestError(f"{where}.{key} is {value!r}, expected one of {sub['enum']}")
        if isinstance(value, dict) and sub.get("type") == "object":
            _check_schema(value, sub, f"{where}.{key}")


def load_manifest(folder: str | Path, verify_files: bool = True) -> Manifest:
    """Read and check folder/manifest.json: its bytes against manifest.sha256, every field's
    presence and type, the contract version, and (by default) that every listed file exists
    with its recorded sha256. So any changed byte of any export file is refused."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise ManifestError(f"{folder}: no {MANIFEST}; not a pipo-export export folder "
                            "(make one with: pipo-export export CKPT -o OUT)")
    if path.is_file():  # a folder in its place gets read_sealed's message
        for name in (MANIFEST, seal_path(path).name):
            if (folder / name).exists():
                member(folder, name)
    try:
        data = json.loads(read_sealed(path))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ManifestError(f"{path}: JSON nesting too deep; re-export") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: not a JSON object; re-export")
    version = data.get("contract_version")
    if isinstance(version, str) and version.split(".")[0] != CONTRACT_VERSION.split(".")[0]:
        raise ManifestError(f"{path}: graph contract {version}, this runtime reads "
                            f"{CONTRACT_VERSION}; re-export with this pipo-export version")
    try:
        manifest = Manifest.from_json(data)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from None
    if verify_files:
        verify_checksums(folder, manifest)
    return manifest


def verify_checksums(folder: Path, manifest: Manifest) -> None:
    for name, entry in manifest.files.items():
        f = member(folder, name)  # inside the folder, a regular file (symlinks resolved)
        try:
            same = f.stat().st_size == entry.bytes and sha256_file(f) == entry.sha256
        except OSError as exc:
            raise ManifestError(f"{f}: cannot be read ({exc.strerror}); check its permissions "
                                "or re-export") from None
        if not same:
            raise ManifestError(f"{folder}: {name} does not match its sha256 in the manifest "
                                "(corrupted or swapped file); re-export")
