"""Sequences that continue (graph contract 1.1): saved states, and the host side of chunked
prefill and resumed conversations. The rules are docs/contract.md's
("Continuing a sequence").

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

from dataclasses import dataclass, field

import numpy as np

from pipo_graphs.contract import ATTENTION_MASK, NEXT_TOKEN, PAST, PRESENT


@dataclass(frozen=True)
class SequenceState:
    """One sequence's states (past.<state> -> [1, ...] numpy; cache slots compacted to the
    positions it holds), the tokens they hold (see the module doc) and the cache-slot axis of
    each state that has one (past.<state> -> axis: the runner's pair_axes)."""

    states: dict
    consumed: tuple[int, ...]
    pending: tuple[int, ...] = ()
    axes: dict = field(default_factory=dict)

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


def row_state(outputs: dict, row: int, axes: dict, consumed, pending=()) -> SequenceState:
    """Row `row` of a step's outputs (present.<state> numpy, as StepRunner.outputs) as a
    SequenceState; axes: present.<state> -> cache-slot axis (StepRunner.pair_axes). The row's
    cache slots that hold no position are dropped."""
    present = {k[len(PRESENT):]: v for k, v in outputs.items() if k.startswith(PRESENT)}
    keep = np.flatnonzero(present[ATTENTION_MASK][row])
    states, past_axes = {}, {PAST + k[len(PRESENT):]: a for k, a in axes.items()}
    for name, value in present.items():
        v = value[row:row + 1]
        axis = past_axes.get(PAST + name)
        states[PAST + name] = np.ascontiguousarray(v if axis is None else v.take(keep, axis))
    return SequenceState(states, tuple(consumed), tuple(pending), past_axes)


def empty_like(state: SequenceState) -> SequenceState:
    """The states of a fresh sequence, shaped as `state`'s: no cache slot, zeros elsewhere."""
    out = {}
    for name, value in state.states.items():
        shape = list(value.shape)
        axis = state.axes.get(name)
        if axis is not None:
            shape[axis] = 0
        out[name] = np.zeros(shape, value.dtype)
    return SequenceState(out, (), (), state.axes)


def batch_past(rows: list[SequenceState | None]) -> dict[str, np.ndarray]:
    """Per-row saved states -> the past.<state> feeds of one batch [B, ...]: each row's cache
    slots padded on the left to the longest with slots that hold no position (attention_mask
    False), so real slots stay right-aligned (the engine's layout, backends/rows.py). None rows
    start fresh. {} when every row is None."""
    template = next((r for r in rows if r is not None), None)
    if template is None:
        return {}
    rows = [r if r is not None else empty_like(template) for r in rows]
    slots = max(r.slots for r in rows)
    out = {}
    for name in template.states:
        axis = template.axes.get(name)
        parts = []
        for r in rows:
            v = r.states[name]
            if axis is not None and v.shape[axis] < slots:
                pad = [(0, 0)] * v.ndim
                pad[axis] = (slots - v.shape[axis], 0)
                v = np.pad(v, pad)
            parts.append(v)
        out[name] = np.concatenate(parts, 0)
    return out


def prefill_continuing(runner, inputs: list[list[int]], past: list, feeds_for,
                       chunk: int | None, pad_id: int, width: int = 2):
    """One prefill step of rows that may continue saved states and may be chunked.

    inputs: each row's tokens to prefill (its past's pending + new); past: a SequenceState or
    None per row; feeds_for(rows, tokens) -> the prompt, sampling and uniform feeds of those
    rows (requests.prefill_feeds or row_prefill_feeds); chunk: prefill_chunk (even) or None;
    width: tokens per cache slot (2; 1 in regular mode). Rows longer than `chunk` first
    prefill chunks of exactly `chunk` tokens with next_token = the chunk's follower, over their
    own states (kept in the runner's own form, `past()`, while the same rows go on; as
    SequenceStates when the batch changes). -> (pair [B, 2], conf [B], consumed tokens per row:
    what each row's states hold after the step)."""
    consumed = [list(p.consumed) if p else [] for p in past]
    rest, past = [list(t) for t in inputs], list(past)
    native = None  # (rows, runner.past()) after a chunk call

    def feeds(rows, tokens):
        out = feeds_for(rows, tokens)
        same = native is not None and native[0] == rows
        out.update(native[1] if same else batch_past([past[r] for r in rows]))
        return out

    rows = [r for r in range(len(rest)) if chunk and len(rest[r]) > chunk]
    while rows:
        step = feeds(rows, [rest[r][:chunk] for r in rows])
        step[NEXT_TOKEN] = np.array([rest[r][chunk] for r in rows], np.int64)
        runner.prefill(step)
        for r in rows:
            consumed[r] += rest[r][:chunk]
            rest[r] = rest[r][chunk:]
        following = [r for r in rows if len(rest[r]) > chunk] or list(range(len(rest)))
        native = (rows, runner.past())
        if following != rows:  # the next call batches other rows: keep each row's states
            outs = runner.outputs()
            for i, r in enumerate(rows):
                past[r] = row_state(outs, i, runner.pair_axes, consumed[r])
            native = None
        rows = [r for r in rows if len(rest[r]) > chunk]
    pair, conf = runner.prefill(feeds(list(range(len(rest))), rest))
    for r, tokens in enumerate(rest):
        consumed[r] += tokens + [pad_id] * (-len(tokens) % width)
    return pair, conf, consumed


def finished_state(outputs: dict, row: int, axes: dict, consumed: list[int], pairs: list,
                   width: int = 2) -> SequenceState:
    """The SequenceState of a row that emitted `pairs` after its prefill step consumed
    `consumed`, from the outputs of the step that emitted its last pair (axes: the runner's
    pair_axes): every pair but the last is consumed, the last is pending (width 1, regular
    mode: its first token)."""
    pairs = [list(p[:width]) for p in pairs]
    return row_state(outputs, row, axes, consumed + [t for p in pairs[:-1] for t in p],
                     pairs[-1])
