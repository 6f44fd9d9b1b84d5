"""The PIPO torch model: transformers' Qwen3.5 backbone plus compressor, MTP and confidence head.

Checkpoint keys line up with module names: ``model.*`` (backbone), ``compressor.*``, ``mtp.*``,
``confidence_head.*``, ``lm_head.weight`` (absent when tied).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen3_5.modeling_qwen3_5 import (Qwen3_5DecoderLayer, Qwen3_5RMSNorm,
                                                          Qwen3_5TextModel)

from pipo_export.model.config import CompressorType, PipoConfig


class Compressor(nn.Module):
    """Folds a token pair into one latent: [e_2i ; e_2i+1] -> c_i."""

    def __init__(self, hidden: int, kind: CompressorType):
        super().__init__()
        self.kind = kind
        if kind == CompressorType.MLP:
            self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.SiLU(),
                                     nn.Linear(2 * hidden, hidden))
        else:
            self.linear = nn.Linear(2 * hidden, hidden)

    def forward(self, pair_embeds: torch.Tensor) -> torch.Tensor:
        """pair_embeds [B, L, 2H] -> latents [B, L, H]."""
        return self.mlp(pair_embeds) if self.kind == CompressorType.MLP else self.linear(pair_embeds)


class MtpHead(nn.Module):
    """x = fc([norm_e(embed(tok)) ; norm_h(h)]) -> one full-attention decoder layer -> norm."""

    def __init__(self, cfg: PipoConfig):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.text.rms_norm_eps
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = Qwen3_5RMSNorm(h, eps=eps)
        self.pre_fc_norm_hidden = Qwen3_5RMSNorm(h, eps=eps)
        self.layers = nn.ModuleList([Qwen3_5DecoderLayer(cfg.mtp_text_config(), 0)])
        self.norm = Qwen3_5RMSNorm(h, eps=eps)

    def fuse(self, token_embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """token_embeds [B, L, H], hidden [B, L, H] -> decoder-layer input [B, L, H]."""
        return self.fc(torch.cat([self.pre_fc_norm_embedding(token_embeds),
                                  self.pre_fc_norm_hidden(hidden)], dim=-1))


class ConfidenceHead(nn.Module):
    """conf = sigmoid(fc2(SiLU(fc1(RMSNorm_2H([h ; m])))))."""

    def __init__(self, cfg: PipoConfig):
        super().__init__()
        h = cfg.hidden_size
        self.norm = Qwen3_5RMSNorm(2 * h, eps=cfg.text.rms_norm_eps)
        self.fc1 = nn.Linear(2 * h, h, bias=False)
        self.fc2 = nn.Linear(h, 1, bias=False)

    def forward(self, hidden: torch.Tensor, mtp_out: torch.Tensor) -> torch.Tensor:
        """hidden [..., H], mtp_out [..., H] -> confidence [...] in (0, 1), float32."""
        x = self.norm(torch.cat([hidden, mtp_out], dim=-1))
        return torch.sigmoid(self.fc2(F.silu(self.fc1(x))).float())[..., 0]


class PipoModel(nn.Module):
    """A PIPO model. Build with `load_checkpoint`; the cached step functions live in `forward`."""

    def __init__(self, cfg: PipoConfig):
        super().__init__()
        assert cfg.compressor_type is not None, "compressor_type must be resolved before building"
        self.config = cfg
        self.model = Qwen3_5TextModel(cfg.text)
        self.compressor = Compressor(cfg.hidden_size, cfg.compressor_type)
        self.mtp = MtpHead(cfg)
        self.confidence_head = ConfidenceHead(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def compress(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (T even) -> pair latents [B, T/2, H]."""
        b, t = input_ids.shape
        emb = self.model.embed_tokens(input_ids)  # [B, T, H]
        return self.compressor(emb.reshape(b, t // 2, 2 * emb.shape[-1]))

    def pair_forward(self, input_ids: torch.Tensor):
        """The training forward (differentiable) through transformers' own modules, no caches:
        every pair teacher forced. Training and validation (`teacher_forced`) share it.

        input_ids [B, T], T even -> backbone_logits [B, L, V], mtp_logits [B, L-1, V],
        confidence [B, L-1] with L = T/2. Backbone hidden h_i predicts t_2i+2; the MTP at pair
        i reads the true t_2i+2 and h_i and predicts t_2i+3; confidence(h_i, m_i).
        """
        b, t = input_ids.shape
        if t % 2 or t < 4:
            raise ValueError(f"teacher_forced needs an even length >= 4, got {t}")
        latents = self.compress(input_ids)  # [B, L, H]
        hidden = self.model(inputs_embeds=latents, use_cache=False).last_hidden_state  # [B, L, H]
        backbone_logits = self.lm_head(hidden)
        n = hidden.shape[1] - 1
        x = self.mtp.fuse(self.model.embed_tokens(input_ids[:, 2::2]), hidden[:, :n])  # [B, n, H]
        positions = torch.arange(n, device=x.device)[None].expand(b, n)
        pos_emb = self.model.rotary_emb(x, positions)
        causal = torch.full((n, n), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        m = self.mtp.layers[0](x, position_embeddings=pos_emb, attention_mask=causal[None, None])
        m = self.mtp.norm(m)
        return backbone_logits, self.lm_head(m), self.confidence_head(hidden[:, :n], m)

    @torch.no_grad()
    def teacher_forced(self, input_ids: torch.Tensor):
        """`pair_forward` without gradients: input_ids [B, T], T even -> backbone_logits
        [B, L, V], mtp_logits [B, L-1, V], confidence [B, L-1] with L = T/2."""
        return self.pair_forward(input_ids)
