"""The tolerance rule, once: errors are measured relative to a tensor's scale,

    scale = max(1, max |reference|)        error = max |got - reference| / scale

because float error grows with a tensor's magnitude (attention keys reach hundreds) while
values near zero (probabilities, masks as floats) still need an absolute floor. Export
validation compares `scaled_error` with its measured noise floor (pipo_export.export.validate);
`compare` turns a relative atol into a per-output absolute one with `scale_of`.
"""
from __future__ import annotations

import numpy as np


def scale_of(*references: np.ndarray) -> float:
    """max(1, largest |value|) over every reference array given (empty arrays count 0)."""
    return max([1.0] + [float(np.abs(r).max(initial=0)) for r in references])


def scaled_error(got: np.ndarray, reference: np.ndarray) -> float:
    """max |got - reference| / scale_of(reference), in float64."""
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(reference, np.float64))
    return float(diff.max(initial=0)) / scale_of(reference)
