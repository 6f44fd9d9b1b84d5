"""Step engines: run one prefill, then decode steps, keeping states inside the backend.

Every engine has the same contract, so a TensorRT engine slots in beside them:
    prefill(feeds) -> (pair [B, 2], confidence [B])   feeds: contract prefill inputs (numpy)
    decode(uniforms [B, 2]) -> (pair, confidence)       the next step, states kept internally
    outputs() -> {name: numpy}                          last step's outputs (for compare)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipo_graphs.contract import SAMPLING_INPUTS, UNIFORMS, present_to_past

from pipo_graphs.errors import PipoUserError

from pipo_runtime.runners import GraphRunner


class BackendError(PipoUserError):
    """A backend failed while running a graph that passed the manifest checks."""


class Engine:
    name = "engine"

    def prefill(self, feeds: dict[str, np.ndarray]):
        raise NotImplementedError

    def decode(self, uniforms: np.ndarray):
        raise NotImplementedError

    def outputs(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _fixed(feeds: dict) -> dict:
    return {n: feeds[n] for n, _ in SAMPLING_INPUTS}


class RunnerEngine(Engine):
    """Any GraphRunner pair (numpy in, numpy out): onnx-reference, or ORT without binding."""

    def __init__(self, prefill: GraphRunner, decode: GraphRunner):
        self.pre = prefill if prefill.active else prefill.activate()
        self.dec = decode if decode.active else decode.activate()
        self.name = prefill.name

    def prefill(self, feeds):
        self.fixed = _fixed(feeds)
        self.last = self.pre.infer(feeds)
        return self.last["pair"], self.last["confidence"]

    def decode(self, uniforms):
        self.last = self.dec.infer({"input_pair": self.last["pair"], **present_to_past(self.last),
                                    **self.fixed,
                                    UNIFORMS: uniforms})
        return self.last["pair"], self.last["confidence"]

    def outputs(self):
        return dict(self.last)

    def close(self):
        self.pre.deactivate()
        self.dec.deactivate()


class OrtBindingEngine(Engine):
    """ONNX Runtime with IO binding: states stay OrtValues from one step to the next (no copy
    to numpy); sampling inputs are bound once per generation and `uniforms` is updated in place.
    Only `pair` and `confidence` cross to the host each step."""

    name = "onnxruntime"

    def __init__(self, prefill_path: Path, decode_path: Path, providers: list[str],
                 session_options=None, threads: int = 0, device: str = "cpu"):
        import onnxruntime as ort
        self.ort = ort
        so = session_options or ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        self.pre = ort.InferenceSession(str(prefill_path), so, providers=providers)
        self.dec = ort.InferenceSession(str(decode_path), so, providers=providers)
        self.files = {self.pre: Path(prefill_path).name, self.dec: Path(decode_path).name}
        self.device = device
        self.pre_out = [o.name for o in self.pre.get_outputs()]
        self.dec_out = [o.name for o in self.dec.get_outputs()]

    def _value(self, array: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device)

    def _run(self, session, inputs: dict, names: list[str]):
        io = session.io_binding()
        for name, value in inputs.items():
            io.bind_ortvalue_input(name, value)
        for name in names:
            io.bind_output(name, self.device)
        try:
            session.run_with_iobinding(io)
        except Exception as exc:  # ORT raises plain RuntimeError/Fail for kernel errors
            raise BackendError(f"ONNX Runtime failed running {self.files[session]}: {exc}; "
                               "`pipo-export check` the folder or re-export it") from None
        self.values = dict(zip(names, io.get_outputs()))
        return self.values["pair"].numpy(), self.values["confidence"].numpy()

    def prefill(self, feeds):
        self.fixed = {n: self._value(feeds[n]) for n, _ in SAMPLING_INPUTS}
        self.uniforms = self._value(feeds[UNIFORMS])
        inputs = {"input_ids": self._value(feeds["input_ids"]),
                  "lengths": self._value(feeds["lengths"]), **self.fixed, UNIFORMS: self.uniforms}
        return self._run(self.pre, inputs, self.pre_out)

    def decode(self, uniforms):
        self.uniforms.update_inplace(np.ascontiguousarray(uniforms, dtype=np.float32))
        inputs = {"input_pair": self.values["pair"], **present_to_past(self.values), **self.fixed,
                  UNIFORMS: self.uniforms}
        return self._run(self.dec, inputs, self.dec_out)

    def outputs(self):
        return {k: v.numpy() for k, v in self.values.items()}
