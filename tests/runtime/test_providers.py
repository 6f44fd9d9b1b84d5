"""Asking for a provider the installed onnxruntime lacks: one line naming what is missing and
the package that provides it (issue 18)."""
from __future__ import annotations

import onnxruntime as ort
import pytest

from pipo_graphs.errors import PipoUserError
from pipo_runtime.backends.onnxruntime import resolve_providers


def test_cpu_resolves():
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    assert resolve_providers(None) == ["CPUExecutionProvider"]


@pytest.mark.parametrize("name,provider", [("cuda", "CUDAExecutionProvider"),
                                           ("tensorrt", "TensorrtExecutionProvider")])
def test_missing_gpu_provider_names_the_package(name, provider):
    if provider in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has {provider}")
    with pytest.raises(PipoUserError) as info:
        resolve_providers(["cpu", name])
    message = str(info.value)
    assert "\n" not in message and provider in message
    assert "onnxruntime-gpu" in message and "pip install 'pipo-runtime[gpu]'" in message


def test_unknown_provider():
    with pytest.raises(PipoUserError, match="unknown ONNX Runtime provider 'tpu'"):
        resolve_providers(["tpu"])
