"""Export lowerings of the Gated DeltaNet: standard ONNX ops only, dynamic lengths.

- `chunk_rule_scan`: the chunked gated delta rule with the intra-chunk UT inverse computed by
  recursive block inversion (log2(64) = 6 levels of batched matmuls, no loop over time) and the
  inter-chunk recurrence as a higher-order `scan` (ONNX `Scan` over a dynamic number of chunks).
- `recurrent_step`: one-token update with plain elementwise ops and reductions.

Both reproduce transformers' torch_chunk/recurrent_gated_delta_rule (checked in tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._higher_order_ops.scan import scan

from pipo_export.export.lowering import Lowering
from pipo_export.model.layers import Kernels

CHUNK = 64


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _heads(q, k, v, g, beta):
    """Grouped q/k heads to Hv heads, float32, [B, H, L, D]; l2norm q/k; scale q."""
    b, n, hk, dk = k.shape
    rep = v.shape[2] // hk

    def expand(x):
        return x[:, :, :, None, :].expand(b, n, hk, rep, dk).reshape(b, n, hk * rep, dk)

    q, k = expand(q), expand(k)
    q, k, v, g, beta = (x.transpose(1, 2).float() for x in (q, k, v, g, beta))
    return _l2norm(q) * dk ** -0.5, _l2norm(k), v, g, beta


def recurrent_step(q, k, v, g, beta, state):
    """q/k [B, 1, Hk, Dk], v [B, 1, Hv, Dv], g/beta [B, 1, Hv], state [B, Hv, Dk, Dv] float32
    -> out [B, 1, Hv, Dv] (input dtype), new state."""
    dtype = q.dtype
    q, k, v, g, beta = (x[:, :, 0] for x in _heads(q, k, v, g, beta))  # [B, H, D]
    state = state * g.exp()[..., None, None]
    delta = (v - (state * k[..., None]).sum(-2)) * beta[..., None]  # [B, H, Dv]
    state = state + k[..., None] * delta[..., None, :]
    out = (state * q[..., None]).sum(-2)  # [B, H, Dv]
    return out[:, None].to(dtype), state


def _index_masks(c: int, device):
    """[C, C] bool masks (strictly upper, strictly lower) from int64 indices (triu/tril trace to
    uint8 ops that TensorRT rejects)."""
    idx = torch.arange(c, device=device)
    return idx[None, :] > idx[:, None], idx[:, None] > idx[None, :]


def _unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """(I + tril(a, -1))^-1 for a [..., C, C] (C a power of two), by recursive 2x2 block
    inversion: inv([[A, 0], [X, D]]) = [[A^-1, 0], [-D^-1 X A^-1, D^-1]], log2(C) levels of
    batched matmuls. As accurate as forward substitution (a Neumann-series product is not: it
    loses everything when keys are correlated), with no loop over rows.
    """
    c = a.shape[-1]
    lead = a.shape[:-2]
    flat = a.reshape(*lead, c * c)
    inv = a.new_ones(*lead, c, 1, 1)  # inverses of the 1x1 diagonal blocks
    b = 1
    while b < c:
        n = c // (2 * b)
        i = torch.arange(n, device=a.device)[:, None, None]
        r = torch.arange(b, device=a.device)
        # X of each 2b x 2b diagonal block: rows (2i+1)b + r, cols 2ib + s (strictly lower)
        index = ((2 * i + 1) * b + r[None, :, None]) * c + 2 * i * b + r[None, None, :]
        x = flat.index_select(-1, index.reshape(-1)).reshape(*lead, n, b, b)
        pairs = inv.reshape(*lead, n, 2, b, b)
        a_inv, d_inv = pairs[..., 0, :, :], pairs[..., 1, :, :]
        low = -(d_inv @ x @ a_inv)
        inv = torch.cat([torch.cat([a_inv, torch.zeros_like(a_inv)], -1),
                         torch.cat([low, d_inv], -1)], -2)  # [..., n, 2b, 2b]
        b *= 2
    return inv.reshape(*lead, c, c)


def chunk_rule_scan(q, k, v, g, beta, state=None):
    """Chunked gated delta rule from `state` (the past one; None: zeros).

    q/k [B, L, Hk, Dk], v [B, L, Hv, Dv], g/beta [B, L, Hv], state [B, Hv, Dk, Dv] float32
    -> out [B, L, Hv, Dv] (input dtype), final state [B, Hv, Dk, Dv] float32. L is dynamic;
    padding to a multiple of 64 uses g = beta = 0, which leaves the state unchanged.
    """
    dtype = q.dtype
    q, k, v, g, beta = _heads(q, k, v, g, beta)
    b, h, n, dk = k.shape
    dv = v.shape[-1]
    pad = (CHUNK - n % CHUNK) % CHUNK
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    chunks = q.shape[2] // CHUNK

    def split(x):  # [B, H, N*C, D] -> [B, H, N, C, D]
        return x.reshape(b, h, chunks, CHUNK, x.shape[-1])

    k_beta = split(k * beta[..., None])
    v_beta = split(v * beta[..., None])
    q, k = split(q), split(k)
    cum = g.reshape(b, h, chunks, CHUNK).cumsum(-1)  # [B, H, N, C]
    upper = _index_masks(CHUNK, q.device)[0]
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")).exp()
    inv = _unit_lower_inverse((k_beta @ k.transpose(-1, -2)) * decay)
    intra = (q @ k.transpose(-1, -2)) * decay  # [B, H, N, C, C]
    new_values = inv @ v_beta
    k_cumdecay = inv @ (k_beta * cum.exp()[..., None])
    q_dec = q * cum.exp()[..., None]
    k_dec = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]  # [B, H, N, 1, 1]

    def step(state, xs):
        nv, kc, qd, kd, att, cd = xs
        v_new = nv - kc @ state
        out = qd @ state + att @ v_new
        return state * cd + kd.transpose(-1, -2) @ v_new, out

    xs = tuple(x.movedim(2, 0) for x in (new_values, k_cumdecay, q_dec, k_dec, intra, chunk_decay))
    state0 = q.new_zeros(b, h, dk, dv) if state is None else state.float()
    state, outs = scan(step, state0, xs)  # outs [N, B, H, C, Dv]
    out = outs.movedim(0, 2).reshape(b, h, chunks * CHUNK, dv)[:, :, :n]
    return out.transpose(1, 2).to(dtype), state


STANDARD_KERNELS = Kernels(chunk_rule=chunk_rule_scan, recurrent_rule=recurrent_step)
LOWERING = Lowering("standard", STANDARD_KERNELS)  # standard ONNX ops only (TensorRT-clean)
