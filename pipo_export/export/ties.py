"""Token comparisons that do not cry wolf: record the reference's sampling calls, and accept a
differing token only where the float64 reference itself is at a near-tie."""
from __future__ import annotations

import numpy as np


class SampleRecorder:
    """Records every `sample` call of the reference step (a reversible patch, optimum style)."""

    MODULES = ("pipo_export.model.steps",)  # PipoStep.pick (RegularStep inherits it)

    def __enter__(self) -> list:
        import importlib
        from pipo_export.model import sampling
        self.calls, self.saved = [], []

        def recording(*args):
            self.calls.append(args)
            return sampling.sample(*args)

        for name in self.MODULES:
            module = importlib.import_module(name)
            self.saved.append((module, module.sample))
            module.sample = recording
        return self.calls

    def __exit__(self, *exc):
        for module, fn in self.saved:
            module.sample = fn


def near_tie_tokens(calls: list, got_pair: np.ndarray, ref_pair: np.ndarray, conf: np.ndarray,
                    threshold: np.ndarray, pad_id: int, eps: float) -> bool:
    """True when every differing token is one the float64 reference could also have picked
    with its logits off by up to `eps` x max|logits| of the row:
    - greedy: the export's token's penalized logit is within 2 x that of the reference's best;
    - sampled: the export's token is a candidate whose cumulative-probability interval lies
      within 2 x that (as probability mass, divided by the temperature) of the slot's target
      u x total;
    - token2 kept vs PAD: the confidence is within eps of the gate threshold;
    - token2 of a row whose token1 differed (at a near-tie): not comparable (the MTP head reads
      token1), so accepted.
    calls: the reference's `sample` calls this step, in slot order (token1, token2)."""
    from pipo_export.model.sampling import candidates, penalized
    for row, slot in zip(*np.nonzero(got_pair != ref_pair)):
        if slot == 1 and got_pair[row, 0] != ref_pair[row, 0]:
            continue  # token2 is conditioned on token1: after a near-tie token1 it cannot compare
        if slot == 1 and pad_id in (got_pair[row, 1], ref_pair[row, 1]):
            if abs(float(conf[row]) - float(threshold[row])) <= eps:
                continue
            return False
        if slot >= len(calls):
            return False
        logits, sp, prompt_mask, output_mask, u, cap = calls[slot][:6]
        one = lambda t: t[row:row + 1]  # noqa: E731
        row_sp = {k: one(v) for k, v in sp.items()}
        scores = penalized(one(logits), row_sp, one(prompt_mask), one(output_mask))[0]
        margin = 2 * eps * float(one(logits).abs().max())
        want, got = int(ref_pair[row, slot]), int(got_pair[row, slot])
        temperature = float(row_sp["temperature"][0])
        if temperature <= 0:
            if float(scores[want] - scores[got]) > margin:
                return False
            continue
        index, cdf = candidates(scores[None], row_sp, cap)
        where = (index[0] == got).nonzero()
        if not len(where):
            return False
        k = int(where[0, 0])
        lo, hi = (float(cdf[0, k - 1]) if k else 0.0), float(cdf[0, k])
        target = float(one(u)[0]) * float(cdf[0, -1])
        if max(lo - target, target - hi, 0.0) > margin / temperature:
            return False
    return True
