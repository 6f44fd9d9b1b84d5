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
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def load(self, key: str) -> onnx.ModelProto | None:
        path = self.folder / f"{key}.onnx"
        if not path.is_file():
            return None
        try:
            return onnx.load(str(path))
        except Exception:  # a truncated or foreign file: trace again
            return None

    def store(self, key: str, model: onnx.ModelProto) -> None:
        """Write atomically (temp file + rename): concurrent exports never read half a file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{key}.{os.getpid()}.tmp"
        onnx.save(model, str(tmp))
        tmp.replace(self.folder / f"{key}.onnx")
