"""weights.data: every weight both graphs use, written once, streamed tensor by tensor.

Each tensor is read from the checkpoint's TensorSource (an adapter merged on read), cast to the
export dtype and appended 4 KiB aligned (so runtimes can map it and hand regions to both
sessions without copies). Stored names are checkpoint names plus the suffix of their form
(pieces.WEIGHT_INPUTS): ".T" transposed, ".T.q"/".T.scales"/".T.zp" the MatMulNBits parts of
the transposed weight (quantize.QuantSpec). Only one weight is in memory at a time.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipo_graphs.contract import WEIGHTS_ALIGN
from pipo_graphs.dtypes import itemsize

from pipo_export.export.assemble import WeightRef
from pipo_export.export.pieces import TRANSPOSED
from pipo_export.export.quantize import QUANT_INPUTS, QuantPlan
from pipo_export.model.source import TensorSource

ALIGN = WEIGHTS_ALIGN  # the layout runtimes check (pipo_runtime.folder.check_layout)
QUANT_SUFFIXES = tuple(TRANSPOSED + s for s in QUANT_INPUTS.values())  # .T.q .T.scales .T.zp


def tensor_bytes(t) -> memoryview:
    """A tensor's (or numpy array's) raw little-endian bytes (bfloat16 as its bit pattern)."""
    if isinstance(t, torch.Tensor):
        t = t.detach().contiguous()
        t = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
    return memoryview(np.ascontiguousarray(t)).cast("B")


class WeightReader:
    """Produces stored weights from the checkpoint: cast, transposed, quantized (the three
    MatMulNBits parts of one weight are computed once)."""

    def __init__(self, source: TensorSource, dtype: torch.dtype, quant: QuantPlan | None = None):
        self.source, self.dtype, self.quant = source, dtype, quant
        self._parts: tuple[str, dict] | None = None
        self.quantized: set[str] = set()  # checkpoint names written quantized

    def base(self, name: str) -> str:
        for suffix in QUANT_SUFFIXES + (TRANSPOSED,):
            if name.endswith(suffix):
                return name[:-len(suffix)]
        return name

    def __call__(self, name: str):
        if name.endswith(QUANT_SUFFIXES):
            base = self.base(name)
            if self._parts is None or self._parts[0] != base:
                w = self.source.get(base).to(torch.float32).T.numpy()  # [K, N]
                packed, scales, zp = self.quant.for_param(base).quantize(w)
                self._parts = (base, dict(zip(QUANT_SUFFIXES, (packed, scales, zp))))
            return self._parts[1][name[len(base):]]
        if name.endswith(TRANSPOSED):
            return self.source.get(name[:-len(TRANSPOSED)]).to(self.dtype).T.contiguous()
        return self.source.get(name).to(self.dtype)

    def reference(self, name: str, dtype: torch.dtype, matmul: bool = True) -> torch.Tensor:
        """The checkpoint tensor `name` as the export computes with it, in `dtype`: what a
        reference must use to measure only the graph. matmul: as a MatMul weight (quantized
        ones dequantized); False for the embedding gather, which stays exact."""
        value = self.source.get(name).to(self.dtype)
        if self.quant is None or not matmul or name not in self.quantized:
            return value.to(dtype)
        spec = self.quant.for_param(name)
        packed, scales, zp = spec.quantize(value.float().T.numpy())
        w_t = spec.dequantize(packed, scales, zp, value.shape[1])
        return torch.from_numpy(np.ascontiguousarray(w_t.T)).to(dtype)


def write_weights(reader: WeightReader, names: list[str], path: Path,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, WeightRef]:
    """Write `names` (deduplicated, in order) into `path`. -> name -> WeightRef.
    progress(bytes_done, bytes_total) is called after each tensor (total: source elements at
    the export dtype, an upper bound for quantized weights)."""
    order = list(dict.fromkeys(names))
    width = itemsize(str(reader.dtype).replace("torch.", ""))
    bases = list(dict.fromkeys(reader.base(n) for n in order))
    total = sum(int(np.prod(reader.source.shape(b))) * width for b in bases)
    reader.quantized = {reader.base(n) for n in order if n.endswith(QUANT_SUFFIXES)}
    refs, done, seen = {}, 0, set()
    with open(path, "wb") as f:
        for name in order:
            f.write(b"\0" * ((-f.tell()) % ALIGN))
            value = reader(name)
            offset = f.tell()
            f.write(tensor_bytes(value))
            dtype = str(value.dtype).replace("torch.", "")
            refs[name] = WeightRef(name, dtype, tuple(value.shape), offset, f.tell() - offset)
            base = reader.base(name)
            if base not in seen:  # a tied table is read twice (gather, lm_head): count it once
                done += int(np.prod(reader.source.shape(base))) * width
                seen.add(base)
            del value
            if progress:
                progress(done, total)
        f.flush()
        os.fsync(f.fileno())
    return refs


class Eta:
    """Progress with an estimate of the time left, printed at most every `every` seconds."""

    def __init__(self, label: str, printer: Callable[[str], None], every: float = 5.0):
        self.label, self.printer, self.every = label, printer, every
        self.start = self.last = time.perf_counter()

    def __call__(self, done: float, total: float, unit: str = "") -> None:
        now = time.perf_counter()
        if now - self.last < self.every and done < total:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed / done * (total - done) if done else float("nan")
        self.printer(f"  {self.label}: {_fmt(done, unit)} of {_fmt(total, unit)}, "
                     f"{elapsed:.0f}s elapsed, ~{left:.0f}s left")


def _fmt(x: float, unit: str) -> str:
    if unit == "B":
        return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"
    return f"{x:g}{unit}"
