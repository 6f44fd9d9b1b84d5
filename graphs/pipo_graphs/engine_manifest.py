"""engines.json: the TensorRT engines `pipo-export build` wrote next to an export
(schema: engine_manifest.schema.json). Read by pipo_runtime without pipo_export or TensorRT.

Engines are tied to the TensorRT version and the GPU that built them, so the manifest records
both, the precision, the optimization profiles, and the sha256 of every engine and of the ONNX
graph it came from. Profiles are ranges of three dims (min, opt, max):

    batch           rows of a request                         (both graphs)
    prompt_tokens   input_ids dim 1 = 2*prompt_pairs, even    (prefill_compress)
    past_slots      past_pairs dim of every past.* cache      (decode_unfold)

A cache slot holds one pair (PIPO exports) or one token (`--mode regular` exports).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .contract import DECODE, PREFILL, Mode
from .dtypes import DType
from .errors import PipoUserError
from .manifest import Manifest, ManifestError, _check_schema, _extra, _Json, sha256_file
from .seal import read_sealed

ENGINES = "engines.json"
ENGINE_FORMAT = "pipo-engines"
ENGINE_FORMAT_VERSION = "1.0"
ENGINE_FILES = {PREFILL: "prefill_compress.engine", DECODE: "decode_unfold.engine"}
SCHEMA = Path(__file__).with_name("engine_manifest.schema.json")
REBUILD = "rebuild them on this machine: pipo-export build {folder} --force"


class EngineManifestError(ManifestError):
    """engines.json is missing or malformed, or does not match the export, the engine files,
    the running TensorRT or the GPU."""


@dataclass(frozen=True)
class DimRange:
    """One dynamic dim of an optimization profile: min <= opt <= max, all >= 1."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"bad range min={self.min} opt={self.opt} max={self.max}")

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max

    def to_list(self) -> list[int]:
        return [self.min, self.opt, self.max]

    @classmethod
    def from_list(cls, values) -> "DimRange":
        return cls(*(int(v) for v in values))


@dataclass(frozen=True)
class EngineProfile:
    """One optimization profile, shared by both engines (profile i of prefill_compress and
    profile i of decode_unfold cover the same context range)."""

    batch: DimRange
    prompt_tokens: DimRange  # prefill: input_ids [batch, prompt_tokens]
    past_slots: DimRange  # decode: past.* [.., past_slots, ..]

    def to_json(self) -> dict:
        return {k: getattr(self, k).to_list() for k in ("batch", "prompt_tokens", "past_slots")}

    @classmethod
    def from_json(cls, data: dict) -> "EngineProfile":
        return cls(*(DimRange.from_list(data[k]) for k in ("batch", "prompt_tokens", "past_slots")))

    def length(self, graph: str) -> DimRange:
        """The dim that varies with the context: prompt_tokens (prefill) or past_slots (decode)."""
        return self.prompt_tokens if graph == PREFILL else self.past_slots


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.6"
    index: int = 0


# ---------------------------------------------------------------------------- engines.json, typed
@dataclass(kw_only=True)
class EngineGpu(_Json):
    """The GPU the engines were built on."""

    name: str
    compute_capability: str
    extra: dict = _extra()


@dataclass(kw_only=True)
class EngineLimits(_Json):
    max_batch: int
    max_context: int  # tokens (prompt + generated)
    max_slots: int  # cache slots (pairs, or tokens for regular exports)
    extra: dict = _extra()


@dataclass(kw_only=True)
class EngineEntry(_Json):
    """One engine file and the ONNX graph it was built from."""

    file: str
    sha256: str
    bytes: int
    onnx: str
    onnx_sha256: str
    extra: dict = _extra()


@dataclass(kw_only=True)
class EngineExport(_Json):
    """The export the engines belong to."""

    mode: Mode
    dtype: DType
    contract_version: str
    extra: dict = _extra()


@dataclass(kw_only=True)
class EngineManifest(_Json):
    """engines.json, typed: `from_json` checks every field, `dumps` writes it (build)."""

    format: Literal["pipo-engines"]
    format_version: str
    tensorrt_version: str
    gpu: EngineGpu
    precision: Literal["fp32", "fp16", "bf16"]
    strongly_typed: bool
    limits: EngineLimits
    profiles: list[dict[str, list[int]]]  # EngineProfile.to_json() each (engine_profiles)
    engines: dict[str, EngineEntry]
    export: EngineExport
    build: dict[str, Any] | None = None  # tool versions, timing cache, created, timings
    extra: dict = _extra()


def select_profile(profiles: list[EngineProfile], graph: str, batch: int, length: int,
                   prefer: int | None = None) -> int:
    """Index of a profile covering (batch, length) for `graph` (length: prompt tokens for the
    prefill, past slots for the decode); `prefer` (the active profile) wins when it fits."""
    fits = [i for i, p in enumerate(profiles)
            if p.batch.contains(batch) and p.length(graph).contains(length)]
    if not fits:
        what = "prompt tokens" if graph == PREFILL else "cached slots"
        ranges = ", ".join(f"batch {p.batch.min}-{p.batch.max} x {what} "
                           f"{p.length(graph).min}-{p.length(graph).max}" for p in profiles)
        raise PipoUserError(f"{graph}: batch {batch} with {length} {what} is outside the engines' "
                            f"optimization profiles ({ranges}); rebuild with a larger "
                            "--max-batch/--max-context")
    return prefer if prefer in fits else fits[0]


