"""`pipo-export check OUT`: verify an export folder without running it."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from pipo_graphs.contract import DECODE, PAST, PREFILL, TARGET_CAPS, Mode, state_specs
from pipo_graphs.errors import PipoUserError
from pipo_graphs.manifest import Manifest
from pipo_runtime.folder import open_export

from pipo_export.onnx.graph import known_to_onnx, op_types, symbolic_dims, weight_refs


@dataclass
class CheckReport:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    refused: str | None = None  # the loader's refusal: the runtimes would not load the folder

    def add(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append((name, ok, detail))

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)


def model_fact_problems(manifest: Manifest, decode_dims: dict[str, list]) -> list[str]:
    """Where the manifest's model facts disagree with its states and the decode graph's past.*
    inputs (`decode_dims`: input name -> shape read from the .onnx file)."""
    mode = manifest.export.mode
    problems = []
    want = {s.name: list(s.shape) for s in state_specs(manifest.model.dims(),
                                                         mtp=mode == Mode.PIPO)}
    have = {s.name: list(s.shape) for s in manifest.states}
    if set(want) != set(have):
        problems.append(f"states {sorted(set(want) ^ set(have))[:4]} differ from the model's")
    for name in sorted(set(want) & set(have)):
        if want[name] != have[name]:
            problems.append(f"state {name}: manifest {have[name]}, model facts {want[name]}")
        if decode_dims.get(PAST + name) != want[name]:
            problems.append(f"decode input {PAST + name}: file {decode_dims.get(PAST + name)}, "
                            f"model facts {want[name]}")
    return problems


def _onnx_checker(path: Path, weights: str | None) -> None:
    """onnx.checker (full) on a graph file. onnx refuses external data in a symlink (a Hugging
    Face cache stores every file as one): then the graph is checked beside a sparse stand-in of
    the weights file's size (its bytes are the sealed ones, its references already checked by
    open_export)."""
    if weights is None or not (path.parent / weights).is_symlink():
        onnx.checker.check_model(str(path), full_check=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(path, Path(tmp) / path.name)
        with open(Path(tmp) / weights, "wb") as f:
            f.truncate((path.parent / weights).stat().st_size)
        onnx.checker.check_model(str(Path(tmp) / path.name), full_check=True)


def check_export(folder: str | Path) -> CheckReport:
    folder, report = Path(folder), CheckReport()
    try:
        export = open_export(folder)  # the runtimes' loader: seal, paths, graph I/O, offsets
        manifest = export.manifest
        report.add("manifest, sha256 of every file, paths inside the folder, graph I/O and "
                   "external-data offsets", True, f"{len(manifest.files)} files")
    except PipoUserError as exc:
        report.add("manifest, sha256 of every file, paths inside the folder, graph I/O and "
                   "external-data offsets", False, str(exc))
        report.refused = str(exc)
        return report
    paths = export.graphs
    known_to_onnx()
    for g, path in paths.items():
        try:
            _onnx_checker(path, manifest.weights and manifest.weights.file)
            report.add(f"onnx checker: {path.name}", True)
        except Exception as exc:  # checker raises ValidationError and shape-inference errors
            report.add(f"onnx checker: {path.name}", False, str(exc).splitlines()[0])
        dims = symbolic_dims(path)
        bad = []
        for t in manifest.graphs[g].tensors():
            have = dims.get(t.name)
            if have != t.shape:
                bad.append(f"{t.name}: file {have}, manifest {t.shape}")
        report.add(f"I/O of {path.name} as in the manifest (dynamic dims symbolic)", not bad,
                   "; ".join(bad[:4]))
    problems = model_fact_problems(manifest, symbolic_dims(paths[DECODE]))
    report.add("model facts (vocabulary, pad/eos ids, dims) agree with the states and graphs",
               not problems, "; ".join(problems[:4]))
    if manifest.export.mode == Mode.PIPO:
        report.add("decode graph holds the confidence-gate If", "If" in op_types(paths[DECODE]))
    refs = weight_refs(paths[PREFILL]) + weight_refs(paths[DECODE])
    files = {loc for loc, _, _ in refs}
    stored = sum(length for _, _, length in set(refs))
    weights_file = manifest.weights.file if manifest.weights else None
    size = export.weights.stat().st_size if files and export.weights else 0
    report.add("weights stored once, in one file shared by both graphs",
               files == {weights_file} and stored <= size,
               f"{len(set(refs))} tensors, {stored:,} bytes referenced, file {size:,} bytes")
    if TARGET_CAPS[manifest.export.target].standard_ops_only:
        from pipo_export.onnx.trt_support import MAX_OPSET, lint_model
        for path in paths.values():
            issues = lint_model(onnx.load(str(path), load_external_data=False))
            report.add(f"TensorRT lint (parser table, opset <= {MAX_OPSET}): {path.name}",
                       not issues, "; ".join(f"{i.op_type} {i.node}: {i.problem}"
                                             for i in issues[:5]))
    return report
