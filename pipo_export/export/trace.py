"""Trace one piece (pipo_export.export.pieces) into an ONNX ModelProto with torch.onnx (dynamo).

The piece's weights are inputs: the traced module calls `torch.func.functional_call` on the
piece's owner with the weight tensors it is given, so the owner itself may live on the meta
device and the example weights are uninitialized `torch.empty` tensors (no memory is touched,
whatever the model size). Every dim the piece's spec names symbolically is asserted symbolic in
the result: an example that spans one chunk must not specialize the length.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings

import onnx
import torch
from torch import nn
from torch.export import Dim

from pipo_export.errors import ExportError
from pipo_export.export.lowering import Lowering
from pipo_export.export.pieces import WEIGHT, WEIGHT_T, Piece
from pipo_export.onnx.graph import iter_graphs, strip_metadata

FOLD_LIMIT = 4096  # elements: fold shape/axes arithmetic; weights are inputs, never folded
MAX_BATCH, MAX_LEN = 4096, 1 << 20


class _Call(nn.Module):
    def __init__(self, piece: Piece):
        super().__init__()
        self.owner, self.fn = piece.owner, piece.fn

    def forward(self, *acts):
        return tuple(self.fn(self.owner, *acts))


class _Traced(nn.Module):
    """forward(activations, weights) -> piece.fn(owner with `weights` as its parameters, ...)
    (tied parameters follow the one they are tied to)."""

    def __init__(self, piece: Piece):
        super().__init__()
        self.call, self.names = _Call(piece), ["owner." + n for n in piece.params]

    def forward(self, acts: list, weights: list):
        return torch.func.functional_call(self.call, dict(zip(self.names, weights)), tuple(acts),
                                          strict=False)


def _dim_objects() -> dict:
    batch, pairs = Dim("batch", min=1, max=MAX_BATCH), Dim("prompt_pairs", min=1, max=MAX_LEN)
    past = Dim("past_pairs", min=1, max=MAX_LEN)
    return {"batch": batch, "prompt_pairs": pairs, "prompt_tokens": 2 * pairs,
            "past_pairs": past, "past_pairs + 1": past + 1}


def _example_weights(piece: Piece) -> list[torch.Tensor]:
    """Uninitialized tensors of each weight's shape and dtype (never read by tracing)."""
    params = dict(piece.owner.named_parameters())
    return [torch.empty(params[n].shape, dtype=params[n].dtype, device="cpu")
            for n in piece.params]


def trace_piece(piece: Piece, opset: int, lowering: Lowering, dtype: torch.dtype) -> onnx.ModelProto:
    """Trace `piece` -> ModelProto whose inputs are the piece's inputs then ``w:<param>`` for
    each weight, outputs the piece's outputs; small constants folded, tracer metadata dropped."""
    dims = _dim_objects()
    dyn = [{i: dims[d] for i, d in enumerate(spec.shape) if isinstance(d, str)}
           for spec in piece.inputs]
    weights = [w.to(dtype) if w.is_floating_point() else w for w in _example_weights(piece)]
    args = (list(piece.example()), weights)
    names = [s.name for s in piece.inputs] + [WEIGHT + n for n in piece.params]
    with torch.no_grad(), _quiet_exporter():
        try:
            prog = torch.onnx.export(
                _Traced(piece).eval(), args, dynamo=True, opset_version=opset,
                dynamic_shapes=(dyn, [None] * len(weights)), input_names=names,
                output_names=[s.name for s in piece.outputs], optimize=False, verbose=False,
                report=False, custom_translation_table=lowering.translation_table or None)
        except Exception as exc:  # the exporter raises many types; keep the cause visible
            raise ExportError(f"tracing {piece.name} failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    import onnxscript.optimizer
    prog.model = onnxscript.optimizer.optimize(prog.model, input_size_limit=FOLD_LIMIT,
                                               output_size_limit=FOLD_LIMIT)
    model = prog.model_proto
    for graph_pass in lowering.graph_passes:
        graph_pass(model)
    strip_metadata(model)
    check_piece_dims(model, piece)
    pre_transpose_weights(model)
    return model


def pre_transpose_weights(model: onnx.ModelProto) -> None:
    """MatMul(x, Transpose(W)) -> MatMul(x, W^T): a 2-D weight input read only through
    Transpose(perm=[1, 0]) becomes the input ``wT:<param>`` of the transposed shape (the weight
    is stored transposed) and each Transpose an Identity. ONNX Runtime would otherwise fold
    every Transpose into a transposed copy of the weight, in each session; MatMulNBits wants
    the [K, N] layout too."""
    users: dict[str, list[onnx.NodeProto]] = {}
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            for name in node.input:
                users.setdefault(name, []).append(node)
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        nodes = users.get(vi.name, [])
        if not vi.name.startswith(WEIGHT) or len(dims) != 2 or not nodes:
            continue
        perms = [[list(a.ints) for a in n.attribute if a.name == "perm"] for n in nodes]
        if not all(n.op_type == "Transpose" and p in ([], [[1, 0]]) for n, p in zip(nodes, perms)):
            continue
        name = WEIGHT_T + vi.name[len(WEIGHT):]
        for node in nodes:
            node.op_type = "Identity"
            del node.attribute[:]
            node.input[0] = name
        vi.name = name
        a, b = (d.dim_value for d in dims)
        dims[0].dim_value, dims[1].dim_value = b, a


def check_piece_dims(model: onnx.ModelProto, piece: Piece) -> None:
    """Every dim the spec names must be symbolic in the traced piece; fixed dims must match."""
    have = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in list(model.graph.input) + list(model.graph.output)}
    for spec in piece.inputs + piece.outputs:
        got = have.get(spec.name)
        if got is None:
            if spec in piece.inputs:
                continue  # an input the piece does not read (dropped by the exporter)
            raise ExportError(f"{piece.name}: output {spec.name} is missing from the trace")
        if len(got) != len(spec.shape):
            raise ExportError(f"{piece.name}: {spec.name} has rank {len(got)}, expected "
                              f"{len(spec.shape)}")
        for want, d in zip(spec.shape, got):
            if isinstance(want, str) and not isinstance(d, str):
                raise ExportError(f"{piece.name}: {spec.name} dim '{want}' was specialized to {d};"
                                  " the trace example must not fix dynamic dims")
            if isinstance(want, int) and d != want:
                raise ExportError(f"{piece.name}: {spec.name} has dim {d}, expected {want}")


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's chatter that is no news to our users: torchvision ops it skips,
    dim-name reuse notices and pytree deprecations. Errors still raise."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        try:
            yield
        finally:
            logger.setLevel(level)


def example_numel(piece: Piece) -> int:
    """Elements in the piece's weights (for progress reports)."""
    return sum(math.prod(p.shape) for n, p in piece.owner.named_parameters() if n in piece.params)
