"""Runtime backends: one module each, registered here by module path and imported only when a
session chooses it (the runtime never imports torch, TensorRT or onnx unless asked).

Adding a backend is one module with `load(folder, manifest, options) -> StepRunner` (contract:
pipo_runtime.backends.base) plus one line in REGISTRY; `Backend` gets its member from that line.
"""
from __future__ import annotations

import importlib
from enum import Enum
from types import ModuleType

from pipo_graphs.errors import PipoUserError

REGISTRY = {
    # name -> module
    "torch": "pipo_export.model.torch_backend",  # pipo_export's torch reference (needs torch)
    "onnxruntime": "pipo_runtime.backends.onnxruntime",
    "onnx-reference": "pipo_runtime.backends.onnx_reference",
    "tensorrt": "pipo_runtime.backends.tensorrt",
}

Backend = Enum("Backend", {name.upper().replace("-", "_"): name for name in REGISTRY},
               type=str, module=__name__)
Backend.__doc__ = "Backends a PIPO generation can run on (one per REGISTRY entry)."


def parse_backend(value) -> Backend:
    """A Backend or its name -> Backend; PipoUserError naming the choices otherwise."""
    try:
        return Backend(value)
    except ValueError:
        raise PipoUserError(f"unknown backend {value!r}; choose from "
                            f"{', '.join(b.value for b in Backend)}") from None


def backend_module(backend: Backend) -> ModuleType:
    """Import the module of `backend`."""
    path = REGISTRY[Backend(backend).value]
    try:
        return importlib.import_module(path)
    except ImportError as exc:
        needs = {exc.name, "pipo-export" if path.startswith("pipo_export.") else None} - {None}
        raise PipoUserError(f"the {backend.value} backend needs {' and '.join(sorted(needs))} "
                            f"installed ({exc}); use --backend onnxruntime") from None
