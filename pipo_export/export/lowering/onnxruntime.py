"""The ONNX Runtime lowering (`--target onnxruntime`): com.microsoft kernels where they pay.

- Gated DeltaNet: LinearAttention (gated_delta rule, q/k l2-normalized outside, value heads may
  outnumber key heads without repeating q/k) for the prompt and for a step; CausalConvWithState
  (SiLU) for the conv. The prompt's conv window is still gathered per row (the op's own state
  would include right padding).
- Decode attention: GroupQueryAttention with the past cache, a per-row additive bias for the
  cache slots that hold no position, and no repeat of keys or values. The prompt's attention
  (over the past cache and the prompt) keeps the standard ops (its cache must hold every slot,
  padding included).
- Norms: every RMSNorm and q/k l2norm one SimplifiedLayerNormalization (lowering.fusions).
- Sampling: an `If` takes the argmax alone when every row is plain greedy.
Each kernel is a torch custom op (eager: the reference math; traced: one node) mapped to its
ONNX Runtime op by the exporter's custom translation table. Verified against the torch
reference by the export's validation like every lowering.
"""
from __future__ import annotations

import math

import onnx.defs
import torch
import torch.nn.functional as F
from onnxscript._internal.values import Op, Opset
from torch import Tensor

from pipo_export.export.lowering import Lowering
from pipo_export.export.lowering.fusions import fuse_rms_norms
from pipo_export.export.lowering.standard import _l2norm
from pipo_export.model.layers import Kernels, attention, attention_inputs, attention_output

MS = "com.microsoft"
_S = onnx.defs.OpSchema
_OPT = _S.FormalParameterOption.Optional


def _schema(name: str, inputs: list[str], optional: set[str], outputs: list[str],
            attrs: dict[str, _S.AttrType], types: dict[str, list[str]],
            typed: dict[str, str]) -> _S:
    """An OpSchema for a com.microsoft op (the onnx package knows only standard ops)."""
    params = lambda names: [_S.FormalParameter(n, typed.get(n, "T"),  # noqa: E731
                                               param_option=_OPT if n in optional else
                                               _S.FormalParameterOption.Single) for n in names]
    return _S(name, MS, 1, inputs=params(inputs), outputs=params(outputs),
              type_constraints=[(t, v, "") for t, v in types.items()],
              attributes=[_S.Attribute(a, kind, "", required=False) for a, kind in attrs.items()])


_F = ["tensor(float)", "tensor(float16)"]
_MS = Opset(MS, 1)
LINEAR_ATTENTION = Op(_MS, "LinearAttention", _schema(
    "LinearAttention", ["query", "key", "value", "past_state", "decay", "beta"],
    {"past_state", "decay", "beta"}, ["output", "present_state"],
    {"q_num_heads": _S.AttrType.INT, "kv_num_heads": _S.AttrType.INT,
     "update_rule": _S.AttrType.STRING, "scale": _S.AttrType.FLOAT}, {"T": _F}, {}))
CAUSAL_CONV = Op(_MS, "CausalConvWithState", _schema(
    "CausalConvWithState", ["input", "weight", "bias", "past_state"], {"bias", "past_state"},
    ["output", "present_state"], {"activation": _S.AttrType.STRING}, {"T": _F}, {}))
GQA = Op(_MS, "GroupQueryAttention", _schema(
    "GroupQueryAttention",
    ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
     "cos_cache", "sin_cache", "position_ids", "attention_bias"],
    {"key", "value", "past_key", "past_value", "cos_cache", "sin_cache", "position_ids",
     "attention_bias"}, ["output", "present_key", "present_value"],
    {"num_heads": _S.AttrType.INT, "kv_num_heads": _S.AttrType.INT, "scale": _S.AttrType.FLOAT},
    {"T": _F, "M": ["tensor(int32)"], "P": ["tensor(int64)"]},
    {"seqlens_k": "M", "total_sequence_length": "M", "position_ids": "P"}))


