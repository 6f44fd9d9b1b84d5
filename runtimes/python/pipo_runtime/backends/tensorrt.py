"""The TensorRT backend: run the engines `pipo-export build` wrote next to an export.

Imported only when Backend.TENSORRT is chosen; needs `tensorrt` (NVIDIA's wheels) and
`polygraphy` (device memory and the CUDA stream, through libcudart).

Buffers (no host copies of states within a generation):
  * two full-size sets of every cache/state buffer (ping-pong), [batch, ..., max_slots, ...],
    allocated once per generation (kept while large enough for the next one). Step n writes its
    present.* into set n % 2; decode step n+1 binds that set as past.* and writes the other one.
    Each buffer is read with the step's shape (past_pairs = cached slots), so a present tensor
    of P+1 slots written contiguously is exactly the past tensor of the next step.
  * pair: two buffers as well (pair of step n is input_pair of step n+1).
  * sampling inputs are uploaded once per generation; uniforms [batch, 2] (8 bytes per row) is
    uploaded each step; only pair [batch, 2] and confidence [batch] are copied to the host.
Rows (the engine's merge/select/trim, StepRunner): the states never leave the device. A row
operation reads the small attention_mask of each source batch, then copies every row's real
slots (device to device) into the other ping-pong set, right-aligned on the pair axis at the new
slot count, zeroes the holes, and makes that set current; sampling inputs are re-uploaded from
their host copies (a few bytes per row).
Each step sets every input shape (set_input_shape) and address (set_tensor_address), switches
optimization profile when the cached length leaves the active one, and runs execute_async_v3
on one stream. The decode step is not captured in a CUDA graph: its shapes change every step
(past_pairs grows) and the ping-pong alternates addresses, so a captured graph would be
invalid at the next step.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipo_graphs.contract import (ATTENTION_MASK, CONFIDENCE, DECODE, INPUT_IDS, INPUT_PAIR,
    LENGTHS, PAIR, PAST, PREFILL, PRESENT, SAMPLING_INPUTS, UNIFORMS)
from pipo_graphs.dtypes import ITEMSIZE, numpy_dtype
from pipo_graphs.engine_manifest import EngineManifestError, GpuInfo, check_compatibility, \
    engine_profiles, load_engine_manifest, prompt_slots, select_profile
from pipo_graphs.errors import PipoUserError
from pipo_graphs.manifest import Manifest, StateInfo
from pipo_graphs.shapes import pair_axes, resolve_shape, state_nbytes

from pipo_runtime.backends.base import BackendError, RunnerOptions, StepRunner, prefill_extras
from pipo_runtime.backends.device_rows import DeviceRows
from pipo_runtime.requests import ModelFacts

INSTALL = ("install it on a host with an NVIDIA GPU: pip install tensorrt-cu12 polygraphy "
           "(tensorrt-cu13 for CUDA 13; wheels come from https://pypi.nvidia.com); "
           "see docs/tensorrt.md")
CUDA_DEV_ATTR_CC_MAJOR, CUDA_DEV_ATTR_CC_MINOR = 75, 76


class TensorRTUnavailable(PipoUserError):
    """TensorRT, Polygraphy, the CUDA runtime or a GPU is missing on this machine."""


def require_tensorrt():
    """Import NVIDIA's `tensorrt` module or raise TensorRTUnavailable (one line, with the fix)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT is not installed ({exc}); {INSTALL}") from None
    except OSError as exc:  # the wheel is there but libnvinfer does not load
        raise TensorRTUnavailable(f"TensorRT is installed but its libraries do not load "
                                  f"({str(exc).splitlines()[0]}); {INSTALL}") from None
    if not hasattr(trt, "Runtime") or not hasattr(trt, "__version__"):
        raise TensorRTUnavailable("the 'tensorrt' module found here is not NVIDIA TensorRT (the "
                                  f"PyPI placeholder package?); {INSTALL}")
    return trt


def _cudart():
    try:
        from polygraphy import cuda
        from polygraphy.logger import G_LOGGER
    except ImportError as exc:
        raise TensorRTUnavailable(f"the tensorrt backend needs polygraphy ({exc}); "
                                  "pip install polygraphy") from None
    try:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL + 1):
            return cuda.wrapper().handle
    except Exception as exc:  # OSError from ctypes, PolygraphyException
        raise TensorRTUnavailable(
            f"the CUDA runtime library (libcudart) was not found ({str(exc).splitlines()[0]}); "
            "pip install nvidia-cuda-runtime-cu12 or install the CUDA toolkit") from None


