"""Reference decoder: fixture greedy pairs, MTP context, sampling, batching, EOS."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipo_export.model.decoder import GenerateOptions, ReferenceDecoder
from pipo_graphs import SamplingParams

from conftest import run_json

MODES = ("free", "gate", "skip")


def _tau(expected, i, mode):
    return {"free": -1.0, "gate": float(expected[f"gate{i}"]), "skip": 1.0}[mode]


@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize("mode", MODES)
def test_fixture_greedy_pairs_through_cli(tiny_ref, expected, i, mode):
    ids = ",".join(str(t) for t in expected[f"prompt{i}"])
    out = run_json("run", str(tiny_ref), "--backend", "torch", "--temperature", "0", "--ids", ids,
                   "--max-steps", "12", "--threshold", str(_tau(expected, i, mode)))
    assert out["pairs"] == expected[f"greedy{i}_{mode}"].tolist()
    if mode != "skip":  # the skip regime does not run the confidence head
        assert np.abs(np.array(out["confidence"]) - expected[f"greedy{i}_{mode}_conf"]).max() < 1e-4
    else:  # prefill always runs the heads; decode steps skip them (If) when tau >= 1
        assert out["confidence"][1:] == [None] * 11
        assert abs(out["confidence"][0] - expected[f"greedy{i}_{mode}_conf"][0]) < 1e-4
    assert out["tokens"] == [t for p in out["pairs"] for t in p if t != 511]


def test_full_context_decode_equals_teacher_forcing(ref_model, expected):
    """docs/contract.md: each decode-step MTP sees all earlier MTP positions, exactly
    as the teacher-forced forward over the generated sequence (an independent code path)."""
    prompt = expected["prompt1"].tolist()
    out = ReferenceDecoder(ref_model).generate(
        [prompt], GenerateOptions(max_steps=10, threshold=-1.0))[0]
    seq = prompt + [t for p in out.pairs for t in p]
    bl, ml, cf = ref_model.teacher_forced(torch.tensor([seq]))
    first = len(prompt) // 2 - 1  # pair index of the prefill step
    steps = len(out.pairs)
    assert bl[0, first:first + steps].argmax(-1).tolist() == [p[0] for p in out.pairs]
    assert ml[0, first:first + steps].argmax(-1).tolist() == [p[1] for p in out.pairs]
    assert np.abs(cf[0, first:first + steps].numpy() - np.array(out.confidence)).max() < 1e-4


SAMPLED = SamplingParams(temperature=1.0, top_p=0.95, top_k=20, presence_penalty=1.5)


def test_seeded_sampling_is_reproducible(ref_model):
    dec = ReferenceDecoder(ref_model)
    opts = GenerateOptions(max_steps=8, sampling=SAMPLED, seed=7)
    a = dec.generate([[1, 2, 3, 4, 5]], opts)[0].pairs
    assert a == dec.generate([[1, 2, 3, 4, 5]], opts)[0].pairs
    other = dec.generate([[1, 2, 3, 4, 5]], GenerateOptions(max_steps=8, sampling=SAMPLED, seed=8))
    assert other[0].pairs != a


@pytest.mark.parametrize("sampling", [SamplingParams(), SAMPLED], ids=["greedy", "sampled"])
def test_mixed_length_batch_equals_each_alone(ref_model, sampling):
    dec = ReferenceDecoder(ref_model)
    prompts = [[3], [7, 8, 9, 10], list(range(20, 161))]  # 1, 4, 141 tokens (71 pairs: 2 chunks)
    batch = dec.generate(prompts, GenerateOptions(max_steps=6, sampling=sampling, threshold=0.5,
                                                  seed=3))
    for i, prompt in enumerate(prompts):
        alone = dec.generate([prompt], GenerateOptions(max_steps=6, sampling=sampling, seed=3,
                                                       threshold=0.5, seq_offset=i))[0]
        assert batch[i].pairs == alone.pairs
        assert np.allclose(batch[i].confidence, alone.confidence, atol=1e-5)


def test_eos_stops_and_drops_token2(ref_model, expected):
    prompt = expected["prompt0"].tolist()
    pairs = expected["greedy0_skip"].tolist()  # token1s are the backbone's greedy choices
    dec = ReferenceDecoder(ref_model)
    eos = pairs[3][0]  # token1 of step 3 becomes EOS
    out = dec.generate([prompt], GenerateOptions(max_steps=12, threshold=1.0, eos_token_ids=(eos,)))
    assert out[0].finish_reason == "eos" and len(out[0].pairs) == 4
    assert eos not in out[0].tokens and out[0].tokens == [p[0] for p in pairs[:3]]
