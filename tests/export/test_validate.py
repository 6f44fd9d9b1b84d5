"""Export validation: a token may differ from the float64 reference only at a near-tie."""
from __future__ import annotations

import numpy as np
import torch

from pipo_export.export.validate import near_tie_tokens

PAD = 9


def _call(logits, temperature=0.0, u=0.5):
    b = logits.shape[0]
    sp = {"temperature": torch.full((b,), temperature, dtype=torch.float64),
          "top_k": torch.zeros(b, dtype=torch.long), "top_p": torch.ones(b, dtype=torch.float64),
          "min_p": torch.zeros(b, dtype=torch.float64),
          "presence_penalty": torch.zeros(b, dtype=torch.float64),
          "repetition_penalty": torch.ones(b, dtype=torch.float64),
          "threshold": torch.full((b,), 0.5, dtype=torch.float64)}
    masks = torch.zeros(b, logits.shape[1], dtype=torch.bool)
    return (logits, sp, masks, masks, torch.full((b,), u, dtype=torch.float64), 16)


def test_greedy_near_tie_accepted_clear_gap_rejected():
    logits = torch.tensor([[0.0, 3.0, 3.0 + 1e-7, 1.0, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    ref = np.array([[2, PAD]])
    got = np.array([[1, PAD]])  # the export picked the other half of the tie
    conf, thr = np.array([0.9]), np.array([0.5])
    assert near_tie_tokens([_call(logits)], got, ref, conf, thr, PAD, eps=1e-3)
    clear = logits.clone()
    clear[0, 2] = 3.5
    assert not near_tie_tokens([_call(clear)], got, ref, conf, thr, PAD, eps=1e-3)


def test_gate_near_threshold_accepted():
    logits = torch.tensor([[0.0, 5.0, 1.0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    calls = [_call(logits), _call(logits)]
    ref, got = np.array([[1, PAD]]), np.array([[1, 1]])  # token2 kept vs dropped
    assert near_tie_tokens(calls, got, ref, np.array([0.50001]), np.array([0.5]), PAD, eps=1e-3)
    assert not near_tie_tokens(calls, got, ref, np.array([0.6]), np.array([0.5]), PAD, eps=1e-3)
