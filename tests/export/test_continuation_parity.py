"""Contract 1.1 parity: a prefill that continues states (after two decode steps, over caches
with holes; one row a chunk that is not its prompt's last, next_token >= 0) against the whole
torch model in float64, for both targets in ONNX Runtime. Tolerance: the export validation's
rule (pipo_graphs.tolerance.scaled_error within NOISE_FACTOR x torch's own float32 error, at
least the float32 floor); tokens, masks and positions equal."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from pipo_export import load_checkpoint
from pipo_export.export.validate import FLOOR, NOISE_FACTOR, continuation_feeds, \
    validation_feeds
from pipo_export.model.steps import PipoStep
from pipo_graphs.contract import PAST, PRESENT, UNIFORMS
from pipo_graphs.tolerance import scaled_error
from pipo_runtime.requests import empty_past

from conftest import TINY_REF
from parity import OrtGraph, graph_past, reference_step, run_torch_decode, run_torch_prefill


@pytest.mark.parametrize("target", ["ort", "trt"])
@pytest.mark.parametrize("lengths,new", [((11, 2, 261), (5, 1, 140)), ((3,), (64,))],
                         ids=["batch3", "chunk"])
def test_continued_prefill_matches_torch(request, target, lengths, new):
    folder = request.getfixturevalue(f"{target}_export")
    model = load_checkpoint(TINY_REF)
    vocab, pad = model.config.vocab_size, model.config.pad_token_id
    ref64, ref32 = reference_step(model), PipoStep(copy.deepcopy(model))
    prefill = OrtGraph(folder / "prefill_compress.onnx")
    feeds, sampling, uniforms = validation_feeds(vocab, pad, lengths)
    ref = run_torch_prefill(ref64, {**empty_past(prefill.inputs, len(lengths)), **feeds})
    for step in (1, 2):  # decode steps: caches gain slots, the short rows keep their holes
        ref = run_torch_decode(ref64, {"input_pair": ref["pair"], **sampling,
                                       UNIFORMS: uniforms(step), **graph_past(ref)})
    past = {PRESENT + k[len(PAST):]: v for k, v in graph_past(ref).items()}
    cont = continuation_feeds(vocab, pad, past, sampling, uniforms, new)
    want, noisy, got = (run_torch_prefill(ref64, cont), run_torch_prefill(ref32, cont),
                        prefill.infer(cont))
    assert set(want) <= set(got)
    for name, value in want.items():
        if value.dtype.kind != "f":
            np.testing.assert_array_equal(got[name], value, err_msg=name)
            continue
        limit = max(NOISE_FACTOR * scaled_error(noisy[name], value), FLOOR["float32"])
        assert scaled_error(got[name], value) <= limit, name
    assert want["present.attention_mask"].shape[1] == ref["present.attention_mask"].shape[1] \
        + (max(new) + 1) // 2
