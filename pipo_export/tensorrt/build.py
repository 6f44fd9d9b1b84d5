"""`pipo-export build OUT`: TensorRT engines from a `--target tensorrt` export.

Writes OUT/prefill_compress.engine, OUT/decode_unfold.engine and OUT/engines.json (the engine
manifest: TensorRT version, GPU, precision, profiles, sha256 of the engines and of their ONNX;
schema in pipo_graphs/engine_manifest.schema.json). Everything is checked before TensorRT is
touched; without TensorRT or a GPU the command stops with one line. Engines are built in a
temporary folder inside OUT and moved in at the end: a failure or Ctrl-C leaves no partial
engines and no engines.json describing them.
"""
from __future__ import annotations

import datetime
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipo_graphs.contract import DECODE, PREFILL, Target
from pipo_graphs.engine_manifest import ENGINE_FILES, ENGINES, EngineManifest, make_engine_manifest
from pipo_graphs.manifest import Manifest, load_manifest, sha256_file
from pipo_graphs.seal import seal_path, write_sealed
from pipo_runtime.folder import open_export

from pipo_export.tensorrt.profiles import (BuildError, Precision, context_limits, derive_profiles, input_shapes,
                           resolve_precision, state_bytes)
from pipo_export.fsutil import make_temp
from pipo_export.versions import package_versions

STAGES = 4


@dataclass
class BuildOptions:
    folder: str
    precision: Precision | None = None  # default: the export's dtype
    max_batch: int = 1
    max_context: int | None = None  # tokens; default: the export's max_context
    profiles: tuple[int, ...] = ()  # context sizes (tokens) where a new profile starts
    timing_cache: str | None = None  # read if present, updated after the build
    force: bool = False
    verbose: bool = False


def _progress(i: int, text: str) -> float:
    print(f"[{i}/{STAGES}] {text}", file=sys.stderr, flush=True)
    return time.perf_counter()


def _versions(trt) -> dict:
    return {"tensorrt": trt.__version__, **package_versions(("pipo-export", "polygraphy"))}


