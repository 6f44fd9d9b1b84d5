"""TensorRT: `pipo-export build`, engines.json, the tensorrt backend, the parser support table.

Runs without TensorRT: profile derivation, engine-manifest checks (hand-written engines.json and
dummy files), the no-TensorRT/no-GPU error paths, the runtime's buffer logic against a stand-in
TensorRT whose engines are ONNX Runtime sessions, and the operator table over the
tensorrt-target graphs. Tests that need real TensorRT and a GPU skip with the reason.
Numerical parity of the tensorrt-target graphs (ONNX Runtime CPU vs torch) is covered by
tests/test_export.py::test_trt_target_matches_torch.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from pipo_graphs.contract import DECODE, PAST, PREFILL, PRESENT, SAMPLING_INPUTS, UNIFORMS, \
    ModelDims, state_specs
from pipo_graphs.engine_manifest import ENGINE_FILES, ENGINES, DimRange, EngineManifestError, \
    EngineProfile, GpuInfo, check_compatibility, load_engine_manifest, make_engine_manifest, \
    select_profile
from pipo_graphs.errors import PipoUserError
from pipo_graphs.manifest import Manifest, ManifestError, file_entries, sha256_file
from pipo_graphs.seal import write_sealed
from pipo_graphs.shapes import resolve_shape
from pipo_export.tensorrt.profiles import BuildError, Precision, context_limits, derive_profiles, \
    input_shapes, parse_profile_bounds, resolve_precision
from pipo_runtime.requests import ModelFacts, check_request

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
GPU = GpuInfo("NVIDIA Test GPU", "8.6")
TRT_VERSION = "10.15.1.29"


# ------------------------------------------------------------------ a hand-made export
def fake_manifest(mode="pipo", max_context=64, target="tensorrt", dtype="float32") -> dict:
    dims = ModelDims(vocab_size=32, hidden_size=8, layer_types=["linear_attention",
                     "full_attention"], num_key_value_heads=2, head_dim=4, conv_dim=6,
                     conv_kernel=4, linear_num_value_heads=2, linear_key_head_dim=4,
                     linear_value_head_dim=4)
    states = state_specs(dims, dtype, mtp=mode == "pipo")
    sampling = [{"name": n, "dtype": dt, "shape": ["batch"]} for n, dt in SAMPLING_INPUTS] + [
        {"name": UNIFORMS, "dtype": "float32", "shape": ["batch", 2]}]
    head = [{"name": "pair", "dtype": "int64", "shape": ["batch", 2]},
            {"name": "confidence", "dtype": "float32", "shape": ["batch"]}]
    st = [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "layer": s.layer,
           "kind": s.kind} for s in states]
    return {
        "format": "pipo-export", "contract_version": "1.0",
        "model": {"vocab_size": 32, "hidden_size": 8, "layer_types": dims.layer_types,
                  "num_key_value_heads": 2, "head_dim": 4, "pad_token_id": 31,
                  "eos_token_ids": [], "compressor_type": "mlp", "max_context": max_context},
        "export": {"mode": mode, "target": target, "dtype": dtype, "opset": 18,
                   "sample_cap": 32, "tool_versions": {}},
        "graphs": {
            PREFILL: {"file": "prefill_compress.onnx",
                      "inputs": [{"name": "input_ids", "dtype": "int64",
                                  "shape": ["batch", "2*prompt_pairs"]},
                                 {"name": "lengths", "dtype": "int64", "shape": ["batch"]}]
                      + sampling,
                      "outputs": head + [dict(s, name=PRESENT + s["name"]) for s in st]},
            DECODE: {"file": "decode_unfold.onnx",
                     "inputs": [{"name": "input_pair", "dtype": "int64", "shape": ["batch", 2]}]
                     + [dict(s, name=PAST + s["name"]) for s in st] + sampling,
                     "outputs": head + [dict(s, name=PRESENT + s["name"]) for s in st]}},
        "weights": {"file": "weights.data", "tensors": 0, "bytes": 4},
        "states": st,
        "files": {},
    }


def write_export(folder: Path, **kw) -> Path:
    folder.mkdir(parents=True)
    manifest = fake_manifest(**kw)
    for name, data in (("prefill_compress.onnx", b"prefill"), ("decode_unfold.onnx", b"decode"),
                       ("weights.data", b"\0\0\0\0")):
        (folder / name).write_bytes(data)
    manifest["files"] = file_entries(folder, ["prefill_compress.onnx", "decode_unfold.onnx",
                                              "weights.data"])
    write_sealed(folder / "manifest.json", json.dumps(manifest))
    return folder


def write_engines(folder: Path, manifest: dict, blobs: dict | None = None, max_batch=1,
                  max_context=None, bounds=(), version=TRT_VERSION, gpu=GPU) -> dict:
    """engines.json as `build` writes it, over the given engine bytes (dummy by default)."""
    limits = context_limits(Manifest.from_json(manifest), max_batch, max_context)
    profiles = derive_profiles(limits, bounds)
    engines = {}
    for graph in (PREFILL, DECODE):
        f = folder / ENGINE_FILES[graph]
        f.write_bytes((blobs or {}).get(graph, f"engine {graph}".encode()))
        onnx_name = manifest["graphs"][graph]["file"]
        engines[graph] = {"file": f.name, "sha256": sha256_file(f), "bytes": f.stat().st_size,
                          "onnx": onnx_name, "onnx_sha256": manifest["files"][onnx_name]["sha256"]}
    em = make_engine_manifest(tensorrt_version=version, gpu=gpu, precision="fp32",
                              strongly_typed=True, max_batch=max_batch,
                              max_context=limits.max_context, max_slots=limits.max_slots,
                              profiles=profiles, engines=engines,
                              export_manifest=Manifest.from_json(manifest))
    write_sealed(folder / ENGINES, json.dumps(em))
    return em


@pytest.fixture
def export(tmp_path):
    return write_export(tmp_path / "out")


# ------------------------------------------------------------------ profiles
def test_single_profile_covers_the_whole_context():
    limits = context_limits(Manifest.from_json(fake_manifest(max_context=4096)), max_batch=4)
    (p,) = derive_profiles(limits)
    assert p.batch == DimRange(1, 2, 4)
    assert p.prompt_tokens == DimRange(2, 2048, 4094)  # even, 2*(M-1) with M = 2048 pairs
    assert p.past_slots == DimRange(1, 1023, 2046)  # present = past + 1 <= 2047 = max_slots
    assert limits.max_slots == 2047


@pytest.mark.parametrize("mode", ["pipo", "regular"])
@pytest.mark.parametrize("bounds", [(), (16,), (16, 31, 40)])
def test_profiles_partition_every_request_the_runtime_accepts(mode, bounds):
    """Every request check_request lets through lands in exactly one profile per step, and
    no cache ever exceeds max_slots (the runtime's buffer size)."""
    n = 64
    manifest = fake_manifest(mode=mode, max_context=n)
    limits = context_limits(Manifest.from_json(manifest), max_batch=2)
    profiles = derive_profiles(limits, bounds)
    assert len(profiles) == len(bounds) + 1
    assert all(p.prompt_tokens.min % 2 == 0 and p.prompt_tokens.max % 2 == 0 for p in profiles)
    k = 2 if mode == "regular" else 1
    facts = ModelFacts.from_manifest(Manifest.from_json(manifest))
    for length in range(1, n):
        for steps in range(1, n):
            try:
                check_request(facts, [[1] * length], steps)
            except PipoUserError:
                continue
            t = length + length % 2
            assert sum(p.prompt_tokens.contains(t) for p in profiles) == 1, (length, steps)
            slots = t // 2 if k == 1 else t
            assert slots <= limits.max_slots
            for _ in range(1, steps):  # decode steps: past = slots, present = slots + 1
                assert sum(p.past_slots.contains(slots) for p in profiles) == 1, (t, slots)
                slots += 1
                assert slots <= limits.max_slots
            select_profile(profiles, PREFILL, 2, t)


def test_input_shapes_resolve_the_manifest_dims():
    manifest = fake_manifest(max_context=64)
    typed = Manifest.from_json(manifest)
    (p,) = derive_profiles(context_limits(typed, max_batch=3))
    pre = input_shapes(typed, PREFILL, p)
    assert pre["input_ids"] == ((1, 2), (2, 32), (3, 62))
    assert pre["uniforms"] == ((1, 2), (2, 2), (3, 2))
    dec = input_shapes(typed, DECODE, p)
    assert dec["past.key.1"] == ((1, 2, 1, 4), (2, 2, 15, 4), (3, 2, 30, 4))
    assert dec["past.conv.0"] == ((1, 6, 3), (2, 6, 3), (3, 6, 3))
    assert dec["past.prompt_mask"] == ((1, 32), (2, 32), (3, 32))
    assert set(dec) == {t["name"] for t in manifest["graphs"][DECODE]["inputs"]}


def test_resolve_shape():
    assert resolve_shape(["batch", 2, "past_pairs + 1", 16], {"batch": 3, "past_pairs": 7}) == \
        (3, 2, 8, 16)
    assert resolve_shape(["batch", "2*prompt_pairs"], {"batch": 1, "prompt_pairs": 5}) == (1, 10)
    with pytest.raises(ManifestError, match="s62"):
        resolve_shape(["batch", "s62"], {"batch": 1})


@pytest.mark.parametrize("kw, match", [
    ({"max_batch": 0}, "--max-batch"),
    ({"max_context": 100}, "exceeds the export's max_context 64"),
    ({"max_context": 4}, ">= 6"),
])
def test_limits_refuse_bad_flags(kw, match):
    with pytest.raises(BuildError, match=match):
        context_limits(Manifest.from_json(fake_manifest(max_context=64)), **kw)


def test_profile_bounds_are_validated():
    assert parse_profile_bounds("512, 4096") == (512, 4096)
    for text in ("4096,512", "8,8", "a,b"):
        with pytest.raises(BuildError, match="--profiles"):
            parse_profile_bounds(text)
    limits = context_limits(Manifest.from_json(fake_manifest(max_context=64)))
    for bounds in ((64,), (2,)):
        with pytest.raises(BuildError, match="between 2 and"):
            derive_profiles(limits, bounds)
    with pytest.raises(BuildError, match="empty"):
        derive_profiles(limits, (62,))  # prompts end at 62 tokens: nothing left for (62, 64]


def test_precision_and_typing():
    assert resolve_precision(None, "float32") == (Precision.FP32, True)
    assert resolve_precision(None, "float16") == (Precision.FP16, True)
    assert resolve_precision(Precision.FP16, "float32", 10) == (Precision.FP16, False)
    with pytest.raises(BuildError, match="removed in TensorRT 11"):
        resolve_precision(Precision.BF16, "float32", 11)
    with pytest.raises(BuildError, match="--dtype float32"):
        resolve_precision(Precision.FP32, "float16")


def test_select_profile_prefers_the_active_one():
    a = EngineProfile(DimRange(1, 1, 2), DimRange(2, 8, 16), DimRange(1, 4, 10))
    b = EngineProfile(DimRange(1, 1, 2), DimRange(2, 16, 32), DimRange(1, 8, 20))
    assert select_profile([a, b], DECODE, 1, 5) == 0
    assert select_profile([a, b], DECODE, 1, 5, prefer=1) == 1
    assert select_profile([a, b], DECODE, 2, 15) == 1
    with pytest.raises(PipoUserError, match="outside the engines' optimization profiles"):
        select_profile([a, b], PREFILL, 3, 4)


# ------------------------------------------------------------------ engines.json
def test_engine_manifest_round_trip(export):
    manifest = json.loads((export / "manifest.json").read_text())
    em = write_engines(export, manifest, max_batch=2, bounds=(16,))
    loaded = load_engine_manifest(export, Manifest.from_json(manifest))
    assert loaded == json.loads(json.dumps(em))
    assert check_compatibility(loaded, TRT_VERSION, GPU) == []
    assert len(loaded["profiles"]) == 2 and loaded["limits"]["max_slots"] == 31


def test_engine_manifest_mismatches(export, tmp_path):
    manifest = json.loads((export / "manifest.json").read_text())
    with pytest.raises(EngineManifestError, match="pipo-export build"):
        load_engine_manifest(export, Manifest.from_json(manifest))  # no engines.json yet
    em = write_engines(export, manifest)
    with pytest.raises(EngineManifestError, match="TensorRT 10.15.1.29, this is TensorRT 11.0.0"):
        check_compatibility(em, "11.0.0", GPU)
    with pytest.raises(EngineManifestError, match="compute capability 8.6"):
        check_compatibility(em, TRT_VERSION, GpuInfo("NVIDIA H100", "9.0"))
    with pytest.warns(RuntimeWarning, match="built on NVIDIA Test GPU"):
        assert check_compatibility(em, TRT_VERSION, GpuInfo("NVIDIA A10", "8.6"))
    other = dict(manifest, files=dict(manifest["files"], **{
        "decode_unfold.onnx": {"sha256": "0" * 64, "bytes": 6}}))
    with pytest.raises(EngineManifestError, match="built from a different decode_unfold.onnx"):
        load_engine_manifest(export, Manifest.from_json(other))
    (export / "prefill_compress.engine").write_bytes(b"swapped")
    with pytest.raises(EngineManifestError, match="prefill_compress.engine does not match"):
        load_engine_manifest(export, Manifest.from_json(manifest))
    (export / "prefill_compress.engine").unlink()
    with pytest.raises(EngineManifestError, match="is missing"):
        load_engine_manifest(export, Manifest.from_json(manifest))
    for broken, match in (("{", "not valid JSON"),
                          (json.dumps({k: v for k, v in em.items() if k != "gpu"}), "'gpu'"),
                          (json.dumps(dict(em, format_version="2.0")), "format 2.0"),
                          (json.dumps(dict(em, precision="int8")), "precision")):
        write_sealed(export / ENGINES, broken)
        with pytest.raises(EngineManifestError, match=match):
            load_engine_manifest(export, Manifest.from_json(manifest), verify_files=False)


# ------------------------------------------------------------------ without TensorRT / GPU
@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_build_without_tensorrt_is_one_line_and_writes_nothing(export):
    before = sorted(p.name for p in export.iterdir())
    proc = run_cli("build", str(export), "--max-batch", "2", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "TensorRT is not installed" in lines[0] and "pip install tensorrt-cu12" in lines[0]
    assert sorted(p.name for p in export.iterdir()) == before  # no engines, no temp folder


def _build(capsys, *args) -> str:
    """`pipo-export build ARGS` in process: must exit 2 with one line on stderr."""
    from pipo_export.cli import main
    assert main(["build", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_build_refuses_other_targets(tmp_path, capsys):
    folder = write_export(tmp_path / "ort", target="onnxruntime")
    assert "exported with --target onnxruntime" in _build(capsys, folder)
    assert "no manifest.json" in _build(capsys, tmp_path / "missing")


def test_build_checks_flags_before_tensorrt(export, capsys):
    manifest = json.loads((export / "manifest.json").read_text())
    write_engines(export, manifest)
    assert "pass --force" in _build(capsys, export)
    assert "exceeds the export's max_context 64" in _build(capsys, export, "--force",
                                                           "--max-context", 128)
    assert "--profiles" in _build(capsys, export, "--force", "--profiles", "9,3")
    assert "--dtype float32" in _build(capsys, write_export(export.parent / "half",
                                                            dtype="float16"), "--precision", "fp32")


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_tensorrt_backend_without_tensorrt(export):
    from pipo_runtime import Backend, PipoSession
    with pytest.raises(PipoUserError, match="TensorRT is not installed.*pip install tensorrt-cu12"):
        PipoSession.load(export, backend=Backend.TENSORRT)
    with pytest.raises(PipoUserError, match="TensorRT is not installed"):
        PipoSession.load(export, backend="tensorrt")


def test_without_gpu_the_error_names_cuda(monkeypatch):
    """A TensorRT module but no libcudart / no GPU: one clear error, not a ctypes traceback."""
    from pipo_runtime.backends import tensorrt as trt_engine
    try:
        trt_engine.gpu_info()
    except trt_engine.TensorRTUnavailable as exc:
        assert re.search(r"CUDA runtime library \(libcudart\) was not found|no CUDA GPU is "
                         r"visible", str(exc)), exc
    else:
        pytest.skip("a CUDA GPU is visible here")
    fake = type(sys)("tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(trt_engine.TensorRTUnavailable, match="not NVIDIA TensorRT"):
        trt_engine.require_tensorrt()
    fake.Runtime, fake.__version__ = object, TRT_VERSION
    assert trt_engine.require_tensorrt() is fake


@pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT and an NVIDIA GPU (pip install "
                                         "tensorrt-cu12 polygraphy on a GPU host)")
def test_build_and_run_on_a_gpu(trt_export, tmp_path):
    """Real TensorRT: build, then the tensorrt backend agrees with ONNX Runtime on tokens."""
    from pipo_runtime import GenerationConfig, PipoSession
    from pipo_runtime.backends.tensorrt import gpu_info
    try:
        gpu_info()
    except PipoUserError as exc:
        pytest.skip(str(exc))
    folder = tmp_path / "trt"
    shutil.copytree(trt_export, folder)
    run_cli("build", str(folder), "--max-batch", "2", "--max-context", "512", "--profiles", "128")
    config = GenerationConfig(max_steps=8, threshold=0.5)
    prompts = [[5, 17, 300], list(range(40, 190))]
    out = {b: PipoSession.load(folder, backend=b).generate(prompts, config).sequences
           for b in ("onnxruntime", "tensorrt")}
    assert [s.pairs for s in out["onnxruntime"]] == [s.pairs for s in out["tensorrt"]]


# ------------------------------------------------------------------ the runtime's buffer logic
class FakeDevice:
    """Host memory standing in for the GPU; counts allocations and copies. A pointer may point
    inside a buffer (row operations copy at offsets)."""

    stream_handle = 7

    def __init__(self):
        from pipo_runtime.backends.tensorrt import DeviceBuffer
        self.Buffer, self.mem, self.next = DeviceBuffer, {}, 1 << 20
        self.allocs, self.h2d, self.d2h, self.d2d = 0, [], [], 0

    def alloc(self, nbytes):
        ptr, self.next = self.next, self.next + nbytes + 256
        self.mem[ptr] = np.zeros(nbytes, np.uint8)
        self.allocs += 1
        return self.Buffer(ptr, nbytes)

    def free(self, buf):
        del self.mem[buf.ptr]

    def _at(self, ptr, nbytes):
        """The bytes [ptr, ptr + nbytes) of the buffer holding them."""
        base = max(b for b in self.mem if b <= ptr)
        view = self.mem[base][ptr - base:ptr - base + nbytes]
        assert view.size == nbytes, "access outside a buffer"
        return view

    def upload(self, ptr, array):
        self._at(ptr, array.nbytes)[:] = array.reshape(-1).view(np.uint8)
        self.h2d.append(array.shape)

    def download(self, array, ptr):
        array.reshape(-1).view(np.uint8)[:] = self._at(ptr, array.nbytes)
        self.d2h.append(array.shape)

    def copy(self, dst, src, nbytes):
        self._at(dst, nbytes)[:] = self._at(src, nbytes)
        self.d2d += 1

    def read(self, ptr, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.mem[ptr][:n].view(dtype).reshape(shape).copy()

    def synchronize(self):
        pass


ORT_TYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(bool)": "bool",
             "tensor(float16)": "float16"}
NP_TYPES = {"float32": np.float32, "int64": np.int64, "bool": np.bool_, "float16": np.float16}


class FakeContext:
    """An IExecutionContext whose engine is an ONNX Runtime session; shapes are checked against
    the profile ranges `build` would give TensorRT (input_shapes)."""

    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addr, self.result = engine, 0, {}, {}, None
        self.switches, self.log = [], []

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        self.switches.append(index)
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.ranges[self.profile][name]
        self.result = None
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)) or len(shape) != len(lo):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        if name in self.engine.inputs:
            self.result = None
        self.addr[name] = ptr
        return True

    def _infer(self):
        if self.result is None:
            dev = self.engine.device
            feeds = {n: dev.read(self.addr[n], self.shapes[n], NP_TYPES[self.engine.dtypes[n]])
                     for n in self.engine.inputs}
            names = self.engine.outputs
            self.result = dict(zip(names, self.engine.session.run(names, feeds)))
        return self.result

    def get_tensor_shape(self, name):
        return self.shapes[name] if name in self.engine.inputs else self._infer()[name].shape

    def execute_async_v3(self, stream):
        dev = self.engine.device
        for name, value in self._infer().items():
            raw = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
            assert raw.size <= dev.mem[self.addr[name]].size, f"{name} overflows its buffer"
            dev.mem[self.addr[name]][:raw.size] = raw
        self.log.append(dict(self.addr))
        self.result = None
        return True


class FakeEngine:
    def __init__(self, blob, device):
        import onnxruntime as ort
        spec = json.loads(blob)
        self.session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
        self.device, self.ranges = device, spec["ranges"]
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.dtypes = {t.name: ORT_TYPES[t.type] for t in
                       self.session.get_inputs() + self.session.get_outputs()}
        self.names = self.inputs + self.outputs
        self.num_io_tensors, self.num_optimization_profiles = len(self.names), len(self.ranges)
        self.contexts = []

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self):
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeTrt:
    """The parts of the tensorrt module TrtEngine uses; dtypes are their names."""

    __version__ = TRT_VERSION
    float32, float16, int64, int32, bool = "float32", "float16", "int64", "int32", "bool"

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    def __init__(self, device):
        self.device, self.engines = device, []

    def Runtime(self, logger):  # noqa: N802 - TensorRT's name
        trt = self

        class Runtime:
            def deserialize_cuda_engine(self, blob):
                trt.engines.append(FakeEngine(blob, trt.device))
                return trt.engines[-1]
        return Runtime()


def fake_engines(export: Path, folder: Path, max_batch, max_context, bounds) -> dict:
    """A copy of `export` with stand-in engines (ONNX file + the profile ranges build derives)."""
    shutil.copytree(export, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    typed = Manifest.from_json(manifest)
    profiles = derive_profiles(context_limits(typed, max_batch, max_context), bounds)
    blobs = {g: json.dumps({"onnx": str(folder / manifest["graphs"][g]["file"]),
                            "ranges": [input_shapes(typed, g, p) for p in profiles]}).encode()
             for g in (PREFILL, DECODE)}
    write_engines(folder, manifest, blobs, max_batch, max_context, bounds)
    return manifest


def _feeds(prompts, pad=511):
    from pipo_graphs import step_uniforms
    from pipo_graphs.semantics import pack_prompts
    from pipo_runtime.requests import sampling_feeds
    from pipo_graphs import SamplingParams
    ids, lengths = pack_prompts(prompts, pad)
    sampling = SamplingParams(temperature=1.0, top_k=20, top_p=0.95, presence_penalty=1.5)
    return {"input_ids": ids, "lengths": lengths, **sampling_feeds(sampling, 0.5, len(prompts)),
            UNIFORMS: step_uniforms(3, list(range(len(prompts))), 0)}


def test_trt_engine_ping_pong_matches_onnxruntime(trt_export, tmp_path):
    """TensorRTStepRunner over stand-in engines vs OrtStepRunner: same outputs every step, across
    optimization-profile switches; buffers allocated once, only pair/confidence downloaded."""
    from pipo_graphs import step_uniforms
    from pipo_runtime.backends.onnxruntime import OrtStepRunner
    from pipo_runtime.backends.tensorrt import TensorRTStepRunner
    folder = tmp_path / "trt"
    manifest = Manifest.from_json(fake_engines(trt_export, folder, max_batch=2, max_context=64,
                                               bounds=(16, 24)))
    device = FakeDevice()
    trt = FakeTrt(device)
    engine = TensorRTStepRunner(folder, manifest, trt=trt, device=device, gpu=GPU)
    ref = OrtStepRunner(folder / "prefill_compress.onnx", folder / "decode_unfold.onnx")
    assert engine.facts(ModelFacts.from_manifest(manifest)).max_context == 64
    prompts = [list(range(40, 51)), [5, 17, 300]]  # 12 tokens -> 6 pairs: profile 0
    feeds = _feeds(prompts)
    for step in range(8):  # past slots 6..12 cross into profile 1 at 9
        if step == 0:
            got, want = engine.prefill(feeds), ref.prefill(feeds)
            allocs, h2d = device.allocs, len(device.h2d)
        else:
            u = step_uniforms(3, [0, 1], step)
            got, want = engine.decode(u), ref.decode(u)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], atol=1e-6)
        outs, ref_outs = engine.outputs(), ref.outputs()
        assert set(outs) == set(ref_outs)
        for name, value in ref_outs.items():
            assert outs[name].shape == value.shape, name
            np.testing.assert_allclose(outs[name], value, atol=1e-5, err_msg=name)
    assert device.allocs == allocs  # nothing allocated after the prefill
    assert len(device.h2d) - h2d == 7  # one upload per decode step: uniforms
    decode_ctx = trt.engines[1].contexts[0]
    assert decode_ctx.switches == [1]  # 6..8 in profile 0, then 9.. in profile 1
    keys = [log["past.key.3"] for log in decode_ctx.log]
    assert len(set(keys)) == 2 and all(a != b for a, b in zip(keys, keys[1:]))  # ping-pong
    assert [log["present.key.3"] for log in decode_ctx.log][:-1] == keys[1:]
    with pytest.raises(PipoUserError, match="--max-batch"):
        engine.prefill(_feeds([[1], [2], [3]]))
    engine.close()


def test_tensorrt_session_generates_like_onnxruntime(trt_export, tmp_path, monkeypatch):
    """PipoSession.load(..., backend="tensorrt") end to end on stand-in engines."""
    from pipo_runtime import GenerationConfig, PipoSession, SamplingParams
    from pipo_runtime.backends import tensorrt as trt_engine
    folder = tmp_path / "trt"
    fake_engines(trt_export, folder, max_batch=3, max_context=80, bounds=(32,))
    device = FakeDevice()
    monkeypatch.setattr(trt_engine, "require_tensorrt", lambda: FakeTrt(device))
    monkeypatch.setattr(trt_engine, "gpu_info", lambda: GPU)
    monkeypatch.setattr(trt_engine, "CudaDevice", lambda: device)
    config = GenerationConfig(max_steps=10, threshold=0.4, seed=5, sampling=SamplingParams(
        temperature=1.0, top_p=0.95, top_k=20, presence_penalty=1.5))
    prompts = [[5, 9, 13], list(range(100, 131)), [300]]
    trt_session = PipoSession.load(folder, backend="tensorrt")
    got = trt_session.generate(prompts, config).sequences
    want = PipoSession.load(folder, backend="onnxruntime").generate(prompts, config).sequences
    assert [s.pairs for s in got] == [s.pairs for s in want]
    assert [s.tokens for s in got] == [s.tokens for s in want]
    with pytest.raises(PipoUserError, match="this export allows 80"):  # the engines' context
        trt_session.generate([list(range(70))], GenerationConfig(max_steps=8))


# ------------------------------------------------------------------ the parser support table
def test_every_op_of_the_tensorrt_graphs_is_in_the_support_table(trt_export):
    """All nodes, subgraphs included: op in the table, lint clean, opset parseable by TensorRT
    10.15 and 11; every restriction the table records for a used op is checked statically."""
    import onnx
    from pipo_export.onnx.trt_support import MAX_OPSET, SUPPORTED_OPS, TRT10_MAX_OPSET, \
        UNSUPPORTED_OPS, lint_model
    from pipo_export.onnx.graph import iter_graphs
    for graph in (PREFILL, DECODE):
        model = onnx.load(str(trt_export / f"{graph}.onnx"), load_external_data=False)
        opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
        assert opsets and max(opsets) <= TRT10_MAX_OPSET <= MAX_OPSET == 25
        assert not [o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx")]
        assert not model.functions
        nodes = [n for g in iter_graphs(model.graph) for n in g.node]
        used = {n.op_type for n in nodes}
        assert {"Scan" if graph == PREFILL else "If"} <= used
        assert used <= set(SUPPORTED_OPS), used - set(SUPPORTED_OPS)
        assert not used & UNSUPPORTED_OPS
        assert all(n.domain in ("", "ai.onnx") for n in nodes)
        for op in used:  # a restriction in the table is enforced by the lint, not just text
            if SUPPORTED_OPS[op].restrictions:
                assert SUPPORTED_OPS[op].check is not None, op
        assert lint_model(model) == [], graph


def test_lint_knows_the_tensorrt_11_additions():
    from onnx import TensorProto, helper
    from pipo_export.onnx.trt_support import lint_model
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    graph = helper.make_graph([helper.make_node("Swish", ["x"], ["y"])], "g", [x], [y])

    def issues(opset):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        return [(i.severity, i.problem) for i in lint_model(model)]
    assert issues(24) == [("warning", "Swish is parsed by TensorRT >= 11.0 only")]
    assert ("warning", "ai.onnx opset 25 needs TensorRT >= 11.5 (TensorRT 10.15 parses up to 24)") \
        in issues(25)
    assert any(sev == "error" and "opset 26 > 25" in p for sev, p in issues(26))


def test_engine_rows_on_the_device_match_each_request_alone(trt_export, tmp_path, monkeypatch):
    """The engine over stand-in TensorRT engines: rows join, leave and are trimmed on the device
    (device-to-device copies; only pair, confidence and attention_mask are downloaded), and
    each request gives the pairs it gives alone on onnxruntime (confidences within compare's
    default atol 1e-3)."""
    import random
    from dataclasses import replace
    from pipo_runtime import GenerationConfig, PipoSession, SamplingParams
    from pipo_runtime.backends import tensorrt as trt_engine
    from pipo_runtime.engine import Engine, EngineConfig
    folder = tmp_path / "trt"
    fake_engines(trt_export, folder, max_batch=4, max_context=160, bounds=(48,))
    device = FakeDevice()
    monkeypatch.setattr(trt_engine, "require_tensorrt", lambda: FakeTrt(device))
    monkeypatch.setattr(trt_engine, "gpu_info", lambda: GPU)
    monkeypatch.setattr(trt_engine, "CudaDevice", lambda: device)
    trt_session = PipoSession.load(folder, backend="tensorrt")
    ort_session = PipoSession.load(folder, backend="onnxruntime")
    rng = random.Random(7)
    samplers = [SamplingParams(), SamplingParams(temperature=1.0, top_k=20, presence_penalty=1.5)]
    requests = [([rng.randrange(500) for _ in range(rng.randint(1, 60))],
                 GenerationConfig(max_steps=rng.randint(1, 12), seed=i, sampling=samplers[i % 2],
                                  threshold=rng.choice([-1.0, 0.5, 1.0])), i % 3)
                for i in range(10)]
    with pytest.raises(PipoUserError, match="max_batch 5 exceeds the 4 rows"):
        Engine(trt_session, EngineConfig(max_batch=5))
    engine = Engine(trt_session, EngineConfig(max_batch=4, max_prefill_tokens=96))
    handles = [engine.submit(p, c, seq=s) for p, c, s in requests]
    results = [h.result(timeout=120) for h in handles]
    engine.shutdown()
    for (prompt, config, seq), got in zip(requests, results):
        want = ort_session.generate([prompt], replace(config, seq_offset=seq)).sequences[0]
        assert got.pairs == want.pairs
        np.testing.assert_allclose(got.confidence, want.confidence, atol=1e-3)
    assert device.d2d > 0  # rows moved on the device
    assert all(len(shape) <= 2 for shape in device.d2h)  # never a cache [B, H, P, D]
