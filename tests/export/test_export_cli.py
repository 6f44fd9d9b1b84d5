"""Export command behaviour that needs no full trace: refusing to overwrite, atomic output."""
from __future__ import annotations

import pytest

from pipo_export import ExportError
from pipo_export.fsutil import atomic_dir
from pipo_export.export.lowering.standard import chunk_rule_scan, recurrent_step

from conftest import TINY_REF, run_cli


def test_existing_out_needs_force(tmp_path):
    (tmp_path / "out").mkdir()
    proc = run_cli("export", str(TINY_REF), "-o", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("exc", [ExportError("boom"), KeyboardInterrupt()])
def test_failure_or_ctrl_c_leaves_nothing(tmp_path, exc):
    with pytest.raises(type(exc)):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "prefill_compress.onnx").write_text("partial")
            raise exc
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_previous(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("x")
    with atomic_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "new").write_text("y")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("length", [1, 2, 11, 64, 65, 200])
def test_standard_lowering_matches_transformers(length):
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule
    g = torch.Generator().manual_seed(length)
    q, k = torch.randn(2, length, 2, 16, generator=g), torch.randn(2, length, 2, 16, generator=g)
    v = torch.randn(2, length, 4, 16, generator=g)
    decay, beta = -torch.rand(2, length, 4, generator=g) * 2, torch.rand(2, length, 4, generator=g)
    want, want_state = torch_recurrent_gated_delta_rule(
        q, k, v, g=decay, beta=beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
    got, state = chunk_rule_scan(q, k, v, decay, beta)
    assert (got - want).abs().max() < 1e-5 and (state - want_state).abs().max() < 1e-5
    step_out, step_state = recurrent_step(q[:, :1], k[:, :1], v[:, :1], decay[:, :1], beta[:, :1],
                                          want_state)
    ref_out, ref_state = torch_recurrent_gated_delta_rule(
        q[:, :1], k[:, :1], v[:, :1], g=decay[:, :1], beta=beta[:, :1], initial_state=want_state,
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert (step_out - ref_out).abs().max() < 1e-6 and (step_state - ref_state).abs().max() < 1e-6


@pytest.mark.parametrize("correlation", [0.0, 0.9, 0.99])
def test_chunk_inverse_is_stable_for_correlated_keys(correlation):
    """Real models have strongly correlated keys inside a chunk; a Neumann-series inverse
    loses all precision there (error 4e6 at 0.9), block inversion must not."""
    import torch
    from pipo_export.export.lowering.standard import _unit_lower_inverse
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 4, 2, 1, 32, generator=g)
    k = correlation * base + (1 - correlation) * torch.randn(1, 4, 2, 64, 32, generator=g)
    k = k / k.norm(dim=-1, keepdim=True)
    beta = torch.rand(1, 4, 2, 64, generator=g) * 0.5 + 0.5
    cum = (-torch.rand(1, 4, 2, 64, generator=g) * 0.05).cumsum(-1)
    a = ((k * beta[..., None]) @ k.transpose(-1, -2)) * (cum[..., :, None] - cum[..., None, :]).exp()
    lower = torch.arange(64)[:, None] > torch.arange(64)[None, :]
    exact = torch.linalg.inv(torch.where(lower, a, torch.zeros_like(a)).double()
                             + torch.eye(64, dtype=torch.float64))
    assert (_unit_lower_inverse(a).double() - exact).abs().max() < 1e-5
