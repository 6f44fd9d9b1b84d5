"""The accuracy an int8/int4 export gives up, measured against its float32 twin.

The twin is the same pieces without the MatMulNBits rewrite, with float32 weights written to a
temporary file beside the export. Both run a 64-token prompt and 63 decode steps, greedy with
token2 always kept, teacher forced on the twin's pairs (so one early disagreement does not
decide every later step). Reported: the largest token1 logit error (absolute, and relative to
the twin's largest |logit|), and the fraction of steps whose token1 / token2 agree.
"""
from __future__ import annotations

import numpy as np

from pipo_graphs import SamplingParams
from pipo_graphs.contract import (DECODE, INPUT_IDS, INPUT_PAIR, LENGTHS, PAIR, PREFILL,
    UNIFORMS, present_to_past)
from pipo_runtime.requests import empty_past, ort_inputs, sampling_feeds

PROMPT_TOKENS, STEPS = 64, 64
TWIN_BUDGET = 8 << 30  # bytes of float32 weights the comparison may write and map


def _greedy_feeds(vocab: int, pad: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(64)
    sampling = sampling_feeds(SamplingParams(), -1.0, 1)  # greedy, every token2 kept
    ids = rng.integers(0, vocab - 1, (1, PROMPT_TOKENS)).astype(np.int64)
    ids[ids == pad] = 0
    feeds = {INPUT_IDS: ids, LENGTHS: np.array([PROMPT_TOKENS], np.int64), **sampling,
             UNIFORMS: np.zeros((1, 2), np.float32)}
    return feeds, sampling


def compare_twins(float_sessions: dict, quant_sessions: dict, vocab: int, pad: int,
                  logits_name: str) -> dict:
    """Run both (sessions per graph) teacher forced on the float twin's pairs."""
    feeds, sampling = _greedy_feeds(vocab, pad)
    runs = {name: (sessions, {**feeds, **empty_past(ort_inputs(sessions[PREFILL]), 1)})
            for name, sessions in (("float", float_sessions), ("quant", quant_sessions))}
    worst, scale, agree = 0.0, 0.0, np.zeros(2)
    for step in range(STEPS):
        out = {}
        for name, (sessions, step_feeds) in runs.items():
            sess = sessions[PREFILL if step == 0 else DECODE]
            names = [o.name for o in sess.get_outputs()]
            out[name] = dict(zip(names, sess.run(names, step_feeds)))
        f, q = out["float"], out["quant"]
        worst = max(worst, float(np.abs(f[logits_name] - q[logits_name]).max()))
        scale = max(scale, float(np.abs(f[logits_name]).max()))
        agree += (f[PAIR] == q[PAIR])[0]
        for name in runs:  # both continue from the float twin's pair
            runs[name] = (runs[name][0], {INPUT_PAIR: f[PAIR], **present_to_past(out[name]),
                                          **sampling, UNIFORMS: np.zeros((1, 2), np.float32)})
    return {"reference": "float32 twin of the same pieces", "prompt_tokens": PROMPT_TOKENS,
            "steps": STEPS, "teacher_forced": True, "max_logit_error": worst,
            "max_logit_error_relative": worst / max(scale, 1e-30),
            "token1_agreement": float(agree[0] / STEPS),
            "token2_agreement": float(agree[1] / STEPS)}
