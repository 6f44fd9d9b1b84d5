"""Weight-only quantization (`export --weights int8|int4 [--block-size N]`): every MatMul whose
weight is a checkpoint tensor (all layer projections, the compressor, the MTP fc and layer, the
confidence head and the lm_head) becomes a com.microsoft MatMulNBits.

The numbers come from ONNX Runtime's own block quantizer (`DefaultWeightOnlyQuantizer
.qbits_block_quant`, the routine its MatMulNBitsQuantizer runs), applied to each weight as it is
streamed into weights.data, so no graph with all weights is ever in memory. The graph rewrite is
done once per traced piece: the weight input ``wT:<param>`` [K, N] feeding MatMul becomes three
inputs ``wq:`` (packed [N, K/block, block*bits/8] uint8), ``wqs:`` (scales [N, K/block]) and,
unless symmetric, ``wqz:`` (zero points, uint8). The embedding gather stays exact (float); a
tied lm_head gets its own quantized copy of the transposed embedding.

Mixed precision (`--head-weights int8`, as llama.cpp's Q4_K_M keeps its output layer at 6 bits):
the lm_head is quantized with its own QuantSpec (QuantPlan.head) while every other weight uses
the export's; the embedding gather is float either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import onnx
from onnx import TensorProto, helper

from pipo_export.export.pieces import WEIGHT, WEIGHT_T

QUANT_INPUTS = {"wq:": ".q", "wqs:": ".scales", "wqz:": ".zp"}  # input prefix -> stored suffix
ZERO_POINTS = "wqz:"
MS_DOMAIN = "com.microsoft"


class WeightFormat(str, Enum):
    FLOAT = "float"  # weights in the export dtype
    INT8 = "int8"
    INT4 = "int4"

    @property
    def bits(self) -> int:
        return {"int8": 8, "int4": 4}[self.value]


@dataclass(frozen=True)
class QuantSpec:
    """Block-wise quantization along K (ORT's MatMulNBits layout); symmetric by default, as
    ONNX Runtime GenAI's int4 models."""

    bits: int
    block_size: int = 32
    accuracy_level: int = 4  # int8 activations in the kernel (fast CPU path)
    symmetric: bool = True  # no stored zero points (MatMulNBits' default 2^(bits-1))

    def _quantizer(self):
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer)
        return DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
            block_size=self.block_size, is_symmetric=self.symmetric,
            accuracy_level=self.accuracy_level, bits=self.bits))

    def quantize(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """w [K, N] float32 -> packed [N, K/bs, bs*bits/8] uint8, scales [N, K/bs] float32,
        zero points [N, ceil(K/bs * bits/8)] uint8 (ORT's own routine; unused and not stored
        when symmetric: the kernel's default 2^(bits-1) applies)."""
        return self._quantizer().qbits_block_quant(np.ascontiguousarray(w, dtype=np.float32))

    def dequantize(self, packed: np.ndarray, scales: np.ndarray, zp: np.ndarray,
                   k: int) -> np.ndarray:
        """The inverse of `quantize`: -> [K, N] float32 (what MatMulNBits multiplies by)."""
        n, blocks, _ = packed.shape
        if self.bits == 4:
            q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, blocks, self.block_size)
            z = np.stack([zp & 0x0F, zp >> 4], -1).reshape(n, -1)[:, :blocks]
        else:
            q, z = packed.reshape(n, blocks, self.block_size), zp.reshape(n, -1)[:, :blocks]
        if self.symmetric:  # the quantizer returns zeros; MatMulNBits reads 2^(bits-1)
            z = np.full_like(z, 1 << (self.bits - 1))
        w = (q.astype(np.float32) - z[..., None].astype(np.float32)) * scales[..., None]
        return w.reshape(n, -1)[:, :k].T


@dataclass(frozen=True)
class QuantPlan:
    """The QuantSpec of every quantized weight: `spec`, except the lm_head (`head_params`: its
    names in the head piece and in the checkpoint, found when the head piece is rewritten),
    which takes `head` when it is set (mixed precision)."""

    spec: QuantSpec
    head: QuantSpec | None = None
    head_params: frozenset = frozenset()

    def for_param(self, param: str) -> QuantSpec:
        return self.head if self.head is not None and param in self.head_params else self.spec

    def bits_by_weight(self, quantized: set[str]) -> dict[str, int]:
        """Quantized weights stored at other bits than `spec.bits` (the manifest's record)."""
        return {p: self.for_param(p).bits for p in sorted(quantized)
                if self.for_param(p).bits != self.spec.bits}


