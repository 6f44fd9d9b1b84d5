"""The accuracy an int8/int4 export gives up, measured against its float32 twin.

The twin is the same pieces without the MatMulNBits rewrite, with float32 weights written to a
temporary file beside the export. Both score one window of 130 seeded random tokens teacher
forced (64 pair positions) with `pipo-export eval`'s own code (pipo_export.eval: the graphs'
token1/token2 logits and confidence, the same metrics), the twin as the reference. Recorded:
KL(twin || quantized) of token 1 and token 2 (mean, percentiles, max), their top-1 agreement,
ln(PPL/PPL_twin) and the gate's commit rate at tau 0.5 beside the twin's.
"""
from __future__ import annotations

import numpy as np

from pipo_export.eval.graphs import eval_sessions, score_sessions
from pipo_export.eval.metrics import Accumulator, Scores

TOKENS = 130  # 65 pairs: 64 scored positions
TWIN_BUDGET = 8 << 30  # bytes of float32 weights the comparison may write and map


def accuracy_ids(vocab: int, pad: int) -> np.ndarray:
    """The scored window [1, TOKENS]: seeded random ids, PAD never among them."""
    ids = np.random.default_rng(64).integers(0, vocab - 1, (1, TOKENS)).astype(np.int64)
    ids[ids == pad] = 0
    return ids


def compare_twins(float_paths: dict, quant_paths: dict, vocab: int, pad: int) -> dict:
    """float_paths / quant_paths: graph name -> .onnx of each twin -> the accuracy record."""
    ids = accuracy_ids(vocab, pad)
    twin = eval_sessions(float_paths, vocab, prepack=False)
    reference = Scores.from_logits(*score_sessions(twin, ids))
    del twin
    quant = eval_sessions(quant_paths, vocab, prepack=True)
    acc = Accumulator()
    acc.add(ids, Scores.from_logits(*score_sessions(quant, ids)), reference)
    s = acc.summary(taus=(0.5,))
    ref, gate = s["reference"], s["gate"]["taus"][0]
    return {"reference": "float32 twin of the same pieces", "tokens": TOKENS,
            "steps": s["positions"], "teacher_forced": True, "kl": ref["kl"],
            "ln_ppl_ratio": ref["ln_ppl_ratio"],
            "token1_agreement": ref["top1_agreement"]["token1"],
            "token2_agreement": ref["top1_agreement"]["token2"],
            "commit_rate_tau_0.5": gate["commit_rate"],
            "twin_commit_rate_tau_0.5": gate["reference_commit_rate"]}
