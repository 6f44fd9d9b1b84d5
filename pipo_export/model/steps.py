"""PIPO prefill and decode steps with explicit states (docs/contract.md), in pieces.

Each step is three pieces: `*_embed` (tokens -> latents and the per-step context every layer
shares: positions, masks, RoPE), one `*_layer` per decoder layer, and `*_head` (final norm,
lm_head, sampling, MTP, confidence head, gate). `prefill` and `decode` compose them eagerly (the
torch reference); the exporter traces each piece once (one layer per layer type, whatever the
depth) and stitches the ONNX graphs together (pipo_export.export.assemble).
"""
from __future__ import annotations

import torch
from torch import nn

from pipo_graphs.contract import (ATTENTION_MASK, DEFAULT_SAMPLE_CAP, HEAD_EXTRAS, LOGITS,
    MTP_KEY, MTP_LOGITS, MTP_TOKENS, MTP_VALUE, OUTPUT_MASK, POSITION, PROMPT_MASK,
    SKIPPED_CONFIDENCE, state_name)

from pipo_export.model.layers import Kernels, gdn_decode, gdn_prefill, mlp_block, rope
from pipo_export.model.modules import PipoModel
from pipo_export.model.sampling import add_tokens, gate, sample

States = dict[str, torch.Tensor]
FULL_ATTENTION = "full_attention"


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, L, H], index [B] -> x[b, index[b]] as [B, H]."""
    return torch.gather(x, 1, index[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]


def layer_prefill(layer, x, valid, n_valid, past_mask, cos, sin, past: States,
                  kernels: Kernels):
    """One decoder layer over a right-padded prompt that continues the layer's past states.

    x [B, L, H]; valid [B, L] bool; n_valid [B]; past_mask [B, P] bool (the past
    attention_mask); cos/sin [B, L, rot]; past: the layer's states by kind (key/value
    [B, Hkv, P, D], or conv/recurrent) -> x [B, L, H] and the layer's new states by kind."""
    h = layer.input_layernorm(x)
    if layer.block_type == FULL_ATTENTION:
        h, k, v = kernels.prefill_attention(layer.self_attn, h, cos, sin, past["key"],
                                            past["value"], torch.cat([past_mask, valid], 1))
        return mlp_block(layer, x + h), {"key": k, "value": v}
    h, conv, rec = gdn_prefill(layer.linear_attn, h, valid, n_valid, past["conv"],
                               past["recurrent"], kernels)
    return mlp_block(layer, x + h), {"conv": conv, "recurrent": rec}


def layer_decode(layer, x, mask, cos, sin, past: States, kernels: Kernels):
    """One decoder layer, one step. x [B, 1, H]; mask [B, P+1] bool; cos/sin [B, 1, rot];
    past: the layer's states by kind -> x [B, 1, H], new states by kind."""
    h = layer.input_layernorm(x)
    if layer.block_type == FULL_ATTENTION:
        h, k, v = kernels.attention(layer.self_attn, h, cos, sin, past["key"], past["value"], mask)
        return mlp_block(layer, x + h), {"key": k, "value": v}
    h, conv, rec = gdn_decode(layer.linear_attn, h, past["conv"], past["recurrent"], kernels)
    return mlp_block(layer, x + h), {"conv": conv, "recurrent": rec}