def gpu_info() -> GpuInfo:
    """Name and compute capability of the current CUDA device (raises TensorRTUnavailable
    without libcudart or a visible GPU)."""
    lib = _cudart()
    count, device = ctypes.c_int(0), ctypes.c_int(0)
    status = lib.cudaGetDeviceCount(ctypes.byref(count))
    if status != 0 or count.value < 1:
        raise TensorRTUnavailable(f"no CUDA GPU is visible (cudaGetDeviceCount returned error "
                                  f"{status}, {count.value} devices); TensorRT needs an NVIDIA "
                                  "GPU and driver (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
    lib.cudaGetDevice(ctypes.byref(device))
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    lib.cudaDeviceGetAttribute(ctypes.byref(major), CUDA_DEV_ATTR_CC_MAJOR, device.value)
    lib.cudaDeviceGetAttribute(ctypes.byref(minor), CUDA_DEV_ATTR_CC_MINOR, device.value)
    props = ctypes.create_string_buffer(8192)  # cudaDeviceProp starts with char name[256]
    get = getattr(lib, "cudaGetDeviceProperties_v2", None) or lib.cudaGetDeviceProperties
    name = ""
    if get(props, device.value) == 0:
        name = props.raw[:256].split(b"\0", 1)[0].decode(errors="replace")
    return GpuInfo(name or f"CUDA device {device.value}", f"{major.value}.{minor.value}",
                   device.value)


@dataclass
class DeviceBuffer:
    ptr: int
    nbytes: int
    handle: object = None


class CudaDevice:
    """Device memory and one CUDA stream through polygraphy.cuda (ctypes over libcudart)."""

    def __init__(self):
        from polygraphy import cuda
        self.cuda = cuda
        self.stream = cuda.Stream()

    @property
    def stream_handle(self) -> int:
        return self.stream.ptr

    def alloc(self, nbytes: int) -> DeviceBuffer:
        array = self.cuda.DeviceArray.raw((max(int(nbytes), 1),))
        return DeviceBuffer(array.ptr, array.allocated_nbytes, array)

    def free(self, buf: DeviceBuffer) -> None:
        buf.handle.free()

    def upload(self, ptr: int, array: np.ndarray) -> None:
        """Async host -> device on the stream; keep `array` alive until synchronize()."""
        self.cuda.wrapper().memcpy(ptr, array.ctypes.data, array.nbytes,
                                   self.cuda.MemcpyKind.HostToDevice, self.stream.ptr)

    def download(self, array: np.ndarray, ptr: int) -> None:
        self.cuda.wrapper().memcpy(array.ctypes.data, ptr, array.nbytes,
                                   self.cuda.MemcpyKind.DeviceToHost, self.stream.ptr)

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """Async device -> device on the stream."""
        self.cuda.wrapper().memcpy(dst, src, nbytes, self.cuda.MemcpyKind.DeviceToDevice,
                                   self.stream.ptr)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        self.stream.free()


def _host(array: np.ndarray, dtype: str) -> np.ndarray:
    """Device storage -> what callers compare: bfloat16 (uint16 bits) becomes float32."""
    if dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


class TensorRTStepRunner(DeviceRows, StepRunner):
    """prefill/decode/outputs over the two TensorRT engines (see the module doc).

    `trt`, `device` and `gpu` default to the real TensorRT module, a CudaDevice and the
    current GPU; tests pass stand-ins to exercise the buffer logic without a GPU."""

    name = "tensorrt"
    concurrent = False  # one execution context and one set of state buffers per graph

    def __init__(self, folder, manifest: Manifest, trt=None, device=None,
                 gpu: GpuInfo | None = None):
        folder = Path(folder)
        self.trt = trt or require_tensorrt()
        gpu = gpu or gpu_info()
        self.em = load_engine_manifest(folder, manifest)
        self.warnings = check_compatibility(self.em, self.trt.__version__, gpu, folder)
        self.manifest, self.profiles = manifest, engine_profiles(self.em)
        self.mode = self.em.export.mode.value
        limits = self.em.limits
        self.max_batch, self.max_slots = limits.max_batch, limits.max_slots
        self.max_rows = self.max_batch
        self.max_context = limits.max_context
        self.states = manifest.states
        self.dtypes = manifest.tensor_dtypes()
        self.device = device or CudaDevice()
        self.buffers: dict = {}
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.engines, self.contexts, self.active = {}, {}, {}
        for graph in (PREFILL, DECODE):
            file = self.em.engines[graph].file
            engine = self.runtime.deserialize_cuda_engine((folder / file).read_bytes())
            if not engine:
                raise EngineManifestError(f"TensorRT could not deserialize {file} (see the "
                                          "TensorRT log above); rebuild: pipo-export build "
                                          f"{folder} --force")
            self._check_io(graph, engine, file)
            context = engine.create_execution_context()
            if not context:
                raise BackendError(f"TensorRT could not create an execution context for {file} "
                                   "(out of GPU memory?)")
            self.engines[graph], self.contexts[graph], self.active[graph] = engine, context, 0
        self.pair_axes = pair_axes({PRESENT + s.name: s.shape for s in self.states})
        self.step, self.batch, self.slots, self.side = -1, 0, 0, 0
        self.pending: list[np.ndarray] = []
        self.fixed_host: dict[str, np.ndarray] = {}

    def facts(self, facts: ModelFacts | None) -> ModelFacts:
        """The export's facts with max_context lowered to what the engines were built for, so
        the session's request check refuses prompts the profiles do not cover."""
        facts = super().facts(facts)
        return replace(facts, max_context=min(self.max_context, facts.max_context))

    def _check_io(self, graph: str, engine, file: str) -> None:
        want = {t.name: t.dtype for t in self.manifest.graphs[graph].tensors()}
        have = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if set(have) != set(want):
            diff = sorted(set(have) ^ set(want))[:4]
            raise EngineManifestError(f"{file}: engine I/O differs from the manifest ({diff}); "
                                      "rebuild the engines from this export")
        names = {getattr(self.trt, a): a for a in ITEMSIZE if hasattr(self.trt, a)}
        for name in have:
            got = names.get(engine.get_tensor_dtype(name), str(engine.get_tensor_dtype(name)))
            if got != want[name]:
                raise EngineManifestError(f"{file}: {name} is {got} in the engine, {want[name]} "
                                          "in the manifest; rebuild the engines from this export")
        if engine.num_optimization_profiles != len(self.profiles):
            raise EngineManifestError(f"{file}: {engine.num_optimization_profiles} optimization "
                                      f"profiles, engines.json lists {len(self.profiles)}; "
                                      "rebuild")

    # ------------------------------------------------------------------ device buffers
    def _ensure(self, key, nbytes: int) -> int:
        buf = self.buffers.get(key)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                self.device.free(buf)
            buf = self.buffers[key] = self.device.alloc(nbytes)
        return buf.ptr

    def _upload(self, key: str, array: np.ndarray) -> tuple[int, tuple]:
        array = np.ascontiguousarray(array, dtype=numpy_dtype(self.dtypes[key]))
        ptr = self._ensure(key, max(array.nbytes, 1))  # empty past states still get an address
        self.device.upload(ptr, array)
        self.pending.append(array)
        return ptr, array.shape

    def _state_shape(self, state: StateInfo, slots: int) -> tuple[int, ...]:
        return resolve_shape(state.shape, {"batch": self.batch, "past_pairs": slots})

    def _allocate_generation(self) -> None:
        """Two full-size sets (ping-pong) of every state and of pair, for this batch."""
        for s in self.states:
            nbytes = state_nbytes(s, self.batch, self.max_slots)
            for side in (0, 1):
                self._ensure((s.name, side), nbytes)
        for side in (0, 1):
            self._ensure((PAIR, side), self.batch * 2 * 8)
        self._ensure(CONFIDENCE, self.batch * 4)

    def _outputs(self, side: int, slots: int) -> dict[str, tuple[int, tuple]]:
        """Output name -> (device pointer, shape) when the step leaves `slots` cached slots."""
        out = {PAIR: (self.buffers[(PAIR, side)].ptr, (self.batch, 2)),
               CONFIDENCE: (self.buffers[CONFIDENCE].ptr, (self.batch,))}
        for s in self.states:
            out[PRESENT + s.name] = (self.buffers[(s.name, side)].ptr,
                                     self._state_shape(s, slots))
        return out

    # ------------------------------------------------------------------ steps
    def _run(self, graph: str, inputs: dict, outputs: dict, length: int) -> None:
        ctx, stream = self.contexts[graph], self.device.stream_handle
        index = select_profile(self.profiles, graph, self.batch, length, prefer=self.active[graph])
        if index != self.active[graph]:
            if not ctx.set_optimization_profile_async(index, stream):
                raise BackendError(f"{graph}: TensorRT could not switch to profile {index}")
            self.active[graph] = index
        for name, (ptr, shape) in inputs.items():
            if not ctx.set_input_shape(name, shape):
                raise BackendError(f"{graph}: TensorRT rejected shape {tuple(shape)} for {name} "
                                   f"(profile {index})")
            if not ctx.set_tensor_address(name, ptr):
                raise BackendError(f"{graph}: TensorRT rejected the address of {name}")
        for name, (ptr, shape) in outputs.items():
            have = tuple(ctx.get_tensor_shape(name))
            if -1 not in have and have != tuple(shape):  # never write past a buffer
                raise BackendError(f"{graph}: TensorRT computes {name} as {have}, the contract "
                                   f"says {tuple(shape)}; rebuild the engines from this export")
            if not ctx.set_tensor_address(name, ptr):
                raise BackendError(f"{graph}: TensorRT rejected the address of {name}")
        if not ctx.execute_async_v3(stream):
            raise BackendError(f"TensorRT failed running {graph} (see the TensorRT log above)")
        self.last = outputs

    def _fetch(self):
        pair = np.empty((self.batch, 2), np.int64)
        conf = np.empty((self.batch,), np.float32)
        self.device.download(pair, self.last[PAIR][0])
        self.device.download(conf, self.last[CONFIDENCE][0])
        self.device.synchronize()
        self.pending.clear()
        return pair, conf

    def prefill(self, feeds: dict[str, np.ndarray]):
        """feeds: input_ids [B, T] (T even), lengths [B], sampling inputs [B], uniforms [B, 2]
        (contract 1.1: past.<state> numpy, uploaded, and next_token) -> pair [B, 2] int64,
        confidence [B] float32 (host)."""
        batch, tokens = feeds[INPUT_IDS].shape
        if batch > self.max_batch:
            raise PipoUserError(f"batch of {batch} prompts; the engines were built for at most "
                                f"{self.max_batch} (pipo-export build --max-batch)")
        past = prefill_extras(self.manifest.graphs[PREFILL].inputs, feeds, batch)
        mask = past.get(PAST + ATTENTION_MASK)
        slots = prompt_slots(self.mode, tokens) + (0 if mask is None else mask.shape[1])
        if slots > self.max_slots:
            raise PipoUserError(f"a prompt of {tokens} tokens exceeds the engines' max_context "
                                f"{self.max_context} (pipo-export build --max-context)")
        self.batch = batch
        self._allocate_generation()
        self.fixed_host = {n: np.asarray(feeds[n]) for n, _ in SAMPLING_INPUTS}
        self.fixed = {n: self._upload(n, feeds[n]) for n, _ in SAMPLING_INPUTS}
        inputs = {INPUT_IDS: self._upload(INPUT_IDS, feeds[INPUT_IDS]),
                  LENGTHS: self._upload(LENGTHS, feeds[LENGTHS]), **self.fixed,
                  UNIFORMS: self._upload(UNIFORMS, feeds[UNIFORMS]),
                  **{name: self._upload(name, value) for name, value in past.items()}}
        self._run(PREFILL, inputs, self._outputs(0, slots), tokens)
        self.step, self.slots, self.side = 0, slots, 0
        return self._fetch()

    def decode(self, uniforms: np.ndarray):
        """uniforms [B, 2] -> pair [B, 2], confidence [B]; states stay on the device."""
        if self.step < 0:
            raise BackendError("decode() before prefill()")
        if self.slots + 1 > self.max_slots:
            raise PipoUserError(f"the generation exceeds the engines' max_context "
                                f"{self.max_context} tokens (pipo-export build --max-context)")
        prev, cur = self.side, 1 - self.side
        inputs = {INPUT_PAIR: (self.buffers[(PAIR, prev)].ptr, (self.batch, 2))}
        for s in self.states:
            inputs[PAST + s.name] = (self.buffers[(s.name, prev)].ptr,
                                     self._state_shape(s, self.slots))
        inputs.update(self.fixed)
        inputs[UNIFORMS] = self._upload(UNIFORMS, uniforms)
        self._run(DECODE, inputs, self._outputs(cur, self.slots + 1), self.slots)
        self.step, self.slots, self.side = self.step + 1, self.slots + 1, cur
        return self._fetch()

    def outputs(self) -> dict[str, np.ndarray]:
        """Every output of the last step, copied to the host (for compare; not per step)."""
        host = {}
        for name, (ptr, shape) in self.last.items():
            array = np.empty(shape, numpy_dtype(self.dtypes[name]))
            self.device.download(array, ptr)
            host[name] = array
        self.device.synchronize()
        return {name: _host(a, self.dtypes[name]) for name, a in host.items()}

    def close(self) -> None:
        for buf in self.buffers.values():
            self.device.free(buf)
        self.buffers.clear()
        self.contexts.clear()
        self.engines.clear()
        if hasattr(self.device, "close"):
            self.device.close()


def load(folder: Path, manifest: Manifest, options: RunnerOptions) -> TensorRTStepRunner:
    """engines.json + *.engine from `pipo-export build` next to the export."""
    return TensorRTStepRunner(folder, manifest)
