"""Sequences that continue (graph contract 1.1): saved states, and the host side of chunked
prefill and resumed conversations. The rules are docs/contract-1.1.md's.

A `SequenceState` is one sequence's states after a step, with the tokens they hold:

    consumed  the tokens the model has read, in pairs, PAD included as the model saw it (an odd
              prompt's PAD, every gated token2); always whole pairs
    pending   the tokens a continuation must read first: the last emitted pair (its input of the
              next decode step), or () for a chunk that ended a prompt's part
    history   consumed + pending: what prefilling the whole sequence from scratch would read

Continuing it with new tokens prefills `pending + new` (one PAD appended when that is odd) over
its states, and gives the tokens a prefill of `history + new` from scratch gives.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipo_graphs.contract import ATTENTION_MASK, PAST, POSITION, PRESENT, past_axis


@dataclass(frozen=True)
class SequenceState:
    """One sequence's states (past.<state> -> [1, ...] numpy; cache slots compacted to the
    positions it holds) and the tokens they hold (see the module doc)."""

    states: dict
    consumed: tuple[int, ...]
    pending: tuple[int, ...] = ()

    @property
    def history(self) -> tuple[int, ...]:
        return self.consumed + self.pending

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.states.values())

    @property
    def slots(self) -> int:
        """Cache slots (pairs, or tokens in regular mode) the states hold."""
        return int(self.states[PAST + ATTENTION_MASK].shape[1])


def row_state(outputs: dict, row: int, consumed, pending=()) -> SequenceState:
    """Row `row` of a step's outputs (present.<state> numpy, as StepRunner.outputs) as a
    SequenceState; the row's cache slots that hold no position are dropped."""
    present = {k[len(PRESENT):]: v for k, v in outputs.items() if k.startswith(PRESENT)}
    keep = np.flatnonzero(present[ATTENTION_MASK][row])
    states = {}
    for name, value in present.items():
        v = value[row:row + 1]
        axis = past_axis(name)
        states[PAST + name] = np.ascontiguousarray(v if axis is None else v.take(keep, axis))
    return SequenceState(states, tuple(consumed), tuple(pending))


def empty_like(state: SequenceState) -> SequenceState:
    """The states of a fresh sequence, shaped as `state`'s: no cache slot, zeros elsewhere."""
    out = {}
    for name, value in state.states.items():
        shape = list(value.shape)
        axis = past_axis(name[len(PAST):])
        if axis is not None:
            shape[axis] = 0
        out[name] = np.zeros(shape, value.dtype)
    return SequenceState(out, ())


def batch_past(rows: list[SequenceState | None]) -> dict[str, np.ndarray]:
    """Per-row saved states -> the past.<state> feeds of one batch [B, ...]: each row's cache
    slots padded at the end to the longest with slots that hold no position (attention_mask
    False). None rows start fresh. {} when every row is None."""
    template = next((r for r in rows if r is not None), None)
    if template is None:
        return {}
    rows = [r if r is not None else empty_like(template) for r in rows]
    slots = max(r.slots for r in rows)
    out = {}
    for name in template.states:
        axis = past_axis(name[len(PAST):])
        parts = []
        for r in rows:
            v = r.states[name]
            if axis is not None and v.shape[axis] < slots:
                pad = [(0, 0)] * v.ndim
                pad[axis] = (0, slots - v.shape[axis])
                v = np.pad(v, pad)
            parts.append(v)
        out[name] = np.concatenate(parts, 0)
    return out


def position(state: SequenceState) -> int:
    """The pair position a continuation of `state` starts at."""
    return int(state.states[PAST + POSITION][0])