def _progress_monitor(trt):
    """A trt.IProgressMonitor printing the builder's top-level phases on stderr (None if this
    TensorRT has no progress monitor)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):
        def __init__(self):
            base.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                print(f"      TensorRT: {phase_name} ({num_steps} steps)", file=sys.stderr,
                      flush=True)

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def _build_engine(trt, onnx_path: Path, graph: str, manifest: Manifest, profiles, precision,
                  strongly_typed: bool, opts: BuildOptions) -> bytes:
    """Parse `onnx_path` (external weights.data resolved from its folder) and build one
    serialized engine with one optimization profile per entry of `profiles`."""
    from polygraphy.backend.trt import (CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath,
                                        Profile)
    trt_profiles = []
    max_past = max(p.past_slots.max for p in profiles)  # a prefill may continue any past
    for p in profiles:
        prof = Profile()
        for name, (lo, opt, hi) in input_shapes(manifest, graph, p, max_past).items():
            prof.add(name, min=lo, opt=opt, max=hi)
        trt_profiles.append(prof)
    weak = not strongly_typed
    config = CreateConfig(fp16=weak and precision == Precision.FP16,
                          bf16=weak and precision == Precision.BF16,
                          profiles=trt_profiles, load_timing_cache=opts.timing_cache,
                          progress_monitor=_progress_monitor(trt))
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)
    return EngineBytesFromNetwork(network, config=config, save_timing_cache=opts.timing_cache)()


def _verify_engine(blob: bytes, graph: str, manifest: Manifest, n_profiles: int) -> None:
    """Deserialize the new engine and compare its I/O with the manifest."""
    from polygraphy.backend.trt import EngineFromBytes
    engine = EngineFromBytes(blob)()
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    want = {t.name for t in manifest.graphs[graph].tensors()}
    if names != want:
        raise BuildError(f"{graph}: the engine's I/O differs from the manifest "
                         f"({sorted(names ^ want)[:4]})")
    if engine.num_optimization_profiles != n_profiles:
        raise BuildError(f"{graph}: the engine has {engine.num_optimization_profiles} profiles, "
                         f"expected {n_profiles}")


def _publish(tmp: Path, folder: Path, names: list[str]) -> None:
    """Move the engines in, engines.json last (the old one goes first, so no engines.json ever
    describes engines that are not there)."""
    seal = seal_path(folder / ENGINES).name
    (folder / ENGINES).unlink(missing_ok=True)
    for name in [*names, seal]:
        os.replace(tmp / name, folder / name)
    os.replace(tmp / ENGINES, folder / ENGINES)


def build(opts: BuildOptions) -> EngineManifest:
    """Build both engines and engines.json in opts.folder; -> the engine manifest."""
    folder = Path(opts.folder)
    manifest = load_manifest(folder)  # sealed and typed: the flags are checked against it first
    target = manifest.export.target
    if target != Target.TENSORRT:
        raise BuildError(f"{folder} was exported with --target {target.value}; TensorRT engines are "
                         f"built from a tensorrt-target export: pipo-export export CKPT -o OUT "
                         "--target tensorrt")
    dtype = manifest.export.dtype.value
    resolve_precision(opts.precision, dtype)  # flag errors before looking for TensorRT
    limits = context_limits(manifest, opts.max_batch, opts.max_context)
    profiles = derive_profiles(limits, opts.profiles)
    if (folder / ENGINES).exists() and not opts.force:
        raise BuildError(f"{folder / ENGINES} already exists; pass --force to rebuild the engines")
    if opts.timing_cache and not Path(opts.timing_cache).resolve().parent.is_dir():
        raise BuildError(f"--timing-cache {opts.timing_cache}: its folder does not exist")
    open_export(folder)  # then every file the runtimes' loader checks (pipo_runtime.folder)

    from pipo_runtime.backends.tensorrt import gpu_info, require_tensorrt
    trt = require_tensorrt()
    gpu = gpu_info()
    try:
        from polygraphy.exception import PolygraphyException
        from polygraphy.logger import G_LOGGER
    except ImportError as exc:
        raise BuildError(f"pipo-export build needs polygraphy ({exc}); pip install polygraphy")
    precision, strongly_typed = resolve_precision(opts.precision, dtype,
                                                  int(trt.__version__.split(".")[0]))
    t0 = _progress(1, f"TensorRT {trt.__version__} on {gpu.name} (compute capability "
                      f"{gpu.compute_capability}); precision {precision.value} "
                      f"({'strongly typed' if strongly_typed else 'weakly typed builder flag'}), "
                      f"max batch {limits.max_batch}, max context {limits.max_context} tokens, "
                      f"{len(profiles)} profile(s); runtime state buffers "
                      f"{2 * state_bytes(manifest, limits, limits.max_batch) / 2**20:.1f} MiB")
    engines, timings = {}, {}
    tmp = make_temp(folder, "engines")
    try:
        with G_LOGGER.verbosity(G_LOGGER.INFO if opts.verbose else G_LOGGER.ERROR):
            for i, graph in enumerate((PREFILL, DECODE)):
                onnx_name = manifest.graphs[graph].file
                t = _progress(2 + i, f"building {ENGINE_FILES[graph]} from {onnx_name} "
                                     "(this takes minutes)")
                try:
                    blob = _build_engine(trt, folder / onnx_name, graph, manifest, profiles,
                                         precision, strongly_typed, opts)
                    _verify_engine(blob, graph, manifest, len(profiles))
                except PolygraphyException as exc:
                    raise BuildError(f"TensorRT could not build {graph} from {onnx_name}: "
                                     f"{str(exc).strip().splitlines()[-1]} (details above; "
                                     "--verbose for the full log)") from None
                (tmp / ENGINE_FILES[graph]).write_bytes(blob)
                del blob
                timings[f"build_{graph}_s"] = time.perf_counter() - t
                engines[graph] = {"file": ENGINE_FILES[graph],
                                  "sha256": sha256_file(tmp / ENGINE_FILES[graph]),
                                  "bytes": (tmp / ENGINE_FILES[graph]).stat().st_size,
                                  "onnx": onnx_name,
                                  "onnx_sha256": manifest.files[onnx_name].sha256}
        _progress(4, f"writing {ENGINES}")
        timings["total_s"] = time.perf_counter() - t0
        em = make_engine_manifest(
            tensorrt_version=trt.__version__, gpu=gpu, precision=precision.value,
            strongly_typed=strongly_typed, max_batch=limits.max_batch,
            max_context=limits.max_context, max_slots=limits.max_slots, profiles=profiles,
            engines=engines, export_manifest=manifest,
            build={"tool_versions": _versions(trt), "timing_cache": opts.timing_cache,
                   "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "timings": timings})
        write_sealed(tmp / ENGINES, em.dumps())
        _publish(tmp, folder, list(ENGINE_FILES.values()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sizes = ", ".join(f"{e['file']} {e['bytes'] / 2**20:.1f} MiB" for e in engines.values())
    print(f"wrote {sizes} and {ENGINES} to {folder}; {timings['total_s']:.1f}s", file=sys.stderr)
    return em


def run_build(opts: BuildOptions) -> int:
    build(opts)
    return 0
