"""pipo_graphs.tolerance: the one tolerance rule, as export validation and compare use it."""
from __future__ import annotations

import numpy as np

from pipo_export.cli.compare import scaled_atol
from pipo_graphs.tolerance import scale_of, scaled_error


def test_scale_is_at_least_one_and_the_largest_magnitude():
    assert scale_of(np.array([0.25, -0.5])) == 1.0
    assert scale_of(np.array([3.0, -300.0]), np.array([7.0])) == 300.0
    assert scale_of(np.zeros(0, np.float32)) == 1.0


def test_scaled_error_is_relative_above_one_absolute_below():
    ref = np.array([100.0, -200.0])
    assert scaled_error(ref + np.array([0.0, 2.0]), ref) == 2.0 / 200.0
    small = np.array([0.001, 0.002], np.float32)
    assert np.isclose(scaled_error(small + 1e-4, small), 1e-4)


def test_compare_atol_per_output_follows_the_rule():
    steps = [{"key": np.array([1.0, -40.0]), "conf": np.array([0.2]), "pair": np.array([3, 4])},
             {"key": np.array([90.0]), "conf": np.array([0.7])}]
    atol = scaled_atol(steps, 1e-3)
    assert atol == {"": 1e-3, "conf": 1e-3, "key": 1e-3 * 90.0}  # ints are compared exactly
