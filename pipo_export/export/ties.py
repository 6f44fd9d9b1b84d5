"""Token comparisons that do not cry wolf: record the reference's sampling calls, and accept a
differing token only where the float64 reference itself is at a near-tie."""
from __future__ import annotations

import numpy as np
import torch


class SampleRecorder:
    """Records every `sample` call of the reference step (a reversible patch, optimum style)."""

    MODULES = ("pipo_export.model.steps", "pipo_export.model.regular")

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
                    threshold: np.ndarray, pad_id: int, eps: float, draws: int = 16) -> bool:
    """True when every differing token is one the float64 reference could also have picked:
    its logits nudged by Gaussian noise of eps x max|logits| (a few draws) give the export's
    token, or (token2 PAD vs not) its confidence is within eps of the gate threshold.
    calls: the reference's `sample` calls this step, in slot order (token1, token2)."""
    from pipo_export.model.sampling import sample
    gen = torch.Generator().manual_seed(0)
    for row, slot in zip(*np.nonzero(got_pair != ref_pair)):
        if slot == 1 and pad_id in (got_pair[row, 1], ref_pair[row, 1]):
            if abs(float(conf[row]) - float(threshold[row])) <= eps:
                continue
            return False
        if slot >= len(calls):
            return False
        logits, sp, prompt_mask, output_mask, u, cap = calls[slot]
        one = lambda t: t[row:row + 1]  # noqa: E731
        row_sp = {k: one(v) for k, v in sp.items()}
        scale = eps * float(logits[row].abs().max())
        if not any(int(sample(one(logits) + scale * torch.randn(one(logits).shape, generator=gen,
                                                                   dtype=logits.dtype),
                              row_sp, one(prompt_mask), one(output_mask), one(u), cap)[0])
                   == int(got_pair[row, slot]) for _ in range(draws)):
            return False
    return True