def prompt_slots(mode: str, prompt_tokens: int) -> int:
    """Cache slots the prefill fills: one per pair (PIPO), one per token (regular)."""
    return prompt_tokens if mode == "regular" else prompt_tokens // 2


def make_engine_manifest(*, tensorrt_version: str, gpu: GpuInfo, precision: str,
                         strongly_typed: bool, max_batch: int, max_context: int, max_slots: int,
                         profiles: list[EngineProfile], engines: dict, export_manifest: Manifest,
                         build: dict | None = None) -> EngineManifest:
    """The engines.json document (write it with `.dumps()`). engines: graph -> {file, sha256,
    bytes, onnx, onnx_sha256}; build: how it was built (tools, timings)."""
    return EngineManifest(
        format=ENGINE_FORMAT, format_version=ENGINE_FORMAT_VERSION,
        tensorrt_version=tensorrt_version,
        gpu=EngineGpu(name=gpu.name, compute_capability=gpu.compute_capability),
        precision=precision, strongly_typed=strongly_typed,
        limits=EngineLimits(max_batch=max_batch, max_context=max_context, max_slots=max_slots),
        profiles=[p.to_json() for p in profiles],
        engines={graph: EngineEntry(**entry) for graph, entry in engines.items()},
        export=EngineExport(mode=export_manifest.export.mode,
                            dtype=export_manifest.export.dtype,
                            contract_version=export_manifest.contract_version),
        build=build)


def load_engine_manifest(folder: str | Path, export_manifest: Manifest,
                         verify_files: bool = True) -> EngineManifest:
    """Read folder/engines.json and check it against the export: schema, profiles, the ONNX
    sha256 each engine was built from (must equal the export manifest's), and (by default) the
    sha256 of every engine file. Raises EngineManifestError naming the fix."""
    folder = Path(folder)
    path = folder / ENGINES
    if not path.is_file():
        raise EngineManifestError(f"{folder}: no {ENGINES}; build the TensorRT engines first: "
                                  f"pipo-export build {folder}")
    try:
        data = json.loads(read_sealed(path))
    except ManifestError as exc:
        raise EngineManifestError(f"{exc} (or rebuild: pipo-export build {folder} --force)") \
            from None
    except json.JSONDecodeError as exc:
        raise EngineManifestError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise EngineManifestError(f"{path}: not a JSON object")
    try:
        _check_schema(data, json.loads(SCHEMA.read_text()), "engines")
    except ManifestError as exc:
        raise EngineManifestError(f"{path}: {exc}") from None
    if str(data["format_version"]).split(".")[0] != ENGINE_FORMAT_VERSION.split(".")[0]:
        raise EngineManifestError(f"{path}: engine manifest format {data['format_version']}, "
                                  f"this runtime reads {ENGINE_FORMAT_VERSION}; "
                                  + REBUILD.format(folder=folder))
    try:
        em = EngineManifest.from_json(data, "engines")
    except ManifestError as exc:
        raise EngineManifestError(f"{path}: {exc}; " + REBUILD.format(folder=folder)) from None
    try:
        profiles = engine_profiles(em)
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineManifestError(f"{path}: bad optimization profile ({exc})") from None
    if not profiles:
        raise EngineManifestError(f"{path}: no optimization profiles")
    for graph, entry in em.engines.items():
        entry_file = export_manifest.files.get(entry.onnx)
        recorded = entry_file.sha256 if entry_file else None
        if recorded != entry.onnx_sha256:
            raise EngineManifestError(
                f"{path}: {entry.file} was built from a different {entry.onnx} (sha256 "
                f"{entry.onnx_sha256[:12]}…, the export has {str(recorded)[:12]}…); the export "
                "changed since the build; " + REBUILD.format(folder=folder))
        if verify_files:
            f = folder / entry.file
            if not f.is_file():
                raise EngineManifestError(f"{folder}: engine {entry.file} listed in {ENGINES} "
                                          "is missing; " + REBUILD.format(folder=folder))
            if f.stat().st_size != entry.bytes or sha256_file(f) != entry.sha256:
                raise EngineManifestError(f"{folder}: {entry.file} does not match its sha256 "
                                          f"in {ENGINES} (corrupted or swapped); "
                                          + REBUILD.format(folder=folder))
    return em


def check_compatibility(data: EngineManifest, tensorrt_version: str, gpu: GpuInfo,
                        folder: str | Path = "OUT") -> list[str]:
    """Raise EngineManifestError when the engines cannot run here (another TensorRT version or
    GPU compute capability); return warnings (same architecture, another GPU model)."""
    fix = REBUILD.format(folder=folder)
    if data.tensorrt_version != tensorrt_version:
        raise EngineManifestError(f"the engines were built with TensorRT {data.tensorrt_version}"
                                  f", this is TensorRT {tensorrt_version} (engines are tied to one "
                                  f"version); {fix}")
    built = data.gpu
    if built.compute_capability != gpu.compute_capability:
        raise EngineManifestError(f"the engines were built for compute capability "
                                  f"{built.compute_capability} ({built.name}), this GPU is "
                                  f"{gpu.name} (compute capability {gpu.compute_capability}); {fix}")
    out = []
    if built.name != gpu.name:
        out.append(f"the engines were built on {built.name}, running on {gpu.name} (same compute "
                   f"capability {gpu.compute_capability}); tactics were tuned for the other GPU, "
                   f"{fix} for best speed")
        for message in out:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
    return out


def engine_profiles(data: EngineManifest) -> list[EngineProfile]:
    return [EngineProfile.from_json(p) for p in data.profiles]
