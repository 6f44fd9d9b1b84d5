"""The manifest is written through the typed Manifest the runtimes read (issue 18): a misspelt
field fails in the constructor, a value of the wrong type in Manifest.dumps, and an export's
manifest.json is exactly what its Manifest serializes to."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pipo_graphs.manifest import MANIFEST, Manifest, ModelInfo, WeightsInfo, load_manifest

PLAIN = {"format": "pipo-export", "contract_version": "1.0",
         "model": {"vocab_size": 32, "hidden_size": 8, "layer_types": [],
                   "num_key_value_heads": 2, "head_dim": 4, "pad_token_id": 0,
                   "eos_token_ids": [], "compressor_type": "mlp", "max_context": 64},
         "export": {"dtype": "float32", "mode": "regular", "target": "onnxruntime",
                    "opset": 18, "sample_cap": 32, "tool_versions": {}},
         "graphs": {g: {"file": f"{g}.onnx", "inputs": [], "outputs": []}
                    for g in ("prefill_compress", "decode_unfold")},
         "weights": {"file": "weights.data", "tensors": 0, "bytes": 0},
         "states": [], "files": {}}


def test_misspelt_field_fails_in_the_constructor():
    model = Manifest.from_json(PLAIN).model
    with pytest.raises(TypeError, match="vocab_sise"):
        ModelInfo(**{**{k: getattr(model, k) for k in ("hidden_size", "layer_types",
                                                       "num_key_value_heads", "head_dim",
                                                       "pad_token_id", "eos_token_ids",
                                                       "compressor_type", "max_context")},
                     "vocab_sise": 32})


def test_wrong_type_fails_when_written():
    manifest = Manifest.from_json(PLAIN)
    manifest.model.max_context = "64"  # a str where the readers want an int
    with pytest.raises(ValueError, match="manifest.model.max_context"):
        manifest.dumps()
    manifest.model.max_context = 64
    manifest.weights = replace(manifest.weights, format="int3")
    with pytest.raises(ValueError, match="manifest.weights.format"):
        manifest.dumps()


def test_round_trip_and_optional_weight_fields():
    manifest = Manifest.from_json(PLAIN)
    assert manifest.weights.format == "float" and manifest.weights.quantized == []
    text = manifest.dumps()
    written = json.loads(text)["weights"]
    assert written == {"file": "weights.data", "tensors": 0, "bytes": 0, "format": "float"}
    assert Manifest.from_json(json.loads(text)) == manifest
    int4 = WeightsInfo(file="w", tensors=1, bytes=2, format="int4", bits=4, block_size=32,
                       symmetric=False, quantized=["a.weight"])
    back = WeightsInfo.from_json(int4.to_json())
    assert back == int4 and int4.to_json()["symmetric"] is False and "accuracy" not in \
        int4.to_json()


def test_export_writes_what_its_manifest_serializes_to(ort_export):
    manifest = load_manifest(ort_export)
    assert manifest.dumps() == (ort_export / MANIFEST).read_text()
