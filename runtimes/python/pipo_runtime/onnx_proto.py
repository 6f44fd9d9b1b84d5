"""What a runtime needs from an .onnx file, read straight from the protobuf (no onnx package):
the external-data references of every initializer (subgraphs included) and the graph's inputs
and outputs (name, dtype, shape). A malformed file is a PipoUserError (one line), never an
IndexError or a RecursionError."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pipo_graphs.dtypes import ONNX_NAMES
from pipo_graphs.errors import PipoUserError

_DIGITS = re.compile(r"[0-9]{1,20}")  # external-data offsets and lengths: plain decimal


@dataclass(frozen=True)
class ExternalTensor:
    """An initializer stored in an external data file."""

    name: str
    data_type: int  # onnx TensorProto.DataType
    dims: tuple[int, ...]
    location: str
    offset: int
    length: int  # -1 when the file does not say (the tensor's own size)


@dataclass(frozen=True)
class ValueInfo:
    """One graph input or output: name, contract dtype name (or `code:N`), dims (int or str)."""

    name: str
    dtype: str
    shape: tuple


def _fields(buf: bytes, start: int, end: int):
    """(field number, wire type, value) of one protobuf message; value: an int for varints,
    (start, end) for length-delimited fields, None otherwise."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = (i, i + n), i + n
        elif wire in (1, 5):
            value, i = None, i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire}")
        if i > end:
            raise ValueError("truncated")
        yield key >> 3, wire, value


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _text(buf: bytes, v) -> str:
    return buf[v[0]:v[1]].decode()


def _number(entries: dict, key: str, default: int) -> int:
    """An external-data offset or length: plain decimal digits (no sign, space or '_')."""
    if key not in entries:
        return default
    if not _DIGITS.fullmatch(entries[key]) or int(entries[key]) >= 1 << 64:
        raise ValueError(f"external-data {key} {entries[key][:30]!r} is not a decimal integer "
                         "below 2^64")
    return int(entries[key])


def _tensor(buf: bytes, start: int, end: int) -> ExternalTensor | None:
    dims, data_type, name, location, entries = [], 0, "", 0, {}
    for f, wire, v in _fields(buf, start, end):
        if f == 1 and wire == 0:
            dims.append(v)
        elif f == 1 and wire == 2:  # packed dims
            i = v[0]
            while i < v[1]:
                d, i = _varint(buf, i)
                dims.append(d)
        elif f == 2 and wire == 0:
            data_type = v
        elif f == 8 and wire == 2:
            name = _text(buf, v)
        elif f == 14 and wire == 0:
            location = v
        elif f == 13 and wire == 2:  # StringStringEntryProto
            kv = {kf: _text(buf, kv_) for kf, kw, kv_ in _fields(buf, *v) if kw == 2}
            entries[kv.get(1, "")] = kv.get(2, "")
    if location != 1 or "location" not in entries:  # 1 = TensorProto.EXTERNAL
        return None
    return ExternalTensor(name, data_type, tuple(dims), entries["location"],
                          _number(entries, "offset", 0), _number(entries, "length", -1))


def _value_info(buf: bytes, start: int, end: int) -> ValueInfo:
    """ValueInfoProto: name = 1, type = 2 (TypeProto.tensor_type = 1: elem_type = 1,
    shape = 2 (dim = 1: dim_value = 1, dim_param = 2))."""
    name, code, shape = "", 0, []
    for f, wire, v in _fields(buf, start, end):
        if f == 1 and wire == 2:
            name = _text(buf, v)
        elif f == 2 and wire == 2:
            for tf, tw, tv in _fields(buf, *v):
                if tf != 1 or tw != 2:
                    continue
                for ef, ew, ev in _fields(buf, *tv):
                    if ef == 1 and ew == 0:
                        code = ev
                    elif ef == 2 and ew == 2:
                        for df, dw, dv in _fields(buf, *ev):
                            if df == 1 and dw == 2:
                                dim = 0
                                for kf, kw, kv in _fields(buf, *dv):
                                    dim = kv if kf == 1 and kw == 0 else \
                                        _text(buf, kv) if kf == 2 and kw == 2 else dim
                                shape.append(dim)
    return ValueInfo(name, ONNX_NAMES.get(code, f"code:{code}"), tuple(shape))


@dataclass(frozen=True)
class ModelView:
    """The parts of one .onnx file a runtime checks before loading it."""

    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    external: list[ExternalTensor]


def read_model(path: str | Path) -> ModelView:
    """Inputs, outputs and external initializers (If/Scan/Loop bodies included) of an .onnx
    file; PipoUserError when it is not a valid ONNX protobuf."""
    buf = Path(path).read_bytes()
    inputs, outputs, external = [], [], []

    def graph(start, end, top):  # GraphProto: node = 1, initializer = 5, input 11, output 12
        for f, wire, v in _fields(buf, start, end):
            if f == 5 and wire == 2:
                tensor = _tensor(buf, *v)
                if tensor is not None:
                    external.append(tensor)
            elif top and f in (11, 12) and wire == 2:
                (inputs if f == 11 else outputs).append(_value_info(buf, *v))
            elif f == 1 and wire == 2:  # NodeProto: attribute = 5
                for af, aw, av in _fields(buf, *v):
                    if af == 5 and aw == 2:  # AttributeProto: g = 6, graphs = 11
                        for gf, gw, gv in _fields(buf, *av):
                            if gf in (6, 11) and gw == 2:
                                graph(*gv, False)
    try:
        for f, wire, v in _fields(buf, 0, len(buf)):
            if f == 7 and wire == 2:  # ModelProto.graph
                graph(*v, True)
    except (ValueError, IndexError, UnicodeDecodeError, RecursionError) as exc:
        raise PipoUserError(f"{path}: not a valid ONNX model ({exc}); re-export") from None
    return ModelView(inputs, outputs, external)


def external_initializers(path: str | Path) -> list[ExternalTensor]:
    """Every initializer of an .onnx file stored in external data, subgraphs (If, Scan, Loop
    bodies) included."""
    return read_model(path).external
