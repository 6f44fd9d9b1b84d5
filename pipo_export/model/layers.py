"""Cached forward pieces of the Qwen3.5 layers, with explicit states (gpt-fast style).

They read the weights of transformers' own modules (Qwen3_5Attention, Qwen3_5GatedDeltaNet)
but take and return caches as plain tensors, so the same code runs eagerly as the reference
decoder and traces into the ONNX graphs. The Gated DeltaNet kernels are pluggable (`Kernels`):
the reference uses transformers' torch implementations, export targets swap in lowerings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers.models.qwen3_5.modeling_qwen3_5 import (apply_rotary_pos_emb, repeat_kv,
                                                          torch_chunk_gated_delta_rule,
                                                          torch_recurrent_gated_delta_rule)


def _reference_chunk(q, k, v, g, beta, state):
    """[B, L, H*, D] q/k/v, g/beta [B, L, Hv], state [B, Hv, Dk, Dv] (the past one, float32)
    -> out [B, L, Hv, Dv], new state [B, Hv, Dk, Dv]."""
    return torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=state,
                                        output_final_state=True, use_qk_l2norm_in_kernel=True)


def _reference_recurrent(q, k, v, g, beta, state):
    """One-token gated delta rule: q/k/v [B, 1, H*, D], state [B, Hv, Dk, Dv]."""
    return torch_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=state,
                                            output_final_state=True, use_qk_l2norm_in_kernel=True)


def conv_prefill(mixed: torch.Tensor, weight: torch.Tensor, n_valid: torch.Tensor,
                 window: torch.Tensor):
    """Depthwise causal conv + SiLU over a right-padded prompt that continues `window`.

    mixed [B, C, L]; weight [C, 1, K]; n_valid [B]; window [B, C, K-1] (the past window, zeros
    for a fresh sequence) -> out [B, C, L], window [B, C, K-1] (the last K-1 inputs of
    cat(window, mixed) before each row's n_valid)."""
    kk = weight.shape[-1]
    padded = torch.cat([window.to(mixed.dtype), mixed], -1)  # [B, C, K-1+L]
    out = F.silu(F.conv1d(padded, weight, groups=mixed.shape[1]))  # [B, C, L]
    cols = n_valid[:, None] + torch.arange(kk - 1, device=mixed.device)[None]  # [B, K-1]
    window = torch.gather(padded, 2, cols[:, None, :].expand(-1, mixed.shape[1], -1))
    return out, window


def conv_step(mixed: torch.Tensor, window: torch.Tensor, weight: torch.Tensor):
    """One step of the causal conv + SiLU. mixed [B, C, 1], window [B, C, K-1], weight
    [C, 1, K] -> out [B, C, 1], new window [B, C, K-1]."""
    full = torch.cat([window, mixed.to(window.dtype)], dim=-1)  # [B, C, K]
    return F.silu((full * weight[:, 0, :]).sum(-1, keepdim=True)), full[:, :, 1:]


@dataclass
class Kernels:
    """Swappable implementations of the sequence mixers and attention (the torch reference, or
    a target's lowering: pipo_export.export.lowering). Signatures are those of the defaults.
    greedy_branch: sampling takes the argmax alone when every row is plain greedy (see
    pipo_export.model.sampling.sample)."""

    attention: Callable = None  # set below: gated GQA attention over cache + new tokens
    prefill_attention: Callable = None  # the same over the cache + a prompt (default: attention)
    conv_prefill: Callable = conv_prefill
    conv_step: Callable = conv_step
    chunk_rule: Callable = _reference_chunk
    recurrent_rule: Callable = _reference_recurrent
    greedy_branch: bool = False

    def __post_init__(self):
        if self.attention is None:
            self.attention = attention
        if self.prefill_attention is None:
            self.prefill_attention = attention


def rope(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions [B, L] int64 -> (cos, sin) [B, L, rotary_dim] (text RoPE: 3 equal streams)."""
    freqs = positions[..., None].float() * inv_freq.float()  # [B, L, rot/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def attention_inputs(attn, x: torch.Tensor, cos, sin):
    """Projections of gated attention: x [B, L, H] -> q [B, Hq, L, D] (q_norm, RoPE),
    gate [B, L, Hq*D], k [B, Hkv, L, D] (k_norm, RoPE), v [B, Hkv, L, D]."""
    b, n = x.shape[:2]
    d = attn.head_dim
    qg = attn.q_proj(x).view(b, n, -1, 2 * d)  # slices, not chunk: no ONNX sequence ops
    q, gate = qg[..., :d], qg[..., d:]
    gate = gate.reshape(b, n, -1)
    q = attn.q_norm(q).transpose(1, 2)  # [B, Hq, L, D]
    k = attn.k_norm(attn.k_proj(x).view(b, n, -1, d)).transpose(1, 2)  # [B, Hkv, L, D]
    v = attn.v_proj(x).view(b, n, -1, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, gate, k, v


def attention_output(attn, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """out [B, L, Hq*D] (attention result), gate [B, L, Hq*D] -> o_proj(out * sigmoid(gate))."""
    return attn.o_proj(out * torch.sigmoid(gate))


def attention(attn, x: torch.Tensor, cos, sin, past_k: torch.Tensor | None,
              past_v: torch.Tensor | None, mask: torch.Tensor):
    """Gated full attention over cache + new tokens.

    x [B, L, H]; past_k/past_v [B, Hkv, P, D] or None (prefill, P = 0); mask [B, P+L] bool
    (slot holds a real position).
    Query i sits at slot P+i and sees slots <= P+i. -> out [B, L, H], keys/values [B, Hkv, P+L, D].
    """
    b, n = x.shape[:2]
    q, gate, k, v = attention_inputs(attn, x, cos, sin)
    if past_k is None:  # prefill: the cache is exactly the new keys (dense, for If branches)
        keys, values = k.contiguous(), v.contiguous()
    else:
        keys, values = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    total = keys.shape[2]
    slots = torch.arange(total, device=x.device)
    query_slots = slots[total - n:]  # [L]
    allowed = mask[:, None, None, :] & (slots[None, None, None, :] <= query_slots[None, None, :, None])
    scores = torch.matmul(q, repeat_kv(keys, attn.num_key_value_groups).transpose(2, 3)) * attn.scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, repeat_kv(values, attn.num_key_value_groups))  # [B, Hq, L, D]
    return attention_output(attn, out.transpose(1, 2).reshape(b, n, -1), gate), keys, values


def _gdn_project(gdn, x: torch.Tensor):
    """x [B, L, H] -> mixed_qkv [B, C, L], z [B, L, Hv, Dv], beta/g [B, L, Hv] (float32 g)."""
    mixed = gdn.in_proj_qkv(x).transpose(1, 2)
    z = gdn.in_proj_z(x).reshape(x.shape[0], x.shape[1], -1, gdn.head_v_dim)
    beta = gdn.in_proj_b(x).sigmoid()
    g = -gdn.A_log.float().exp() * F.softplus(gdn.in_proj_a(x).float() + gdn.dt_bias)
    return mixed, z, beta, g


def _gdn_output(gdn, conv_out: torch.Tensor, z, rule, *rule_args):
    """conv_out [B, C, L] (after SiLU) -> layer output [B, L, H] and the new recurrent state."""
    b, _, n = conv_out.shape
    qkv = conv_out.transpose(1, 2)  # [B, L, C]; slices, not split: no ONNX sequence ops
    kd = gdn.key_dim
    q, k, v = qkv[..., :kd], qkv[..., kd:2 * kd], qkv[..., 2 * kd:]
    q = q.reshape(b, n, -1, gdn.head_k_dim)
    k = k.reshape(b, n, -1, gdn.head_k_dim)
    v = v.reshape(b, n, -1, gdn.head_v_dim)
    core, state = rule(q, k, v, *rule_args)
    core = gdn.norm(core.reshape(-1, gdn.head_v_dim), z.reshape(-1, gdn.head_v_dim))
    return gdn.out_proj(core.reshape(b, n, -1)), state


def gdn_prefill(gdn, x: torch.Tensor, valid: torch.Tensor, n_valid: torch.Tensor,
                window: torch.Tensor, state: torch.Tensor, kernels: Kernels):
    """Gated DeltaNet over a right-padded prompt that continues the past states.

    x [B, L, H]; valid [B, L] bool; n_valid [B] real positions per row; window [B, C, K-1] and
    state [B, Hv, Dk, Dv] float32: the past ones (zeros for a fresh sequence).
    Positions past n_valid get beta = 0 and g = 0, so they leave the recurrent state unchanged.
    -> out [B, L, H], conv window [B, C, K-1] (inputs before n_valid), state [B, Hv, Dk, Dv].
    """
    mixed, z, beta, g = _gdn_project(gdn, x)
    conv, window = kernels.conv_prefill(mixed, gdn.conv1d.weight, n_valid, window)
    keep = valid[..., None]
    beta = torch.where(keep, beta, torch.zeros_like(beta))
    g = torch.where(keep, g, torch.zeros_like(g))
    out, state = _gdn_output(gdn, conv, z, kernels.chunk_rule, g, beta, state)
    return out, window, state


def gdn_decode(gdn, x: torch.Tensor, window: torch.Tensor, state: torch.Tensor, kernels: Kernels):
    """One Gated DeltaNet step. x [B, 1, H]; window [B, C, K-1]; state [B, Hv, Dk, Dv]
    -> out [B, 1, H], new window, new state."""
    mixed, z, beta, g = _gdn_project(gdn, x)
    conv, window = kernels.conv_step(mixed, window, gdn.conv1d.weight)
    out, state = _gdn_output(gdn, conv, z, kernels.recurrent_rule, g, beta, state)
    return out, window, state


def mlp_block(layer, x: torch.Tensor) -> torch.Tensor:
    """Second half of a decoder layer: x + MLP(post_attention_layernorm(x))."""
    return x + layer.mlp(layer.post_attention_layernorm(x))
