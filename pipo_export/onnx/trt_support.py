"""TensorRT ONNX-parser operator table (onnx-tensorrt docs/operators.md, TensorRT 10.15) and a static lint.

TensorRT 11: the per-operator rows are still the 10.15 table (no TensorRT 11 operators.md was available to
transcribe). What the TensorRT 11 documentation states is added on top: the parser reads opsets up to 25 (NVIDIA's
"ONNX Opset Guide" for 11.x; opset 25 support arrived in the 11.5 parser per the NVIDIA/TensorRT v11.5 release notes),
and the 11.0 parser added `Swish`. Opset 25 and `Swish` are flagged as warnings because TensorRT 10.x cannot parse them.

TensorRT 10 supports INT64 natively (the TensorRT <= 8.x int64->int32 cast-down note no longer applies); per the doc,
DOUBLE is cast to FLOAT, UINT8 is allowed only for network I/O, INT8/INT4/FP8/FP4 only as quantized (Q/DQ) types.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper

from pipo_graphs.dtypes import ONNX_CODES

from pipo_export.onnx.graph import GraphScope

TRT_DOC_SOURCE = ("onnx/onnx-tensorrt docs/operators.md, TensorRT 10.15 revision ('TensorRT 10.15 supports "
                  "operators in the inclusive range of opset 9 to opset 24'); the same file is vendored in "
                  "NVIDIA/TensorRT as parsers/onnx/docs/operators.md")
TRT11_DOC_SOURCE = ("docs.nvidia.com TensorRT 'ONNX Opset Guide' (TensorRT 11.x: maximum opset 25) and NVIDIA/TensorRT "
                    "release notes v11.0 (parser: Swish) and v11.5 (parser: ONNX opset 25)")
MIN_OPSET = 9
TRT10_MAX_OPSET = 24  # TensorRT 10.15 operators.md
MAX_OPSET = 25  # TensorRT 11.x (11.5+) parser, NVIDIA ONNX Opset Guide
TOPK_MAX_K = 3840


@dataclass(frozen=True)
class OpSupport:
    dtypes: tuple[str, ...]
    restrictions: str = ""
    check: Optional[Callable] = None  # check(node, scope) -> list[(severity, message)]


@dataclass
class LintIssue:
    node: str
    op_type: str
    graph: str
    problem: str
    severity: str = "error"  # "error" (parse/build will fail) or "warning" (may fail / be lossy)

    def __str__(self) -> str:
        return f"[{self.severity}] {self.graph}:{self.node or '-'} ({self.op_type or '-'}): {self.problem}"


# ---------------------------------------------------------------- node helpers
def _attr(node, name, default=None):
    v = next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)
    return v.decode() if isinstance(v, bytes) else v


def _rank(tp: Optional[onnx.TypeProto]) -> Optional[int]:
    ok = tp is not None and tp.HasField("tensor_type") and tp.tensor_type.HasField("shape")
    return len(tp.tensor_type.shape.dim) if ok else None


def _inp(node, i):
    return node.input[i] if len(node.input) > i else ""


# ---------------------------------------------------------------- per-op checks
def _check_topk(node, sc):
    out = []
    if _attr(node, "sorted", 1) != 1:
        out.append(("error", "`sorted` must be 1"))
    k_name = _inp(node, 1)
    if not k_name:  # opset < 10: K is an attribute
        k = _attr(node, "k")
    elif not sc.is_const(k_name):
        return out + [("warning", f"K input '{k_name}' is not an initializer/Constant; TensorRT <= 8.x required an "
                                  f"initializer and TensorRT 10 still needs the runtime K < {TOPK_MAX_K}")]
    else:
        v = sc.const_value(k_name)
        k = int(v.reshape(-1)[0]) if v is not None and v.size else None
    if k is not None and k > TOPK_MAX_K:
        out.append(("error", f"K={k} exceeds the TensorRT TopK limit ({TOPK_MAX_K})"))
    elif k == TOPK_MAX_K:
        out.append(("warning", f"K={k}: the doc says K must be less than {TOPK_MAX_K}"))
    return out


def _const_input(idx, what, severity="error"):
    def check(node, sc):
        name = _inp(node, idx)
        if name and not sc.is_const(name):
            return [(severity, f"{what} ('{name}') is not an initializer/Constant (constant-fold the model first)")]
        return []
    return check


def _check_if(node, sc):
    then_g, else_g, out = _attr(node, "then_branch"), _attr(node, "else_branch"), []
    if then_g is None or else_g is None:
        return [("error", "If node is missing a then/else branch")]
    t_sc, e_sc = GraphScope(then_g, "then"), GraphScope(else_g, "else")
    for i, (to, eo) in enumerate(zip(then_g.output, else_g.output)):
        tr, er = _rank(t_sc.types.get(to.name)), _rank(e_sc.types.get(eo.name))
        if tr is not None and er is not None and tr != er:
            out.append(("error", f"output {i}: then-branch rank {tr} != else-branch rank {er}"))
        if to.name == eo.name:
            out.append(("error", f"output {i}: both branches name their output '{to.name}'; "
                                 "the doc requires different names"))
    if len(then_g.output) != len(else_g.output):
        out.append(("error", "then/else branches have different numbers of outputs"))
    return out


def _check_loop(node, sc):
    body, n_carried = _attr(node, "body"), max(len(node.input) - 2, 0)
    n_scan = len(node.output) - n_carried
    out = [("warning", "Loop carried-dependency shapes must not change across iterations and scan outputs "
                       "need a static length (only partly checkable statically)")]
    if n_scan > 0:
        trip = _inp(node, 0)
        if not trip or not sc.is_const(trip):
            out.append(("error", f"{n_scan} scan output(s) with a data-dependent trip count "
                                 f"(M='{trip}' is not a constant); scan output length cannot be dynamic"))
        elif body is not None and len(body.input) > 1 and body.output:
            cond_out = body.output[0].name
            if cond_out != body.input[1].name and not GraphScope(body, "body").is_const(cond_out):
                out.append(("warning", "scan outputs with a computed early-exit condition may have dynamic length"))
    if body is not None:  # carried state: body input (2+i) vs body output (1+i)
        b = GraphScope(body, "body")
        for i in range(n_carried):
            if 2 + i < len(body.input) and 1 + i < len(body.output):
                ti, to = b.types.get(body.input[2 + i].name), b.types.get(body.output[1 + i].name)
                if _rank(ti) is not None and _rank(to) is not None and _rank(ti) != _rank(to):
                    out.append(("error", f"carried dependency {i} changes rank inside the loop body"))
    return out


_RESIZE_OK = {"coordinate_transformation_mode": ("half_pixel", {"half_pixel", "pytorch_half_pixel",
              "tf_half_pixel_for_nn", "asymmetric", "align_corners"}), "mode": ("nearest", {"nearest", "linear"}),
              "nearest_mode": ("round_prefer_floor", {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}),
              "keep_aspect_ratio_policy": ("stretch", {"stretch"})}


def _check_attrs(node, sc):
    """Attribute/input rules of the remaining restricted ops (one branch per op family)."""
    op, out, E = node.op_type, [], "error"
    if op == "Resize":
        out += [(E, f"{a}='{v}' unsupported") for a, (d, ok) in _RESIZE_OK.items() if (v := _attr(node, a, d)) not in ok]
        out += [(E, "antialiasing is not supported")] if _attr(node, "antialias", 0) else []
    elif op in ("AveragePool", "MaxPool", "LpPool"):
        if any(d != 1 for d in _attr(node, "dilations", []) or []):
            out.append((E, "`dilations` must be empty or all ones"))
        ks = _attr(node, "kernel_shape")
        if op != "LpPool" and ks is not None and len(ks) not in (2, 3):
            out.append((E if len(ks) > 3 else "warning", f"{len(ks)}D pooling; the doc lists 2D or 3D only"))
        if op == "MaxPool" and any(node.output[1:]):
            out.append((E, "`Indices` output tensor unsupported"))
    elif op in ("GRU", "LSTM", "RNN"):
        acts, h = _attr(node, "activations"), len(_attr(node, "activations", []) or []) // 2
        if _attr(node, "direction", "forward") == "bidirectional" and acts and acts[:h] != acts[h:]:
            out.append((E, "bidirectional: forward/reverse activation functions differ"))
        if op == "LSTM":
            out += [(E, f"`{a}` attribute must be 0") for a in ("input_forget", "layout") if _attr(node, a, 0)]
    elif op in ("QuantizeLinear", "DequantizeLinear") and _inp(node, 2):
        zp = _inp(node, 2)
        v = sc.const_value(zp)
        if v is not None and np.any(v.astype(np.float64) != 0):
            out.append((E, f"zero point '{zp}' must be zero"))
        elif v is None:
            out.append(("warning", f"zero point '{zp}' is not a constant; it must be zero"))
    elif op == "Dropout" and _inp(node, 2):
        v = sc.const_value(_inp(node, 2))
        if v is None or bool(v.any()):
            out.append((E, "`is_training` must be an initializer and evaluate to False"))
    elif op == "Constant":
        out += [(E, f"attribute `{a.name}` unsupported") for a in node.attribute
                if a.name in ("sparse_value", "value_string", "value_strings")]
    elif op == "ScatterND" and _attr(node, "reduction", "none") != "none":
        out.append((E, f"`reduction`='{_attr(node, 'reduction')}' not supported"))
    elif op == "STFT":
        out += [(E, f"`{w}` must be an initializer") for i, w in ((1, "frame_step"), (2, "window"))
                if _inp(node, i) and not sc.is_const(_inp(node, i))]
    elif op == "RotaryEmbedding" and sc.elem_type(_inp(node, 3)) not in (None, TensorProto.INT64):
        out.append((E, "`position_ids` must be INT64"))
    elif op == "TensorScatter" and _attr(node, "axis", -2) != -2:
        out.append((E, "`axis` must be -2"))
    elif op == "LayerNormalization" and any(node.output[1:]):
        out.append((E, "only the first output `Y` is supported"))
    return out


# ---------------------------------------------------------------- the table
F, I, B = ("FP32", "FP16", "BF16"), ("INT32", "INT64"), ("BOOL",)
F2 = ("FP32", "FP16")
_PLAIN = [  # (dtypes, ops without restrictions in the doc)
    (F, "Acos Acosh Asin Asinh Atan Atanh BatchNormalization Ceil Celu Clip Conv ConvTranspose Cos Cosh Einsum Elu "
        "Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool GroupNormalization HardSigmoid HardSwish "
        "ImageScaler InstanceNormalization IsInf LeakyRelu Log LogSoftmax LRN LpNormalization MatMul "
        "MeanVarianceNormalization ParametricSoftplus PRelu Reciprocal RMSNormalization Round ScaledTanh Scan Selu "
        "Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample"),
    (F + I, "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min Mod "
            "Mul Neg Pad Pow Range Relu Scatter ScatterElements Shrink Sign SpaceToDepth Sub Sum"),
    (F + I + B, "Concat Expand Flatten Gather GatherElements GatherND Identity Reshape ReverseSequence Shape Size "
                "Slice Split Tile Transpose Trilu Where"),
    (B, "And Not Or Xor"),
    (F2, "BlackmanWindow HammingWindow HannWindow Mish NonMaxSuppression NonZero RoiAlign"),
    (F + ("INT8",) + I, "Gelu"), (F + ("FP8",) + I, "Mean"), (F + I + ("UINT8", "BOOL"), "Cast CastLike"),
]
_QCONST = F + ("FP8", "FP4", "INT4") + I + B
_BIDIR = "For bidirectional {}s, activation functions must be the same for both the forward and reverse pass"
SUPPORTED_OPS: dict[str, OpSupport] = {op: OpSupport(dt) for dt, ops in _PLAIN for op in ops.split()}
SUPPORTED_OPS.update({
    "Attention": OpSupport(F + ("INT8", "FP8"), "`Q`, `K`, `V` and `attn_mask` must be 4D. `past_key`, `past_value` "
                           "and `nonpad_kv_seqlen` inputs are unsupported. `present_key`, `present_value` and "
                           "`qk_matmul_output` outputs are unsupported. `qk_matmul_output_mode` and `softcap` "
                           "attributes are unsupported."),
    "AveragePool": OpSupport(F, "2D or 3D Pooling only. `dilations` must be empty or all ones", _check_attrs),
    "Constant": OpSupport(_QCONST, "`sparse_value`, `value_string`, and `value_strings` attributes are unsupported.",
                          _check_attrs),
    "ConstantOfShape": OpSupport(_QCONST),
    "CumSum": OpSupport(F, "`axis` must be a build-time constant", _const_input(1, "`axis` (build-time constant)")),
    "DeformConv": OpSupport(F2, "`input` must have 1D or 2D spatial dimensions. `pads` for the beginning and end "
                                "along each spatial axis must be the same"),
    "DequantizeLinear": OpSupport(("INT8", "FP8", "FP4", "INT4"), "`x_zero_point` must be zero",
                                  _check_attrs),
    "Dropout": OpSupport(F, "`is_training` must be an initializer and evaluate to False.", _check_attrs),
    "EyeLike": OpSupport(F + I + B, "`input` must have static dimensions"),
    "GridSample": OpSupport(F2, "Input must be 4D input."),
    "GRU": OpSupport(F, _BIDIR.format("GRU"), _check_attrs),
    "Hardmax": OpSupport(F, "`axis` dimension of input must be a build-time constant"),
    "If": OpSupport(F + I + B, "Output tensors of the two conditional branches must have the same rank and must "
                               "have different names", _check_if),
    "LayerNormalization": OpSupport(F, "Only the first output `Y` is supported.", _check_attrs),
    "Loop": OpSupport(F + I + B, "Scan output length cannot be dynamic. The shape of Loop carried dependencies must "
                                 "be the same across all loop iterations.", _check_loop),
    "LSTM": OpSupport(F, _BIDIR.format("LSTM") + ". `input_forget` attribute must be 0. `layout` attribute must be 0.",
                      _check_attrs),
    "LpPool": OpSupport(F, "`dilations` must be empty or all ones", _check_attrs),
    "MaxPool": OpSupport(F, "2D or 3D pooling only. `Indices` output tensor unsupported. `dilations` must be empty "
                            "or all ones", _check_attrs),
    "OneHot": OpSupport(F + I + B, "`depth` must be a build-time constant", _const_input(2, "`depth`", "warning")),
    "QuantizeLinear": OpSupport(F, "`y_zero_point` must be 0", _check_attrs),
    "Resize": OpSupport(F, "Supported coordinate transformation modes: half_pixel, pytorch_half_pixel, "
                           "tf_half_pixel_for_nn, asymmetric, align_corners. Supported modes: nearest, linear. "
                           "Supported nearest modes: floor, ceil, round_prefer_floor, round_prefer_ceil. Supported "
                           "aspect ratio policy: stretch. When `scales` is a tensor input, `axes` must be an iota "
                           "vector of length rank(input). Antialiasing is not supported.", _check_attrs),
    "RNN": OpSupport(F, _BIDIR.format("RNN"), _check_attrs),
    "RotaryEmbedding": OpSupport(F, "`position_ids` must be INT64", _check_attrs),
    "STFT": OpSupport(("FP32",), "`frame_step` and `window` must be an initializer. Input must be real-valued.",
                      _check_attrs),
    "ScatterND": OpSupport(F + I, "`reduction` other than `none` is not supported", _check_attrs),
    "Squeeze": OpSupport(F + I + B, "`axes` must be resolvable to a constant.", _const_input(1, "`axes`", "warning")),
    "Unsqueeze": OpSupport(F + I + B, "`axes` must be resolvable to a constant.",
                           _const_input(1, "`axes`", "warning")),
    "TensorScatter": OpSupport(F[:3] + ("INT32",), "`past_cache` and `update` must be 4D. `axis` must be -2.",
                               _check_attrs),
    "TopK": OpSupport(F + I, "`sorted` must be 1. `K` input must be less than 3840.", _check_topk),
})
SUPPORTED_OPS["Swish"] = OpSupport(F, "TensorRT 11.0+ parser only (not in the TensorRT 10.15 table)",
                                   lambda node, sc: [("warning", "Swish is parsed by TensorRT >= 11.0 only")])
for _op in ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"):
    SUPPORTED_OPS[_op] = OpSupport(F, "`seed` value is ignored by TensorRT")
for _op in ("L1 L2 LogSum LogSumExp Max Mean Min Prod Sum SumSquare").split():
    SUPPORTED_OPS["Reduce" + _op] = OpSupport(F + I, "`axes` must be an initializer", _const_input(1, "`axes`"))

# Rows marked N in the doc.
UNSUPPORTED_OPS: frozenset[str] = frozenset((
    "AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress "
    "ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool "
    "MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement "
    "QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert "
    "SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit "
    "TfIdfVectorizer Unique").split())

_TRT_TYPES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "float64": "FP32",
              "int32": "INT32", "int64": "INT64", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}
_DTYPE = {ONNX_CODES[n]: t for n, t in _TRT_TYPES.items()} | {  # and types with no contract name
    TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT4: "INT4", TensorProto.FLOAT4E2M1: "FP4"}


# ---------------------------------------------------------------- lint
def _lint_types(sc: GraphScope, model_io: set[str], issues: list[LintIssue]) -> None:
    for name, tp in sc.types.items():
        kind, prod = tp.WhichOneof("value"), sc.producer.get(name)
        et = tp.tensor_type.elem_type if kind == "tensor_type" else None
        msg, sev = None, "error"
        if kind != "tensor_type":
            msg = f"has {kind}; TensorRT supports only tensors (no sequence/map/optional)"
        elif et == TensorProto.STRING:
            msg = "is a string tensor (unsupported)"
        elif et == TensorProto.DOUBLE:
            msg, sev = "is DOUBLE; TensorRT casts it to FLOAT (clamped to +-FLT_MAX)", "warning"
        elif et == TensorProto.UINT8 and name not in model_io:
            msg, sev = "is UINT8; only network inputs/outputs may be UINT8", "warning"
        elif et not in _DTYPE and et != TensorProto.UNDEFINED:
            msg = f"has type {TensorProto.DataType.Name(et)}, not a TensorRT type"
        if msg:
            issues.append(LintIssue(prod.name if prod else "", prod.op_type if prod else "", sc.name,
                                    f"tensor '{name}' {msg}", sev))


def _lint_graph(graph, sc: GraphScope, funcs, model_io, issues: list[LintIssue], seen_funcs: set) -> None:
    _lint_types(sc, model_io, issues)
    for n in graph.node:
        def add(problem, sev="error", _n=n):
            issues.append(LintIssue(_n.name, _n.op_type, sc.name, problem, sev))

        if n.domain not in ("", "ai.onnx"):
            key = (n.domain, n.op_type)
            if key in funcs and key not in seen_funcs:  # the parser inlines model-local functions
                seen_funcs.add(key)
                fg = helper.make_graph(list(funcs[key].node), n.op_type, [], [])
                _lint_graph(fg, GraphScope(fg, f"function:{n.domain}::{n.op_type}", sc), funcs, model_io, issues,
                            seen_funcs)
            elif key not in funcs:
                add(f"op from non-default domain '{n.domain}' is unsupported (only loadable as a TensorRT plugin "
                    "registered under the same op name)")
            continue
        spec = SUPPORTED_OPS.get(n.op_type)
        if spec is None:
            if n.op_type.startswith("Sequence") or n.op_type in ("SplitToSequence", "ConcatFromSequence"):
                add("sequence op: TensorRT has no sequence types")
            elif n.op_type in UNSUPPORTED_OPS:
                add("marked unsupported (N) in the TensorRT operator table")
            else:
                add("not listed in the TensorRT operator table")
        else:
            for sev, msg in (spec.check(n, sc) if spec.check else []):
                add(msg, sev)
            first = next((x for x in n.input if x), None) or (n.output[0] if n.output else "")
            et = sc.elem_type(first)
            if et in _DTYPE and _DTYPE[et] not in spec.dtypes:
                add(f"input '{first}' is {_DTYPE[et]}; supported types: {', '.join(spec.dtypes)}", "warning")
        for a in n.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else \
                list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
            for i, g in enumerate(subs):
                sub_name = f"{sc.name}/{n.name or n.op_type}.{a.name}" + (f"[{i}]" if len(subs) > 1 else "")
                _lint_graph(g, GraphScope(g, sub_name, sc), funcs, model_io, issues, seen_funcs)


def lint_model(model: onnx.ModelProto) -> list[LintIssue]:
    """Statically check `model` against the TensorRT ONNX-parser support table (incl. all subgraphs)."""
    issues: list[LintIssue] = []
    for v in (imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")):
        if v > MAX_OPSET:
            issues.append(LintIssue("", "", "model", f"ai.onnx opset {v} > {MAX_OPSET} (TensorRT 11 parser max)"))
        elif v > TRT10_MAX_OPSET:
            issues.append(LintIssue("", "", "model", f"ai.onnx opset {v} needs TensorRT >= 11.5 (TensorRT 10.15 "
                                                     f"parses up to {TRT10_MAX_OPSET})", "warning"))
        elif v < MIN_OPSET:
            issues.append(LintIssue("", "", "model", f"ai.onnx opset {v} < {MIN_OPSET} (parser minimum)", "warning"))
    try:  # type info for dtype/rank checks; fall back to declared value_info only
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference failures must not break linting
        pass
    g = model.graph
    funcs = {(f.domain, f.name): f for f in model.functions}
    model_io = {v.name for v in list(g.input) + list(g.output)}
    _lint_graph(g, GraphScope(g, g.name or "main"), funcs, model_io, issues, set())
    return issues
