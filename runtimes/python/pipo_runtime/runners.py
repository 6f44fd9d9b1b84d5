"""Graph runners, one per backend (Polygraphy's contract: activate / infer / deactivate)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipo_graphs.errors import PipoUserError


class GraphRunner:
    """Runs one ONNX graph: infer(feeds: name -> array) -> name -> array."""

    name = "base"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.active = False

    def activate(self) -> "GraphRunner":
        self.active = True
        return self

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def deactivate(self) -> None:
        self.active = False

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()


class OrtRunner(GraphRunner):
    """ONNX Runtime InferenceSession; providers default to CPU."""

    name = "onnxruntime"

    def __init__(self, path: Path, providers: list[str] | None = None, threads: int = 0,
                 options=None):
        super().__init__(path)
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = threads
        self.options = options
        self.session = None

    def activate(self):
        import onnxruntime as ort
        available = ort.get_available_providers()
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise PipoUserError(f"ONNX Runtime providers {missing} are not available here "
                                f"(available: {available})")
        so = self.options or ort.SessionOptions()
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(str(self.path), so, providers=self.providers)
        self.output_names = [o.name for o in self.session.get_outputs()]
        return super().activate()

    def infer(self, feeds):
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def deactivate(self):
        self.session = None
        super().deactivate()


def _reference_ops():
    """Replacements for onnx reference kernels with limits our graphs exceed."""
    from onnx.reference.op_run import OpRun

    class GatherElements(OpRun):
        # onnx's version uses np.choose, which numpy caps at 64 choices along the axis
        def _run(self, data, indices, axis=None):
            axis = 0 if axis is None else axis
            return (np.take_along_axis(data, np.where(indices < 0, indices + data.shape[axis],
                                                      indices), axis=axis),)

    return [GatherElements]


class OnnxReferenceRunner(GraphRunner):
    """onnx's own reference evaluator: slow, independent of ONNX Runtime."""

    name = "onnx-reference"

    def activate(self):
        import onnx
        from onnx.reference import ReferenceEvaluator
        model = onnx.load(str(self.path), load_external_data=True)
        self.evaluator = ReferenceEvaluator(model, new_ops=_reference_ops())
        self.output_names = [o.name for o in model.graph.output]
        return super().activate()

    def infer(self, feeds):
        return dict(zip(self.output_names, self.evaluator.run(None, feeds)))
