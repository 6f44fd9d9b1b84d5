"""The onnxruntime backend: both graphs in ONNX Runtime, weights mapped once, IO binding.

Weights: `shared_sessions` maps each external-data file (weights.data) once with np.memmap and
gives every session the same tensors (SessionOptions.add_initializer with an OrtValue over the
mapping, one per stored region, read from the .onnx protobufs, subgraphs included), with
prepacking off, so no session makes its own copy (as the C++ runtime does). The optimization
level decides whether ORT derives new copies from them (`OrtOptimization`).

Steps: `OrtStepRunner` keeps the states as OrtValues from one step to the next (present.X bound
as past.X, no copy to numpy); sampling inputs are bound once per generation and `uniforms` is
updated in place. Only `pair` and `confidence` cross to the host each step.

Rows (the engine's merge/select/trim, StepRunner): the states cross to the host only when rows
join or leave (OrtValue -> numpy -> OrtValue); `trim` reads the small attention_mask alone and
copies the caches only when a column goes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipo_graphs.contract import (CONFIDENCE, DECODE, INPUT_IDS, INPUT_PAIR, LENGTHS, PAIR,
    PAST, PREFILL, PRESENT, SAMPLING_INPUTS, UNIFORMS, present_to_past)
from pipo_graphs.dtypes import ONNX_CODES, ONNX_NAMES, numpy_dtype
from pipo_graphs.errors import PipoUserError
from pipo_graphs.shapes import pair_axes

from pipo_runtime.backends import rows as host_rows
from pipo_runtime.backends.base import (BackendError, OrtOptimization, RunnerOptions, StepRunner,
    prefill_extras)
from pipo_runtime.onnx_proto import ExternalTensor, external_initializers  # noqa: F401
from pipo_runtime.requests import ort_inputs

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider"}
# provider -> how to get an onnxruntime that has it (onnxruntime itself ships CPU only)
PROVIDER_PACKAGES = {
    "CUDAExecutionProvider": "onnxruntime-gpu: pip install 'pipo-runtime[gpu]' (it replaces "
                             "onnxruntime; see pipo-runtime's pyproject.toml)",
    "TensorrtExecutionProvider": "onnxruntime-gpu with TensorRT: pip install 'pipo-runtime[gpu]' "
                                 "(it replaces onnxruntime; see pipo-runtime's pyproject.toml)",
}
# onnx TensorProto.DataType -> contract dtype name, for the types an OrtValue can map as is
# (numpy has no bfloat16)
ONNX_DTYPES = {code: name for code, name in ONNX_NAMES.items() if name != "bfloat16"}
FLOAT16, UINT8 = ONNX_CODES["float16"], ONNX_CODES["uint8"]


def resolve_providers(names) -> list[str]:
    """Short names (cpu, cuda, tensorrt) or ORT provider names -> ORT names, all available
    here (PipoUserError naming the missing ones otherwise)."""
    import onnxruntime as ort
    resolved = [PROVIDER_ALIASES.get(p.lower(), p) for p in (names or ["cpu"])]
    available = ort.get_available_providers()
    for p in resolved:
        if p in available:
            continue
        if p not in ort.get_all_providers():
            raise PipoUserError(f"unknown ONNX Runtime provider {p!r}; choose from "
                                f"{', '.join(PROVIDER_ALIASES)} or an ONNX Runtime provider name")
        raise PipoUserError(f"the installed onnxruntime {ort.__version__} has no {p} (it has "
                            f"{', '.join(available)}); it comes with "
                            f"{PROVIDER_PACKAGES.get(p, 'another onnxruntime build')}")
    return resolved


# ---------------------------------------------------------------------------- sessions
def _options(options: RunnerOptions, optimization: OrtOptimization, prepack: bool):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if options.threads:
        so.intra_op_num_threads = options.threads
    if not options.spinning:  # idle intra-op threads sleep instead of spinning
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if optimization == OrtOptimization.MAPPED:
        # float16 runs through per-op casts on CPU: a priority-based order keeps each weight's
        # float32 cast alive only until its MatMul (the default order casts them all first),
        # and without the arena a freed cast goes back to the system
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        so.enable_cpu_mem_arena = False
    return so


def _session(path, so, providers, model: bytes | None = None, **kw):
    """An InferenceSession of the graph at `path` (or of `model`, its serialized replacement);
    ORT's load errors (a malformed or foreign graph) in one line."""
    import onnxruntime as ort
    try:
        return ort.InferenceSession(str(path) if model is None else model, so,
                                    providers=providers, **kw)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/RuntimeException types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PipoUserError(f"{Path(path).name}: ONNX Runtime cannot load it ({first}); "
                            "`pipo-export check` the folder or re-export it") from None