# -- Gated DeltaNet ------------------------------------------------------------------------
@torch.library.custom_op("pipo::linear_attention", mutates_args=())
def linear_attention(q: Tensor, k: Tensor, v: Tensor, state: Tensor, g: Tensor, beta: Tensor,
                     q_heads: int, v_heads: int, scale: float) -> tuple[Tensor, Tensor]:
    """Gated delta rule. q/k [B, T, Hk*Dk] (l2-normalized), v [B, T, Hv*Dv], state
    [B, Hv, Dk, Dv], g/beta [B, T, Hv] (float32) -> out [B, T, Hv*Dv], new state."""
    b, t = q.shape[:2]
    dk, dv = q.shape[-1] // q_heads, v.shape[-1] // v_heads
    rep = v_heads // q_heads
    qh = q.view(b, t, q_heads, dk).repeat_interleave(rep, 2) * scale  # [B, T, Hv, Dk]
    kh = k.view(b, t, q_heads, dk).repeat_interleave(rep, 2)
    vh = v.view(b, t, v_heads, dv)
    outs = []
    for i in range(t):
        state = state * g[:, i].exp()[..., None, None]
        delta = (vh[:, i] - (state * kh[:, i, ..., None]).sum(-2)) * beta[:, i, :, None]
        state = state + kh[:, i, ..., None] * delta[..., None, :]
        outs.append((state * qh[:, i, ..., None]).sum(-2))
    return torch.stack(outs, 1).reshape(b, t, v_heads * dv), state


@linear_attention.register_fake
def _(q, k, v, state, g, beta, q_heads, v_heads, scale):
    return v.new_empty(v.shape), torch.empty_like(state)


def _linear_attention_onnx(q, k, v, state, g, beta, q_heads: int, v_heads: int, scale: float):
    return LINEAR_ATTENTION(q, k, v, state, g, beta, q_num_heads=q_heads, kv_num_heads=v_heads,
                            update_rule="gated_delta", scale=scale, _outputs=2)


def _rule(q, k, v, g, beta, state=None):
    """Kernels.chunk_rule / recurrent_rule on LinearAttention: q/k [B, L, Hk, Dk],
    v [B, L, Hv, Dv], g/beta [B, L, Hv] -> out [B, L, Hv, Dv] (q's dtype), state float32."""
    b, n, hk, dk = k.shape
    hv, dv = v.shape[2], v.shape[3]
    if state is None:
        state = q.new_zeros(b, hv, dk, dv, dtype=torch.float32)
    out, state = linear_attention(
        _l2norm(q.float()).reshape(b, n, hk * dk), _l2norm(k.float()).reshape(b, n, hk * dk),
        v.float().reshape(b, n, hv * dv), state, g.float(), beta.float(), hk, hv,
        1.0 / math.sqrt(dk))
    return out.reshape(b, n, hv, dv).to(q.dtype), state


