"""`pipo-export compare` and `run` on exports: agreement, detected disagreement, bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from pipo_export.onnx.graph import iter_graphs
from pipo_graphs.errors import PipoUserError
from pipo_graphs.manifest import file_entries
from pipo_graphs.seal import write_sealed
from pipo_runtime import GenerationConfig, PipoSession

from conftest import run_cli


def test_compare_three_backends_agree(trt_export):
    """A standard-op export: every backend by default, onnx-reference included."""
    proc = run_cli("compare", str(trt_export), "--steps", "5", "--json")
    report = json.loads(proc.stdout)
    assert report["passed"] and report["reference"] == "torch"
    assert set(report["backends"]) == {"onnxruntime", "onnx-reference"}
    for name in ("onnxruntime", "onnx-reference"):
        b = report["backends"][name]
        assert b["first_diverging_step"] is None and len(b["steps"]) == 5
        assert all(s["tokens_agree"] and s["confidence_max_abs"] < 1e-3 for s in b["steps"])
        assert 0 < b["commit_rate"] <= 1


def test_compare_table_output(trt_export):
    out = run_cli("compare", str(trt_export), "--backends", "onnxruntime,onnx-reference",
                  "--steps", "3").stdout
    assert "compare PASSED" in out and "agree on every step" in out


def test_onnx_reference_refuses_contrib_ops(ort_export):
    """Asked for explicitly on a contrib-op export: one line, before any backend runs."""
    err = _user_error("compare", str(ort_export), "--backends", "onnxruntime,onnx-reference",
                      "--steps", "2")
    assert "ONNX Runtime contrib ops" in err and len(err.strip().splitlines()) == 1


def test_compare_defaults_to_backends_that_run_the_export(ort_export):
    from pipo_export.cli.compare import default_backends
    from pipo_graphs.manifest import load_manifest
    from pipo_runtime.backends import Backend
    report = json.loads(run_cli("compare", str(ort_export), "--steps", "2", "--json").stdout)
    assert report["passed"] and report["reference"] == "torch"
    assert set(report["backends"]) == {"onnxruntime"}  # no onnx-reference for contrib ops
    manifest = load_manifest(ort_export)
    manifest.export.source = str(ort_export / "moved-away")
    assert default_backends(manifest) == [Backend.ONNXRUNTIME]  # torch needs the checkpoint
    assert default_backends(manifest, checkpoint=str(ort_export)) == [Backend.TORCH,
                                                                      Backend.ONNXRUNTIME]


def _altered(src, dst, scale: float):
    """A copy of an export whose weights were changed after export (manifest re-hashed, so only
    a numerical comparison can notice)."""
    shutil.copytree(src, dst)
    data = np.fromfile(dst / "weights.data", dtype=np.uint8)
    rng = np.random.default_rng(0)
    model = onnx.load(str(dst / "decode_unfold.onnx"), load_external_data=False)
    for t in (t for g in iter_graphs(model.graph) for t in g.initializer):
        kv = {e.key: e.value for e in t.external_data}
        if t.data_type == onnx.TensorProto.FLOAT and "offset" in kv:
            span = slice(int(kv["offset"]), int(kv["offset"]) + int(kv["length"]))
            w = data[span].view(np.float32)
            w *= (1 + scale * rng.standard_normal(w.shape)).astype(np.float32)
    data.tofile(dst / "weights.data")
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"] = file_entries(dst, list(manifest["files"]))
    write_sealed(dst / "manifest.json", json.dumps(manifest, indent=2))
    return dst


def test_compare_fails_when_weights_altered(ort_export, tmp_path):
    bad = _altered(ort_export, tmp_path / "altered", 0.01)
    proc = run_cli("compare", str(bad), "--backends", "torch,onnxruntime", "--steps", "4",
                   "--json", check=False)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    b = report["backends"]["onnxruntime"]
    assert not report["passed"] and not b["passed"]
    assert max(s["confidence_max_abs"] for s in b["steps"]) > 1e-3 or b["first_diverging_step"] is not None


def _user_error(*args) -> str:
    """Run the CLI, expect exit 2 with a one-line message and no traceback; return stderr."""
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc.stderr


def _snapshot(folder):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())


@pytest.fixture()
def export_copy(ort_export, tmp_path):
    return shutil.copytree(ort_export, tmp_path / "export")


def test_bad_requests(export_copy, layout_export):
    before = _snapshot(export_copy)
    out = str(export_copy)
    assert "outside the vocabulary" in _user_error("run", out, "--ids", "5,9999")
    assert "context" in _user_error("run", out, "--ids", "5,6", "--max-steps", "20000")
    assert "tokenizer" in _user_error("run", out, "--prompt", "hello")
    assert "unknown ONNX Runtime provider 'nosuch'" in _user_error("run", out, "--ids", "5",
                                                                   "--providers", "nosuch")
    assert "invalid choice" in _user_error("run", out, "--ids", "5", "--backend", "nosuch")
    assert "unknown backend" in _user_error("compare", out, "--backends", "torch,nosuch")
    assert "at least one token" in _user_error("run", out, "--ids", "")
    assert "empty prompt" in _user_error("run", str(layout_export), "--prompt", "")
    assert _snapshot(export_copy) == before
    session = PipoSession.load(export_copy)
    for prompts in ([[]], [], [[5, -1]]):
        with pytest.raises(PipoUserError):
            session.generate(prompts, GenerationConfig(max_steps=2))
    with pytest.raises(PipoUserError, match="unknown backend"):
        PipoSession.load(export_copy, backend="nosuch")
    with pytest.raises(PipoUserError, match="max_steps or max_new_tokens"):
        session.generate([[5]], GenerationConfig())


def test_bad_export_folders(export_copy, tmp_path):
    out = str(export_copy)
    manifest = json.loads((export_copy / "manifest.json").read_text())

    wrong = dict(manifest, contract_version="2.0")
    write_sealed(export_copy / "manifest.json", json.dumps(wrong))
    assert "graph contract 2.0" in _user_error("run", out, "--ids", "5")
    write_sealed(export_copy / "manifest.json", json.dumps(manifest))

    original = (export_copy / "decode_unfold.onnx").read_bytes()
    shutil.copy(export_copy / "prefill_compress.onnx", export_copy / "decode_unfold.onnx")
    assert "decode_unfold.onnx does not match its sha256" in _user_error("run", out, "--ids", "5")
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    (export_copy / "decode_unfold.onnx").write_bytes(bytes(flipped))
    assert "sha256" in _user_error("run", out, "--ids", "5", "--backend", "onnx-reference")
    (export_copy / "decode_unfold.onnx").write_bytes(original)

    (export_copy / "weights.data").rename(tmp_path / "weights.data")
    assert "weights.data listed in the manifest is missing" in _user_error("run", out, "--ids", "5")
    (tmp_path / "weights.data").rename(export_copy / "weights.data")
    assert "no manifest.json" in _user_error("run", str(tmp_path), "--ids", "5",
                                             "--backend", "onnxruntime")
    assert json.loads(run_cli("run", out, "--ids", "5", "--json").stdout)["tokens"]
