"""One external-data file shared by both graphs: every weight is stored once."""
from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import TensorProto

from pipo_export.onnx.graph import iter_graphs, strip_metadata

INLINE_BELOW = 1024  # bytes; shape constants stay inline (ORT cannot shape-infer external ones)
ALIGN = 4096


def _external_files(path: Path) -> set[Path]:
    model = onnx.load(str(path), load_external_data=False)
    return {path.parent / kv.value for g in iter_graphs(model.graph) for t in g.initializer
            for kv in t.external_data if kv.key == "location"}


def share_weights(model_paths: list[Path], data_name: str) -> dict:
    """Rewrite the models (all in one folder) so their large initializers live once, deduplicated
    by content (dtype + bytes), 4 KiB aligned, in `data_name` next to them.
    -> {"tensors": unique tensors stored, "bytes": file size}."""
    folder = model_paths[0].parent
    old = set().union(*(_external_files(p) for p in model_paths))
    models = [onnx.load(str(p), load_external_data=True) for p in model_paths]
    index: dict[str, tuple[int, int]] = {}
    tmp = folder / (data_name + ".tmp")
    with open(tmp, "wb") as f:
        for model in models:
            for graph in iter_graphs(model.graph):
                for t in graph.initializer:
                    raw = t.raw_data if t.HasField("raw_data") else \
                        onnx.numpy_helper.to_array(t).tobytes()
                    if len(raw) < INLINE_BELOW:
                        continue
                    # bytes only: a reshaped copy of a weight shares the stored bytes
                    key = hashlib.sha256(bytes([t.data_type]) + raw).hexdigest()
                    if key not in index:
                        f.write(b"\0" * ((-f.tell()) % ALIGN))
                        index[key] = (f.tell(), len(raw))
                        f.write(raw)
                    offset, length = index[key]
                    for field in ("raw_data", "float_data", "int32_data", "int64_data",
                                  "double_data", "uint64_data", "string_data"):
                        t.ClearField(field)
                    del t.external_data[:]
                    t.data_location = TensorProto.EXTERNAL
                    for k, v in (("location", data_name), ("offset", str(offset)),
                                 ("length", str(length))):
                        entry = t.external_data.add()
                        entry.key, entry.value = k, v
    for path in old:
        if path.name != data_name and path.exists():
            path.unlink()
    tmp.replace(folder / data_name)
    for model, path in zip(models, model_paths):
        strip_metadata(model)
        onnx.save(model, str(path))
    return {"tensors": len(index), "bytes": (folder / data_name).stat().st_size}
