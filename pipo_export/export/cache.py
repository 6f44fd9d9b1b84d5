"""A cache of traced pieces (`export --trace-cache DIR`).

A traced piece depends only on the model's dims (not its weights, which are piece inputs), the
piece, the dtype, the lowering, the opset, the sample cap, the code that traces it and the
tracer's version; re-exporting the same architecture (another checkpoint, another max_context,
an adapter over the same base) reuses the pieces. The key hashes all of those, including the
source that defines and traces pieces (TRACED_CODE), so an edited exporter never reads a stale
piece. A lowering patched at run time must carry its own name (Lowering.key), or not use the
cache.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import onnx

from pipo_export.export.pieces import Piece
from pipo_export.versions import package_versions

PACKAGES = ("torch", "onnx", "onnxscript", "transformers")
PIECE_KEY = "pipo.piece_key"  # metadata entry of a cached piece: its cache key


TRACED_CODE = ("model/config.py", "model/layers.py", "model/modules.py", "model/steps.py",
               "model/regular.py", "model/sampling.py", "export/pieces.py", "export/trace.py",
               "export/io_spec.py", "export/lowering/*.py")  # what a traced piece depends on


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """sha256 over the source that defines and traces pieces (TRACED_CODE)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for pattern in TRACED_CODE:
        for path in sorted(root.glob(pattern)):
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def piece_key(piece: Piece, text_config: dict, **settings) -> str:
    """The cache key of a traced piece."""
    params = dict(piece.owner.named_parameters())
    doc = {"piece": piece.name, "config": text_config, "settings": settings,
           "inputs": [[s.name, s.dtype, list(s.shape)] for s in piece.inputs],
           "outputs": [[s.name, s.dtype, list(s.shape)] for s in piece.outputs],
           "params": [[n, list(params[n].shape), str(params[n].dtype)] for n in piece.params],
           "code": code_hash(), "versions": package_versions(PACKAGES)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


class PieceCache:
    """Pieces stored content-addressed: KEY.onnx holds the piece with its key in its metadata
    (PIECE_KEY), KEY.sha256 the sha256 of KEY.onnx's bytes (`sha256sum -c` format). `load`
    checks both, so an edited piece (a poisoned cache) or one swapped with another key's is
    never used: it is traced again (`warn` says why, one line)."""

    def __init__(self, folder: str | Path, warn=None):
        self.folder = Path(folder)
        self.warn = warn or (lambda text: None)

    def load(self, key: str) -> onnx.ModelProto | None:
        path = self.folder / f"{key}.onnx"
        if not path.is_file():
            return None
        try:
            data = path.read_bytes()
            line = (self.folder / f"{key}.sha256").read_text()
        except (OSError, UnicodeDecodeError) as exc:
            return self._refuse(path, f"no readable checksum ({exc.__class__.__name__})")
        if line != f"{hashlib.sha256(data).hexdigest()}  {path.name}\n":
            return self._refuse(path, "its bytes do not match its sha256 (edited or corrupted)")
        try:
            model = onnx.load_from_string(data)
        except Exception:  # a foreign file with a matching checksum: trace again
            return self._refuse(path, "not an ONNX model")
        if {p.key: p.value for p in model.metadata_props}.get(PIECE_KEY) != key:
            return self._refuse(path, "it holds another piece (swapped)")
        return model

    def _refuse(self, path: Path, why: str) -> None:
        self.warn(f"  trace cache: {path.name} not used ({why}); tracing it again")
        return None

    def store(self, key: str, model: onnx.ModelProto) -> None:
        """Write atomically (temp file + rename): concurrent exports never read half a file.
        The checksum goes last, so a piece without its checksum is never trusted."""
        self.folder.mkdir(parents=True, exist_ok=True)
        model = onnx.ModelProto.FromString(model.SerializeToString())
        entry = model.metadata_props.add()
        entry.key, entry.value = PIECE_KEY, key
        data = model.SerializeToString()
        for name, payload in ((f"{key}.onnx", data), (f"{key}.sha256", (
                f"{hashlib.sha256(data).hexdigest()}  {key}.onnx\n").encode())):
            tmp = self.folder / f".{name}.{os.getpid()}.tmp"
            tmp.write_bytes(payload)
            tmp.replace(self.folder / name)
