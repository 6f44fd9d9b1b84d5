"""ONNX export: parity with the torch reference, fixture tokens through `run OUT`, structure."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from pipo_export import load_checkpoint
from pipo_export.onnx.check import check_export
from pipo_export.onnx.graph import op_types
from pipo_export.model.decoder import GenerateOptions, ReferenceDecoder
from pipo_export.onnx.graph import symbolic_dims
from pipo_export.onnx.graph import iter_graphs, weight_refs
from pipo_graphs import SamplingParams, step_uniforms
from pipo_graphs.manifest import load_manifest
from pipo_graphs.seal import write_sealed
from pipo_runtime import GenerationConfig, PipoSession

from conftest import TINY_REF, run_cli, run_json
from parity import OrtGraph, reference_step, validate_steps

# float32 export vs the torch reference run in float64; atol scales with each output's largest
# magnitude (validate.compare_outputs); ints and bools (tokens, masks, positions) must be equal.
ATOL = RTOL = 1e-4


def _feeds(vocab, pad, lengths, seed=0, threshold=(-1.0, 0.5, 0.3)):
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), max(lengths) + max(lengths) % 2), pad, np.int64)
    for r, n in enumerate(lengths):
        ids[r, :n] = rng.integers(0, vocab - 1, n)
    b = len(lengths)
    sampling = {"temperature": np.resize(np.array([0.0, 1.0, 0.7], np.float32), b),
                "top_k": np.resize(np.array([0, 20, 5]), b),
                "top_p": np.resize(np.array([1.0, 0.95, 0.9], np.float32), b),
                "min_p": np.resize(np.array([0.0, 0.0, 0.1], np.float32), b),
                "presence_penalty": np.resize(np.array([0.0, 1.5, 0.0], np.float32), b),
                "repetition_penalty": np.resize(np.array([1.0, 1.0, 1.3], np.float32), b),
                "threshold": np.resize(np.array(threshold, np.float32), b)}
    seqs = list(range(b))
    return ({"input_ids": ids, "lengths": np.array(lengths, np.int64), **sampling,
             "uniforms": step_uniforms(9, seqs, 0)}, sampling, lambda s: step_uniforms(9, seqs, s))


CASES = {"len1": [1], "len2": [2], "len11": [11], "len64": [64], "len261-three-chunks": [261],
         "batch3-mixed": [11, 2, 261], "batch3-skip-branch": [5, 64, 1]}


def _parity(folder, checkpoint, lengths, threshold=(-1.0, 0.5, 0.3)):
    model = load_checkpoint(checkpoint)
    step = reference_step(model)
    feeds, sampling, uniforms = _feeds(model.config.vocab_size, model.config.pad_token_id, lengths,
                                       threshold=threshold)
    pre = OrtGraph(folder / "prefill_compress.onnx")
    dec = OrtGraph(folder / "decode_unfold.onnx")
    report = validate_steps(step, pre, dec, feeds, 3, sampling, uniforms, ATOL, RTOL)
    bad = [(s, e) for s, errors in report for e in errors if not e.ok]
    assert not bad, bad[:3]
    return report


@pytest.mark.parametrize("case", CASES)
def test_trt_target_matches_torch(trt_export, case):
    thr = (1.0, 1.5, 2.0) if "skip" in case else (-1.0, 0.5, 0.3)
    _parity(trt_export, TINY_REF, CASES[case], thr)


@pytest.mark.parametrize("case", ["len11", "batch3-mixed", "batch3-skip-branch"])
def test_ort_target_matches_torch(ort_export, case):
    thr = (1.0, 1.5, 2.0) if "skip" in case else (-1.0, 0.5, 0.3)
    _parity(ort_export, TINY_REF, CASES[case], thr)


@pytest.mark.parametrize("case", ["len2", "len64", "batch3-mixed"])
def test_other_layout_matches_torch(layout_export, layout_checkpoint, case):
    _parity(layout_export, layout_checkpoint, CASES[case])


@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize("mode", ["free", "gate", "skip"])
def test_fixture_greedy_pairs_through_run(ort_export, expected, i, mode):
    tau = {"free": -1.0, "gate": float(expected[f"gate{i}"]), "skip": 1.0}[mode]
    ids = ",".join(str(t) for t in expected[f"prompt{i}"])
    out = run_json("run", str(ort_export), "--temperature", "0", "--ids", ids, "--max-steps",
                   "12", "--threshold", str(tau))
    assert out["pairs"] == expected[f"greedy{i}_{mode}"].tolist()


SAMPLED = SamplingParams(temperature=1.0, top_p=0.95, top_k=20, presence_penalty=1.5)


@pytest.mark.parametrize("threshold", [-1.0, 0.4])
def test_seeded_sampling_same_tokens_as_torch(trt_export, ref_model, threshold):
    prompts = [[5, 9, 13], list(range(100, 171))]
    torch_out = ReferenceDecoder(ref_model).generate(
        prompts, GenerateOptions(max_steps=16, threshold=threshold, sampling=SAMPLED, seed=11))
    onnx_out = PipoSession.load(trt_export).generate(prompts, GenerationConfig(
        max_steps=16, threshold=threshold, sampling=SAMPLED, seed=11)).sequences
    for a, b in zip(torch_out, onnx_out):
        assert a.pairs == b.pairs
        assert np.allclose(a.confidence, b.confidence, atol=1e-4)


def test_dynamic_dims_symbolic_if_present_weights_once(trt_export):
    manifest = load_manifest(trt_export)
    for graph in manifest.graphs.values():
        dims = symbolic_dims(trt_export / graph.file)
        for t in graph.inputs + graph.outputs:
            for d in t.shape:
                assert not isinstance(d, int) or d in dims[t.name]
            # every dim the contract leaves dynamic is a dim_param in the file
            assert dims[t.name][0] == "batch"
        assert "2*prompt_pairs" in dims.get("input_ids", ["2*prompt_pairs"])
    assert "If" in op_types(trt_export / "decode_unfold.onnx")
    assert "Scan" in op_types(trt_export / "prefill_compress.onnx")
    refs = weight_refs(trt_export / "prefill_compress.onnx") + weight_refs(
        trt_export / "decode_unfold.onnx")
    assert {loc for loc, _, _ in refs} == {"weights.data"}
    unique = set(refs)
    spans = sorted((off, off + n) for _, off, n in unique)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # stored spans never overlap
    # every weight above the fold limit is stored exactly once, in its original form; only
    # small tensors (shape arithmetic, < FOLD_LIMIT elements) may also appear folded
    from pipo_export.export.trace import FOLD_LIMIT
    big = sorted(p.numel() * 4 for p in set(load_checkpoint(TINY_REF).parameters())
                 if p.numel() > FOLD_LIMIT)
    assert sorted(n for _, _, n in unique if n > FOLD_LIMIT * 4) == big
    for path in ("prefill_compress.onnx", "decode_unfold.onnx"):
        model = onnx.load(str(trt_export / path), load_external_data=False)
        # inline constants of 1 KiB and more are only masks and index tables (bool/int),
        # never float data (a weight, or a weight folded into the graph)
        floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                  onnx.TensorProto.BFLOAT16)
        inline = [t.name for g in iter_graphs(model.graph) for t in g.initializer
                  if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= 1024
                  and t.data_type in floats]
        assert not inline


def test_check_passes_and_detects_corruption(trt_export, tmp_path):
    assert check_export(trt_export).ok
    bad = tmp_path / "bad"
    shutil.copytree(trt_export, bad)
    data = bytearray((bad / "weights.data").read_bytes())
    data[100] ^= 0xFF
    (bad / "weights.data").write_bytes(bytes(data))
    report = check_export(bad)
    assert not report.ok and "sha256" in report.checks[0][2]
    proc = run_cli("run", str(bad), "--ids", "1,2", check=False)
    assert proc.returncode == 2 and "does not match its sha256" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_cross_checks_resealed_model_facts(trt_export, tmp_path):
    """A manifest edited and resealed (so every checksum holds): model facts that disagree with
    the graphs fail `check`; ids outside the vocabulary fail at load, in one line."""
    bad = tmp_path / "bad"
    shutil.copytree(trt_export, bad)
    manifest = json.loads((trt_export / "manifest.json").read_text())
    manifest["model"]["head_dim"] *= 2
    write_sealed(bad / "manifest.json", json.dumps(manifest))
    report = check_export(bad)
    failed = [(n, d) for n, ok, d in report.checks if not ok]
    assert [n for n, _ in failed] == ["model facts (vocabulary, pad/eos ids, dims) agree with "
                                      "the states and graphs"], failed
    assert "state key.3" in failed[0][1] and "past.key.3" in failed[0][1]
    manifest["model"]["head_dim"] //= 2
    manifest["model"]["eos_token_ids"] = [7, manifest["model"]["vocab_size"]]
    write_sealed(bad / "manifest.json", json.dumps(manifest))
    proc = run_cli("check", str(bad), check=False)  # a folder the runtimes refuse: as `run`
    assert proc.returncode == 2 and "eos_token_ids [512] outside the vocabulary" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_manifest_describes_the_export(trt_export):
    m = json.loads((trt_export / "manifest.json").read_text())
    assert m["export"]["target"] == "tensorrt" and m["export"]["dtype"] == "float32"
    assert m["model"]["pad_token_id"] == 511 and m["model"]["compressor_type"] == "mlp"
    assert {s["name"] for s in m["states"]} >= {"key.3", "conv.0", "recurrent.0", "mtp_key",
                                                 "output_mask", "prompt_mask"}
    assert set(m["files"]) == {"prefill_compress.onnx", "decode_unfold.onnx", "weights.data"}
    v = m["export"]["validation"]
    assert v["compared"] > 0 and v["worst"]["error"] <= v["worst"]["limit"]
    for v in ("torch", "transformers", "onnx"):
        assert v in m["export"]["tool_versions"]


def test_tensorrt_target_passes_the_support_table(trt_export):
    from pipo_export.onnx.trt_support import MAX_OPSET, SUPPORTED_OPS, lint_model
    for path in ("prefill_compress.onnx", "decode_unfold.onnx"):
        model = onnx.load(str(trt_export / path), load_external_data=False)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= MAX_OPSET
        assert lint_model(model) == []
        assert op_types(trt_export / path) <= set(SUPPORTED_OPS)


def test_lint_flags_what_tensorrt_cannot_parse():
    from onnx import TensorProto, helper
    from pipo_export.onnx.trt_support import lint_model
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8000])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    i = helper.make_tensor_value_info("i", TensorProto.INT64, None)
    k = helper.make_tensor("k", TensorProto.INT64, [1], [5000])
    seq = helper.make_node("SplitToSequence", ["x"], ["s"])
    at = helper.make_node("SequenceAt", ["s", "zero"], ["x2"])
    zero = helper.make_tensor("zero", TensorProto.INT64, [], [0])
    topk = helper.make_node("TopK", ["x2", "k"], ["y", "i"])
    graph = helper.make_graph([seq, at, topk], "g", [x], [y, i], [k, zero])
    issues = lint_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    problems = " ".join(f"{i.op_type}: {i.problem}" for i in issues)
    assert "SplitToSequence" in problems and "3840" in problems