@torch.library.custom_op("pipo::causal_conv", mutates_args=())
def causal_conv(x: Tensor, weight: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """SiLU(depthwise causal conv of cat(state, x)). x [B, C, L], weight [C, 1, K], state
    [B, C, K-1] -> out [B, C, L], the last K-1 columns of cat(state, x)."""
    full = torch.cat([state, x], -1)
    out = F.silu(F.conv1d(full, weight, groups=x.shape[1]))
    return out, full[..., full.shape[-1] - state.shape[-1]:].clone()


@causal_conv.register_fake
def _(x, weight, state):
    return torch.empty_like(x), torch.empty_like(state)


def _causal_conv_onnx(x, weight, state):
    return CAUSAL_CONV(x, weight, None, state, activation="silu", _outputs=2)


def conv_prefill(mixed: Tensor, weight: Tensor, n_valid: Tensor, window: Tensor):
    """Kernels.conv_prefill: the op's output from the past window; the new window gathered at
    each row's length."""
    kk = weight.shape[-1]
    c = mixed.shape[1]
    out, _ = causal_conv(mixed.float(), weight.float(), window.float())
    padded = torch.cat([window.to(mixed.dtype), mixed], -1)
    cols = n_valid[:, None] + torch.arange(kk - 1, device=mixed.device)[None]
    window = torch.gather(padded, 2, cols[:, None, :].expand(-1, c, -1))
    return out.to(mixed.dtype), window


def conv_step(mixed: Tensor, window: Tensor, weight: Tensor):
    """Kernels.conv_step on CausalConvWithState."""
    out, new = causal_conv(mixed.float(), weight.float(), window.float())
    return out.to(mixed.dtype), new.to(window.dtype)


# -- decode attention ----------------------------------------------------------------------
@torch.library.custom_op("pipo::gqa_step", mutates_args=())
def gqa_step(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, seqlens: Tensor,
             total: Tensor, bias: Tensor, heads: int, kv_heads: int,
             scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """One attention step over the cache. q [B, 1, Hq*D], k/v [B, 1, Hkv*D], past [B, Hkv, P, D],
    seqlens [B] int32 (= P), total int32 scalar (P + 1), bias [B, 1, 1, P+1] (0 or -inf)
    -> out [B, 1, Hq*D], present [B, Hkv, P+1, D] (new token at slot P)."""
    b, d = q.shape[0], past_k.shape[-1]
    keys = torch.cat([past_k, k.view(b, 1, kv_heads, d).transpose(1, 2)], 2)
    values = torch.cat([past_v, v.view(b, 1, kv_heads, d).transpose(1, 2)], 2)
    qh = q.view(b, 1, heads, d).transpose(1, 2)  # [B, Hq, 1, D]
    rep = heads // kv_heads
    scores = qh @ keys.repeat_interleave(rep, 1).transpose(2, 3) * scale + bias
    out = torch.softmax(scores.float(), -1).to(q.dtype) @ values.repeat_interleave(rep, 1)
    return out.transpose(1, 2).reshape(b, 1, heads * d), keys, values


@gqa_step.register_fake
def _(q, k, v, past_k, past_v, seqlens, total, bias, heads, kv_heads, scale):
    b, hkv, p, d = past_k.shape
    shape = (b, hkv, p + 1, d)
    return torch.empty_like(q), past_k.new_empty(shape), past_v.new_empty(shape)


def _gqa_step_onnx(q, k, v, past_k, past_v, seqlens, total, bias, heads: int, kv_heads: int,
                   scale: float):
    return GQA(q, k, v, past_k, past_v, seqlens, total, None, None, None, bias, num_heads=heads,
               kv_num_heads=kv_heads, scale=scale, _outputs=3)


def ort_attention(attn, x, cos, sin, past_k, past_v, mask):
    """Kernels.attention of a decode step: GroupQueryAttention (a prompt keeps the standard ops,
    Kernels.prefill_attention)."""
    b = x.shape[0]
    q, gate, k, v = attention_inputs(attn, x, cos, sin)
    p = past_k.shape[2]
    seqlens = torch.full((b,), p, dtype=torch.int32, device=x.device)
    total = torch.full((), p + 1, dtype=torch.int32, device=x.device)
    bias = torch.where(mask, 0.0, float("-inf")).to(q.dtype)[:, None, None, :]
    out, keys, values = gqa_step(q.transpose(1, 2).reshape(b, 1, -1),
                                 k.transpose(1, 2).reshape(b, 1, -1),
                                 v.transpose(1, 2).reshape(b, 1, -1), past_k, past_v, seqlens,
                                 total, bias, q.shape[1], k.shape[1], attn.scaling)
    return attention_output(attn, out, gate), keys, values


KERNELS = Kernels(attention=ort_attention, conv_prefill=conv_prefill, conv_step=conv_step,
                  chunk_rule=_rule, recurrent_rule=_rule, greedy_branch=True)
LOWERING = Lowering(
    "onnxruntime-contrib", KERNELS,
    translation_table={torch.ops.pipo.linear_attention.default: _linear_attention_onnx,
                       torch.ops.pipo.causal_conv.default: _causal_conv_onnx,
                       torch.ops.pipo.gqa_step.default: _gqa_step_onnx},
    opset_imports={MS: 1}, graph_passes=(fuse_rms_norms,))
