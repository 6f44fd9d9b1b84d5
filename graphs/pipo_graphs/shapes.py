"""Symbolic shapes of the contract resolved to ints, and the bytes of the states they size.

The one resolver of manifest shapes (ints and symbolic dims such as "batch", "past_pairs",
"2*prompt_pairs", "past_pairs + 1"): the engine profiles, the TensorRT runtime's buffers and the
bench's bytes-moved model all go through it.
"""
from __future__ import annotations

import ast
import math
from typing import Iterable, Protocol

from .dtypes import itemsize
from .manifest import ManifestError


class HasShape(Protocol):
    """A state as the manifest (StateInfo) or the contract (StateSpec) describes it."""

    shape: list | tuple
    dtype: str


def resolve_shape(shape, dims: dict[str, int]) -> tuple[int, ...]:
    """A manifest shape (ints and symbolic dims such as "batch", "2*prompt_pairs",
    "past_pairs + 1") with the symbols of `dims` substituted -> concrete ints."""
    return tuple(d if isinstance(d, int) else _eval(d, dims) for d in shape)


def _eval(expr: str, dims: dict[str, int]) -> int:
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in dims:
                raise KeyError(node.id)
            return int(dims[node.id])
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(
                node.op, ast.Sub) else a * b
        raise ValueError(expr)
    try:
        return ev(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError, KeyError) as exc:
        raise ManifestError(f"cannot resolve symbolic dim {expr!r} with {sorted(dims)} "
                            f"({type(exc).__name__}: {exc})") from None


def state_nbytes(state: HasShape, batch: int, slots: int) -> int:
    """Bytes of one state for `batch` rows with `slots` cache slots (past_pairs)."""
    shape = resolve_shape(state.shape, {"batch": batch, "past_pairs": slots})
    return math.prod(shape) * itemsize(state.dtype)


def state_bytes(states: Iterable[HasShape], batch: int, slots: int) -> int:
    """Bytes of every state in `states` for `batch` rows with `slots` cache slots."""
    return sum(state_nbytes(s, batch, slots) for s in states)


PAST_PAIRS = "past_pairs"  # the one dim rows of a batch share: cache slots (takes masked holes)


def pair_axes(shapes: dict[str, list | tuple]) -> dict[str, int]:
    """{state name: shape} -> {state name: axis of its past_pairs dim} for the states that have
    one (attention caches and attention_mask); every other state is per row only."""
    return {name: list(shape).index(PAST_PAIRS) for name, shape in shapes.items()
            if PAST_PAIRS in list(shape)}
