"""The one loader of export folders: every runtime path and `pipo-export check` open an export
through `open_export`, and read only the files it vouches for.

The seal (manifest.sha256) is a checksum, not a signature: whoever can edit a downloaded
export can also reseal it. So besides the checksums, the loader refuses (ManifestError, one
line) any manifest that makes a runtime read something the seal does not cover or read outside
the folder:

- every file it names (graphs, weights, `files` entries, external-data locations) is a plain
  relative path whose target, symlinks resolved, is a regular file inside the folder
  (pipo_graphs.members);
- the `files` table covers both graphs and the weights file; a file it does not list (a
  tokenizer.json dropped in later) is never read;
- each graph's inputs and outputs (name, dtype, shape) are the manifest's, so swapped or
  duplicated graph files are refused before ONNX Runtime sees them;
- every external-data reference points into the sealed weights file: offset and length
  non-negative integers, length the tensor's size, offset + length within the file, and the
  layout is the one the exporter writes (check_layout): one aligned region per tensor, no
  overlaps. Only a coherent rewrite (say, two same-sized tensors swapped in both graphs)
  passes, which a checksum seal cannot tell from a new export.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pipo_graphs.contract import DECODE, PREFILL, WEIGHTS_ALIGN
from pipo_graphs.dtypes import ONNX_NAMES, itemsize
from pipo_graphs.errors import ManifestError
from pipo_graphs.manifest import Manifest, load_manifest, verify_checksums
from pipo_graphs.members import check_name, member

from pipo_runtime.onnx_proto import ExternalTensor, ModelView, read_model

TOKENIZER = "tokenizer.json"


@dataclass(frozen=True)
class ExportFolder:
    """A checked export folder: its manifest and the files a runtime may read."""

    folder: Path
    manifest: Manifest
    graphs: dict[str, Path]  # PREFILL/DECODE -> folder/file (checked; not resolved, so ORT
    #                          finds the weights beside it even when the file is a symlink)
    weights: Path | None  # the weights file, resolved
    tokenizer: Path | None  # tokenizer.json when the seal covers it, resolved

    def sealed(self, name: str) -> Path | None:
        """The resolved path of a file the seal covers, None when the manifest does not list
        it (such a file is never read)."""
        return member(self.folder, name) if name in self.manifest.files else None


def open_export(folder: str | Path, verify_files: bool = True) -> ExportFolder:
    """Check an export folder (see the module doc) -> ExportFolder; ManifestError otherwise."""
    folder = Path(folder)
    manifest = load_manifest(folder, verify_files=False)
    for name in manifest.files:
        check_name(name, "files entry")
    needed = {manifest.graphs[g].file: f"graph {g}" for g in (PREFILL, DECODE)}
    if manifest.weights is not None:
        needed[manifest.weights.file] = "weights file"
    for name, what in needed.items():
        check_name(name, what)
        if name not in manifest.files:
            raise ManifestError(f"{folder}: the manifest's files table does not list the {what} "
                                f"{name}, so its checksum is unknown; re-export")
    if len({manifest.graphs[g].file for g in (PREFILL, DECODE)}) != 2:
        raise ManifestError(f"{folder}: both graphs name the file "
                            f"{manifest.graphs[PREFILL].file}; re-export")
    if verify_files:
        verify_checksums(folder, manifest)
    weights = member(folder, manifest.weights.file, "weights file") if manifest.weights else None
    graphs, regions = {}, {}
    for g in (PREFILL, DECODE):
        name = manifest.graphs[g].file
        view = read_model(member(folder, name, f"graph {g}"))
        check_io(manifest, g, view, name)
        check_external(folder, manifest, view.external, name)
        regions.update({(name, t.name): (t.offset, t.length) for t in view.external})
        graphs[g] = folder / name
    if weights is not None:
        check_layout(regions, manifest.weights.file)
    tokenizer = member(folder, TOKENIZER) if TOKENIZER in manifest.files else None
    return ExportFolder(folder, manifest, graphs, weights, tokenizer)


def check_io(manifest: Manifest, graph: str, view: ModelView, file: str) -> None:
    """The graph file's inputs and outputs are the manifest's (names, dtypes, shapes)."""
    info = manifest.graphs[graph]
    for kind, want, have in (("inputs", info.inputs, view.inputs),
                             ("outputs", info.outputs, view.outputs)):
        want_map = {t.name: (t.dtype, tuple(t.shape)) for t in want}
        have_map = {v.name: (v.dtype, v.shape) for v in have}
        if len(have_map) != len(have) or len(want_map) != len(want):
            raise ManifestError(f"{file}: duplicated {kind} names (graph or manifest); re-export")
        if want_map != have_map:
            diff = sorted(set(want_map.items()) ^ set(have_map.items()), key=str)[0]
            raise ManifestError(f"{file}: its {kind} differ from the manifest's {graph} graph "
                                f"(first difference: {diff[0]}); a swapped or foreign graph "
                                "file; re-export")


def check_external(folder: Path, manifest: Manifest, tensors: list[ExternalTensor],
                   file: str) -> None:
    """Every external-data reference of a graph points into the sealed weights file, inside
    it, with the tensor's exact length."""
    sizes: dict[str, int] = {}
    for t in tensors:
        where = f"{file}: initializer {t.name[:60]!r}"
        check_name(t.location, f"external-data location of {file}")
        if manifest.weights is None or t.location != manifest.weights.file:
            raise ManifestError(f"{where} points into {t.location!r}, not the manifest's weights "
                                "file; re-export")
        if t.location not in sizes:
            sizes[t.location] = member(folder, t.location, "weights file").stat().st_size
        name = ONNX_NAMES.get(t.data_type)
        if name is None:
            raise ManifestError(f"{where} has ONNX data type {t.data_type}, which no export "
                                "writes; re-export")
        size = math.prod(t.dims) * itemsize(name)
        length = size if t.length == -1 else t.length
        if length != size or t.offset + length > sizes[t.location] or t.offset % WEIGHTS_ALIGN:
            raise ManifestError(f"{where} points outside {t.location}, off its "
                                f"{WEIGHTS_ALIGN}-byte alignment or has the wrong length (offset "
                                f"{t.offset}, length {length}, tensor {size} bytes, file "
                                f"{sizes[t.location]} bytes); re-export")


def check_layout(regions: dict[tuple[str, str], tuple[int, int]], file: str) -> None:
    """The weights file's layout as the exporter writes it: each tensor name has one region
    (the same in both graphs), each region one name, regions never overlap (and each starts at
    a multiple of WEIGHTS_ALIGN: check_external). Every aligned position inside the file is
    then some tensor's start, so an edited offset or length that stays inside the file lands
    on another tensor and is refused. `regions`: (graph file, tensor name) -> (offset,
    length)."""
    by_name, by_region = {}, {}
    for (graph, name), region in regions.items():
        if by_name.setdefault(name, region) != region:
            raise ManifestError(f"{graph}: initializer {name[:60]!r} is stored at {region}, the "
                                f"other graph reads it at {by_name[name]}; re-export")
        if by_region.setdefault(region, name) != name:
            raise ManifestError(f"{graph}: initializers {name[:60]!r} and "
                                f"{by_region[region][:60]!r} share the bytes at {region[0]} of "
                                f"{file}; re-export")
    end = 0
    for offset, length in sorted(by_region):
        if offset < end:
            raise ManifestError(f"{file}: two stored tensors overlap at byte {offset} (not the "
                                "layout an export writes); re-export")
        end = offset + length
