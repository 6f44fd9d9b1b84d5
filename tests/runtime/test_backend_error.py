"""A kernel failure on an export that passed its checks is a bug (issue 18): BackendError is no
PipoUserError, keeps ONNX Runtime's exception as its cause, and the CLI shows its traceback."""
from __future__ import annotations

import onnxruntime as ort
import pytest

from pipo_graphs.errors import PipoUserError
from pipo_runtime import GenerationConfig, PipoSession
from pipo_runtime.backends.base import BackendError


class KernelFailure(RuntimeError):
    pass


@pytest.fixture
def failing_kernels(monkeypatch):
    def run_with_iobinding(self, *args, **kwargs):
        raise KernelFailure("[ONNXRuntimeError] : 1 : FAIL : a kernel failed")
    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", run_with_iobinding)


def test_kernel_failure_is_a_backend_error_with_its_cause(ort_export, failing_kernels):
    assert not issubclass(BackendError, PipoUserError)
    session = PipoSession.load(ort_export)
    with pytest.raises(BackendError, match="ONNX Runtime failed running") as info:
        session.generate([[5, 17, 300]], GenerationConfig(max_steps=2))
    assert isinstance(info.value.__cause__, KernelFailure)
    session.close()


def test_cli_keeps_the_traceback_of_a_backend_error(ort_export, failing_kernels):
    from pipo_export.cli import main
    with pytest.raises(BackendError):  # not turned into a one-line exit 2
        main(["run", str(ort_export), "--ids", "5,17,300", "--max-steps", "2"])