def _consumers(graph_list) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for graph in graph_list:
        for node in graph.node:
            for name in node.input:
                users.setdefault(name, []).append(node)
    return users


def lm_head_as_matmul(model: onnx.ModelProto) -> set[str]:
    """Gemm(x, W, transB=1) on a weight input -> MatMul(x, wT:W) (the quantizable layout), adding
    the transposed weight input; the gather of the same weight keeps reading W.
    -> the parameter names rewritten (the lm_head)."""
    from pipo_export.onnx.graph import iter_graphs
    graphs = list(iter_graphs(model.graph))
    weights = {vi.name: vi for vi in model.graph.input if vi.name.startswith(WEIGHT)}
    rewritten = set()
    for graph in graphs:
        for node in graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if (node.op_type != "Gemm" or len(node.input) > 2 or node.input[1] not in weights
                    or attrs.get("transB") != 1 or attrs.get("transA", 0)
                    or attrs.get("alpha", 1.0) != 1.0):
                continue
            src = weights[node.input[1]]
            name = WEIGHT_T + src.name[len(WEIGHT):]
            if name not in {vi.name for vi in model.graph.input}:
                v, h = (d.dim_value for d in src.type.tensor_type.shape.dim)
                model.graph.input.append(helper.make_tensor_value_info(
                    name, src.type.tensor_type.elem_type, [h, v]))
            node.op_type = "MatMul"
            node.input[1] = name
            del node.attribute[:]
            rewritten.add(src.name[len(WEIGHT):])
    return rewritten


def quantize_piece(model: onnx.ModelProto, plan: QuantPlan) -> list[str]:
    """Rewrite every MatMul reading a ``wT:`` weight input into MatMulNBits (each weight with its
    plan.for_param spec), in place. -> the parameter names quantized."""
    from pipo_export.onnx.graph import iter_graphs
    graphs = list(iter_graphs(model.graph))
    users = _consumers(graphs)
    done = []
    inputs = list(model.graph.input)
    for vi in inputs:
        if not vi.name.startswith(WEIGHT_T):
            continue
        k, n = (d.dim_value for d in vi.type.tensor_type.shape.dim)
        matmuls, direct = [], list(users.get(vi.name, []))
        for node in direct:  # pre_transpose_weights left Identity nodes in between
            matmuls += users.get(node.output[0], []) if node.op_type == "Identity" else [node]
        ok = all(m.op_type == "MatMul" and m.input[1] in {vi.name} | {d.output[0] for d in direct}
                 for m in matmuls)
        if not matmuls or not ok:
            continue
        param = vi.name[len(WEIGHT_T):]
        spec = plan.for_param(param)
        blocks = -(-k // spec.block_size)
        shapes = {"wq:": [n, blocks, spec.block_size * spec.bits // 8],
                  "wqs:": [n, blocks],
                  "wqz:": [n, -(-blocks * spec.bits // 8)]}
        types = {"wq:": TensorProto.UINT8, "wqs:": vi.type.tensor_type.elem_type,
                 "wqz:": TensorProto.UINT8}
        prefixes = [p for p in QUANT_INPUTS if p != ZERO_POINTS or not spec.symmetric]
        for m in matmuls:  # (the plan's specs share `symmetric`)
            m.op_type, m.domain = "MatMulNBits", MS_DOMAIN
            m.input[:] = [m.input[0]] + [p + param for p in prefixes]
            m.attribute.extend([helper.make_attribute("K", k), helper.make_attribute("N", n),
                                helper.make_attribute("bits", spec.bits),
                                helper.make_attribute("block_size", spec.block_size),
                                helper.make_attribute("accuracy_level", spec.accuracy_level)])
        for node in direct:
            if node.op_type == "Identity":
                for g in graphs:
                    if node in g.node:
                        g.node.remove(node)
        model.graph.input.remove(vi)
        for prefix in prefixes:
            model.graph.input.append(helper.make_tensor_value_info(
                prefix + param, types[prefix], shapes[prefix]))
        done.append(param)
    if done and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return done
