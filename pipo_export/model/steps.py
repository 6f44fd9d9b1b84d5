"""PIPO prefill and decode steps with explicit states (PIPO_SPEC section 3).

`PipoStep.prefill` and `PipoStep.decode` are the two graphs of the contract (pipo_graphs):
the reference decoder calls them eagerly, the exporter traces them.
"""
from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from pipo_graphs.contract import SKIPPED_CONFIDENCE

from pipo_export.model.layers import Kernels, attention, gdn_decode, gdn_prefill, mlp_block, rope
from pipo_export.model.modules import PipoModel
from pipo_export.model.sampling import DEFAULT_SAMPLE_CAP, add_tokens, gate, sample


class MtpContext(str, Enum):
    """What the MTP layer attends to in a decode step.

    FULL: every earlier MTP position and itself (PIPO_SPEC section 2, as in training).
    FIRST_SLOT: MTP cache slot 0 only. This reproduces the reference generator behind
    pipo-tiny-ref/expected.npz, whose decode passed a [B, 1] attention mask to a cached
    transformers layer; transformers pads such a mask with False, exposing only slot 0.
    """

    FULL = "full"
    FIRST_SLOT = "first-slot"


States = dict[str, torch.Tensor]


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, L, H], index [B] -> x[b, index[b]] as [B, H]."""
    return torch.gather(x, 1, index[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]


class PipoStep(nn.Module):
    """The two PIPO steps around one PipoModel.

    use_cond: express the tau >= 1 skip as torch.cond (an ONNX `If` when traced) instead of a
    Python branch. sample_cap: candidates kept by the sampler's TopK.
    """

    def __init__(self, model: PipoModel, kernels: Kernels | None = None,
                 sample_cap: int = DEFAULT_SAMPLE_CAP, use_cond: bool = False,
                 mtp_context: MtpContext = MtpContext.FULL):
        super().__init__()
        self.model = model
        self.kernels = kernels or Kernels()
        self.sample_cap = sample_cap
        self.use_cond = use_cond
        self.mtp_context = MtpContext(mtp_context)
        self.pad_id = model.config.pad_token_id

    # -- backbone -------------------------------------------------------------------------
    def _backbone(self, latents, positions, mask, past: States | None, valid=None, n_valid=None):
        """latents [B, L, H] at positions [B, L]; mask [B, P+L] -> hidden [B, L, H], states."""
        bb = self.model.model
        cos, sin = rope(bb.rotary_emb.inv_freq, positions, latents.dtype)
        x, states = latents, {}
        for i, layer in enumerate(bb.layers):
            h = layer.input_layernorm(x)
            if layer.block_type == "full_attention":
                pk, pv = (None, None) if past is None else (past[f"key.{i}"], past[f"value.{i}"])
                h, states[f"key.{i}"], states[f"value.{i}"] = attention(layer.self_attn, h, cos, sin,
                                                                        pk, pv, mask)
            elif past is None:
                h, states[f"conv.{i}"], states[f"recurrent.{i}"] = gdn_prefill(
                    layer.linear_attn, h, valid, n_valid, self.kernels)
            else:
                h, states[f"conv.{i}"], states[f"recurrent.{i}"] = gdn_decode(
                    layer.linear_attn, h, past[f"conv.{i}"], past[f"recurrent.{i}"], self.kernels)
            x = mlp_block(layer, x + h)
        return bb.norm(x), states, (cos, sin)

    # -- MTP + confidence + gate ----------------------------------------------------------
    def _mtp(self, tokens, hidden, rope_cs, mask, past_k=None, past_v=None):
        """tokens [B, L], hidden [B, L, H] -> mtp output [B, L, H] (post-norm), keys, values."""
        mtp, layer = self.model.mtp, self.model.mtp.layers[0]
        x = mtp.fuse(self.model.model.embed_tokens(tokens), hidden)
        h, keys, values = attention(layer.self_attn, layer.input_layernorm(x), *rope_cs, past_k,
                                    past_v, mask)
        return mtp.norm(mlp_block(layer, x + h)), keys, values

    def _second_token(self, tokens, hidden, last, rope_cs, mask, past_kv, sp, prompt_mask,
                      output_mask, u):
        """Run MTP, sample token2, confidence, gate. In decode (past_kv given) the MTP and the
        confidence head are skipped entirely when every tau >= 1 (an ONNX `If` when traced);
        prefill always runs them, so the MTP cache always covers the prompt.

        tokens [B, L] MTP input tokens, hidden [B, L, H], last [B] each row's final position,
        mask [B, P+L], past_kv () at prefill or (keys, values) [B, Hkv, P, D]
        -> token2 [B], conf [B], mtp keys/values [B, Hkv, P+L, D].
        """
        names = sorted(sp)
        n_past = len(past_kv)
        kv_heads, head_dim = self.model.config.text.num_key_value_heads, self.model.config.text.head_dim

        def run(tokens, hidden, last, cos, sin, mask, prompt_mask, output_mask, u, *rest):
            past, spd = rest[:n_past] or (None, None), dict(zip(names, rest[n_past:]))
            m, keys, values = self._mtp(tokens, hidden, (cos, sin), mask, *past)
            m_last, h_last = _take(m, last), _take(hidden, last)
            token2 = sample(self.model.lm_head(m_last), spd, prompt_mask, output_mask, u,
                            self.sample_cap)
            conf = self.model.confidence_head(h_last, m_last)
            return gate(token2, conf, spd["threshold"], self.pad_id), conf, keys, values

        def skip(tokens, hidden, last, cos, sin, mask, prompt_mask, output_mask, u, *rest):
            b, n = tokens.shape
            new = hidden.new_zeros(b, kv_heads, n, head_dim)
            pad = torch.full((b,), self.pad_id, dtype=torch.long, device=tokens.device)
            conf = torch.full((b,), SKIPPED_CONFIDENCE, dtype=torch.float32, device=tokens.device)
            return pad, conf, torch.cat([rest[0], new], 2), torch.cat([rest[1], new], 2)

        operands = (tokens, hidden, last, *rope_cs, mask, prompt_mask, output_mask, u, *past_kv,
                    *[sp[n] for n in names])
        if not n_past:
            return run(*operands)
        all_skip = sp["threshold"].min() >= 1
        if self.use_cond:  # ONNX If; operands must not alias each other (views are cloned)
            return torch.cond(all_skip, skip, run, tuple(t.clone() for t in operands))
        return skip(*operands) if bool(all_skip) else run(*operands)

    # -- the two graphs -------------------------------------------------------------------
    def prefill(self, input_ids, lengths, sp: dict[str, torch.Tensor], uniforms):
        """input_ids [B, T] (T even, PAD after each row's length), lengths [B] >= 1,
        sp: sampling inputs [B], uniforms [B, 2] -> pair [B, 2], confidence [B], states."""
        b, t = input_ids.shape
        n = t // 2
        n_valid = torch.div(lengths + 1, 2, rounding_mode="trunc")  # pairs per row (lengths > 0)
        positions = torch.arange(n, device=input_ids.device)[None].expand(b, n)
        valid = positions < n_valid[:, None]  # [B, L]
        hidden, states, rope_cs = self._backbone(self.model.compress(input_ids), positions, valid,
                                                 None, valid, n_valid)
        last = n_valid - 1
        h_last = _take(hidden, last)
        in_prompt = torch.arange(t, device=input_ids.device)[None] < lengths[:, None]
        prompt_tokens = torch.where(in_prompt, input_ids, torch.full_like(input_ids, self.pad_id))
        prompt_mask = add_tokens(torch.zeros(b, self.model.config.vocab_size, dtype=torch.bool,
                                             device=input_ids.device), prompt_tokens, self.pad_id)
        output_mask = torch.zeros_like(prompt_mask)
        token1 = sample(self.model.lm_head(h_last), sp, prompt_mask, output_mask, uniforms[:, 0],
                        self.sample_cap)
        output_mask = add_tokens(output_mask, token1[:, None], self.pad_id)
        # MTP context: t_2, t_4, ..., then token1 at each row's last pair
        shifted = torch.cat([input_ids[:, 2::2], input_ids[:, :1]], dim=1)  # [B, L]
        mtp_tokens = torch.where(positions == last[:, None], token1[:, None], shifted)
        token2, conf, states["mtp_key"], states["mtp_value"] = self._second_token(
            mtp_tokens, hidden, last, rope_cs, valid, (), sp, prompt_mask, output_mask,
            uniforms[:, 1])
        states.update(attention_mask=valid, position=n_valid, prompt_mask=prompt_mask,
                      output_mask=add_tokens(output_mask, token2[:, None], self.pad_id))
        return torch.stack([token1, token2], dim=1), conf, states

    def decode(self, input_pair, past: States, sp: dict[str, torch.Tensor], uniforms):
        """input_pair [B, 2] (the pair emitted last), past states, sp [B], uniforms [B, 2]
        -> pair [B, 2], confidence [B], states."""
        b = input_pair.shape[0]
        position = past["position"]  # [B]
        mask = torch.cat([past["attention_mask"], torch.ones(b, 1, dtype=torch.bool,
                                                             device=input_pair.device)], dim=1)
        hidden, states, rope_cs = self._backbone(self.model.compress(input_pair), position[:, None],
                                                 mask, past)
        h_last = hidden[:, 0]
        prompt_mask = past["prompt_mask"]
        token1 = sample(self.model.lm_head(h_last), sp, prompt_mask, past["output_mask"],
                        uniforms[:, 0], self.sample_cap)
        output_mask = add_tokens(past["output_mask"], token1[:, None], self.pad_id)
        last = torch.zeros_like(position)
        mtp_mask = mask
        if self.mtp_context == MtpContext.FIRST_SLOT:
            mtp_mask = mask & (torch.arange(mask.shape[1], device=mask.device) == 0)[None]
        token2, conf, states["mtp_key"], states["mtp_value"] = self._second_token(
            token1[:, None], hidden, last, rope_cs, mtp_mask, (past["mtp_key"], past["mtp_value"]),
            sp, prompt_mask, output_mask, uniforms[:, 1])
        states.update(attention_mask=mask, position=position + 1, prompt_mask=prompt_mask.clone(),
                      output_mask=add_tokens(output_mask, token2[:, None], self.pad_id))
        return torch.stack([token1, token2], dim=1), conf, states
