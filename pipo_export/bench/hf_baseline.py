"""The checkpoint's backbone as a transformers `Qwen3_5ForCausalLM`: what a user would otherwise
run (eager `generate`), and an independent reference for regular-mode exports."""
from __future__ import annotations

import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM

from pipo_export.model.modules import PipoModel


def hf_causal_lm(model: PipoModel) -> Qwen3_5ForCausalLM:
    """A Qwen3_5ForCausalLM sharing `model`'s backbone and lm_head modules (no copy)."""
    with torch.device("meta"):  # no throwaway random weights: the modules are replaced below
        hf = Qwen3_5ForCausalLM(model.config.text)
    hf.model, hf.lm_head = model.model, model.lm_head
    hf.generation_config.pad_token_id = model.config.pad_token_id
    hf.generation_config.eos_token_id = None  # fixed-length generation for timing
    return hf.eval()
