"""Edits an attacker makes to a downloaded export, each followed by a reseal (manifest.sha256 is
a checksum, not a signature): the bad-export table (tests/cli/test_bad_exports.py) and the
folder fuzz (tests/runtime/test_folder_fuzz.py) build their cases from these."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
from onnx import TensorProto

from pipo_export.onnx.graph import iter_graphs
from pipo_graphs.seal import write_sealed

PREFILL_FILE, DECODE_FILE, WEIGHTS_FILE = "prefill_compress.onnx", "decode_unfold.onnx", \
    "weights.data"


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def reseal(folder: Path, manifest: dict, changed=()) -> None:
    """Write `manifest` with the files table entries of `changed` (names in the folder)
    recomputed, and seal it: what an attacker does after editing files."""
    for name in changed:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(),
                                   "bytes": len(data)}
    write_sealed(folder / "manifest.json", json.dumps(manifest, indent=2))


def edit_manifest(folder: Path, edit) -> None:
    """Apply edit(manifest dict) and reseal."""
    manifest = read_manifest(folder)
    edit(manifest)
    reseal(folder, manifest)


def external_tensors(model: onnx.ModelProto) -> list[TensorProto]:
    return [t for g in iter_graphs(model.graph) for t in g.initializer
            if t.data_location == TensorProto.EXTERNAL]


def edit_external(folder: Path, graph_file: str, index: int, **entries: str) -> None:
    """Set external-data entries (offset=, length=, location=; strings as stored) of the
    index-th external initializer of `graph_file`, then reseal with the graph's new hash."""
    path = folder / graph_file
    model = onnx.load(str(path), load_external_data=False)
    tensor = external_tensors(model)[index]
    kv = {e.key: e.value for e in tensor.external_data}
    kv.update(entries)
    del tensor.external_data[:]
    for key, value in kv.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())
    manifest = read_manifest(folder)
    reseal(folder, manifest, [graph_file] if graph_file in manifest["files"] else [])


def write_file(folder: Path, name: str, data: bytes, listed: bool = True) -> None:
    """folder/name with `data`; listed: also in the files table (resealed)."""
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    if listed:
        reseal(folder, read_manifest(folder), [name])


def tiny_tokenizer_json(vocab_size: int = 512) -> str:
    """A valid word-level tokenizer.json over ids 0..vocab_size-1 ("w0", "w1", ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()
