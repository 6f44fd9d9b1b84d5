"""pipo_runtime: PipoSession on every backend, streaming, batching, and running without torch."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipo_runtime import Backend, GenerationConfig, PipoSession, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
SAMPLED = SamplingParams(temperature=1.0, top_p=0.95, top_k=20, presence_penalty=1.5)
MODES = ("free", "gate", "skip")


def _tau(expected, i, mode) -> float:
    return {"free": -1.0, "gate": float(expected[f"gate{i}"]), "skip": 1.0}[mode]


RUNS = {"ort-contrib": (Backend.ONNXRUNTIME, "ort"), "ort-standard": (Backend.ONNXRUNTIME, "trt"),
        "onnx-reference": (Backend.ONNX_REFERENCE, "trt")}  # onnx's evaluator: standard ops only


@pytest.fixture(scope="module")
def sessions(ort_export, trt_export):
    folders = {"ort": ort_export, "trt": trt_export}
    out = {run: PipoSession.load(folders[f], backend=b) for run, (b, f) in RUNS.items()}
    yield out
    for s in out.values():
        s.close()


@pytest.mark.parametrize("run", list(RUNS))
def test_fixture_greedy_pairs_exact(sessions, expected, run):
    """expected.npz (the authors' generator): 2 prompts x 3 gate regimes, 12 pairs each."""
    session, backend = sessions[run], run
    for i in (0, 1):
        for mode in MODES:
            config = GenerationConfig(max_steps=12, threshold=_tau(expected, i, mode))
            seq = session.generate([expected[f"prompt{i}"].tolist()], config).sequences[0]
            assert seq.pairs == expected[f"greedy{i}_{mode}"].tolist(), (backend, i, mode)


def test_seeded_sampling_identical_on_three_backends(trt_export):
    prompts = [[5, 9, 13], list(range(100, 171)), [300]]
    config = GenerationConfig(max_steps=10, threshold=0.4, sampling=SAMPLED, seed=23)
    results = {}
    for backend in (Backend.TORCH, Backend.ONNXRUNTIME, Backend.ONNX_REFERENCE):
        session = PipoSession.load(trt_export, backend=backend)
        results[backend] = session.generate(prompts, config).sequences
        session.close()
    ref = results[Backend.TORCH]
    assert any(p[1] == 511 for s in ref for p in s.pairs), "gate never dropped a token2"
    for backend, seqs in results.items():
        for a, b in zip(ref, seqs):
            assert a.pairs == b.pairs, backend
            assert a.tokens == b.tokens, backend
            # float32 graphs vs the float32 torch reference
            np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-4)


def test_stream_yields_exactly_what_generate_returns(sessions):
    session = sessions["ort-contrib"]
    prompts = [[5, 17, 300, 42, 7], list(range(20, 60))]
    config = GenerationConfig(max_steps=9, threshold=0.5, sampling=SAMPLED, seed=4)
    streamed = [[] for _ in prompts]
    steps = []
    for event in session.stream(prompts, config):
        streamed[event.row].extend(event.tokens)
        steps.append(event.step)
    assert steps == sorted(steps) and len(set(steps)) == 9
    result = session.generate(prompts, config)
    assert [s.tokens for s in result.sequences] == streamed
    assert all(len(s.tokens) >= 9 for s in result.sequences)


def test_text_stream_and_stop_string(layout_export):
    """With tokenizer.json in the export: text prompts, text deltas that add up, stop strings."""
    session = PipoSession.load(layout_export)
    config = GenerationConfig(max_steps=12, threshold=0.3, sampling=SAMPLED, seed=2)
    stream = session.stream("The exporter writes", config)
    deltas = "".join(e.text for e in stream)
    seq = stream.result.sequences[0]
    assert seq.text and deltas == seq.text
    stop = seq.text[len(seq.text) // 2:][:3]
    cut = session.generate("The exporter writes",
                           GenerationConfig(max_steps=12, threshold=0.3, sampling=SAMPLED,
                                            seed=2, stop_strings=(stop,))).sequences[0]
    assert cut.finish_reason == "stop" and cut.text == seq.text[:seq.text.find(stop)]
    session.close()


def test_mixed_batch_equals_each_prompt_alone(sessions):
    session = sessions["ort-contrib"]
    prompts = [[5, 17, 300], list(range(40, 51)), list(range(7, 140)), [99, 98]]
    config = dict(max_steps=10, threshold=0.5, sampling=SAMPLED, seed=8)
    batch = session.generate(prompts, GenerationConfig(**config)).sequences
    for row, prompt in enumerate(prompts):
        # seq_offset gives the lone prompt the batch row's random stream
        alone = session.generate([prompt], GenerationConfig(**config, seq_offset=row)).sequences[0]
        assert alone.pairs == batch[row].pairs, row
        # float32: batch size changes MLAS's GEMM blocking, so sums round differently
        np.testing.assert_allclose(alone.confidence, batch[row].confidence, atol=1e-4)


def test_max_new_tokens_and_stop_ids(sessions):
    session = sessions["ort-contrib"]
    full = session.generate([[5, 17, 300]], GenerationConfig(max_steps=8)).sequences[0]
    seq = session.generate([[5, 17, 300]], GenerationConfig(max_new_tokens=5)).sequences[0]
    assert seq.tokens == full.tokens[:5] and seq.finish_reason == "length"
    stop = full.tokens[6]
    seq = session.generate([[5, 17, 300]], GenerationConfig(max_steps=8, stop_token_ids=(stop,)))
    seq = seq.sequences[0]
    assert seq.finish_reason == "stop" and seq.tokens == full.tokens[:full.tokens.index(stop)]


def test_timings_reported(sessions):
    result = sessions["ort-contrib"].generate([[5, 17, 300]], GenerationConfig(max_steps=6))
    assert result.steps == 6 and result.ttft_s > 0 and result.decode_s > 0
    assert result.ms_per_step > 0 and result.ms_per_token > 0


NO_TORCH_SCRIPT = """
import json, sys
try:
    import torch
    sys.exit("torch is installed in this venv")
except ImportError:
    pass
from pipo_runtime import GenerationConfig, PipoSession
session = PipoSession.load(sys.argv[1])
seq = session.generate([json.loads(sys.argv[2])], GenerationConfig(max_steps=12)).sequences[0]
assert "torch" not in sys.modules
print(json.dumps(seq.pairs))
"""


def test_runtime_in_a_venv_without_torch(tmp_path, ort_export, expected):
    """pip install ./graphs ./runtimes/python into a fresh venv (no torch), then generate."""
    for part in ("graphs", "runtimes/python"):  # build from copies: keep the tree clean
        shutil.copytree(ROOT / part, tmp_path / "src" / part,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q",
                          str(tmp_path / "src/graphs"), str(tmp_path / "src/runtimes/python")],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-3000:]
    proc = subprocess.run([str(venv / "bin/python"), "-c", NO_TORCH_SCRIPT, str(ort_export),
                           json.dumps(expected["prompt0"].tolist())],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == expected["greedy0_free"].tolist()