def shared_sessions(paths, options: RunnerOptions | None = None, models=None) -> list:
    """One InferenceSession per .onnx path; all of them read their external weights through
    one np.memmap per data file (no per-session copy; prepacked copies only if
    `options.prepack`, by default for quantized graphs). The mapping lives
    as long as the sessions. A caller's `options.session_options` is used as given: then each
    session loads its weights itself. models: serialized graphs to run instead of the files
    (the same initializers, e.g. with more outputs: pipo_export.eval), one per path."""
    import onnxruntime as ort
    options = options or RunnerOptions()
    providers = resolve_providers(options.providers)
    if options.session_options is not None:
        return [_session(p, options.session_options, providers) for p in paths]
    tables = {Path(p): external_initializers(p) for p in paths}
    optimization = OrtOptimization(options.optimization)
    if optimization == OrtOptimization.AUTO:
        half = any(t.data_type == FLOAT16 for ts in tables.values() for t in ts)
        optimization = OrtOptimization.MAPPED if half else OrtOptimization.ALL
    disabled = ["ConstantFolding"] if optimization == OrtOptimization.MAPPED else None
    prepack = options.prepack
    if prepack is None:
        prepack = any(t.data_type == UINT8 for ts in tables.values() for t in ts)
    maps, values = {}, {}  # file -> np.memmap; (file, offset, dtype, dims) -> OrtValue
    sessions = []
    for path, tensors in tables.items():
        so = _options(options, optimization, prepack)
        for t in tensors:
            dtype = ONNX_DTYPES.get(t.data_type)
            file = (path.parent / t.location).resolve()
            if dtype is None or Path(t.location).is_absolute() or ".." in Path(t.location).parts:
                continue  # ORT loads it itself
            if file not in maps:
                maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
            count = int(np.prod(t.dims, dtype=np.int64))
            size = count * np.dtype(numpy_dtype(dtype)).itemsize
            if t.length not in (-1, size) or t.offset + size > maps[file].size:
                raise PipoUserError(f"{path}: initializer {t.name} points outside {t.location} "
                                    "or has the wrong length; re-export")
            if t.offset % np.dtype(numpy_dtype(dtype)).itemsize:
                continue  # misaligned for its type: let ORT copy it
            key = (file, t.offset, dtype, t.dims)
            if key not in values:
                region = maps[file][t.offset:t.offset + size].view(numpy_dtype(dtype))
                values[key] = ort.OrtValue.ortvalue_from_numpy(region.reshape(t.dims))
            so.add_initializer(t.name, values[key])
        if models is not None:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        str(path.parent))
        model = None if models is None else models[len(sessions)]
        session = _session(path, so, providers, model, disabled_optimizers=disabled)
        session._pipo_weights = (maps, values)  # keep the mapping alive with the session
        sessions.append(session)
    return sessions


