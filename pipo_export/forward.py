"""PIPO prefill and decode steps with explicit states (PIPO_SPEC section 3).

`PipoStep.prefill` and `PipoStep.decode` are the two graphs of the contract (pipo_graphs):
the reference decoder calls them eagerly, the exporter traces them.
"""
from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from pipo_graphs.contract import SKIPPED_CONFIDENCE

from .layers import Kernels, attention, gdn_decode, gdn_prefill, mlp_block, rope
from .model import PipoModel
from .sampling import DEFAULT_SAMPLE_CAP, add_tokens, gate, sample


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
                pk, pv = self._past_kv(past, f"key.{i}", f"value.{i}", layer.self_attn, latents)
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

    @staticmethod
    def _past_kv(past, kname, vname, attn, like):
        if past is not None:
            return past[kname], past[vname]
        empty = like.new_zeros(like.shape[0], attn.config.num_key_value_heads, 0, attn.head_dim)
        return empty, empty

    # -- MTP + confidence + gate ----------------------------------------------------------
    def _mtp(self, tokens, hidden, rope_cs, mask, past_k, past_v):
        """tokens [B, L], hidden [B, L, H] -> mtp output [B, L, H] (post-norm), keys, values."""
        mtp, layer = self.model.mtp, self.model.mtp.layers[0]
        x = mtp.fuse(self.model.model.embed_tokens(tokens), hidden)
        h, keys, values = attention(layer.self_attn, layer.input_layernorm(x), *rope_cs, past_k,
                                    past_v, mask)
        return mtp.norm(mlp_block(layer, x + h)), keys, values

    def _second_token(self, tokens, hidden, last, h_last, rope_cs, mask, past_k, past_v, sp,
                      prompt_mask, output_mask, u):
        """Run MTP, sample token2, confidence, gate. `last` [B] picks each row's final position.
        -> token2 [B], conf [B], mtp keys/values [B, Hkv, P+L, D]."""

        def run(past_k, past_v, output_mask, h_last, hidden):
            m, keys, values = self._mtp(tokens, hidden, rope_cs, mask, past_k, past_v)
            m_last = _take(m, last)
            logits = self.model.lm_head(m_last)
            token2 = sample(logits, sp, prompt_mask, output_mask, u, self.sample_cap)
            conf = self.model.confidence_head(h_last, m_last)
            return gate(token2, conf, sp["threshold"], self.pad_id), conf, keys, values

        def skip(past_k, past_v, output_mask, h_last, hidden):
            b, n = hidden.shape[:2]
            new = past_k.new_zeros(b, past_k.shape[1], n, past_k.shape[3])
            pad = torch.full((b,), self.pad_id, dtype=torch.long, device=hidden.device)
            conf = torch.full((b,), SKIPPED_CONFIDENCE, dtype=torch.float32, device=hidden.device)
            return pad, conf, torch.cat([past_k, new], 2), torch.cat([past_v, new], 2)

        all_skip = sp["threshold"].min() >= 1
        operands = (past_k, past_v, output_mask, h_last, hidden)
        if self.use_cond:
            return torch.cond(all_skip, skip, run, operands)
        return skip(*operands) if bool(all_skip) else run(*operands)

    # -- the two graphs -------------------------------------------------------------------
    def prefill(self, input_ids, lengths, sp: dict[str, torch.Tensor], uniforms):
        """input_ids [B, T] (T even, PAD after each row's length), lengths [B] >= 1,
        sp: sampling inputs [B], uniforms [B, 2] -> pair [B, 2], confidence [B], states."""
        b, t = input_ids.shape
        n = t // 2
        n_valid = (lengths + 1) // 2  # pairs per row
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
        empty = hidden.new_zeros(b, self.model.config.text.num_key_value_heads, 0,
                                 self.model.mtp.layers[0].self_attn.head_dim)
        token2, conf, states["mtp_key"], states["mtp_value"] = self._second_token(
            mtp_tokens, hidden, last, h_last, rope_cs, valid, empty, empty, sp, prompt_mask,
            output_mask, uniforms[:, 1])
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
            token1[:, None], hidden, last, h_last, rope_cs, mtp_mask, past["mtp_key"], past["mtp_value"],
            sp, prompt_mask, output_mask, uniforms[:, 1])
        states.update(attention_mask=mask, position=position + 1, prompt_mask=prompt_mask,
                      output_mask=add_tokens(output_mask, token2[:, None], self.pad_id))
        return torch.stack([token1, token2], dim=1), conf, states
