"""`export --weights int8|int4`: MatMulNBits graphs that run, the accuracy record in the
manifest, and exactly the tokens of an independent computation: the torch model with every
quantized weight replaced by its dequantized value (ONNX Runtime's quantizer, our inverse
checked against the kernel), run by the torch reference decoder."""
from __future__ import annotations

import json

import onnx
import pytest

from pipo_graphs.contract import TARGET_CAPS, Mode
from pipo_runtime import GenerationConfig, PipoSession

from conftest import TINY_REF, export_folder, run_cli

PROMPTS = [[5, 9, 13], list(range(100, 171))]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "trace-cache"
    root = tmp_path_factory.mktemp("quantized")
    # int4 with float activations (accuracy_level 0): the kernel then computes x @ dequant(W)
    # to float32 rounding, so the tokens can be compared exactly; int8 with the default level
    return {"int8": export_folder(root / "int8", TINY_REF, cache, weights="int8"),
            "int4": export_folder(root / "int4", TINY_REF, cache, weights="int4",
                                  accuracy_level=0),
            "int4-asym": export_folder(root / "int4-asym", TINY_REF, cache, weights="int4",
                                       accuracy_level=0, symmetric=False),
            # mixed precision: int4, the lm_head at 8 bits
            "int4-head8": export_folder(root / "int4-head8", TINY_REF, cache, weights="int4",
                                        accuracy_level=0, head_weights="int8")}