class PipoStep(nn.Module):
    """The two PIPO steps around one PipoModel, as pieces (RegularStep overrides embed/head).

    use_cond: express the tau >= 1 skip as torch.cond (an ONNX `If` when traced) instead of a
    Python branch. sample_cap: candidates kept by the sampler's TopK.
    """

    def __init__(self, model: PipoModel, kernels: Kernels | None = None,
                 sample_cap: int = DEFAULT_SAMPLE_CAP, use_cond: bool = False):
        super().__init__()
        self.model = model
        self.kernels = kernels or Kernels()
        self.sample_cap = sample_cap
        self.use_cond = use_cond
        self.pad_id = model.config.pad_token_id

    mtp = True  # the head keeps an MTP cache (mtp_key/mtp_value states)

    @property
    def layers(self):
        return self.model.model.layers

    def pick(self, logits, sp, prompt_mask, output_mask, u):
        """sampling.sample with this step's cap and greedy branch -> tokens [B]."""
        return sample(logits, sp, prompt_mask, output_mask, u, self.sample_cap,
                      self.kernels.greedy_branch)

    # -- prefill pieces -------------------------------------------------------------------
    def prefill_embed(self, input_ids, lengths, position):
        """input_ids [B, T] (T even), lengths [B], past position [B] -> latents [B, L, H],
        valid [B, L] bool, n_valid [B] (pairs per row), cos/sin [B, L, rot] (positions
        continue from `position`)."""
        b, t = input_ids.shape
        n = t // 2
        n_valid = torch.div(lengths + 1, 2, rounding_mode="trunc")
        offsets = torch.arange(n, device=input_ids.device)[None].expand(b, n)
        valid = offsets < n_valid[:, None]
        latents = self.model.compress(input_ids)
        cos, sin = rope(self.model.model.rotary_emb.inv_freq, position[:, None] + offsets,
                        latents.dtype)
        return latents, valid, n_valid, cos, sin

    def continued_masks(self, input_ids, lengths, past: States):
        """The penalty masks a continued prefill samples with: prompt_mask [B, V] = the past
        prompt_mask | the past output_mask | the new tokens (a continuation is a prefill of the
        whole history); output_mask [B, V] empty."""
        in_prompt = torch.arange(input_ids.shape[1], device=input_ids.device)[None] \
            < lengths[:, None]
        new = torch.where(in_prompt, input_ids, torch.full_like(input_ids, self.pad_id))
        prompt_mask = add_tokens(past[PROMPT_MASK] | past[OUTPUT_MASK], new, self.pad_id)
        return prompt_mask, torch.zeros_like(prompt_mask)

    def emitted_mask(self, output_mask, next_token):
        """A chunk that is not its sequence's last (next_token >= 0) emits nothing: its
        output_mask [B, V] stays empty."""
        return output_mask & (next_token < 0)[:, None]

    def prefill_head(self, hidden, input_ids, lengths, valid, n_valid, position, cos, sin,
                     past: States, next_token, sp, uniforms):
        """hidden [B, L, H] (last layer's output) and the embed outputs, past: mtp_key/mtp_value
        [B, Hkv, P, D], attention_mask [B, P], prompt_mask/output_mask [B, V]; next_token [B]
        (-1, or the first token of the chunk after this one), sp: sampling [B], uniforms
        [B, 2] -> pair [B, 2], confidence [B], head states (mtp cache, masks, ...)."""
        hidden = self.model.model.norm(hidden)
        last, mask = n_valid - 1, torch.cat([past[ATTENTION_MASK], valid], 1)
        prompt_mask, output_mask = self.continued_masks(input_ids, lengths, past)
        logits = self.model.lm_head(take(hidden, last))
        token1 = self.pick(logits, sp, prompt_mask, output_mask, uniforms[:, 0])
        output_mask = add_tokens(output_mask, token1[:, None], self.pad_id)
        # MTP context: t_2, t_4, ..., then at each row's last pair the next chunk's first token
        # or token1
        positions = torch.arange(hidden.shape[1], device=input_ids.device)[None]
        shifted = torch.cat([input_ids[:, 2::2], input_ids[:, :1]], dim=1)  # [B, L]
        follow = torch.where(next_token >= 0, next_token, token1)
        mtp_tokens = torch.where(positions == last[:, None], follow[:, None], shifted)
        token2, conf, mtp_key, mtp_value, mtp_logits = self._second_token(
            mtp_tokens, hidden, last, (cos, sin), mask, (past[MTP_KEY], past[MTP_VALUE]), sp,
            prompt_mask, output_mask, uniforms[:, 1], skippable=False)
        output_mask = add_tokens(output_mask, token2[:, None], self.pad_id)
        states = {MTP_KEY: mtp_key, MTP_VALUE: mtp_value, ATTENTION_MASK: mask,
                  POSITION: position + n_valid, PROMPT_MASK: prompt_mask,
                  OUTPUT_MASK: self.emitted_mask(output_mask, next_token),
                  LOGITS: logits.float(), MTP_LOGITS: mtp_logits, MTP_TOKENS: mtp_tokens}
        return torch.stack([token1, token2], dim=1), conf, states

    # -- decode pieces --------------------------------------------------------------------
    def decode_embed(self, input_pair, attention_mask, position):
        """input_pair [B, 2], past attention_mask [B, P], position [B] -> latents [B, 1, H],
        mask [B, P+1], cos/sin [B, 1, rot]."""
        b = input_pair.shape[0]
        mask = torch.cat([attention_mask, torch.ones(b, 1, dtype=torch.bool,
                                                     device=input_pair.device)], dim=1)
        latents = self.model.compress(input_pair)
        cos, sin = rope(self.model.model.rotary_emb.inv_freq, position[:, None], latents.dtype)
        return latents, mask, cos, sin

    def decode_head(self, hidden, mask, position, cos, sin, past: States, sp, uniforms):
        """hidden [B, 1, H] and the embed outputs, past: mtp_key/mtp_value [B, Hkv, P, D],
        prompt_mask/output_mask [B, V] -> pair [B, 2], confidence [B], head states."""
        hidden = self.model.model.norm(hidden)
        prompt_mask = past[PROMPT_MASK]
        logits = self.model.lm_head(hidden[:, 0])
        token1 = self.pick(logits, sp, prompt_mask, past[OUTPUT_MASK], uniforms[:, 0])
        output_mask = add_tokens(past[OUTPUT_MASK], token1[:, None], self.pad_id)
        mtp_tokens = token1[:, None]
        token2, conf, mtp_key, mtp_value, mtp_logits = self._second_token(
            mtp_tokens, hidden, torch.zeros_like(position), (cos, sin), mask,
            (past[MTP_KEY], past[MTP_VALUE]), sp, prompt_mask, output_mask, uniforms[:, 1])
        states = {MTP_KEY: mtp_key, MTP_VALUE: mtp_value, ATTENTION_MASK: mask,
                  POSITION: position + 1, PROMPT_MASK: prompt_mask.clone(),
                  OUTPUT_MASK: add_tokens(output_mask, token2[:, None], self.pad_id),
                  LOGITS: logits.float(), MTP_LOGITS: mtp_logits, MTP_TOKENS: mtp_tokens}
        return torch.stack([token1, token2], dim=1), conf, states

    # -- MTP + confidence + gate ----------------------------------------------------------
    def _mtp(self, tokens, hidden, rope_cs, mask, past_k, past_v, attention):
        """tokens [B, L], hidden [B, L, H] (post-norm), past_k/past_v [B, Hkv, P, D]
        -> mtp output [B, L, H], keys, values [B, Hkv, P+L, D]."""
        mtp, layer = self.model.mtp, self.model.mtp.layers[0]
        x = mtp.fuse(self.model.model.embed_tokens(tokens), hidden)
        h, keys, values = attention(layer.self_attn, layer.input_layernorm(x), *rope_cs, past_k,
                                    past_v, mask)
        return mtp.norm(mlp_block(layer, x + h)), keys, values

    def _second_token(self, tokens, hidden, last, rope_cs, mask, past_kv, sp, prompt_mask,
                      output_mask, u, skippable: bool = True):
        """Run MTP, sample token2, confidence, gate. In decode (skippable) the MTP and the
        confidence head are skipped entirely when every tau >= 1 (an ONNX `If` when traced);
        prefill always runs them, so the MTP cache always covers the prompt.

        tokens [B, L] MTP input tokens, hidden [B, L, H], last [B] each row's final position,
        mask [B, P+L], past_kv (keys, values) [B, Hkv, P, D]
        -> token2 [B], conf [B], mtp keys/values [B, Hkv, P+L, D], token2's logits [B, V]
        float32 (zeros when skipped).
        """
        names = sorted(sp)
        n_past = len(past_kv)
        attention = self.kernels.attention if skippable else self.kernels.prefill_attention
        kv_heads, head_dim = self.model.config.text.num_key_value_heads, self.model.config.text.head_dim

        def run(tokens, hidden, last, cos, sin, mask, prompt_mask, output_mask, u, *rest):
            past, spd = rest[:n_past], dict(zip(names, rest[n_past:]))
            m, keys, values = self._mtp(tokens, hidden, (cos, sin), mask, *past, attention)
            m_last, h_last = take(m, last), take(hidden, last)
            logits2 = self.model.lm_head(m_last)
            token2 = self.pick(logits2, spd, prompt_mask, output_mask, u)
            conf = self.model.confidence_head(h_last, m_last)
            return (gate(token2, conf, spd["threshold"], self.pad_id), conf, keys, values,
                    logits2.float())

        def skip(tokens, hidden, last, cos, sin, mask, prompt_mask, output_mask, u, *rest):
            b, n = tokens.shape
            new = hidden.new_zeros(b, kv_heads, n, head_dim)
            pad = torch.full((b,), self.pad_id, dtype=torch.long, device=tokens.device)
            conf = torch.full((b,), SKIPPED_CONFIDENCE, dtype=torch.float32, device=tokens.device)
            logits2 = torch.zeros(b, self.model.config.vocab_size, dtype=torch.float32,
                                  device=tokens.device)
            return (pad, conf, torch.cat([rest[0], new], 2), torch.cat([rest[1], new], 2),
                    logits2)

        operands = (tokens, hidden, last, *rope_cs, mask, prompt_mask, output_mask, u, *past_kv,
                    *[sp[n] for n in names])
        if not skippable:
            return run(*operands)
        all_skip = sp["threshold"].min() >= 1
        if self.use_cond:  # ONNX If; operands must not alias each other (views are cloned)
            return torch.cond(all_skip, skip, run, tuple(t.clone() for t in operands))
        return skip(*operands) if bool(all_skip) else run(*operands)

    # -- the two steps, composed ----------------------------------------------------------
    def empty_past(self, batch: int, device=None) -> States:
        """The past states of fresh sequences: no cached pairs, zero conv windows and recurrent
        states, position 0, empty penalty masks."""
        p = next(self.parameters())
        dtype, device = p.dtype, device or p.device
        cfg = self.model.config.text
        kv = lambda: torch.zeros(batch, cfg.num_key_value_heads, 0, cfg.head_dim,  # noqa: E731
                                 dtype=dtype, device=device)
        states: States = {}
        for i, layer in enumerate(self.layers):
            if layer.block_type == FULL_ATTENTION:
                states.update({state_name("key", i): kv(), state_name("value", i): kv()})
            else:
                lin = layer.linear_attn
                states[state_name("conv", i)] = torch.zeros(
                    batch, lin.conv_dim, lin.conv_kernel_size - 1, dtype=dtype, device=device)
                states[state_name("recurrent", i)] = torch.zeros(
                    batch, lin.num_v_heads, lin.head_k_dim, lin.head_v_dim, device=device)
        if self.mtp:
            states.update({MTP_KEY: kv(), MTP_VALUE: kv()})
        vocab = torch.zeros(batch, cfg.vocab_size, dtype=torch.bool, device=device)
        return {**states, ATTENTION_MASK: torch.zeros(batch, 0, dtype=torch.bool, device=device),
                POSITION: torch.zeros(batch, dtype=torch.long, device=device),
                PROMPT_MASK: vocab, OUTPUT_MASK: vocab.clone()}

    def prefill(self, input_ids, lengths, sp: dict[str, torch.Tensor], uniforms,
                past: States | None = None, next_token=None):
        """input_ids [B, T] (T even, PAD after each row's length), lengths [B] >= 1,
        sp: sampling inputs [B], uniforms [B, 2]; past: the states the prompt continues (None:
        fresh sequences, `empty_past`); next_token [B] (None: -1 each, see prefill_head)
        -> pair [B, 2], confidence [B], states."""
        b = input_ids.shape[0]
        past = self.empty_past(b, input_ids.device) if past is None else past
        if next_token is None:
            next_token = torch.full((b,), -1, dtype=torch.long, device=input_ids.device)
        x, valid, n_valid, cos, sin = self.prefill_embed(input_ids, lengths, past[POSITION])
        states: States = {}
        for i, layer in enumerate(self.layers):
            mine = {kind: past[state_name(kind, i)] for kind in LAYER_STATES[layer.block_type]}
            x, st = layer_prefill(layer, x, valid, n_valid, past[ATTENTION_MASK], cos, sin, mine,
                                  self.kernels)
            states.update({state_name(kind, i): v for kind, v in st.items()})
        pair, conf, head = self.prefill_head(x, input_ids, lengths, valid, n_valid,
                                             past[POSITION], cos, sin, past, next_token, sp,
                                             uniforms)
        for name in HEAD_EXTRAS:
            head.pop(name, None)
        return pair, conf, {**states, **head}

    def decode(self, input_pair, past: States, sp: dict[str, torch.Tensor], uniforms):
        """input_pair [B, 2] (the pair emitted last), past states, sp [B], uniforms [B, 2]
        -> pair [B, 2], confidence [B], states."""
        x, mask, cos, sin = self.decode_embed(input_pair, past[ATTENTION_MASK], past[POSITION])
        states: States = {}
        for i, layer in enumerate(self.layers):
            mine = {kind: past[state_name(kind, i)] for kind in LAYER_STATES[layer.block_type]}
            x, st = layer_decode(layer, x, mask, cos, sin, mine, self.kernels)
            states.update({state_name(kind, i): v for kind, v in st.items()})
        pair, conf, head = self.decode_head(x, mask, past[POSITION], cos, sin, past, sp, uniforms)
        for name in HEAD_EXTRAS:
            head.pop(name, None)
        return pair, conf, {**states, **head}


LAYER_STATES = {FULL_ATTENTION: ("key", "value"), "linear_attention": ("conv", "recurrent")}
LAYER_KINDS = frozenset(k for kinds in LAYER_STATES.values() for k in kinds)  # per-layer states
