"""Row operations for a runner whose states live on a device (TensorRT): merge, select and trim
without a host copy of any cache.

Each operation is one `relayout`: the new batch's rows, each taken from a row of a source
runner (this one, or a newcomer for merge), are copied device to device into the ping-pong set
that is not current, with the row's real slots (read from the small host copy of its
attention_mask) right-aligned on the pair axis at the new slot count and the holes zeroed;
then that set becomes current. Sampling inputs are re-uploaded from their host copies.

The runner provides: states (manifest StateInfo), pair_axes, buffers {(name, side): buffer},
side, batch, slots, step, max_slots, max_batch, fixed_host, device (upload, download, copy,
synchronize), _ensure(key, nbytes), _upload(key, array), _outputs(side, slots).
"""
from __future__ import annotations

import copy
import math

import numpy as np

from pipo_graphs.contract import ATTENTION_MASK, CONFIDENCE, PAIR, PRESENT, SAMPLING_INPUTS
from pipo_graphs.dtypes import itemsize
from pipo_graphs.errors import PipoUserError
from pipo_graphs.shapes import resolve_shape, state_nbytes

PAIR_BYTES = 2 * 8  # one row of pair [B, 2] int64


def runs(columns: np.ndarray) -> list[tuple[int, int]]:
    """Sorted column indices -> [(start, length)] of consecutive runs."""
    if not len(columns):
        return []
    breaks = np.flatnonzero(np.diff(columns) != 1) + 1
    return [(int(c[0]), len(c)) for c in np.split(columns, breaks)]


class DeviceRows:
    """Mixin: StepRunner row operations over device buffers (see the module doc)."""

    def begin(self):
        runner = copy.copy(self)
        runner.buffers, runner.pending, runner.fixed_host = {}, [], {}
        runner.step, runner.batch, runner.slots, runner.side = -1, 0, 0, 0
        return runner

    def end(self) -> None:
        self.device.synchronize()
        for buf in self.buffers.values():
            self.device.free(buf)
        self.buffers.clear()
        self.pending.clear()
        self.step, self.batch, self.slots, self.fixed_host = -1, 0, 0, {}

    def rows(self) -> int:
        return self.batch if self.step >= 0 else 0

    def attention_mask(self) -> np.ndarray:
        """[B, P] bool, downloaded (B * P bytes)."""
        mask = np.empty((self.batch, self.slots), np.bool_)
        self.device.download(mask, self.buffers[(ATTENTION_MASK, self.side)].ptr)
        self.device.synchronize()
        return mask

    def merge(self, other) -> None:
        moves = [(self, r) for r in range(self.rows())] + [(other, r) for r in range(other.rows())]
        self._relayout(moves, max(self.slots if self.rows() else 0, other.slots))

    def select(self, rows: list[int], trim: bool = False) -> None:
        if not rows:
            self.end()
            return
        self._relayout([(self, int(r)) for r in rows], 0 if trim else self.slots)

    def trim(self) -> int:
        if not self.rows():
            return 0
        used = int(self.attention_mask().any(axis=0).sum())
        if used == self.slots:
            return 0
        before = self.slots
        self._relayout([(self, r) for r in range(self.batch)], 0)
        return before - self.slots

    # ------------------------------------------------------------------ the copy
    def _relayout(self, moves: list, slots: int) -> None:
        """New batch: row i = row moves[i][1] of runner moves[i][0], right-aligned at
        max(slots, most real slots of any row) slots."""
        if len(moves) > self.max_batch:
            raise PipoUserError(f"a batch of {len(moves)} rows; the engines were built for at "
                                f"most {self.max_batch} (pipo-export build --max-batch, or a "
                                "smaller EngineConfig.max_batch)")
        masks = {id(src): src.attention_mask() for src, _ in moves}
        real = [np.flatnonzero(masks[id(src)][row]) for src, row in moves]
        slots = max([slots] + [len(c) for c in real])
        batch, dst = len(moves), 1 - self.side
        for s in self.states:
            self._ensure((s.name, dst), state_nbytes(s, batch, self.max_slots))
        self._ensure((PAIR, dst), batch * PAIR_BYTES)
        for s in self.states:
            self._move_state(s, moves, real, dst, slots)
        for i, (src, row) in enumerate(moves):
            self.device.copy(self.buffers[(PAIR, dst)].ptr + i * PAIR_BYTES,
                             src.buffers[(PAIR, src.side)].ptr + row * PAIR_BYTES, PAIR_BYTES)
        host = {n: np.stack([src.fixed_host[n][row] for src, row in moves])
                for n, _ in SAMPLING_INPUTS}
        self.device.synchronize()  # sources may be freed (newcomers) or overwritten after this
        self.pending.clear()
        self.batch, self.slots, self.side, self.step = batch, slots, dst, max(self.step, 0)
        self.fixed_host = host
        for s in self.states:  # the other set: the next decode writes it
            self._ensure((s.name, 1 - dst), state_nbytes(s, batch, self.max_slots))
        self._ensure((PAIR, 1 - dst), batch * PAIR_BYTES)
        self._ensure(CONFIDENCE, batch * 4)
        self.fixed = {n: self._upload(n, a) for n, a in host.items()}
        self.last = self._outputs(self.side, self.slots)

    def _move_state(self, s, moves, real, dst: int, slots: int) -> None:
        dst_ptr = self.buffers[(s.name, dst)].ptr
        axis = self.pair_axes.get(PRESENT + s.name)
        if axis is None:
            row_bytes = state_nbytes(s, 1, 0)
            for i, (src, row) in enumerate(moves):
                self.device.copy(dst_ptr + i * row_bytes,
                                 src.buffers[(s.name, src.side)].ptr + row * row_bytes, row_bytes)
            return
        shape = resolve_shape(s.shape, {"batch": 1, "past_pairs": 1})
        outer, inner = math.prod(shape[1:axis]), math.prod(shape[axis + 1:]) * itemsize(s.dtype)
        for i, ((src, row), cols) in enumerate(zip(moves, real)):
            src_ptr, hole = src.buffers[(s.name, src.side)].ptr, slots - len(cols)
            pieces = runs(cols)
            for o in range(outer):
                source = src_ptr + (row * outer + o) * src.slots * inner
                target = dst_ptr + (i * outer + o) * slots * inner
                if hole:
                    self._zero(target, hole * inner)
                at = hole
                for start, n in pieces:
                    self.device.copy(target + at * inner, source + start * inner, n * inner)
                    at += n

    def _zero(self, ptr: int, nbytes: int) -> None:
        zeros = getattr(self, "_zeros", None)
        if zeros is None or zeros.size < nbytes:
            zeros = self._zeros = np.zeros(max(nbytes, 1 << 16), np.uint8)
        self.device.upload(ptr, zeros[:nbytes])
        self.pending.append(zeros)