def _op_types(path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    ops = set()

    def walk(graph):
        for node in graph.node:
            ops.add(node.op_type)
            for attr in node.attribute:
                if attr.g.node:
                    walk(attr.g)
    walk(model.graph)
    return ops


@pytest.mark.parametrize("bits", ["int8", "int4", "int4-asym"])
def test_manifest_records_what_and_how_accurate(quantized, bits):
    manifest = json.loads((quantized[bits] / "manifest.json").read_text())
    w = manifest["weights"]
    assert w["format"] == bits[:4] and w["bits"] == int(bits[3]) and w["block_size"] == 32
    assert w["accuracy_level"] == (4 if bits == "int8" else 0)
    assert "model.layers.0.mlp.down_proj.weight" in w["quantized"]
    assert all("norm" not in name for name in w["quantized"])  # norms and biases stay float
    acc = w["accuracy"]
    assert acc["measured"] and acc["steps"] == 64 and acc["teacher_forced"]
    assert 0 <= acc["token1_agreement"] <= 1 and 0 <= acc["token2_agreement"] <= 1
    assert 0 < acc["kl"]["token1"]["mean"] <= acc["kl"]["token1"]["max"]  # quantization moves
    assert 0 <= acc["commit_rate_tau_0.5"] <= 1
    for graph in ("prefill_compress.onnx", "decode_unfold.onnx"):
        assert "MatMulNBits" in _op_types(quantized[bits] / graph)


@pytest.mark.parametrize("kind", ["int4", "int4-asym"])
def test_zero_points_stored_only_when_asymmetric(quantized, kind):
    symmetric = kind == "int4"
    assert json.loads((quantized[kind] / "manifest.json").read_text())["weights"]["symmetric"] \
        == symmetric
    model = onnx.load(str(quantized[kind] / "decode_unfold.onnx"), load_external_data=False)
    inputs = {len(n.input) for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert inputs == ({3} if symmetric else {4})  # A, B, scales (, zero points)


def _fake_quantized(names: list[str], spec, head_spec=None):
    """The tiny checkpoint in torch with each quantized weight W [out, in] replaced by
    dequantize(quantize(W^T))^T (the lm_head with head_spec when given); the tied table only on
    the lm_head side (the export's gather stays exact)."""
    import torch
    from pipo_export import load_checkpoint
    model = load_checkpoint(TINY_REF)

    def fq(w, s=spec):
        k = w.shape[1]
        return torch.from_numpy(s.dequantize(*s.quantize(w.detach().T.numpy()), k).T.copy())
    with torch.no_grad():
        for name in names:
            if name == "model.embed_tokens.weight":
                model.lm_head.weight = torch.nn.Parameter(fq(model.lm_head.weight,
                                                             head_spec or spec))
            else:
                model.get_parameter(name).copy_(fq(model.get_parameter(name)))
    return model


def test_mixed_precision_keeps_the_lm_head_at_8_bits(quantized):
    """--head-weights int8: the lm_head's MatMulNBits read 8-bit weights, every other one 4-bit,
    and the manifest records the exception."""
    w = json.loads((quantized["int4-head8"] / "manifest.json").read_text())["weights"]
    assert w["bits"] == 4 and w["bits_by_weight"] == {"model.embed_tokens.weight": 8}
    assert "bits_by_weight" not in json.loads((quantized["int4"] / "manifest.json").read_text()
                                              )["weights"]
    model = onnx.load(str(quantized["int4-head8"] / "decode_unfold.onnx"),
                      load_external_data=False)
    bits = {}

    def walk(graph):
        for node in graph.node:
            if node.op_type == "MatMulNBits":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                bits[node.input[1]] = attrs["bits"]
            for attr in node.attribute:
                if attr.g.node:
                    walk(attr.g)
    walk(model.graph)
    assert {v for k, v in bits.items() if "embed_tokens" in k} == {8}
    assert {v for k, v in bits.items() if "embed_tokens" not in k} == {4}


def test_head_weights_need_a_quantized_export(tmp_path):
    proc = run_cli("export", str(TINY_REF), "-o", str(tmp_path / "out"), "--head-weights", "int8",
                   check=False)
    assert proc.returncode == 2 and "needs --weights int8|int4" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["int4", "int4-asym", "int4-head8"])
def test_int4_tokens_equal_dequantized_torch(quantized, kind):
    """Greedy and sampled pairs of the int4 export equal the torch reference on the dequantized
    weights exactly (the lm_head at 8 bits for int4-head8); confidences within 1e-4 (float32
    summation order)."""
    from pipo_export.export.quantize import QuantSpec
    from pipo_export.model.decoder import GenerateOptions, ReferenceDecoder
    from pipo_graphs import SamplingParams
    w = json.loads((quantized[kind] / "manifest.json").read_text())["weights"]
    head = w.get("bits_by_weight", {}).get("model.embed_tokens.weight")
    model = _fake_quantized(w["quantized"], QuantSpec(4, w["block_size"], 0, w["symmetric"]),
                            QuantSpec(head, w["block_size"], 0, w["symmetric"]) if head else None)
    session = PipoSession.load(quantized[kind])
    for sampling in (SamplingParams(), SamplingParams(temperature=1.0, top_p=0.95, top_k=20)):
        want = ReferenceDecoder(model).generate(PROMPTS, GenerateOptions(
            max_steps=12, threshold=0.5, sampling=sampling, seed=3))
        got = session.generate(PROMPTS, GenerationConfig(max_steps=12, threshold=0.5,
                                                         sampling=sampling, seed=3)).sequences
        for a, b in zip(want, got):
            assert a.pairs == b.pairs
            assert max(abs(x - y) for x, y in zip(a.confidence, b.confidence)) < 1e-4


def test_int8_runs_and_checks(quantized):
    got = PipoSession.load(quantized["int8"]).generate(PROMPTS, GenerationConfig(max_steps=6))
    assert all(len(s.pairs) == 6 for s in got.sequences)
    assert "export OK" in run_cli("check", str(quantized["int8"])).stdout


def test_quantized_weights_need_a_capable_target(tmp_path):
    refused = [t.value for t, caps in TARGET_CAPS.items() if not caps.quantized_weights]
    assert refused == ["tensorrt"]
    proc = run_cli("export", str(TINY_REF), "-o", str(tmp_path / "out"), "--target", "tensorrt",
                   "--weights", "int4", check=False)
    assert proc.returncode == 2 and "needs --target onnxruntime" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_regular_mode_int4_exports_and_says_why_accuracy_is_not_measured(tmp_path):
    """`--mode regular --weights int4` (the peers bench's baseline) exports and runs; its manifest
    says why the accuracy record is missing (eval's code scores PIPO graphs). Before this, the
    accuracy step refused the regular graph and the export failed."""
    out = export_folder(tmp_path / "regular-int4", TINY_REF, tmp_path.parent / "trace-cache",
                        weights="int4", mode=Mode.REGULAR)
    acc = json.loads((out / "manifest.json").read_text())["weights"]["accuracy"]
    assert acc["measured"] is False and "PIPO" in acc["why"]
    got = PipoSession.load(out).generate(PROMPTS, GenerationConfig(max_steps=4))
    assert all(len(s.tokens) == 4 for s in got.sequences)
