"""The trace cache is content-addressed, and validation runs every branch of every `If`: a
poisoned cache (ArgMax -> ArgMin in the greedy-only sampler branch) is retraced when only the
piece changed, and refused by validation when the poisoner also rewrote its checksum."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import onnx
import pytest

from pipo_export.errors import ExportError
from pipo_export.export.cache import PieceCache
from pipo_export.onnx.graph import iter_graphs

from conftest import TINY_REF, export_folder


def _model(name: str) -> onnx.ModelProto:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    node = onnx.helper.make_node(name, ["x"], ["y"])
    return onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y]))


def test_cache_round_trip_and_edits_are_retraced(tmp_path):
    warnings = []
    cache = PieceCache(tmp_path, warnings.append)
    cache.store("a" * 64, _model("Relu"))
    cache.store("b" * 64, _model("Neg"))
    assert cache.load("a" * 64).graph.node[0].op_type == "Relu" and warnings == []
    path = tmp_path / f"{'a' * 64}.onnx"
    path.write_bytes(path.read_bytes().replace(b"Relu", b"Tanh"))  # same length, other op
    assert cache.load("a" * 64) is None
    assert len(warnings) == 1 and "do not match its sha256" in warnings[0]


def test_swapped_pieces_are_retraced(tmp_path):
    warnings = []
    cache = PieceCache(tmp_path, warnings.append)
    a, b = "a" * 64, "b" * 64
    cache.store(a, _model("Relu"))
    cache.store(b, _model("Neg"))
    # b's piece under a's key, with a checksum that matches the bytes (the swap keeps it valid)
    data = (tmp_path / f"{b}.onnx").read_bytes()
    (tmp_path / f"{a}.onnx").write_bytes(data)
    (tmp_path / f"{a}.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {a}.onnx\n")
    assert cache.load(a) is None and "another piece" in warnings[-1]
    (tmp_path / f"{b}.sha256").unlink()
    assert cache.load(b) is None and "no readable checksum" in warnings[-1]


def _poison(cache: Path) -> list[str]:
    """ArgMax -> ArgMin in every greedy-only branch (an If branch with ArgMax and no TopK) of
    the cached pieces, resealing each piece's checksum as a careful poisoner would."""
    poisoned = []
    for path in sorted(cache.glob("*.onnx")):
        model = onnx.load(str(path))
        hit = False
        for g in iter_graphs(model.graph):
            for node in g.node:
                if node.op_type != "If":
                    continue
                for attr in node.attribute:
                    ops = {n.op_type for sub in iter_graphs(attr.g) for n in sub.node}
                    if "ArgMax" in ops and "TopK" not in ops:
                        for sub in iter_graphs(attr.g):
                            for n in sub.node:
                                if n.op_type == "ArgMax":
                                    n.op_type, hit = "ArgMin", True
        if hit:
            data = model.SerializeToString()
            path.write_bytes(data)
            path.with_suffix(".sha256").write_text(
                f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
            poisoned.append(path.name)
    return poisoned


def test_poisoned_greedy_branch_is_refused_by_validation(ort_export, tmp_path,
                                                         tmp_path_factory):
    """The onnxruntime export (its sampler takes the argmax alone, in an If branch, for
    greedy-only batches) filled the session's trace cache; a copy of it, poisoned and resealed,
    makes the next export fail validation (the greedy-only batch) instead of writing it."""
    cache = tmp_path / "cache"
    shutil.copytree(tmp_path_factory.getbasetemp() / "trace-cache", cache)
    assert _poison(cache), "no greedy-only If branch found in the cached pieces"
    with pytest.raises(ExportError, match="greedy-only batch"):
        export_folder(tmp_path / "out", TINY_REF, cache)
    assert not (tmp_path / "out").exists()
