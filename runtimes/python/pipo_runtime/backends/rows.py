"""Row operations on a batch's states held as numpy arrays (the host path of merge/select/trim).

A batch's state is a dict of per-row arrays, batch on axis 0: every `present.X` of the last
step, `pair` (the next decode's input_pair) and the sampling inputs. Only the attention caches
and `present.attention_mask` share a second dim across rows, past_pairs (their axis is given
by `axes`, pipo_graphs.shapes.pair_axes); a slot whose mask is False is a hole the decode
graph's attention ignores (RoPE reads `position`, never the slot index).

Layout the engine keeps: every row's real slots are contiguous at the right end of the pair
axis ("right-aligned"); holes are on the left. Newcomers are aligned when they join, so rows
that leave free columns on the left, which `trim_columns` drops.
"""
from __future__ import annotations

import numpy as np

from pipo_graphs.contract import ATTENTION_MASK, PRESENT

MASK = PRESENT + ATTENTION_MASK

States = dict[str, np.ndarray]


def batch_rows(states: States) -> int:
    """Rows of a batch (0 for an empty one)."""
    return len(states[MASK]) if states else 0


def _along(order: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """[B, P] indices -> broadcastable to an array of `ndim` dims with P on `axis`."""
    shape = [order.shape[0]] + [1] * (ndim - 1)
    shape[axis] = order.shape[1]
    return order.reshape(shape)


def is_aligned(mask: np.ndarray) -> bool:
    """[B, P] attention mask: every row's real slots contiguous at the right end."""
    return mask.shape[1] < 2 or bool((np.diff(mask.astype(np.int8), axis=1) >= 0).all())


def align_right(states: States, axes: dict[str, int]) -> States:
    """Move each row's real slots (mask True) to the right end of the pair axis, keeping their
    order; holes go left. A no-op (no copy) when already aligned."""
    if not states:
        return states
    mask = states[MASK]
    if is_aligned(mask):
        return states
    order = np.argsort(mask, axis=1, kind="stable")  # False (holes) first, then real slots
    out = dict(states)
    for name, axis in axes.items():
        out[name] = np.take_along_axis(states[name], _along(order, axis, states[name].ndim), axis)
    return out


def merge_rows(a: States, b: States, axes: dict[str, int]) -> States:
    """Rows of `a` then rows of `b` (both aligned): the pair axis of the shorter side is padded
    on the left with holes (zero caches, mask False) to the longer one's slots. One new array
    per state, written once."""
    if not a:
        return dict(b)
    slots = max(a[MASK].shape[1], b[MASK].shape[1])
    rows = len(a[MASK])
    out = {}
    for name, x in a.items():
        y, axis = b[name], axes.get(name)
        shape = list(x.shape)
        shape[0] = rows + len(y)
        if axis is not None:
            shape[axis] = slots
        merged = out[name] = np.empty(shape, x.dtype)
        for part, (start, stop) in ((x, (0, rows)), (y, (rows, shape[0]))):
            if axis is None:
                merged[start:stop] = part
                continue
            index = [slice(start, stop)] + [slice(None)] * (len(shape) - 1)
            hole = slots - part.shape[axis]
            index[axis] = slice(0, hole)
            merged[tuple(index)] = 0  # finite keys/values, mask False
            index[axis] = slice(hole, slots)
            merged[tuple(index)] = part
    return out


def select_rows(states: States, rows: list[int]) -> States:
    """Keep `rows` (indices into the batch), in that order."""
    if not rows:
        return {}
    index = np.asarray(rows, dtype=np.int64)
    return {name: np.ascontiguousarray(x[index]) for name, x in states.items()}


def trim_columns(states: States, axes: dict[str, int]) -> States:
    """Drop the pair-axis columns that are a hole in every row (no copy when there are none)."""
    if not states:
        return states
    keep = states[MASK].any(axis=0)
    if keep.all():
        return states
    out = dict(states)
    for name, axis in axes.items():
        out[name] = np.ascontiguousarray(np.compress(keep, states[name], axis=axis))
    return out


def holes(mask: np.ndarray) -> int:
    """Masked slots of a [B, P] attention mask."""
    return int(mask.size - np.count_nonzero(mask))
