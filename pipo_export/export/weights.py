"""weights.data: every weight both graphs use, written once, streamed tensor by tensor.

Each tensor is read from the checkpoint's TensorSource (an adapter merged on read), cast to the
export dtype and appended 4 KiB aligned (so runtimes can map it and hand regions to both
sessions without copies). Only one tensor is in memory at a time.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipo_graphs.dtypes import itemsize

from pipo_export.export.assemble import WeightRef
from pipo_export.export.pieces import TRANSPOSED
from pipo_export.model.source import TensorSource

ALIGN = 4096


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes (bfloat16 as its 16-bit pattern), no copy."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def write_weights(source: TensorSource, names: list[str], path: Path, dtype: torch.dtype,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, WeightRef]:
    """Write `names` (deduplicated, in order) from `source` as `dtype` into `path`; a name
    ending in TRANSPOSED is the checkpoint tensor transposed ([out, in] -> [in, out]).
    -> name -> WeightRef. progress(bytes_done, bytes_total) is called after each tensor."""
    order = list(dict.fromkeys(names))
    width = itemsize(str(dtype).replace("torch.", ""))
    total = sum(int(np.prod(source.shape(n.removesuffix(TRANSPOSED)))) * width for n in order)
    refs, done = {}, 0
    with open(path, "wb") as f:
        for name in order:
            f.write(b"\0" * ((-f.tell()) % ALIGN))
            value = read_weight(source, name, dtype)
            offset = f.tell()
            f.write(tensor_bytes(value))
            refs[name] = WeightRef(name, str(dtype).replace("torch.", ""), tuple(value.shape),
                                   offset, f.tell() - offset)
            done += refs[name].length
            del value
            if progress:
                progress(done, total)
        f.flush()
        os.fsync(f.fileno())
    return refs


def read_weight(source: TensorSource, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A stored weight: the checkpoint tensor in `dtype`, transposed for a TRANSPOSED name."""
    if name.endswith(TRANSPOSED):
        return source.get(name[:-len(TRANSPOSED)]).to(dtype).T.contiguous()
    return source.get(name).to(dtype)


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
