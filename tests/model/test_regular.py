"""Regular decoding (`export --mode regular`): the baseline equals transformers' own generate."""
from __future__ import annotations

import json

import pytest
import torch

from pipo_export.model.decoder import GenerateOptions, ReferenceDecoder
from pipo_export.bench.hf_baseline import hf_causal_lm
from pipo_export.model.regular import RegularStep
from pipo_runtime import GenerationConfig, PipoSession

from conftest import run_cli

PROMPTS = [[5, 17, 300], list(range(40, 51)), list(range(7, 137))]  # 3, 11, 130 tokens


def _hf_greedy(ref_model, prompt, n):
    hf = hf_causal_lm(ref_model)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def hf_tokens(ref_model):
    return [_hf_greedy(ref_model, p, 8) for p in PROMPTS]


def test_regular_step_equals_transformers_generate(ref_model, hf_tokens):
    dec = ReferenceDecoder(ref_model)
    dec.step = RegularStep(ref_model)
    outs = dec.generate(PROMPTS, GenerateOptions(max_steps=8))  # one batch, mixed lengths
    for out, want in zip(outs, hf_tokens):
        assert out.tokens == want
        assert all(p[1] == ref_model.config.pad_token_id for p in out.pairs)


def test_regular_export_runs_like_transformers(regular_export, hf_tokens):
    manifest = json.loads((regular_export / "manifest.json").read_text())
    assert manifest["export"]["mode"] == "regular"
    assert not any(s["name"].startswith("mtp_") for s in manifest["states"])
    assert "export OK" in run_cli("check", str(regular_export)).stdout
    session = PipoSession.load(regular_export)
    result = session.generate(PROMPTS, GenerationConfig(max_new_tokens=8))
    assert [s.tokens for s in result.sequences] == hf_tokens
    assert all(s.commit_rate == 0 for s in result.sequences)
