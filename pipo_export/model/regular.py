"""Regular decoding of a PIPO checkpoint's backbone: the baseline PIPO is measured against.

`RegularStep` runs the same Qwen3.5 backbone, caches, sampler and graph contract as `PipoStep`,
but as a plain causal LM: tokens are embedded one by one (no compressor), one token per step, no
MTP or confidence head. It keeps the pair contract so the same runtimes drive it: `pair[:, 1]` is
always PAD (never committed), `confidence` is SKIPPED_CONFIDENCE, and each cache slot holds one
token instead of one pair (the `past_pairs` dim counts tokens). The backbone was trained on pair
latents, so its regular-mode tokens are not meaningful text; timings and memory traffic are.
"""
from __future__ import annotations

import torch

from pipo_graphs.contract import SKIPPED_CONFIDENCE

from pipo_export.model.steps import PipoStep, States, _take
from pipo_graphs.contract import Mode
from pipo_export.model.sampling import add_tokens, sample


class RegularStep(PipoStep):
    """prefill/decode with PipoStep's signatures; states lack mtp_key/mtp_value."""

    def _emit(self, token, b, device):
        pad = torch.full((b,), self.pad_id, dtype=torch.long, device=device)
        conf = torch.full((b,), SKIPPED_CONFIDENCE, dtype=torch.float32, device=device)
        return torch.stack([token, pad], dim=1), conf

    def prefill(self, input_ids, lengths, sp: dict[str, torch.Tensor], uniforms):
        """input_ids [B, T] (PAD after each row's length), lengths [B] >= 1, sp [B],
        uniforms [B, 2] -> pair [B, 2] (token, PAD), confidence [B] (-1), states (T slots)."""
        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device)[None].expand(b, t)
        valid = positions < lengths[:, None]  # [B, T]
        embeds = self.model.model.embed_tokens(input_ids)  # [B, T, H]
        hidden, states, _ = self._backbone(embeds, positions, valid, None, valid, lengths)
        prompt_tokens = torch.where(valid, input_ids, torch.full_like(input_ids, self.pad_id))
        prompt_mask = add_tokens(torch.zeros(b, self.model.config.vocab_size, dtype=torch.bool,
                                             device=input_ids.device), prompt_tokens, self.pad_id)
        output_mask = torch.zeros_like(prompt_mask)
        token = sample(self.model.lm_head(_take(hidden, lengths - 1)), sp, prompt_mask,
                       output_mask, uniforms[:, 0], self.sample_cap)
        states.update(attention_mask=valid, position=lengths.clone(), prompt_mask=prompt_mask,
                      output_mask=add_tokens(output_mask, token[:, None], self.pad_id))
        return (*self._emit(token, b, input_ids.device), states)

    def decode(self, input_pair, past: States, sp: dict[str, torch.Tensor], uniforms):
        """input_pair [B, 2] (the token emitted last, PAD), past states, sp [B], uniforms [B, 2]
        -> pair [B, 2] (token, PAD), confidence [B] (-1), states (one more slot)."""
        b = input_pair.shape[0]
        position = past["position"]  # [B]
        mask = torch.cat([past["attention_mask"], torch.ones(b, 1, dtype=torch.bool,
                                                             device=input_pair.device)], dim=1)
        embeds = self.model.model.embed_tokens(input_pair[:, :1])  # [B, 1, H]
        hidden, states, _ = self._backbone(embeds, position[:, None], mask, past)
        token = sample(self.model.lm_head(hidden[:, 0]), sp, past["prompt_mask"],
                       past["output_mask"], uniforms[:, 0], self.sample_cap)
        states.update(attention_mask=mask, position=position + 1,
                      prompt_mask=past["prompt_mask"].clone(),
                      output_mask=add_tokens(past["output_mask"], token[:, None], self.pad_id))
        return (*self._emit(token, b, input_pair.device), states)


def step_class(mode: Mode) -> type[PipoStep]:
    """The step functions of an export mode."""
    return PipoStep if Mode(mode) == Mode.PIPO else RegularStep
