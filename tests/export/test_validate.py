"""Export validation: a token may differ from the float64 reference only at a near-tie."""
from __future__ import annotations

import copy

import numpy as np
import torch

from pipo_export.export.ties import near_tie_tokens

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


def test_sampled_token_at_a_cdf_boundary_accepted_far_rejected():
    """Temperature 1 over four candidates; u sits on the boundary between candidates 1 and 2."""
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9]],
                                    dtype=torch.float64))
    call = _call(logits, temperature=1.0, u=0.7 - 1e-6)  # target just below cdf 0.7: token 1
    ref, conf, thr = np.array([[1, PAD]]), np.array([0.9]), np.array([0.5])
    assert near_tie_tokens([call], np.array([[2, PAD]]), ref, conf, thr, PAD, eps=1e-4)
    assert not near_tie_tokens([call], np.array([[3, PAD]]), ref, conf, thr, PAD, eps=1e-4)


def test_token2_after_a_near_tie_token1_is_not_compared_but_after_a_real_error_fails():
    tie = torch.tensor([[0.0, 3.0, 3.0 + 1e-7, 1.0, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    clear = torch.tensor([[0.0, 3.0, 5.0, 1.0, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    conf, thr = np.array([0.9]), np.array([0.5])
    ref, got = np.array([[2, 3]]), np.array([[1, 7]])  # token2 follows a different token1
    assert near_tie_tokens([_call(tie), _call(clear)], got, ref, conf, thr, PAD, eps=1e-3)
    assert not near_tie_tokens([_call(clear), _call(clear)], got, ref, conf, thr, PAD, eps=1e-3)
    same1 = np.array([[2, 7]])  # same token1: token2 is judged on its own logits
    assert not near_tie_tokens([_call(tie), _call(clear)], same1, ref, conf, thr, PAD, eps=1e-3)


# -- the export's own validation: passes honest exports, fails real bugs --------------------
import pytest  # noqa: E402

from pipo_export import ExportError  # noqa: E402
from pipo_export.export import pipeline  # noqa: E402
from pipo_export.export.lowering import Lowering, lowering_for  # noqa: E402
from pipo_export.model.layers import attention  # noqa: E402
from pipo_export.model.synthetic import TINY_TEXT_CONFIG, TinyLayout, write_tiny_checkpoint  # noqa: E402

from conftest import TINY_REF, export_folder  # noqa: E402


class _View:
    """A TensorSource view whose get() the test rewrites (the bug being injected)."""

    def __init__(self, source, get):
        self.source, self._get = source, get

    def __getattr__(self, name):
        return getattr(self.source, name)

    def get(self, name):
        return self._get(self.source, name)


def _inject_weights(monkeypatch, get):
    """Make the export write weights through `get` (validation still reads the checkpoint)."""
    real = pipeline.write_weights

    def write(reader, *a, **k):
        bad = copy.copy(reader)  # a WeightReader over the rewritten source, for writing only
        bad.source = _View(reader.source, get)
        return real(bad, *a, **k)

    monkeypatch.setattr(pipeline, "write_weights", write)


def _noisy(source, name):
    t = source.get(name)
    if t.is_floating_point() and t.ndim == 2:
        g = torch.Generator().manual_seed(len(name))
        t = t * (1 + 0.01 * torch.randn(t.shape, generator=g, dtype=t.dtype))
    return t


def _swapped(source, name):
    """Layers 0 and 1 (both Gated DeltaNet in pipo-tiny-ref) trade weights."""
    for a, b in (("model.layers.0.", "model.layers.1."), ("model.layers.1.", "model.layers.0.")):
        if name.startswith(a):
            return source.get(b + name[len(a):])
    return source.get(name)


@pytest.mark.parametrize("bug", ["one-percent-weight-noise", "two-layers-swapped"])
def test_validation_fails_on_wrong_weights(tmp_path, monkeypatch, trace_cache, bug):
    _inject_weights(monkeypatch, _noisy if bug.startswith("one") else _swapped)
    with pytest.raises(ExportError, match="validation failed"):
        export_folder(tmp_path / "out", TINY_REF, trace_cache)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def _interleaved_rope_attention(attn, x, cos, sin, past_k, past_v, mask):
    """The classic RoPE bug: cos/sin tables laid out for interleaved pairs, used with the
    rotate-half rotation Qwen3.5 uses."""
    half = cos.shape[-1] // 2
    return attention(attn, x, cos[..., :half].repeat_interleave(2, -1),
                     sin[..., :half].repeat_interleave(2, -1), past_k, past_v, mask)


def test_validation_fails_on_a_wrong_rotary_layout(tmp_path, monkeypatch, trace_cache):
    good = lowering_for("tensorrt")
    from dataclasses import replace
    bad = Lowering("standard-interleaved-rope-bug",
                   replace(good.kernels, attention=_interleaved_rope_attention))
    monkeypatch.setattr(pipeline, "lowering_for", lambda target: bad)
    with pytest.raises(ExportError, match="validation failed"):
        export_folder(tmp_path / "out", TINY_REF, trace_cache, target="tensorrt")


MROPE_SIX_LAYERS = dict(
    TINY_TEXT_CONFIG, num_hidden_layers=6, head_dim=32,
    layer_types=["linear_attention", "linear_attention", "full_attention"] * 2,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                     "mrope_section": [2, 1, 1], "mrope_interleaved": True})


def test_validation_passes_a_layout_no_other_test_uses(tmp_path, trace_cache):
    """6 layers, linear compressor, mrope rope parameters, multimodal config: the layout whose
    correct export the old float64-vs-export validation refused (present.key.4 off by 6e-4)."""
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", TinyLayout(multimodal=True, compressor="linear"),
                                 seed=5, text_config=MROPE_SIX_LAYERS)
    out = export_folder(tmp_path / "out", ckpt, trace_cache)
    import json
    v = json.loads((out / "manifest.json").read_text())["export"]["validation"]
    assert v["compared"] > 6 * 2 * 3 and v["worst"]["error"] <= v["worst"]["limit"]
