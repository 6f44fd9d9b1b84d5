"""In-graph token sampling (traceable torch): the definition every backend reproduces.

All inputs are per row, so one export serves every setting. See pipo_graphs.SamplingParams
for the order of operations.
"""
from __future__ import annotations

import torch

from pipo_graphs.contract import DEFAULT_SAMPLE_CAP, SAMPLING_INPUTS  # noqa: F401 (re-exported)


def sampling_tensors(params, batch: int, threshold: float) -> dict[str, torch.Tensor]:
    """SamplingParams + threshold -> the sampling graph inputs, each [B]."""
    values = dict(vars(params), threshold=threshold)
    return {name: torch.full((batch,), values[name], dtype=getattr(torch, dt))
            for name, dt in SAMPLING_INPUTS}


def add_tokens(mask: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """mask [B, V] bool | tokens [B, N] int64 -> mask with those tokens set (PAD never set)."""
    ones = torch.ones_like(tokens, dtype=torch.int32)
    hits = torch.zeros(mask.shape, dtype=torch.int32, device=mask.device).scatter(1, tokens, ones)
    hits[:, pad_id] = 0
    return mask | (hits > 0)


def penalized(logits: torch.Tensor, sp: dict[str, torch.Tensor], prompt_mask: torch.Tensor,
              output_mask: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> float32 logits after the repetition and presence penalties."""
    logits = logits.float()
    rep = sp["repetition_penalty"][:, None]
    scaled = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(prompt_mask | output_mask, scaled, logits)
    return logits - sp["presence_penalty"][:, None] * output_mask.float()


def candidates(logits: torch.Tensor, sp: dict[str, torch.Tensor], cap: int):
    """Penalized logits [B, V] -> (token ids [B, K] best first, cumulative kept mass [B, K]):
    temperature, top-k, top-p and min-p over the top `cap` candidates."""
    temperature = sp["temperature"]
    scaled = logits / torch.where(temperature > 0, temperature, torch.ones_like(temperature))[:, None]
    values, index = torch.topk(scaled, min(cap, logits.shape[-1]), dim=-1)  # [B, K] descending
    rank = torch.arange(values.shape[-1], device=logits.device)[None]
    top_k = sp["top_k"][:, None]
    keep = (top_k <= 0) | (rank < top_k)
    probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of better candidates
    keep = keep & (before < sp["top_p"][:, None])
    keep = keep & (probs >= sp["min_p"][:, None] * probs[:, :1])
    return index, torch.cumsum(torch.where(keep, probs, torch.zeros_like(probs)), dim=-1)


def sample(logits: torch.Tensor, sp: dict[str, torch.Tensor], prompt_mask: torch.Tensor,
           output_mask: torch.Tensor, u: torch.Tensor, cap: int,
           greedy_branch: bool = False) -> torch.Tensor:
    """Pick one token per row.

    logits [B, V]; sp: sampling inputs [B]; prompt_mask/output_mask [B, V] bool; u [B] uniforms
    in [0, 1); cap: number of top candidates sampled from -> tokens [B] int64.
    greedy_branch: when every row is greedy without penalties, take the argmax alone
    (torch.cond: an ONNX `If`; the same tokens, without the sampler's passes over the vocabulary).
    """
    if not greedy_branch:
        return _sample(logits, sp, prompt_mask, output_mask, u, cap)
    names = sorted(sp)
    plain = ((sp["temperature"] <= 0) & (sp["repetition_penalty"] == 1)
             & (sp["presence_penalty"] == 0)).all()

    def greedy(logits, prompt_mask, output_mask, u, *values):
        return torch.argmax(logits.float(), dim=-1)

    def full(logits, prompt_mask, output_mask, u, *values):
        return _sample(logits, dict(zip(names, values)), prompt_mask, output_mask, u, cap)

    operands = (logits, prompt_mask, output_mask, u, *[sp[n] for n in names])
    return torch.cond(plain, greedy, full, tuple(t.clone() for t in operands))


def _sample(logits, sp, prompt_mask, output_mask, u, cap: int) -> torch.Tensor:
    logits = penalized(logits, sp, prompt_mask, output_mask)
    greedy = torch.argmax(logits, dim=-1)
    index, cdf = candidates(logits, sp, cap)
    target = u[:, None] * cdf[:, -1:]
    pick = (cdf <= target).sum(dim=-1)  # index of the first cdf > u * total
    last = torch.full_like(pick, index.shape[-1] - 1)
    pick = torch.where(pick > last, last, pick)  # Where, not Clip: TensorRT's Clip is float-only
    sampled = torch.gather(index, 1, pick[:, None])[:, 0]
    return torch.where(sp["temperature"] > 0, sampled, greedy)


def gate(token2: torch.Tensor, conf: torch.Tensor, threshold: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The confidence gate (docs/contract.md): tau < 0 commits, 0 <= tau < 1 pads where
    conf < tau, tau >= 1 pads. [B]."""
    commit = (threshold < 0) | ((conf >= threshold) & (threshold < 1))
    return torch.where(commit, token2, torch.full_like(token2, pad_id))
