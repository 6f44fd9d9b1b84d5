"""Regular decoding of a PIPO checkpoint's backbone: the baseline PIPO is measured against.

`RegularStep` runs the same Qwen3.5 backbone, caches, sampler and graph contract as `PipoStep`,
but as a plain causal LM: tokens are embedded one by one (no compressor), one token per step, no
MTP or confidence head. It keeps the pair contract so the same runtimes drive it: `pair[:, 1]` is
always PAD (never committed), `confidence` is SKIPPED_CONFIDENCE, and each cache slot holds one
token instead of one pair (the `past_pairs` dim counts tokens). The backbone was trained on pair
latents, so its regular-mode tokens are not meaningful text; timings and memory traffic are.
It overrides only the embed and head pieces: the layers are PipoStep's.
"""
from __future__ import annotations

import torch

from pipo_graphs.contract import (ATTENTION_MASK, Mode, OUTPUT_MASK, POSITION, PROMPT_MASK,
    SKIPPED_CONFIDENCE)

from pipo_export.model.layers import rope
from pipo_export.model.sampling import add_tokens
from pipo_export.model.steps import LOGITS, PipoStep, States, take


class RegularStep(PipoStep):
    """PipoStep's pieces for one token per step; states lack mtp_key/mtp_value."""

    mtp = False

    def _emit(self, token):
        pad = torch.full_like(token, self.pad_id)
        conf = torch.full(token.shape, SKIPPED_CONFIDENCE, dtype=torch.float32,
                          device=token.device)
        return torch.stack([token, pad], dim=1), conf

    def prefill_embed(self, input_ids, lengths, position):
        """input_ids [B, T], lengths [B], past position [B] -> embeds [B, T, H], valid [B, T],
        n_valid = lengths, cos/sin [B, T, rot] (one slot per token, positions continue from
        `position`)."""
        b, t = input_ids.shape
        offsets = torch.arange(t, device=input_ids.device)[None].expand(b, t)
        x = self.model.model.embed_tokens(input_ids)
        cos, sin = rope(self.model.model.rotary_emb.inv_freq, position[:, None] + offsets,
                        x.dtype)
        return x, offsets < lengths[:, None], lengths.clone(), cos, sin

    def prefill_head(self, hidden, input_ids, lengths, valid, n_valid, position, cos, sin,
                     past: States, next_token, sp, uniforms):
        """-> pair [B, 2] (token, PAD), confidence [B] (-1), head states."""
        hidden = self.model.model.norm(hidden)
        prompt_mask, output_mask = self.continued_masks(input_ids, lengths, past)
        logits = self.model.lm_head(take(hidden, lengths - 1))
        token = self.pick(logits, sp, prompt_mask, output_mask, uniforms[:, 0])
        output_mask = add_tokens(output_mask, token[:, None], self.pad_id)
        states = {ATTENTION_MASK: torch.cat([past[ATTENTION_MASK], valid], 1),
                  POSITION: position + n_valid, PROMPT_MASK: prompt_mask,
                  OUTPUT_MASK: self.emitted_mask(output_mask, next_token),
                  LOGITS: logits.float()}
        return (*self._emit(token), states)

    def decode_embed(self, input_pair, attention_mask, position):
        """input_pair [B, 2] (the token emitted last, PAD) -> embeds [B, 1, H], mask [B, P+1],
        cos/sin [B, 1, rot]."""
        b = input_pair.shape[0]
        mask = torch.cat([attention_mask, torch.ones(b, 1, dtype=torch.bool,
                                                     device=input_pair.device)], dim=1)
        x = self.model.model.embed_tokens(input_pair[:, :1])
        cos, sin = rope(self.model.model.rotary_emb.inv_freq, position[:, None], x.dtype)
        return x, mask, cos, sin

    def decode_head(self, hidden, mask, position, cos, sin, past: States, sp, uniforms):
        """-> pair [B, 2] (token, PAD), confidence [B] (-1), head states (one more slot)."""
        hidden = self.model.model.norm(hidden)
        logits = self.model.lm_head(hidden[:, 0])
        token = self.pick(logits, sp, past[PROMPT_MASK], past[OUTPUT_MASK], uniforms[:, 0])
        states = {ATTENTION_MASK: mask, POSITION: position + 1,
                  PROMPT_MASK: past[PROMPT_MASK].clone(),
                  OUTPUT_MASK: add_tokens(past[OUTPUT_MASK], token[:, None], self.pad_id),
                  LOGITS: logits.float()}
        return (*self._emit(token), states)


def step_class(mode: Mode) -> type[PipoStep]:
    """The step functions of an export mode."""
    return PipoStep if Mode(mode) == Mode.PIPO else RegularStep
