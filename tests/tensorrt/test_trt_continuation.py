"""Contract 1.1 on the TensorRT runner (stand-in engines: ONNX Runtime behind TensorRT's API,
shapes checked against the profile ranges `build` derives): a resumed conversation and a
chunked prefill give the onnxruntime backend's pairs."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from pipo_runtime import GenerationConfig, PipoSession, SamplingParams

from test_tensorrt import GPU, FakeDevice, FakeTrt, fake_engines


def test_tensorrt_continues_sequences_like_onnxruntime(trt_export, tmp_path, monkeypatch):
    from pipo_runtime.backends import tensorrt as trt_engine
    folder = tmp_path / "trt"
    fake_engines(trt_export, folder, max_batch=3, max_context=160, bounds=())  # one profile:
    # its prefill takes any past, as `build` gives every profile (max_past)
    device = FakeDevice()
    monkeypatch.setattr(trt_engine, "require_tensorrt", lambda: FakeTrt(device))
    monkeypatch.setattr(trt_engine, "gpu_info", lambda: GPU)
    monkeypatch.setattr(trt_engine, "CudaDevice", lambda: device)
    config = GenerationConfig(max_steps=5, threshold=0.4, seed=5, save_state=True,
                              sampling=SamplingParams(temperature=1.0, top_k=20,
                                                      presence_penalty=1.5))
    trt = PipoSession.load(folder, backend="tensorrt")
    ort = PipoSession.load(folder, backend="onnxruntime")
    states = {"trt": None, "ort": None}
    rng = np.random.default_rng(4)
    for turn in range(3):
        new = rng.integers(0, 500, 5 + turn).tolist()
        got = trt.generate([new], config, past=states["trt"]).sequences[0]
        want = ort.generate([new], config, past=states["ort"]).sequences[0]
        assert got.pairs == want.pairs, turn
        assert got.state.history == want.state.history
        states = {"trt": got.state, "ort": want.state}
    prompts = [rng.integers(0, 500, 70).tolist(), [3, 4, 5]]
    chunked = trt.generate(prompts, replace(config, prefill_chunk=16)).sequences
    whole = ort.generate(prompts, config).sequences
    assert [s.pairs for s in chunked] == [s.pairs for s in whole]