# ---------------------------------------------------------------------------- steps
class OrtStepRunner(StepRunner):
    """prefill/decode over two ONNX Runtime sessions with IO binding (see the module doc)."""

    name = "onnxruntime"

    def __init__(self, prefill_path, decode_path, options: RunnerOptions | None = None,
                 device: str = "cpu"):
        import onnxruntime as ort
        self.ort, self.device = ort, device
        self.pre, self.dec = shared_sessions([prefill_path, decode_path], options)
        self.files = {self.pre: Path(prefill_path).name, self.dec: Path(decode_path).name}
        self.names = {s: [o.name for o in s.get_outputs()] for s in (self.pre, self.dec)}
        self.pair_axes = pair_axes({PRESENT + i.name[len(PAST):]: i.shape
                                    for i in self.dec.get_inputs() if i.name.startswith(PAST)})
        self.pre_inputs = ort_inputs(self.pre)
        self.values = self.fixed = self.uniforms = None

    def _value(self, array: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device)

    def _run(self, session, inputs: dict):
        io = session.io_binding()
        for name, value in inputs.items():
            io.bind_ortvalue_input(name, value)
        for name in self.names[session]:
            io.bind_output(name, self.device)
        try:
            session.run_with_iobinding(io)
        except Exception as exc:  # ORT raises plain RuntimeError/Fail for kernel errors
            raise BackendError(f"ONNX Runtime failed running {self.files[session]}: {exc}; "
                               "`pipo-export check` the folder or re-export it") from exc
        self.values = dict(zip(self.names[session], io.get_outputs()))
        return self.values[PAIR].numpy(), self.values[CONFIDENCE].numpy()

    def prefill(self, feeds):
        self.fixed = {n: self._value(feeds[n]) for n, _ in SAMPLING_INPUTS}
        self.uniforms = self._value(feeds[UNIFORMS])
        inputs = {INPUT_IDS: self._value(feeds[INPUT_IDS]),
                  LENGTHS: self._value(feeds[LENGTHS]), **self.fixed, UNIFORMS: self.uniforms}
        for name, value in prefill_extras(self.pre_inputs, feeds, len(feeds[LENGTHS])).items():
            inputs[name] = value if isinstance(value, self.ort.OrtValue) else self._value(value)
        return self._run(self.pre, inputs)

    def past(self):
        """The last step's states as OrtValues (no host copy)."""
        return present_to_past(self.values)

    def decode(self, uniforms):
        uniforms = np.ascontiguousarray(uniforms, dtype=np.float32)
        if self.uniforms is None or tuple(self.uniforms.shape()) != uniforms.shape:
            self.uniforms = self._value(uniforms)  # the batch changed (rows joined or left)
        else:
            self.uniforms.update_inplace(uniforms)
        inputs = {INPUT_PAIR: self.values[PAIR], **present_to_past(self.values), **self.fixed,
                  UNIFORMS: self.uniforms}
        return self._run(self.dec, inputs)

    def outputs(self):
        return {k: v.numpy() for k, v in self.values.items()}

    def rows(self) -> int:
        return 0 if self.values is None else self.values[PAIR].shape()[0]

    def attention_mask(self) -> np.ndarray:
        return self.values[host_rows.MASK].numpy()

    def host_states(self) -> dict[str, np.ndarray]:
        if self.values is None:
            return {}
        out = {k: v.numpy() for k, v in self.values.items() if k.startswith(PRESENT) or k == PAIR}
        return {**out, **{k: v.numpy() for k, v in self.fixed.items()}}

    def load_states(self, states: dict[str, np.ndarray]) -> None:
        if not states:
            self.end()
            return
        # OrtValue.numpy() views ORT's buffer without keeping it alive: own every array
        states = {k: v if v.flags.owndata else v.copy() for k, v in states.items()}
        self.fixed = {n: self._value(states[n]) for n, _ in SAMPLING_INPUTS}
        self.values = {k: self._value(v) for k, v in states.items() if k not in self.fixed}

    def end(self):
        self.values = self.fixed = self.uniforms = None

    def close(self):
        self.pre = self.dec = self.values = None


def load(folder: Path, manifest, options: RunnerOptions) -> OrtStepRunner:
    return OrtStepRunner(folder / manifest.graphs[PREFILL].file,
                         folder / manifest.graphs[DECODE].file, options)
